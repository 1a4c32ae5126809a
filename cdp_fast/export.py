"""Synthetic data sets out, in the files the adversarial-training codebases read.

``cdp-fast export SHARDS --out FILE.npz``: one npz with ``image`` uint8 [N, H, W, C] and ``label``
int64 [N] (what DM-Improves-AT and imrahulr's ``--aux-data-filename`` read); ``--format authors``
names them ``arr_0`` / ``arr_1``. The npz members are written shard by shard into the zip (the
.npy header first, sized from a pass over the shards' headers), so memory does not grow with N;
the file appears atomically when complete.

``cdp-fast select SHARDS --criterion confidence --keep 0.2 --per-class --out DIR``: score every
image with a classifier (or the ``confidence`` stored by ``generate``), keep the best fraction
(per class: DM-Improves-AT's filter), and write the kept images as shards. Two streaming passes:
scores first (O(N) floats), then the kept images shard by shard.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from . import models, selection
from .config import field
from .data import load_synthetic, save_synthetic, shard_files  # shard_files re-exported here
from .manifest import warn_set
from .utils import _umask, check_output, progress, replace_output, resolve_device, write_json

__all__ = ["ExportConfig", "SelectConfig", "export_npz", "select_shards", "shard_files", "run_export", "run_select",
           "resolve", "npz_path"]

FORMATS = {"cdp-fast": ("image", "label"), "authors": ("arr_0", "arr_1")}


def _member_header(zf: zipfile.ZipFile, names) -> tuple[str, tuple, np.dtype]:
    for name in names:
        if f"{name}.npy" in zf.namelist():
            with zf.open(f"{name}.npy") as f:
                version = np.lib.format.read_magic(f)
                reader = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if reader is None:
                    raise ValueError(f"unsupported .npy version {version}")
                shape, _, dtype = reader(f)
            return name, shape, dtype
    raise KeyError(names)


def _scan(files: list[Path]) -> tuple[list[int], tuple]:
    """Per-shard image counts and the common image shape (H, W, C), from the npy headers only."""
    counts, hwc = [], None
    for f in files:
        try:
            with zipfile.ZipFile(f) as zf:
                _, shape, dtype = _member_header(zf, ("image", "arr_0"))
        except (zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
            raise ValueError(f"{f}: not a synthetic shard (npz with image/label or arr_0/arr_1): {e}") from None
        if dtype != np.uint8 or len(shape) not in (3, 4):
            raise ValueError(f"{f}: images must be uint8 [N, H, W(, C)], got {dtype} {shape}")
        counts.append(int(shape[0]))
        s = tuple(shape[1:]) if len(shape) == 4 else tuple(shape[1:]) + (1,)
        hwc = hwc or s
    return counts, hwc


def _write_header(f, shape: tuple, dtype) -> None:
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))


def npz_path(out) -> Path:
    """export's one naming rule: ``--out`` is the npz file; a name without ``.npz`` gets it appended
    (``--out name`` writes ``name.npz``, its settings in ``name.npz.config.json``)."""
    out = Path(out)
    return out if out.suffix == ".npz" else out.with_name(out.name + ".npz")


def export_npz(shards, out, *, format: str = "cdp-fast", show_progress: bool = True) -> dict:
    """Write the shards of ``shards`` as one npz ``out`` (see the module docstring); returns a summary."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    files = shard_files(shards)
    if Path(shards).is_dir():
        warn_set(shards, "export")
    counts, _ = _scan(files)
    out = npz_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ik, lk = FORMATS[format]
    N = sum(counts)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # like the shards and every other output (mkstemp makes 0600)
    hwc = None
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            with zf.open(f"{ik}.npy", "w", force_zip64=True) as f:
                header_done = False
                for path, n in progress(list(zip(files, counts, strict=True)), desc="export images", disable=not show_progress
                                        or None):
                    x, _ = load_synthetic(path)  # validated, NCHW uint8
                    img = _nhwc(x)
                    if len(img) != n:
                        raise ValueError(f"{path}: changed while exporting ({len(img)} != {n} images)")
                    if not header_done:
                        hwc = img.shape[1:]
                        _write_header(f, (N,) + hwc, np.uint8)
                        header_done = True
                    elif img.shape[1:] != hwc:
                        raise ValueError(f"{path}: image shape {img.shape[1:]} differs from {files[0]} ({hwc})")
                    f.write(img.tobytes())
            with zf.open(f"{lk}.npy", "w", force_zip64=True) as f:
                _write_header(f, (N,), np.int64)
                for path in files:
                    _, y = load_synthetic(path)
                    f.write(np.ascontiguousarray(y.numpy().astype(np.int64)).tobytes())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"out": str(out), "n": N, "shards": len(files), "image_shape": list(hwc or ()), "format": format,
            "keys": [ik, lk], "bytes": out.stat().st_size}


