"""Small shared helpers: device choice, seeding, progress bars, atomic file writes, settings
fingerprints."""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress(iterable=None, *, total=None, desc: str = "", disable: bool | None = None, **kw):
    """tqdm progress bar; quiet when CDP_FAST_QUIET=1 (tests) unless disable is given."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = os.environ.get("CDP_FAST_QUIET", "0") == "1"
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True,
                file=sys.stderr, **kw)


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temp file + rename so a crash never leaves a half-written file behind.

    The file gets the permissions a plain ``open(path, "w")`` would (0666 minus the umask):
    mkstemp makes its temp file 0600, which would leave outputs unreadable to colleagues.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def settings_fingerprint(settings: dict, length: int = 16) -> str:
    """Short sha256 of a settings dict (key order and JSON-unfriendly values don't matter): the one
    cache key of ``pipeline`` stages and of ``generate`` folders."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ------------------------------------------------------------------------------------------------
# The one no-overwrite rule of every command: an output that holds an earlier result is refused
# unless --force (or a command's own resume) says so; --force replaces it cleanly (the old files
# are removed, never mixed with the new ones). Checked read-only before any work.
# ------------------------------------------------------------------------------------------------
# Files that mark a folder as a cdp-fast result: --force deletes only folders holding one of them.
RESULT_MARKERS = ("config.json", "generate.json", "manifest.json", "selection.json", "model.safetensors",
                  "train_config.json", "metrics.json", "summary.json", "results.json", "train_state.pt")


def _listing(p: Path, k: int = 5) -> str:
    names = sorted(os.listdir(p))
    return ", ".join(names[:k]) + (f", ... ({len(names)} entries)" if len(names) > k else "")


def check_output(out, *, force: bool = False, what: str = "an earlier result", flag: str = "--out",
                 is_file: bool = False, ignore: tuple[str, ...] = ()) -> bool:
    """The no-overwrite rule, read-only (call it before any work). Returns True when ``out`` holds
    an earlier result that ``--force`` replaces (then call :func:`replace_output` right before the
    first write), False when ``out`` is free. Raises ValueError when ``out`` holds a result and
    ``force`` is False, or when --force could not safely remove it (not a cdp-fast output, or the
    current / home folder). ``is_file``: the output is one file (export's npz). ``ignore``: entries
    that do not count as a result (an empty folder is free)."""
    p = Path(out)
    if is_file:
        if p.is_dir():
            raise ValueError(f"{flag} {p} is a folder; give a file name")
        if not p.exists():
            return False
        if not force:
            raise ValueError(f"{flag} {p} already exists ({what}); choose a new {flag}, "
                             f"or pass --force to replace it")
        return True
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p} exists and is not a folder")
    if not p.is_dir() or not [e for e in os.listdir(p) if e not in ignore]:
        return False
    if not force:
        raise ValueError(f"{flag} {p} already holds {what} ({_listing(p)}); choose a new {flag}, or pass "
                         f"--force to replace it (its files are deleted first)")
    r = p.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if r == Path(r.anchor) or r in (cwd, home) or r in cwd.parents:
        raise ValueError(f"--force will not delete {p}: it is the current, home or root folder or above "
                         f"them; choose another {flag}")
    if not any((p / m).exists() for m in RESULT_MARKERS):
        raise ValueError(f"--force will not delete {p}: it does not look like a cdp-fast output (none of "
                         f"{', '.join(RESULT_MARKERS[:4])}, ...); remove it yourself or choose another {flag}")
    return True


def replace_output(out, *, is_file: bool = False) -> None:
    """Remove the earlier result at ``out`` (after :func:`check_output` returned True under --force)."""
    import shutil

    p = Path(out)
    if is_file:
        p.unlink(missing_ok=True)
    elif p.is_dir():
        shutil.rmtree(p)


def note(msg: str) -> None:
    """A plain one-line message on stderr (no Python warning machinery, no source line)."""
    print(msg, file=sys.stderr, flush=True)
