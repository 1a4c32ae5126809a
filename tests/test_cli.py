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
