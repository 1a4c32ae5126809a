"""Synthetic images as npz shards: ``save_synthetic`` writes one, ``load_synthetic`` reads a file or a
folder of shards into memory.

A shard is an ``.npz`` with ``image`` (uint8 N x H x W x C) and ``label`` (int64), or the authors'
``arr_0``/``arr_1``, plus optional per-image arrays (e.g. ``confidence``); shards are read with
``allow_pickle=False``.
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .datasets import ImageData, _atomic_savez, to_uint8

__all__ = ["save_synthetic", "load_synthetic"]


def _as_numpy(a, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    if isinstance(a, np.ndarray):
        return a
    raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(a).__name__}")


def _to_nhwc(img: np.ndarray, layout: str, where: str) -> np.ndarray:
    if img.ndim == 3:
        return img[..., None]
    if img.ndim != 4:
        raise ValueError(f"{where}: images must be 4-D (N,C,H,W or N,H,W,C) or 3-D (N,H,W), got {img.shape}")
    if layout == "auto":
        nchw, nhwc = img.shape[1] in (1, 3, 4), img.shape[3] in (1, 3, 4)
        if nchw and nhwc:  # ambiguous (e.g. 3x3 images): the torch convention wins
            layout = "NCHW"
        elif nchw or nhwc:
            layout = "NCHW" if nchw else "NHWC"
        else:
            raise ValueError(f"{where}: cannot tell NCHW from NHWC for shape {img.shape} "
                             f"(no axis of 1, 3 or 4 channels); pass layout=")
    if layout == "NCHW":
        return img.transpose(0, 2, 3, 1)
    if layout == "NHWC":
        return img
    raise ValueError(f"layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}")


def save_synthetic(path, images, labels, *, layout: str = "auto", **extra_arrays) -> Path:
    """Write a synthetic shard ``path`` (.npz) atomically (temp file + rename).

    ``images``: torch tensor or numpy array, NCHW or NHWC (``layout="auto"`` guesses from the
    channel axis; NCHW when ambiguous), either uint8 0..255 or float in [0, 1] (rounded with
    ``to_uint8``). ``labels``: N integers. Extra per-image arrays (e.g. ``confidence`` from
    pseudo-labelling) are stored under their names. Stored: ``image`` uint8 N x H x W x C,
    ``label`` int64 N. Returns the path (".npz" appended when missing)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    img = _as_numpy(images, "images")
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.floating):
            raise TypeError(f"images must be uint8 or float in [0, 1], got {img.dtype}")
        if img.size and float(img.min()) < -0.5:  # a common slip: diffusion output in [-1, 1]
            raise ValueError(f"float images must be in [0, 1] (min {float(img.min()):.3f}); map diffusion "
                             f"samples with (x + 1) / 2 first")
        img = to_uint8(torch.from_numpy(np.ascontiguousarray(img, np.float32))).numpy()
    img = np.ascontiguousarray(_to_nhwc(img, layout, "save_synthetic"))
    lab = _as_numpy(labels, "labels")
    if lab.ndim != 1 or len(lab) != len(img):
        raise ValueError(f"labels must have shape [{len(img)}], got {lab.shape}")
    if lab.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got {lab.dtype}")
    if len(lab) and lab.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(lab.min())}")
    extra = {}
    for k, v in extra_arrays.items():
        if k in ("image", "label"):
            raise ValueError(f"extra array name {k!r} is reserved")
        v = _as_numpy(v, k)
        if len(v) != len(img):
            raise ValueError(f"extra array {k!r} has {len(v)} rows, images have {len(img)}")
        extra[k] = v
    return _atomic_savez(path, image=img, label=lab.astype(np.int64), **extra)


def _read_npz(path: Path, like: ImageData | None):
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if "image" in keys and "label" in keys:
                ik, lk = "image", "label"
            elif "arr_0" in keys and "arr_1" in keys:
                ik, lk = "arr_0", "arr_1"
            else:
                raise KeyError(f"expected arrays 'image' + 'label' (or 'arr_0' + 'arr_1'), found {keys}")
            img, lab = z[ik], z[lk]
            extra = {k: z[k] for k in keys if k not in (ik, lk)}
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated npz (or it holds pickled objects, which are "
                         f"refused): {e}") from None
    if img.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 (0..255), got {img.dtype}")
    if like is not None and img.ndim == 4:
        c, h, w = like.shape
        if img.shape[1:] == (h, w, c):
            img = img
        elif img.shape[1:] == (c, h, w):
            img = img.transpose(0, 2, 3, 1)
        else:
            raise ValueError(f"{path}: images have shape {img.shape}, expected N x {h} x {w} x {c} "
                             f"(N x H x W x C) to match {like.name}")
    else:
        img = _to_nhwc(img, "auto", str(path))
    if lab.ndim == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if lab.ndim != 1 or len(lab) != len(img):
        raise ValueError(f"{path}: expected {len(img)} labels (one per image), got shape {lab.shape}")
    if lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
        lab = lab.astype(np.int64)
    if lab.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be integers, got {lab.dtype}")
    lab = lab.astype(np.int64)
    if len(lab):
        hi = like.num_classes if like is not None else None
        if lab.min() < 0 or (hi is not None and lab.max() >= hi):
            bad = int(lab.min()) if lab.min() < 0 else int(lab.max())
            raise ValueError(f"{path}: label {bad} out of range [0, {hi if hi is not None else 'inf'})"
                             + (f" for {like.name}" if like is not None else ""))
    if like is not None and img.shape[1:] != (like.size, like.size, like.channels):
        c, h, w = like.shape
        raise ValueError(f"{path}: images have shape {img.shape}, expected N x {h} x {w} x {c} for {like.name}")
    extra = {k: v for k, v in extra.items() if v.ndim >= 1 and len(v) == len(img)}
    return img, lab, extra


def load_synthetic(path, *, like: ImageData | None = None, with_extra: bool = False):
    """Load synthetic images from an npz file or a folder of ``*.npz`` shards (sorted by name).

    Returns ``(images uint8 [N, C, H, W] torch, labels int64 [N] torch)``, plus a dict of extra
    per-image arrays present in every shard (e.g. ``confidence``) when ``with_extra=True``.
    With ``like`` (the real dataset) the image shape and the label range are checked against it.
    Files are read with ``allow_pickle=False``; corrupt files raise ValueError naming the file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.npz shards in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"synthetic data {path} does not exist (an .npz file or a folder of shards)")
    imgs, labs, extras = [], [], []
    for f in files:
        img, lab, extra = _read_npz(f, like)
        if imgs and img.shape[1:] != imgs[0].shape[1:]:
            raise ValueError(f"{f}: image shape {img.shape[1:]} differs from {files[0]} ({imgs[0].shape[1:]})")
        imgs.append(img), labs.append(lab), extras.append(extra)
    img = imgs[0] if len(imgs) == 1 else np.concatenate(imgs)
    lab = labs[0] if len(labs) == 1 else np.concatenate(labs)
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(lab)
    if not with_extra:
        return x, y
    common = set.intersection(*(set(e) for e in extras))
    ex = {k: torch.from_numpy(np.concatenate([e[k] for e in extras])) for k in sorted(common)}
    return x, y, ex
