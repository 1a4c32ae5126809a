"""The one `cdp-fast` CLI: subcommands, --help, --config files, the saved resolved config."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cdp_fast import config as cfgmod
from cdp_fast.cli import COMMANDS, _config_class, main


def test_help_lists_every_subcommand():
    r = subprocess.run([sys.executable, "-m", "cdp_fast.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in [*COMMANDS, "bench"]:
        assert name in r.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text and "--out" in text or "--json" in text


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_config_roundtrip(name, tmp_path):
    cls = _config_class(name)
    default = cls()
    path = cfgmod.save(default, tmp_path / "c.json")
    assert cfgmod.from_dict(cls, json.loads(path.read_text())) == default


def test_flags_override_config_file(tmp_path):
    from cdp_fast.pipeline import PipelineConfig

    f = tmp_path / "p.toml"
    f.write_text('n_synthetic = 7\nseeds = 3\n')
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    cfgmod.add_arguments(p, PipelineConfig)
    ns = p.parse_args(["--config", str(f), "--seeds", "2", "--no-head"])
    cfg = cfgmod.from_args(PipelineConfig, ns)
    assert (cfg.n_synthetic, cfg.seeds, cfg.head) == (7, 2, False)


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "bad.json"
    f.write_text('{"n_synthetic": 5, "no_such_option": 1}')
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--config", str(f)])
    assert e.value.code == 2
    assert "no_such_option" in capsys.readouterr().err


def test_bad_input_reports_error_not_traceback(tmp_path, capsys):
    rc = main(["eval", "--checkpoint", str(tmp_path / "missing"), "--json", str(tmp_path / "e.json")])
    assert rc == 2
    assert "missing" in capsys.readouterr().err


# --- issue 15: clean errors, typed config values, eps fractions, help texts, --version ------------
def test_version(capsys):
    from cdp_fast import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_states_each_default_once(name):
    # "(default: the dataset's model) (default: None)" and eval's "(default: '')" for a required flag
    import dataclasses

    cls = _config_class(name)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        text = cfgmod._help(f, default)
        assert text.count("(default:") <= 1, (f.name, text)
        if "default" in f.metadata.get("help", "").lower():
            assert not text.endswith(f"(default: {default!r})"), (f.name, text)
    if name == "eval":
        ck = next(f for f in dataclasses.fields(cls) if f.name == "checkpoint")
        assert cfgmod._help(ck, "").endswith("(required)")


def test_eps_accepts_fractions_and_refuses_above_one(tmp_path, capsys):
    import argparse

    from cdp_fast.pipeline import PipelineConfig

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    cfgmod.add_arguments(p, PipelineConfig)
    assert cfgmod.from_args(PipelineConfig, p.parse_args(["--eps", "8/255"])).eps == pytest.approx(8 / 255)
    f = tmp_path / "c.toml"
    f.write_text('eps = "8/255"\nscale = 3e3\n')
    assert cfgmod.from_args(PipelineConfig, p.parse_args(["--config", str(f)])).eps == pytest.approx(8 / 255)
    with pytest.raises(SystemExit):
        p.parse_args(["--eps", "8/0"])
    # --eps 8 used to train silently to 0% robust accuracy
    for cmd in (["pipeline"], ["train-robust"], ["eval", "--checkpoint", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--eps", "8", "--out" if cmd[0] != "eval" else "--json", str(tmp_path / "o")])
        assert e.value.code == 2
        assert "8/255" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    for name in ("pipeline", "train-robust", "eval"):
        eps_help = next(a.help for a in _parser(name)._actions if a.dest == "eps")
        assert "default" in eps_help and "8/255" in eps_help
    # one digits default for every command (issue 21: train-robust used 0.3, the pipeline 0.1)
    for name in ("pipeline", "train-robust", "eval"):
        assert "digits 0.1" in next(a.help for a in _parser(name)._actions if a.dest == "eps"), name


def _parser(name):
    import argparse

    p = argparse.ArgumentParser()
    cfgmod.add_arguments(p, _config_class(name))
    return p


def test_config_values_are_type_checked_and_dashed_keys_accepted(tmp_path, capsys):
    from cdp_fast.trades import TrainRobustConfig

    # lr = "0.1" used to end in a TypeError traceback deep inside the optimiser
    f = tmp_path / "bad.toml"
    f.write_text('lr = "0.1"\n')
    with pytest.raises(SystemExit) as e:
        main(["train-robust", "--config", str(f), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'lr'" in err and "number" in err and "Traceback" not in err
    for bad, word in (({"epochs": 2.5}, "integer"), ({"ema": "yes"}, "true or false"),
                      ({"optimizer": "adam"}, "one of"), ({"model": 3}, "string"), ({"epochs": None}, "value")):
        with pytest.raises(ValueError, match=word):
            cfgmod.from_dict(TrainRobustConfig, bad)
    # keys spelt like the flags (TOML and JSON)
    f = tmp_path / "dash.toml"
    f.write_text('synthetic-fraction = 0.25\nbatch-size = 32\n')
    cfg = cfgmod.from_dict(TrainRobustConfig, cfgmod.load_file(f))
    assert (cfg.synthetic_fraction, cfg.batch_size) == (0.25, 32)
    with pytest.raises(ValueError, match="twice"):
        cfgmod.from_dict(TrainRobustConfig, {"batch-size": 1, "batch_size": 2})


def _fake_run(monkeypatch, cmd, fn):
    import importlib

    monkeypatch.setattr(importlib.import_module(COMMANDS[cmd][0]), COMMANDS[cmd][2], fn)


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(cfg):
        (tmp_path / "o").mkdir()
        raise KeyboardInterrupt

    _fake_run(monkeypatch, "generate", interrupted)
    assert main(["generate", "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "interrupted — rerun the same command to resume" in err and "Traceback" not in err
    # the folder this run created gets its settings record, so the rerun is reproducible
    assert json.loads((tmp_path / "o" / "config.json").read_text())["out"] == str(tmp_path / "o")
    _fake_run(monkeypatch, "train-robust", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["train-robust", "--out", str(tmp_path / "t")]) == 130
    assert "--resume" in capsys.readouterr().err


def test_unwritable_out_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import errno
    import os

    # a path under a regular file (any user, root included, gets an OSError from the file system)
    (tmp_path / "file").write_text("x")
    from cdp_fast import models

    models.save(models.build("small-cnn", num_classes=10, in_channels=1, image_size=8), tmp_path / "ck")
    rc = main(["eval", "--checkpoint", str(tmp_path / "ck"), "--steps", "1", "--limit", "4", "--device", "cpu",
               "--json", str(tmp_path / "file" / "e.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "file" in err and "Traceback" not in err
    # a read-only file system (errno 30), as in the issue
    real = os.replace

    def read_only(src, dst, *a, **k):
        if str(dst).endswith(".json"):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", read_only)
    rc = main(["eval", "--checkpoint", str(tmp_path / "ck"), "--steps", "1", "--limit", "4", "--device", "cpu",
               "--json", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "Read-only file system" in err and "writable" in err and "Traceback" not in err


def test_data_dir_checks(tmp_path, monkeypatch, capsys):
    _fake_run(monkeypatch, "eval", lambda cfg: {})
    assert main(["eval", "--checkpoint", "x", "--data", "digits", "--data-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning: --data-dir" in err and "ignored" in err
    missing = tmp_path / "no" / "such"
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", "x", "--data", "mnist", "--data-dir", str(missing)])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists(), "a download created folders at a mistyped --data-dir"


def test_failed_rerun_keeps_the_config_record(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"seed": 0}\n')

    def failing(cfg):
        raise ValueError("boom")

    _fake_run(monkeypatch, "generate", failing)
    assert main(["generate", "--out", str(out), "--seed", "5"]) == 2
    assert (out / "config.json").read_text() == '{"seed": 0}\n'
    assert main(["generate", "--out", str(tmp_path / "new"), "--seed", "5"]) == 2
    assert not (tmp_path / "new").exists()
