"""Issue 15 odds and ends: atomic writes respect the umask; train-robust never restarts over a run."""
from __future__ import annotations

import os

import pytest

from cdp_fast import trades
from cdp_fast.utils import atomic_write_bytes, write_json


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_respects_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        write_json(tmp_path / "b.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as fh:  # what a plain open() gives
            fh.write("x")
    finally:
        os.umask(old)
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert plain == 0o666 & ~mask
    for name in ("a.bin", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain, name  # mkstemp alone gives 0600


def test_train_robust_refuses_to_restart_over_a_run(tmp_path):
    from cdp_fast.data import load_dataset

    data = load_dataset("digits", real_limit=40)
    cfg = trades.TrainRobustConfig(epochs=2, stop_after=1, batch_size=16, attack_steps=1, eval_attack_steps=1,
                                   val_size=0, limit_test=8, out=str(tmp_path), device="cpu")
    trades.train_robust(cfg, data=data, show_progress=False)
    state = (tmp_path / trades.STATE_FILE).read_bytes()
    cfg.stop_after = None
    # a rerun without --resume used to start again from epoch 1 and overwrite the partial run
    with pytest.raises(ValueError, match="--resume"):
        trades.train_robust(cfg, data=data, show_progress=False)
    assert (tmp_path / trades.STATE_FILE).read_bytes() == state
    cfg.resume = True
    assert trades.train_robust(cfg, data=data, show_progress=False)["epochs_done"] == 2


def test_skipped_diffusers_tests_are_announced():
    # the README's test command used to skip 34 diffusers-equivalence tests without a word
    import conftest

    class Report:
        def __init__(self, why):
            self.longrepr = ("tests/x.py", 1, f"Skipped: {why}")

    class Reporter:
        stats = {"skipped": [Report("could not import 'diffusers': No module named 'diffusers'")] * 2
                 + [Report("needs CUDA")]}
        lines: list[str] = []

        def write_line(self, line, **kw):
            self.lines.append(line)

    rep = Reporter()
    conftest.pytest_terminal_summary(rep)
    assert len(rep.lines) == 1 and "2 diffusers-equivalence tests" in rep.lines[0]
    assert "SKIPPED" in rep.lines[0] and ".[dev,interop]" in rep.lines[0]
    Reporter.stats = {"skipped": [Report("needs CUDA")]}
    rep.lines.clear()
    conftest.pytest_terminal_summary(rep)
    assert rep.lines == []