@dataclass
class ExportConfig:
    POSITIONAL: ClassVar[str] = "shards"  # `cdp-fast export SHARDS --out FILE.npz`
    shards: str | None = field(None, help="folder of generate's shard-*.npz (or one npz)")
    out: str = field("runs/synthetic.npz", help="npz file to write (.npz is appended to a name without it)")
    format: str = field("cdp-fast", help="cdp-fast: image/label (DM-Improves-AT, imrahulr); authors: arr_0/arr_1",
                        choices=tuple(FORMATS))
    force: bool = field(False, help="replace an existing --out file (refused without it)")


def run_export(cfg: ExportConfig) -> dict:
    if not cfg.shards:
        raise ValueError("export: give the shards (cdp-fast export SHARDS --out FILE.npz)")
    return export_npz(cfg.shards, cfg.out, format=cfg.format)


def resolve(cfg):
    """Checks of ``export`` / ``select`` before anything is read or written (the CLI calls it)."""
    if not cfg.shards:
        what = "FILE.npz" if isinstance(cfg, ExportConfig) else "DIR"
        name = "export" if isinstance(cfg, ExportConfig) else "select"
        raise ValueError(f"{name}: give the shards (cdp-fast {name} SHARDS --out {what})")
    shard_files(cfg.shards)  # FileNotFoundError: no such file / no shards in the folder
    if isinstance(cfg, ExportConfig):
        out = npz_path(cfg.out)
        check_output(out, force=cfg.force, what="an exported data set", is_file=True)
        return dataclasses.replace(cfg, out=str(out))
    if isinstance(cfg.keep, bool) or not 0.0 < cfg.keep <= 1.0:
        raise ValueError(f"--keep must be a fraction in (0, 1] (0.2 keeps 20%), got {cfg.keep}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    crit = selection._criterion(cfg.criterion)
    if cfg.classifier is None and crit != "confidence":
        raise ValueError(f"select: --criterion {cfg.criterion} needs a scoring classifier (--classifier); "
                         f"without one only the stored confidence can be used")
    if Path(cfg.out).resolve() == Path(cfg.shards).resolve():
        raise ValueError("select: --out must differ from the input shards")
    check_output(cfg.out, force=cfg.force, what="an earlier selection")
    return cfg


# ---------------------------------------------------------------------------------------------
def select_shards(shards, out, *, criterion: str = "confidence", fraction: float = 0.2, per_class: bool = True,
                  model=None, keep: str | None = None, batch_size: int = 256, device="cpu", replace: bool = False,
                  **score_kw) -> dict:
    """Keep the best ``fraction`` of the images of ``shards`` by ``criterion`` (per class with
    ``per_class``) and write them to the folder ``out`` as shards; returns a summary.

    ``model``: the scoring classifier; without one only ``confidence`` works, read from the
    ``confidence`` array ``generate`` stores in each shard. ``replace``: delete the folder ``out``
    (an earlier selection, the CLI's --force) after scoring, before writing."""
    crit = selection._criterion(criterion)
    direction = keep or selection.DEFAULT_KEEP[crit]
    files = shard_files(shards)
    out = Path(out)
    if out.resolve() == Path(shards).resolve():
        raise ValueError("select: --out must differ from the input shards")
    if Path(shards).is_dir():
        warn_set(shards, "select")
    scores, labels, sizes = [], [], []
    for f in progress(files, desc=f"select: scoring ({crit})"):
        x, y, extra = load_synthetic(f, with_extra=True)
        if model is None:
            if crit != "confidence" or "confidence" not in extra:
                raise ValueError(f"select: criterion {crit!r} needs a classifier (--classifier) "
                                 f"({f} stores no {crit})" if crit == "confidence" else
                                 f"select: criterion {crit!r} needs a classifier (--classifier)")
            s = extra["confidence"].float()
        else:
            s = selection.scores(model, x, y, crit, batch_size=batch_size, device=device, **score_kw)
        scores.append(s), labels.append(y), sizes.append(len(y))
    score, label = torch.cat(scores), torch.cat(labels)
    if per_class:
        idx = selection.top_k_per_class(score, label, fraction, direction)
    else:
        k = max(1, int(round(fraction * len(score))))
        idx = torch.sort(selection.top_k(score, k, direction)).values
    kept = torch.zeros(len(score), dtype=torch.bool)
    kept[idx] = True
    if replace:
        replace_output(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard-*.npz"):
        stale.unlink()
    start, written = 0, 0
    for i, (f, n) in enumerate(zip(files, sizes, strict=True)):
        m = kept[start:start + n]
        sc = score[start:start + n]
        start += n
        if not bool(m.any()):
            continue
        x, y, extra = load_synthetic(f, with_extra=True)
        rest = {k: v[m].numpy() for k, v in extra.items() if k != "score"}
        save_synthetic(out / f"shard-{i:05d}.npz", x[m], y[m], score=sc[m].numpy().astype(np.float32), **rest)
        written += int(m.sum())
    counts = torch.bincount(label[kept]).tolist() if written else []
    summary = {"out": str(out), "criterion": crit, "keep": direction, "fraction": fraction, "per_class": per_class,
               "n_in": int(len(score)), "n_kept": written, "label_counts": counts,
               "score_threshold": float(score[kept].min()) if written and direction == "high" else None}
    write_json(out / "selection.json", summary)
    return summary


@dataclass
class SelectConfig:
    POSITIONAL: ClassVar[str] = "shards"  # `cdp-fast select SHARDS --criterion ... --out DIR`
    shards: str | None = field(None, help="folder of generate's shard-*.npz (or one npz)")
    out: str = field("runs/selected", help="folder for the kept images (shards + selection.json)")
    criterion: str = field("confidence", help="per-image score", choices=selection.CRITERIA + (
        "grad-norm", "gradient-norm", "grad-norm-rob", "margin"))
    keep: float = field(0.2, help="fraction kept (DM-Improves-AT: 0.2 per class)")
    per_class: bool = field(True, help="keep the fraction within each (pseudo-)class")
    direction: str | None = field(None, help="high | low (None: the criterion's default)", choices=("high", "low"))
    classifier: str | None = field(None, help="scoring classifier: checkpoint folder or external weights file "
                                              "(None: confidence stored in the shards)")
    classifier_arch: str | None = field(None, help="architecture of an external classifier file, e.g. wrn-28-10-swish")
    eps: float | None = field(None, help="PGD radius for gradnorm-rob")
    batch_size: int = field(256, help="scoring batch size")
    device: str = field("auto", help="auto | cpu | cuda[:i]")
    force: bool = field(False, help="replace an existing --out selection (its files are deleted first; "
                                    "refused without it)")


def run_select(cfg: SelectConfig) -> dict:
    if not cfg.shards:
        raise ValueError("select: give the shards (cdp-fast select SHARDS --out DIR)")
    replace = check_output(cfg.out, force=cfg.force, what="an earlier selection")
    device = resolve_device(cfg.device)
    model = models.load(cfg.classifier, device=device, arch=cfg.classifier_arch) if cfg.classifier else None
    kw = {"eps": cfg.eps} if cfg.eps is not None else {}
    return select_shards(cfg.shards, cfg.out, criterion=cfg.criterion, fraction=cfg.keep, per_class=cfg.per_class,
                         model=model, keep=cfg.direction, batch_size=cfg.batch_size, device=device,
                         replace=replace, **kw)
