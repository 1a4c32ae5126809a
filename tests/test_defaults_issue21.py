"""Issue 21: defaults that train nothing, fp32 attacks by default, train-robust / eval input handling.

Each test reproduces a reported mistake: digits' train-robust defaults (eps 0.3, SGD 0.3) ended at
10.0% after 3 epochs; eval attacked in bf16 on CUDA; a bad --model / --batch-size / --val-size left
a config.json behind; --resume took a changed eps / beta / lr; eval --json to an unwritable path
ran the whole evaluation and lost it; eval could not read an external .pt and ignored the
checkpoint's training eps.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from cdp_fast import cli, models, trades
from cdp_fast.data import DATASETS, defaults_for
from cdp_fast.evaluate import EvalConfig, evaluate, run
from cdp_fast.trades import TrainRobustConfig
from cdp_fast.training import resolve_eval_precision, resolve_precision


# ---- item 5: the defaults train a model --------------------------------------------------------
def test_digits_defaults_at_the_readme_quick_budget_train_well_above_chance(tmp_path):
    """`cdp-fast train-robust --data digits --epochs 3` (the README's quick budget; only the test
    split is cut to 180 images to keep the test short). The old defaults gave 10.0% / 10.0%."""
    d = defaults_for("digits")
    assert d.quick == "--epochs 3"
    r = trades.train_robust(TrainRobustConfig(data="digits", epochs=3, limit_test=180, out=str(tmp_path)),
                            show_progress=False)
    assert (r["eps"], r["optimizer"], r["lr"]) == (d.eps, d.optimizer, d.lr)
    assert not r["at_chance"] and r["clean_acc"] >= 0.3, r
    assert r["robust_acc"] > r["chance_acc"] + 0.05, r


def test_a_run_at_chance_says_so_loudly(tmp_path, capsys):
    # digits' former defaults (eps 0.3, SGD 0.3) at a tiny budget: the zero-initialised head never moves
    r = trades.train_robust(TrainRobustConfig(data="digits", real_limit=64, epochs=1, batch_size=32, eps=0.3,
                                              optimizer="sgd", lr=0.3, attack_steps=1, eval_attack_steps=1,
                                              val_size=16, limit_test=40, out=str(tmp_path), device="cpu"),
                            show_progress=False)
    assert r["at_chance"] and "at chance" in r["warning"]
    assert "WARNING" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["at_chance"] is True
    assert json.loads((tmp_path / "metrics.json").read_text())[-1]["val_at_chance"] is True
    y = torch.tensor([0] * 60 + [1] * 40)
    assert trades.chance_level(y, 2) == 0.6
    assert trades.at_chance(0.6, y, 2) and trades.at_chance(0.7, y, 2) and not trades.at_chance(0.9, y, 2)


# ---- item 6: attacks in fp32 by default --------------------------------------------------------
def test_attacks_default_to_fp32_on_every_device(tmp_path):
    # training keeps bf16 on CUDA; evaluation and AutoAttack do not (it used to be bf16 on CUDA)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    for dev in ("cuda", "cpu"):
        assert resolve_eval_precision("auto", torch.device(dev)) == "fp32"
    assert resolve_eval_precision("bf16", torch.device("cuda")) == "bf16"  # asked for explicitly
    assert EvalConfig.__dataclass_fields__["precision"].default == "auto"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    x, y = torch.randint(0, 256, (5, 1, 2, 2), dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 1])
    for attack in ("pgd", "autoattack"):
        r = evaluate(model, x, y, eps=0.1, attack=attack, steps=1, aa_iters=1, device="cpu", show_progress=False)
        assert r["precision"] == "fp32"
    # train-robust: validation and test attacks in fp32 although training runs in bf16
    seen = []
    real = trades.evaluate

    def spy(*a, **k):
        seen.append(k["precision"])
        return real(*a, **k)

    import unittest.mock as mock

    with mock.patch.object(trades, "evaluate", spy):
        r = trades.train_robust(TrainRobustConfig(data="digits", real_limit=40, epochs=1, batch_size=16,
                                                  attack_steps=1, eval_attack_steps=1, val_size=8, limit_test=8,
                                                  precision="bf16", out=str(tmp_path), device="cpu"),
                                show_progress=False)
    assert r["precision"] == "bf16" and r["eval_precision"] == "fp32" and seen == ["fp32", "fp32"]


# ---- train-robust: bad settings fail before anything is written --------------------------------
@pytest.mark.parametrize("flags,match", [
    (["--model", "resnet9000"], "resnet9000"),
    (["--batch-size", "100000"], "batch-size"),
    (["--real-limit", "20", "--val-size", "50"], "val-size"),
    (["--beta", "-1"], "--beta must be"),
])
def test_train_robust_bad_settings_write_nothing(tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    args = ["train-robust", "--data", "digits", "--epochs", "1", "--out", str(out)] + flags
    try:
        rc = cli.main(args)
    except SystemExit as e:  # argparse's error exit
        rc = e.code
    assert rc == 2 and match in capsys.readouterr().err
    assert not out.exists(), "a failed run created its --out folder (and config.json)"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    try:
        rc = cli.main(args)
    except SystemExit as e:
        rc = e.code
    assert rc == 2 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---- train-robust --resume repeats the recorded settings ----------------------------------------
def test_resume_refuses_changed_training_settings(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train-robust", "--data", "digits", "--real-limit", "48", "--epochs", "2", "--batch-size", "16",
            "--attack-steps", "1", "--eval-attack-steps", "1", "--val-size", "8", "--limit-test", "8",
            "--device", "cpu", "--out", str(out)]
    assert cli.main(base + ["--stop-after", "1"]) == 0
    config = (out / "config.json").read_text()
    state = (out / trades.STATE_FILE).read_bytes()
    for flags, names in ((["--eps", "0.2"], ["eps", "step_size"]), (["--beta", "3"], ["beta"]),
                         (["--lr", "0.01", "--optimizer", "sgd"], ["lr", "optimizer"])):
        capsys.readouterr()
        assert cli.main(base + ["--resume"] + flags) == 2
        err = capsys.readouterr().err
        for n in names:
            assert f"{n} " in err and "recorded" in err, (n, err)
        assert (out / "config.json").read_text() == config, "a refused resume rewrote config.json"
        assert (out / trades.STATE_FILE).read_bytes() == state
    # what may change: log_every, stop_after, device
    assert cli.main(base + ["--resume", "--log-every", "3"]) == 0
    assert json.loads((out / "results.json").read_text())["epochs_done"] == 2


# ---- eval --------------------------------------------------------------------------------------
def _checkpoint(folder, **config):
    torch.manual_seed(0)
    m = models.build("small-cnn", num_classes=10, in_channels=1, image_size=8)
    nn.init.normal_(m.head.weight, std=0.1)
    models.save(m, folder, **config)
    return m


def test_eval_checks_the_json_path_first_and_always_prints_the_metrics(tmp_path, monkeypatch, capsys):
    _checkpoint(tmp_path / "ck")
    (tmp_path / "file").write_text("x")
    calls = []
    monkeypatch.setattr(models, "load", lambda *a, **k: calls.append(1))
    for bad in (tmp_path / "file" / "eval.json", tmp_path):  # under a file; a folder
        with pytest.raises(ValueError, match="--json"):
            run(EvalConfig(checkpoint=str(tmp_path / "ck"), data="digits", json=str(bad), device="cpu"))
    assert not calls, "the evaluation started before the --json path was checked"
    monkeypatch.undo()
    import cdp_fast.evaluate as ev

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", "eval.json")

    monkeypatch.setattr(ev, "write_json", full_disk)
    with pytest.raises(OSError):
        run(EvalConfig(checkpoint=str(tmp_path / "ck"), data="digits", steps=1, limit=6,
                       json=str(tmp_path / "eval.json"), device="cpu"))
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 6 and "robust_acc" in printed


def test_eval_external_pt_with_arch_and_the_checkpoints_eps(tmp_path, capsys):
    m = _checkpoint(tmp_path / "ck", data="digits", eps=0.2, trained_with="trades")
    torch.save({"model_state_dict": m.state_dict()}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="--arch"):
        run(EvalConfig(checkpoint=str(tmp_path / "w.pt"), data="digits", device="cpu"))
    ext = run(EvalConfig(checkpoint=str(tmp_path / "w.pt"), arch="small-cnn", data="digits", steps=1, limit=20,
                         device="cpu"))
    own = run(EvalConfig(checkpoint=str(tmp_path / "ck"), data="digits", steps=1, limit=20, device="cpu",
                         eps=defaults_for("digits").eps))
    assert ext["clean_acc"] == own["clean_acc"] and ext["eps"] == defaults_for("digits").eps
    assert "digits default" in ext["eps_source"]
    capsys.readouterr()
    trained = run(EvalConfig(checkpoint=str(tmp_path / "ck"), data="digits", steps=1, limit=20, device="cpu"))
    assert trained["eps"] == 0.2 and "training eps" in trained["eps_source"]
    assert "eps 0.2 (the checkpoint's training eps" in capsys.readouterr().err


def test_readme_states_the_defaults_of_the_one_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in DATASETS:
        d = defaults_for(name)
        row = next((line for line in readme.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, name
        assert d.optimizer in row and f"{d.attack_steps}" in row and d.quick.split(" (")[0] in row, (name, row)
