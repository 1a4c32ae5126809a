"""Typed dataclass configs <-> argparse flags <-> JSON/TOML files.

Every command's config is a dataclass; each field becomes a ``--field-name`` flag whose help is
the field's ``metadata["help"]``. ``--config FILE`` (JSON or TOML) supplies values; explicit flags
win over the file; the resolved config is written next to a run's outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str = "", choices=None, **kw) -> Any:
    """A dataclass field with CLI help (and optional choices)."""
    md = {"help": help}
    if choices is not None:
        md["choices"] = tuple(choices)
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


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field; defaults are left as None so a --config file can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f.metadata.get("help", "")
        help_ = f"{help_} (default: {default!r})" if help_ else f"(default: {default!r})"
        help_ = help_.replace("%", "%%")  # argparse %-formats help strings
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (str,)
            kw["type"] = inner if inner is not Ellipsis else str
            kw["nargs"] = "+"
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            kw["type"] = str
        parser.add_argument(_flag(f.name), **kw)


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


def from_dict(cls: type[T], values: dict) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    conv = {}
    for k, v in values.items():
        tp, _ = _unwrap_optional(hints[k])
        if v is not None and typing.get_origin(tp) is tuple:
            v = tuple(v)
        conv[k] = v
    return cls(**conv)


def from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """File values (``--config``) first, then every flag given explicitly."""
    values: dict = {}
    cfg_path = getattr(ns, "config", None)
    if cfg_path:
        values.update(load_file(cfg_path))
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    return from_dict(cls, values)


def to_dict(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def save(cfg, path: str | Path) -> Path:
    """Write the resolved config (JSON) so a run can be reproduced with ``--config``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(cfg), indent=2, default=str) + "\n")
    return path
