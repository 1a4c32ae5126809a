"""Typed dataclass configs <-> argparse flags <-> JSON/TOML files.

Every command's config is a dataclass; each field becomes a ``--field-name`` flag whose help is
the field's ``metadata["help"]``. ``--config FILE`` (JSON or TOML) supplies values; explicit flags
win over the file; the resolved config is written next to a run's outputs. File keys may be spelt
like the fields (``n_synthetic``) or like the flags (``n-synthetic``); every value is checked
against the field's type, so a wrong type is an error naming the key, not a traceback later.
Float settings accept fractions (``8/255``) on the command line and in files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str = "", choices=None, required: bool = False,
          aliases: tuple[str, ...] = (), **kw) -> Any:
    """A dataclass field with CLI help (and optional choices).

    ``required``: the command needs a value (flag or file); --help says so instead of showing the
    placeholder default. ``aliases``: more flag names (``("--num-images",)`` for ``--n``).
    """
    md = {"help": help}
    if aliases:
        md["aliases"] = tuple(aliases)
    if choices is not None:
        md["choices"] = tuple(choices)
    if required:
        md["required"] = True
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=md, **kw)
    return dataclasses.field(default=default, metadata=md, **kw)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_float(text: str) -> float:
    """A float from a number (``0.1``, ``3e3``) or a fraction (``8/255``, how eps is usually written)."""
    s = str(text).strip()
    try:
        if s.count("/") == 1:
            num, den = (float(p) for p in s.split("/"))
            if den == 0:
                raise ValueError
            return num / den
        return float(s)
    except ValueError:
        raise ValueError(f"not a number or fraction: {text!r} (examples: 0.1, 3e3, 8/255)") from None


def _arg_float(text: str) -> float:
    try:
        return parse_float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _help(f: dataclasses.Field, default: Any) -> str:
    """The field's help plus its default, unless the help already says it (no "(default: x) (default: None)")."""
    help_ = f.metadata.get("help", "")
    if f.metadata.get("required"):
        tail = "(required)"
    elif "default" in help_.lower() or "none:" in help_.lower():
        tail = ""
    else:
        tail = f"(default: {default!r})"
    return " ".join(p for p in (help_, tail) if p).replace("%", "%%")  # argparse %-formats help


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field; defaults are left as None so a --config file can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": _help(f, default)}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (str,)
            kw["type"] = _arg_float if inner is float else inner if inner is not Ellipsis else str
            kw["nargs"] = "+"
        elif tp is float:
            kw["type"] = _arg_float
        elif tp in (int, str):
            kw["type"] = tp
        else:
            kw["type"] = str
        parser.add_argument(*f.metadata.get("aliases", ()), _flag(f.name), **kw)


def load_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON (or use a .toml file): {e}") from e


def _check_value(cls_name: str, name: str, f: dataclasses.Field, tp, optional: bool, v):
    """``v`` converted to the field's type, or ValueError naming the setting and what was wrong."""
    where = f"setting {name!r} ({_flag(name)})"
    if v is None:
        if optional:
            return None
        raise ValueError(f"{where} of {cls_name} must have a value, got null")

    def bad(want):
        hint = " (write it without quotes)" if isinstance(v, str) and want != "a string" else ""
        return ValueError(f"{where} must be {want}, got {type(v).__name__} {v!r}{hint}")

    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        inner = str if inner is Ellipsis else inner
        if not isinstance(v, (list, tuple)):
            raise bad("a list")
        items = [_check_value(cls_name, name, f, inner, False, x) for x in v]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(v, bool):
            raise bad("true or false")
    elif tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad("an integer")
    elif tp is float:
        if isinstance(v, str) and "/" in v:
            try:
                v = parse_float(v)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad("a number (or a fraction in quotes, like \"8/255\")")
        v = float(v)
    elif tp is str:
        if not isinstance(v, str):
            raise bad("a string")
    choices = f.metadata.get("choices")
    if choices is not None and v not in choices:
        raise ValueError(f"{where} must be one of {', '.join(map(str, choices))}, got {v!r}")
    return v


def from_dict(cls: type[T], values: dict) -> T:
    """Build ``cls`` from a dict of settings (keys in field or flag spelling), checking every value."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    norm: dict = {}
    for k, v in values.items():
        key = str(k).strip().lstrip("-").replace("-", "_")
        if key in norm:
            raise ValueError(f"setting {key!r} is given twice (as {key!r} and with dashes)")
        norm[key] = v
    unknown = set(norm) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    conv = {}
    for k, v in norm.items():
        tp, optional = _unwrap_optional(hints[k])
        conv[k] = _check_value(cls.__name__, k, fields[k], tp, optional, v)
    return cls(**conv)


def from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """File values (``--config``) first, then every flag given explicitly."""
    values: dict = {}
    cfg_path = getattr(ns, "config", None)
    if cfg_path:
        values.update(_settings_in(load_file(cfg_path)))
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    return from_dict(cls, values)


# Per-invocation actions, not settings: never read from a --config file nor written to config.json
# (replaying a run's config must not delete anything).
ACTIONS = ("force",)


def _settings_in(doc: dict) -> dict:
    """The command settings in a loaded file: the file itself, or the ``train_config`` a diffusion
    checkpoint's config.json records (so ``--config DIR/config.json`` repeats train-diffusion)."""
    if isinstance(doc, dict) and doc.get("format") == "cdp-fast-diffusion" and isinstance(doc.get("train_config"), dict):
        doc = doc["train_config"]
    return {k: v for k, v in doc.items() if str(k).strip().lstrip("-").replace("-", "_") not in ACTIONS}


def to_dict(cfg) -> dict:
    """The settings of ``cfg`` (JSON-able; the ACTIONS left out: they are not settings, so no record
    or cache key depends on them)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()
            if k not in ACTIONS}


def save(cfg, path: str | Path) -> Path:
    """Write the resolved config (JSON) so a run can be reproduced with ``--config``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(cfg), indent=2, default=str) + "\n")
    return path


def check_eps(eps: float | None, flag: str = "--eps") -> None:
    """eps is a radius in [0, 1] pixel units: refuse eps > 1 rather than run a meaningless attack.

    An Linf ball of radius > 1 around a [0, 1] image contains every image, so robust accuracy is
    0 by construction (``--eps 8`` meant 8/255): an error, not a warning nobody reads.
    """
    if eps is None:
        return
    if math.isnan(eps) or eps < 0:
        raise ValueError(f"{flag} must be >= 0, got {eps}")
    if eps > 1:
        raise ValueError(f"{flag} {eps:g} is larger than 1: eps is in [0, 1] pixel units "
                         f"(did you mean {flag} {eps:g}/255 = {eps / 255:.4g}?)")


def check_data_dir(data: str, data_dir: str | None) -> list[str]:
    """Problems with ``--data-dir`` before anything runs: warnings returned, errors raised.

    digits is built in, so a ``--data-dir`` would be silently ignored (a warning). A folder that
    does not exist is refused: a download would otherwise create it, and inside it, at a mistyped path.
    """
    if data_dir is None:
        return []
    if str(data).strip().lower() in ("digits", "sklearn-digits"):
        return [f"--data-dir {data_dir} is ignored: the digits data set is built in"]
    if not Path(data_dir).expanduser().is_dir():
        raise ValueError(f"--data-dir {data_dir} does not exist (create it first, e.g. mkdir -p "
                         f"{data_dir}, to download {data} into it)")
    return []
