"""Synthetic images as npz shards: ``save_synthetic`` writes one, ``load_synthetic`` reads a file or a
folder of shards into memory, ``SyntheticStore`` reads them lazily (memory-mapped consolidated copy).

A shard is an ``.npz`` with ``image`` (uint8 N x H x W x C) and ``label`` (int64), or the authors'
``arr_0``/``arr_1``, plus optional per-image arrays (e.g. ``confidence``); shards are read with
``allow_pickle=False``.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..utils import write_json
from .datasets import ImageData, _atomic_savez, to_uint8

__all__ = ["save_synthetic", "load_synthetic", "shard_files", "consolidate_synthetic", "default_cache_dir",
           "SyntheticStore", "CONSOLIDATED_DIR"]


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


def _warn_set(path) -> None:
    """A generate folder whose manifest says incomplete, or with npz files it does not list, is read
    with a one-line warning (see ``cdp_fast.manifest.set_problems``)."""
    from ..manifest import warn_set

    warn_set(path)


def shard_files(path) -> list[Path]:
    """The npz files of a synthetic set: the file itself, or a folder's ``*.npz`` sorted by name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.npz shards in this folder")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"synthetic data {path} does not exist (an .npz file or a folder of shards)")


def load_synthetic(path, *, like: ImageData | None = None, with_extra: bool = False):
    """Load synthetic images from an npz file or a folder of ``*.npz`` shards (sorted by name).

    Returns ``(images uint8 [N, C, H, W] torch, labels int64 [N] torch)``, plus a dict of extra
    per-image arrays present in every shard (e.g. ``confidence``) when ``with_extra=True``.
    With ``like`` (the real dataset) the image shape and the label range are checked against it.
    Files are read with ``allow_pickle=False``; corrupt files raise ValueError naming the file."""
    files = shard_files(path)
    if Path(path).is_dir():
        _warn_set(path)
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


# ---------------------------------------------------------------------------------------------
# Lazy reading. The shards are consolidated once into two .npy files beside them (images uint8
# [N, C, H, W], labels int64 [N]), written shard by shard (memory: one shard) and renamed into
# place, with meta.json last as the commit point. Training reads each batch's rows from them by
# offset, so the resident memory of the process stays at about one batch whatever the size of the
# set (the kernel's page cache, which is not the process's memory, keeps what it can).
CONSOLIDATED_DIR = "consolidated"
_STORE_VERSION = 1


def default_cache_dir(path) -> Path:
    """Where the consolidated copy of a synthetic set lives: ``<folder>/consolidated`` for a folder
    of shards (``*.npz`` readers do not look into it), ``<file stem>.consolidated`` beside one file."""
    path = Path(path)
    return path / CONSOLIDATED_DIR if path.is_dir() else path.with_name(f"{path.stem}.{CONSOLIDATED_DIR}")


def _fingerprint(files: list[Path]) -> list:
    return [[f.name, st.st_size, st.st_mtime_ns] for f in files for st in (f.stat(),)]


def _npz_len(path: Path) -> int:
    """Number of images in a shard, from its labels alone (the images are not decompressed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ("label", "arr_1") if k in z.files), None)
            if key is None:
                raise ValueError(f"expected arrays 'image' + 'label' (or 'arr_0' + 'arr_1'), found {z.files}")
            return int(len(z[key]))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated npz: {e}") from None


def _npy_header(fh, shape: tuple, dtype) -> None:
    np.lib.format.write_array_header_1_0(
        fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})


def consolidate_synthetic(path, *, like: ImageData | None = None, cache_dir=None) -> Path:
    """Write (once) the consolidated copy of the synthetic set ``path`` and return its folder.

    Reused while the shards are unchanged (same names, sizes and mtimes); rewritten otherwise. Each
    shard is read and checked like :func:`load_synthetic` does, one at a time. Errors (a corrupt
    shard, a full disk, a read-only folder) leave no partial file and name the problem."""
    files = shard_files(path)
    if Path(path).is_dir():
        _warn_set(path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(path)
    meta_path = cache / "meta.json"
    fp = _fingerprint(files)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") == _STORE_VERSION and meta.get("shards") == fp:
            return cache
    except (OSError, ValueError):
        pass
    counts = [_npz_len(f) for f in files]
    n = sum(counts)
    if n == 0:
        raise ValueError(f"{path}: the synthetic set holds no images")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # stale copy: not valid while being rewritten
    except OSError as e:
        raise ValueError(f"cannot write the consolidated copy of {path} in {cache}: {e}; pass another "
                         f"folder (--synthetic-cache) or keep the set in memory (--synthetic-store memory)") from None
    tmp = {k: cache / f".{k}.{os.getpid()}.tmp.npy" for k in ("images", "labels")}
    shape, lo, hi = None, None, None
    try:
        with open(tmp["images"], "wb") as fi, open(tmp["labels"], "wb") as fl:
            _npy_header(fl, (n,), np.int64)
            for f, cnt in zip(files, counts, strict=True):
                img, lab, _ = _read_npz(f, like)
                if len(img) != cnt:
                    raise ValueError(f"{f}: changed while being read ({cnt} then {len(img)} images)")
                if shape is None:
                    shape = img.shape[1:]
                    h, w, c = shape
                    _npy_header(fi, (n, c, h, w), np.uint8)
                elif img.shape[1:] != shape:
                    raise ValueError(f"{f}: image shape {img.shape[1:]} differs from {files[0]} ({shape})")
                fi.write(np.ascontiguousarray(img.transpose(0, 3, 1, 2)).data)
                fl.write(lab.astype("<i8").data)
                if len(lab):
                    lo = int(lab.min()) if lo is None else min(lo, int(lab.min()))
                    hi = int(lab.max()) if hi is None else max(hi, int(lab.max()))
                del img, lab
            for fh in (fi, fl):
                fh.flush()
                os.fsync(fh.fileno())
        for k, t in tmp.items():
            os.replace(t, cache / f"{k}.npy")
    except OSError as e:
        raise ValueError(f"cannot write the consolidated copy of {path} in {cache}: {e}; free some space, "
                         f"pass another folder (--synthetic-cache) or use --synthetic-store memory") from None
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)
    h, w, c = shape
    write_json(meta_path, {"version": _STORE_VERSION, "n": n, "shape": [c, h, w], "label_min": lo,
                           "label_max": hi, "shards": fp})
    return cache


def _npy_layout(path: Path) -> tuple[int, tuple, np.dtype]:
    """(data offset, shape, dtype) of a C-ordered .npy file, checking its size."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
    if fortran:
        raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
    size = path.stat().st_size
    if size < offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError(f"{path}: truncated ({size} bytes, header says {shape} {dtype}); delete "
                         f"{path.parent} to rebuild it")
    return offset, tuple(shape), dtype


