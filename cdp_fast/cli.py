"""The ``cdp-fast`` command line: one console script, one subcommand per job.

Each subcommand is a typed dataclass config (flags generated from its fields, ``--config FILE``
to read JSON/TOML) and a ``run(cfg)`` function; modules are imported only when their command
runs, so ``cdp-fast --help`` is instant. A command module may define ``resolve(cfg) -> cfg``: it
validates every setting (raising ValueError) and fills in the defaults actually used, before
anything runs or is written.

Errors a user can cause (bad settings, missing or unwritable files) print one line, not a
traceback; Ctrl-C says how to continue. ``config.json`` (the settings, reusable with
``--config``) is written when a command finishes, or when it stops after creating its output
folder, so a failed rerun never rewrites the record of the outputs already there.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from importlib import import_module
from pathlib import Path

from . import __version__
from . import config as _config

# name -> (module, config class, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "pipeline": ("cdp_fast.pipeline", "PipelineConfig", "run",
                 "the paper's experiment end to end (default: built-in digits, minutes on a CPU)"),
    "train-diffusion": ("cdp_fast.diffusion_train", "TrainDiffusionConfig", "run",
                        "train an epsilon-prediction UNet on real data"),
    "generate": ("cdp_fast.generate", "GenerateConfig", "run",
                 "sample a synthetic .npz set with DDIM or Contrastive-DP"),
    "train-robust": ("cdp_fast.trades", "TrainRobustConfig", "run",
                     "mixed-precision TRADES adversarial training on real (+ synthetic) data"),
    "eval": ("cdp_fast.evaluate", "EvalConfig", "run",
             "clean and robust accuracy of a checkpoint (PGD, CW, AutoAttack)"),
    "convert": ("cdp_fast.diffusion_train", "ConvertConfig", "convert",
                "a diffusers folder or original DDPM checkpoint -> a cdp-fast safetensors checkpoint"),
    "export": ("cdp_fast.export", "ExportConfig", "run_export",
               "synthetic shards -> one npz (image/label or the authors' arr_0/arr_1), streamed"),
    "select": ("cdp_fast.export", "SelectConfig", "run_select",
               "keep the best fraction of synthetic images (per class) by confidence, entropy, grad-norm, ..."),
    "simulate": ("cdp_fast.simulate", "SimulateConfig", "run",
                 "the paper's Gaussian theory: closed forms, Lemma 3 Monte Carlo, Figure 1"),
    "verify": ("cdp_fast.manifest", "VerifyConfig", "run",
               "check a generate folder against its manifest (cdp-fast verify OUT)"),
    "sweep": ("cdp_fast.sweep", "SweepConfig", "run",
              "guidance-scale study: the same noise across a grid of lambdas, measured and plotted"),
    "study": ("cdp_fast.study", "StudyConfig", "run",
              "the paper's MNIST protocol (Figure 3): real counts x DDIM / Contrastive-DP, guidance chosen on validation"),
}


def _config_class(name: str):
    mod, cls, _, _ = COMMANDS[name]
    return getattr(import_module(mod), cls)


def build_parser(load_configs: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdp-fast",
        description="Contrastive-guided diffusion (Contrastive-DP) at GPU speed: synthetic data, "
                    "a fast DDIM sampler, TRADES training and honest benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"cdp-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", default=None, help="JSON or TOML file of settings (flags win)")
        if load_configs:
            _config.add_arguments(p, _config_class(name))
    b = sub.add_parser("bench", help="kernel and end-to-end benchmarks (see --help)", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _config_path(cfg) -> Path | None:
    if getattr(cfg, "out", None):
        out = Path(cfg.out)  # a file output (export's FILE.npz) gets its config beside it
        return out.with_name(out.name + ".config.json") if out.suffix == ".npz" else out / "config.json"
    if getattr(cfg, "json", None):
        return Path(str(cfg.json) + ".config.json")
    return None


# What to do after Ctrl-C, per command (the default: the command resumes where it stopped).
_RESUME_HINT = {
    "train-robust": "rerun the same command with --resume to continue from the last finished epoch",
    "eval": "rerun the same command (evaluation starts again from the beginning)",
    "simulate": "rerun the same command (it starts again from the beginning)",
    "train-diffusion": "rerun the same command with --resume to continue from the last --save-every "
                       "checkpoint (without --save-every: with --force, training starts again)",
}


def _common_checks(cfg) -> list[str]:
    """Checks every command shares (eps range, --data-dir); returns warnings, raises ValueError."""
    if hasattr(cfg, "eps"):
        _config.check_eps(cfg.eps)
    if hasattr(cfg, "data") and hasattr(cfg, "data_dir"):
        return _config.check_data_dir(cfg.data, cfg.data_dir)
    return []


def _os_error(e: OSError) -> str:
    """One line for an OSError: what failed on which file, and what to do for the usual causes."""
    if e.errno is None or not e.filename:
        return str(e)  # our own FileNotFoundErrors carry a full message
    msg = f"{e.strerror or e}: {e.filename}"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        msg += " (choose a writable --out, or fix the folder's permissions)"
    elif e.errno == errno.ENOSPC:
        msg += " (the disk is full; free space, then rerun the same command to resume)"
    return msg


def _stamp(path: Path | None):
    try:
        return None if path is None else path.stat().st_mtime_ns
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":  # `torchrun ... -m cdp_fast -- generate ...`: the separator is not a command
        argv = argv[1:]
    if argv and argv[0] == "bench":
        return int(import_module("cdp_fast.benchmarks.__main__").main(argv[1:]) or 0)
    # Only the chosen subcommand's module is imported.
    cmd = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(load_configs=False)
    if cmd is None:
        parser.parse_args(argv)  # prints help / version / errors for unknown commands
        parser.print_help()
        return 0 if not argv else 2
    if cmd == "verify" and len(argv) > 1 and not argv[1].startswith("-"):
        argv[1:2] = ["--folder", argv[1]]  # `cdp-fast verify OUT`
    cls = _config_class(cmd)
    p = argparse.ArgumentParser(prog=f"cdp-fast {cmd}", description=COMMANDS[cmd][3])
    p.add_argument("--config", default=None, help="JSON or TOML file of settings (flags win)")
    _config.add_arguments(p, cls)
    pos = getattr(cls, "POSITIONAL", None)  # e.g. `cdp-fast convert PATH`: PATH fills that field
    if pos:
        p.add_argument("_positional", nargs="?", default=None, metavar=pos.upper(), help=f"same as --{pos}")
    ns = p.parse_args(argv[1:])
    if pos and ns._positional is not None:
        setattr(ns, pos, ns._positional)


    mod = import_module(COMMANDS[cmd][0])
    try:
        cfg = _config.from_args(cls, ns)
        warnings = _common_checks(cfg)
        if hasattr(mod, "resolve"):  # every setting of every stage, before anything runs
            cfg = mod.resolve(cfg)
    except (ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    for w in warnings:
        print(f"cdp-fast {cmd}: warning: {w}", file=sys.stderr)
    path = _config_path(cfg)
    existed = path is not None and path.parent.exists()
    stamp = _stamp(path)
    run = getattr(mod, COMMANDS[cmd][2])
    t0 = time.perf_counter()
    finished = False
    try:
        result = run(cfg)
        finished = True
    except KeyboardInterrupt:
        print(f"\ncdp-fast {cmd}: interrupted — "
              f"{_RESUME_HINT.get(cmd, 'rerun the same command to resume')}", file=sys.stderr)
        return 130
    except OSError as e:  # FileNotFoundError, read-only or full disk, permissions
        print(f"cdp-fast {cmd}: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"cdp-fast {cmd}: error: {e}", file=sys.stderr)
        return 2
    finally:
        # the record of the settings: after success, or when this run created the folder; never
        # over a config.json the command wrote itself (a diffusion checkpoint's metadata). A --force
        # run that deleted the old record gets a new one.
        if path is not None and _stamp(path) in (stamp, None) and (finished or (not existed and path.parent.is_dir())):
            try:
                _config.save(cfg, path)
            except OSError as e:
                print(f"cdp-fast {cmd}: warning: could not write {path}: {_os_error(e)}", file=sys.stderr)
    if isinstance(result, dict):
        summary = {k: v for k, v in result.items() if not isinstance(v, (list, dict)) or k in ("arms",)}
        print(json.dumps(summary, indent=2, default=str))
    print(f"cdp-fast {cmd}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
