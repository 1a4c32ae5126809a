"""Issue 21, items 3-4 and the CLI items: one no-overwrite rule (refused without --force, replaced
cleanly with it), train-diffusion's --resume / batch-size / --config, convert, export, select,
incomplete sets, the leading `--`, --num-images and the messages."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from cdp_fast import utils
from cdp_fast.cli import main
from cdp_fast.data import load_synthetic, save_synthetic
from cdp_fast.diffusion_train import load_diffusion

TD = ["train-diffusion", "--data", "digits", "--real-limit", "20", "--iters", "2", "--batch-size", "4",
      "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny trainings on shared, loaded CI cores run many times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _refused(capsys, argv, *words):
    """Exit 2 with these words: from the settings check (argparse exit) or from the run."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# ---------------------------------------------------------------------------------------------
def test_check_output_rule(tmp_path, monkeypatch):
    assert utils.check_output(tmp_path / "new") is False
    (tmp_path / "empty").mkdir()
    assert utils.check_output(tmp_path / "empty") is False
    res = tmp_path / "res"
    res.mkdir()
    (res / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--out .*res already holds .*config.json.*--force"):
        utils.check_output(res)
    assert utils.check_output(res, force=True) is True
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("x")
    with pytest.raises(ValueError, match="does not look like a cdp-fast output"):
        utils.check_output(other, force=True)
    monkeypatch.chdir(res)
    with pytest.raises(ValueError, match="current"):
        utils.check_output(res, force=True)
    with pytest.raises(ValueError, match="current"):
        utils.check_output(tmp_path, force=True)  # above the current folder
    f = tmp_path / "x.npz"
    f.write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        utils.check_output(f, is_file=True)
    assert utils.check_output(f, is_file=True, force=True)


def test_train_diffusion_refuses_then_force_replaces_cleanly(tmp_path, capsys):
    out = tmp_path / "dm"
    assert main([*TD, "--out", str(out)]) == 0
    (out / "stale-from-old-run.json").write_text("{}")
    before = _files(out)
    _refused(capsys, [*TD, "--out", str(out), "--seed", "1"], "already holds", "--force")
    assert _files(out) == before  # untouched
    assert main([*TD, "--out", str(out), "--seed", "1", "--force"]) == 0
    assert not (out / "stale-from-old-run.json").exists()  # replaced, not mixed
    assert load_diffusion(out)[2]["seed"] == 1
    # --force never travels in the recorded settings (replaying them must not delete anything)
    assert "force" not in json.loads((out / "train_config.json").read_text())


def test_train_diffusion_batch_larger_than_the_data_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "dm"
    rc = main([*TD[:-4], "--batch-size", "100000", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--batch-size 100000 is larger than the 20 training images" in err, err
    assert not out.exists()


def test_train_diffusion_config_repeats_from_its_own_output(tmp_path, capsys):
    out = tmp_path / "dm"
    assert main([*TD, "--out", str(out), "--seed", "3"]) == 0
    capsys.readouterr()
    # the checkpoint's config.json records the command's settings: --config takes them
    _refused(capsys, ["train-diffusion", "--config", str(out / "config.json")], "already holds")
    out2 = tmp_path / "dm2"
    assert main(["train-diffusion", "--config", str(out / "config.json"), "--out", str(out2)]) == 0
    assert load_diffusion(out2)[2]["seed"] == 3 and load_diffusion(out2)[2]["real_images"] == 20
    a, b = (out / "model.safetensors").read_bytes(), (out2 / "model.safetensors").read_bytes()
    assert a == b


def test_train_diffusion_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    import cdp_fast.diffusion_train as dt

    args = ["train-diffusion", "--data", "digits", "--real-limit", "24", "--iters", "6", "--batch-size", "4",
            "--save-every", "2", "--log-every", "3", "--device", "cpu", "--warmup", "2"]
    full = tmp_path / "full"
    assert main([*args, "--out", str(full)]) == 0
    part = tmp_path / "part"
    real, calls = dt.ema_update, []

    def dies_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(dt, "ema_update", dies_at_step_5)
    assert main([*args, "--out", str(part)]) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(dt, "ema_update", real)
    assert json.loads((part / "config.json").read_text())["iters"] == 4  # the step-4 checkpoint
    _refused(capsys, [*args, "--out", str(part)], "already holds")  # a plain rerun would replace it
    _refused(capsys, [*args, "--out", str(part), "--resume", "--seed", "1"], "seed")
    resumed = []
    monkeypatch.setattr(dt, "ema_update", lambda *a, **k: (resumed.append(1), real(*a, **k)))
    assert main([*args, "--out", str(part), "--resume"]) == 0
    assert len(resumed) == 2  # steps 5 and 6 only: continued, not restarted
    assert (part / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    for name in ("metrics.json",):
        assert (part / name).read_text() == (full / name).read_text()
    _refused(capsys, [*args, "--out", str(tmp_path / "none"), "--resume"], "train_state.pt")


def test_convert_refuses_a_model_folder_and_force_leaves_no_stale_metrics(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "dm"
    assert main([*TD, "--out", str(src), "--seed", "1"]) == 0
    assert main([*TD, "--out", str(out)]) == 0
    before = _files(out)
    _refused(capsys, ["convert", str(src), "--out", str(out)], "already holds", "--force")
    assert _files(out) == before
    assert main(["convert", str(src), "--out", str(out), "--force"]) == 0
    assert not (out / "metrics.json").exists() and not (out / "train_config.json").exists()
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    _refused(capsys, ["convert", str(src), "--out", str(src), "--force"], "would hold the input")


# ---------------------------------------------------------------------------------------------
def _set(folder, n_shards=2, per=4, *, manifest=True, complete=True):
    """A generate-like folder: shards with confidence, and (optionally) a manifest listing them."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n_shards):
        name = f"shard-{i:05d}.npz"
        save_synthetic(folder / name, rng.integers(0, 256, (per, 1, 8, 8), dtype=np.uint8),
                       np.arange(per) % 2, confidence=rng.random(per).astype(np.float32))
        recs.append({"file": name, "index": i, "images": per})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps(
            {"format": "cdp-fast-shards/1", "fingerprint": "f", "n": n_shards * per + (0 if complete else per),
             "batch_size": per, "num_shards": n_shards + (0 if complete else 1), "complete": complete,
             "images": n_shards * per, "shards": recs}))
    return folder


def test_export_refuses_existing_file_force_replaces(tmp_path, capsys):
    syn = _set(tmp_path / "syn")
    out = tmp_path / "set.npz"
    assert main(["export", str(syn), "--out", str(out)]) == 0
    before = out.read_bytes()
    _refused(capsys, ["export", str(syn), "--out", str(out), "--format", "authors"], "already exists", "--force")
    assert out.read_bytes() == before
    assert main(["export", str(syn), "--out", str(out), "--format", "authors", "--force"]) == 0
    with np.load(out) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]


def test_export_mode_and_suffix_rule(tmp_path):
    syn = _set(tmp_path / "syn")
    old = os.umask(0o022)
    try:
        assert main(["export", str(syn), "--out", str(tmp_path / "name")]) == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["name.npz", "name.npz.config.json", "syn"]
    mode = stat.S_IMODE((tmp_path / "name.npz").stat().st_mode)
    assert mode == stat.S_IMODE((syn / "shard-00000.npz").stat().st_mode) == 0o644


def test_select_refuses_then_force_replaces_without_stale_shards(tmp_path, capsys):
    syn = _set(tmp_path / "syn", n_shards=3)
    out = tmp_path / "sel"
    assert main(["select", str(syn), "--keep", "0.5", "--out", str(out)]) == 0
    assert (out / "shard-00002.npz").exists()
    (out / "notes-left-by-old-run.txt").write_text("x")
    before = _files(out)
    _refused(capsys, ["select", str(syn), "--keep", "0.5", "--out", str(out)], "already holds", "--force")
    assert _files(out) == before
    syn2 = _set(tmp_path / "syn2", n_shards=1)
    assert main(["select", str(syn2), "--keep", "0.5", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "selection.json", "shard-00000.npz"]


def test_select_keep_out_of_range_names_the_flag(tmp_path, capsys):
    syn = _set(tmp_path / "syn")
    _refused(capsys, ["select", str(syn), "--keep", "1.5", "--out", str(tmp_path / "s")], "--keep", "1.5")
    _refused(capsys, ["select", str(syn), "--criterion", "entropy", "--out", str(tmp_path / "s")], "--classifier")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("problem", ["incomplete", "stray"])
def test_incomplete_or_stray_sets_are_read_with_a_warning(tmp_path, capsys, problem):
    syn = _set(tmp_path / "syn", complete=problem != "incomplete")
    if problem == "stray":
        save_synthetic(syn / "shard-00007.npz", np.zeros((4, 1, 8, 8), np.uint8), np.zeros(4, np.int64),
                       confidence=np.ones(4, np.float32))
    want = "incomplete set" if problem == "incomplete" else "does not list (shard-00007.npz)"
    capsys.readouterr()
    load_synthetic(syn)  # train-robust --synthetic (memory store)
    assert want in capsys.readouterr().err
    from cdp_fast.data.synthetic import consolidate_synthetic

    consolidate_synthetic(syn, cache_dir=tmp_path / "cache")  # the lazy store
    assert want in capsys.readouterr().err
    assert main(["export", str(syn), "--out", str(tmp_path / "e.npz")]) == 0
    assert f"cdp-fast export: warning: {syn}" in capsys.readouterr().err
    assert main(["select", str(syn), "--out", str(tmp_path / "s")]) == 0
    assert want in capsys.readouterr().err
    clean = _set(tmp_path / "clean")
    load_synthetic(clean)
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
def test_leading_double_dash_and_num_images(tmp_path, capsys):
    rc = main(["--", "verify", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2 and "invalid choice" not in err and "is not a folder" in err
    import argparse

    from cdp_fast import config as _config
    from cdp_fast.generate import GenerateConfig

    p = argparse.ArgumentParser()
    _config.add_arguments(p, GenerateConfig)
    assert _config.from_args(GenerateConfig, p.parse_args(["--num-images", "7"])).n == 7
    assert _config.from_args(GenerateConfig, p.parse_args(["--n", "8"])).n == 8


def test_torchrun_does_not_eat_num_images():
    """torchrun's parser (prefix matching on) passes --num-images to the script; --n it would take."""
    run = pytest.importorskip("torch.distributed.run")
    args = run.get_args_parser().parse_args(["-m", "cdp_fast", "generate", "--num-images", "5"])
    assert args.training_script_args == ["generate", "--num-images", "5"]
    with pytest.raises(SystemExit):  # the failure: "ambiguous option: --n could match --nnodes, ..."
        run.get_args_parser().parse_args(["-m", "cdp_fast", "generate", "--n", "5"])


class Obj:
    pass


def test_pickle_refusal_does_not_advise_weights_only_false(tmp_path):
    from cdp_fast.models.checkpoint import read_file

    f = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1), "o": Obj()}, f)
    with pytest.raises(ValueError) as e:
        read_file(f)
    msg = str(e.value)
    assert "refused" in msg and "Obj" in msg
    assert "weights_only" not in msg and "will likely succeed" not in msg