class SyntheticStore:
    """A synthetic set read lazily from its consolidated copy (see :func:`consolidate_synthetic`).

    ``take(idx)`` reads just the rows asked for with positioned reads (``os.preadv``) into a fresh
    buffer. Not a memory map: a mapped file's pages are faulted in by large blocks (read-around,
    large page-cache folios: measured ~1 MB per random row on the dev box), so random rows would map
    far more than they hold; positioned reads keep the process's memory at about one batch."""

    def __init__(self, cache_dir):
        cache = Path(cache_dir)
        self.cache_dir = cache
        self.meta = json.loads((cache / "meta.json").read_text())
        self._img_off, img_shape, img_dt = _npy_layout(cache / "images.npy")
        self._lab_off, lab_shape, lab_dt = _npy_layout(cache / "labels.npy")
        if img_dt != np.uint8 or len(img_shape) != 4 or lab_shape != img_shape[:1] or lab_dt != np.dtype("<i8"):
            raise ValueError(f"{cache}: inconsistent consolidated copy (images {img_dt} {img_shape}, labels "
                             f"{lab_dt} {lab_shape}); delete the folder to rebuild it")
        self._n, self._shape = int(img_shape[0]), tuple(int(v) for v in img_shape[1:])
        self._row = int(np.prod(self._shape))
        self._fd_img = os.open(cache / "images.npy", os.O_RDONLY)
        self._fd_lab = os.open(cache / "labels.npy", os.O_RDONLY)

    def __del__(self):
        for fd in (getattr(self, "_fd_img", None), getattr(self, "_fd_lab", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    @classmethod
    def open(cls, path, *, like: ImageData | None = None, cache_dir=None) -> "SyntheticStore":
        """Consolidate ``path`` if needed, then map it; with ``like`` the image shape and the label
        range are checked against the real dataset."""
        store = cls(consolidate_synthetic(path, like=like, cache_dir=cache_dir))
        if like is not None:
            if store.shape != like.shape:
                raise ValueError(f"{path}: images have shape {store.shape} (C,H,W), expected {like.shape} "
                                 f"for {like.name}")
            hi = store.meta.get("label_max")
            if hi is not None and hi >= like.num_classes:
                raise ValueError(f"{path}: label {hi} out of range [0, {like.num_classes}) for {like.name}")
        return store

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return self._shape

    @property
    def nbytes(self) -> int:
        return self._n * (self._row + 8)

    def take(self, idx, *, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images uint8 [n, C, H, W] and labels int64 [n] at ``idx`` (CPU tensors, pinned on request)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self._n):
            raise IndexError(f"synthetic index out of range [0, {self._n})")
        x = torch.empty((len(idx),) + self._shape, dtype=torch.uint8, pin_memory=pin_memory)
        y = np.empty(len(idx), np.int64)
        rows, labs, row = x.numpy().reshape(len(idx), self._row), y.view(np.uint8).reshape(-1, 8), self._row
        for j, i in enumerate(idx.tolist()):
            got = os.preadv(self._fd_img, [rows[j]], self._img_off + i * row)
            got += os.preadv(self._fd_lab, [labs[j]], self._lab_off + i * 8)
            if got != row + 8:
                raise ValueError(f"{self.cache_dir}: short read at row {i} (file changed?); delete the folder "
                                 f"to rebuild it")
        return x, torch.from_numpy(y)

    def __repr__(self) -> str:
        return f"SyntheticStore({str(self.cache_dir)!r}, n={len(self)}, shape={self.shape})"
