"""Real datasets: names and per-dataset defaults, the ``ImageData`` container, image conversions and
the readers (scikit-learn digits, IDX for the MNIST family, CIFAR-10 python batches, GTSRB folders).

Conventions: datasets are held as uint8 NCHW tensors (``ImageData``); classifiers see float [0, 1]
NCHW (``to_float``). CIFAR-10's python batches are pickles: they go through ``read_cifar_batch``, a
restricted unpickler that can only build dicts/lists/bytes/numbers and numpy arrays.
"""
from __future__ import annotations

import csv
import functools
import gzip
import io
import os
import pickle
import struct
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..utils import atomic_write_bytes

__all__ = [
    "DATASETS", "DEFAULTS", "DatasetDefaults", "ImageData", "load_dataset", "dataset_defaults", "defaults_for", "canonical_name", "balanced_subset",
    "read_idx", "write_idx", "read_cifar_batch", "to_float", "as_float01", "to_uint8",
]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "gtsrb")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar_10": "cifar10", "sklearn-digits": "digits"}

# ---------------------------------------------------------------------------------------------
# Per-dataset defaults: the ONE place every command reads them from (train-robust, eval's default
# eps, the pipeline's TRADES arms and intermediate classifier, the device loader). METHOD.md §10.
@dataclass(frozen=True)
class DatasetDefaults:
    """Every default that depends on the data set.

    Data: ``channels``, ``size``, ``num_classes``. Models: ``model`` (classifier of train-robust
    and of the pipeline's classifiers). Augmentation: ``augment`` ("crop-flip" for CIFAR-like
    data, "crop" where a flip changes the class, "none" for MNIST/Fashion-MNIST as TRADES) with
    crop ``padding``. Threat model (train-robust, the pipeline, eval's default eps): ``eps``,
    attack ``step_size`` and ``attack_steps`` (a changed eps or step count keeps the ratio
    step_size * attack_steps / eps), TRADES ``beta``. TRADES optimisation: ``optimizer``, peak
    ``lr``, LR ``schedule``, ``ema`` and its warm-up fraction ``ema_warmup``.
    ``quick``: the README's quick train-robust budget (flags) whose defaults must train a model
    well above chance (tested on what is available offline).
    """

    channels: int
    size: int
    num_classes: int
    model: str
    augment: str
    padding: int
    eps: float
    step_size: float
    attack_steps: int
    beta: float
    optimizer: str
    lr: float
    schedule: str = "cosine"
    ema: bool = True
    ema_warmup: float = 0.025
    quick: str = ""


# Why these values (METHOD.md §10 and measurements; the README's "train-robust defaults" table):
# * digits: the tiny offline stand-in for MNIST. eps 0.1, not MNIST's 0.3: at 0.3 an 8x8
#   small-cnn collapses to chance (measured: 10.0% clean after 3 and 10 epochs with SGD 0.3).
#   AdamW 3e-3: the small-cnn's zero-initialised head leaves SGD on a loss plateau for a
#   seed-dependent 70-200 steps (digits has ~10 steps per epoch; SGD 0.05 constant: still 10.0%
#   after 3 epochs). Constant LR: at these budgets cosine-to-zero spends half the run at a small
#   rate (measured, seed 0, test split: 3 epochs 41.1 / 27.2% clean / PGD-20 with cosine, 65.8 /
#   31.9% constant; 10 epochs 88.3 / 49.4% cosine, 94.4 / 61.9% constant).
# * mnist / fashion-mnist: TRADES MNIST's threat model (eps 0.3, 40 steps of 0.01, beta 1) on
#   MNIST; Fashion-MNIST at eps 0.1 with 10 steps of 0.025. The same small-cnn as digits, so the
#   same AdamW (1e-3 at 28x28) and constant LR (reported: Fashion-MNIST, 5k images, 1 epoch, SGD
#   0.1 cosine and 40 steps ended at chance; 10k images, 2 epochs: SGD 0.05 constant beat SGD 0.1
#   cosine + EMA).
# * cifar10 / gtsrb: the field's recipe (8/255, 10 steps of 2/255, beta 6, SGD Nesterov 0.1,
#   cosine, EMA; Rice et al., Gowal et al.) for budgets of tens of epochs on a GPU.
# EMA at short budgets: the Gowal warm-up decay (1 + n) / (10 + n) averages over the last ~n/9
# steps, so a short run's EMA is close to its last weights (measured on digits, 3 epochs: 41.1 /
# 26.4% with EMA, 41.1 / 25.3% without): kept on everywhere.
DEFAULTS: dict[str, DatasetDefaults] = {
    "digits": DatasetDefaults(channels=1, size=8, num_classes=10, model="small-cnn", augment="crop",
                              padding=1, eps=0.1, step_size=0.025, attack_steps=10, beta=1.0,
                              optimizer="adamw", lr=3e-3, schedule="constant", quick="--epochs 3"),
    "mnist": DatasetDefaults(channels=1, size=28, num_classes=10, model="small-cnn", augment="none",
                             padding=0, eps=0.3, step_size=0.01, attack_steps=40, beta=1.0,
                             optimizer="adamw", lr=1e-3, schedule="constant",
                             quick="--real-limit 5000 --epochs 1"),
    "fashion-mnist": DatasetDefaults(channels=1, size=28, num_classes=10, model="small-cnn",
                                     augment="none", padding=0, eps=0.1, step_size=0.025,
                                     attack_steps=10, beta=1.0, optimizer="adamw", lr=1e-3,
                                     schedule="constant", quick="--real-limit 5000 --epochs 1"),
    "cifar10": DatasetDefaults(channels=3, size=32, num_classes=10, model="wrn-28-10-swish",
                               augment="crop-flip", padding=4, eps=8 / 255, step_size=2 / 255,
                               attack_steps=10, beta=6.0, optimizer="sgd", lr=0.1,
                               quick="--model preact-resnet18 --epochs 1 (a GPU)"),
    "gtsrb": DatasetDefaults(channels=3, size=32, num_classes=43, model="preact-resnet18",
                             augment="crop", padding=4, eps=8 / 255, step_size=2 / 255,
                             attack_steps=10, beta=6.0, optimizer="sgd", lr=0.1,
                             quick="--epochs 1 (a GPU)"),
}
# The same as plain dicts (older readers: the device loader).
_DEFAULTS = {k: asdict(v) for k, v in DEFAULTS.items()}


def canonical_name(name: str) -> str:
    """Normalise a dataset name ("CIFAR-10" -> "cifar10"); ValueError for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def defaults_for(name: str) -> DatasetDefaults:
    """The ``DatasetDefaults`` of a data set (any spelling ``canonical_name`` accepts)."""
    return DEFAULTS[canonical_name(name)]


def dataset_defaults(name: str) -> dict:
    """``defaults_for(name)`` as a fresh dict (safe to modify): eps, step_size, attack_steps, beta,
    model, channels, size, num_classes, augment, padding, optimizer, lr, schedule, ema, ..."""
    return asdict(defaults_for(name))


# ---------------------------------------------------------------------------------------------
# container
@dataclass
class ImageData:
    """A labelled image dataset. All tensors on CPU unless ``.to(device)`` is called."""

    name: str
    x_train: torch.Tensor  # uint8 [N, C, H, W]
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor  # uint8 [M, C, H, W]
    y_test: torch.Tensor  # int64 [M]
    num_classes: int

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{self.name}: x_{split} must be uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise ValueError(f"{self.name}: y_{split} must be int64 [{len(x)}], got {y.dtype} {tuple(y.shape)}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train images {tuple(self.x_train.shape[1:])} and test images "
                             f"{tuple(self.x_test.shape[1:])} differ in shape")

    def to(self, device) -> "ImageData":
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def size(self) -> int:
        return int(self.x_train.shape[2])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (f"ImageData({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
                f"num_classes={self.num_classes}, device={self.x_train.device})")


def _make(name, xtr, ytr, xte, yte, num_classes) -> ImageData:
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)  # noqa: E731
    for y, split in ((ytr, "train"), (yte, "test")):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name}: {split} labels must lie in [0, {num_classes}), found "
                             f"[{int(y.min())}, {int(y.max())}]")
    return ImageData(name, t(xtr, torch.uint8), t(ytr, torch.int64), t(xte, torch.uint8), t(yte, torch.int64),
                     int(num_classes))


def balanced_subset(labels, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` examples, as class-balanced as the data allows, deterministic in ``seed``.

    Classes are visited round-robin (in a seeded random class order), each class's examples in a
    seeded random order; classes that run out are skipped. Returned sorted."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"real_limit must be a positive int, got {n!r}")
    if n > len(y):
        raise ValueError(f"real_limit={n} exceeds the {len(y)} training images")
    rng = np.random.RandomState(seed % 2**32)
    classes = np.unique(y)
    class_pos = np.empty(classes.max() + 1, np.int64)
    class_pos[classes] = rng.permutation(len(classes))
    rank = np.empty(len(y), np.int64)
    for c in classes:
        idx = np.flatnonzero(y == c)
        rank[idx[rng.permutation(len(idx))]] = np.arange(len(idx))
    key = rank * len(classes) + class_pos[y]
    return np.sort(np.argsort(key, kind="stable")[:n])


# ---------------------------------------------------------------------------------------------
# loaders
def _default_dir(data_dir) -> Path:
    return Path(data_dir if data_dir is not None else os.environ.get("CDP_FAST_DATA_DIR", "data")).expanduser()


def _torchvision():
    try:
        import torchvision.datasets as tvd
        return tvd
    except Exception:  # not installed, or built for another torch (RuntimeError on import)
        return None


def _try_download(what: str, fn) -> str:
    """Run a torchvision download; on failure return a note for the FileNotFoundError."""
    try:
        fn()
        return ""
    except Exception as e:  # offline, checksum mismatch, ...
        return f" (download of {what} via torchvision failed: {type(e).__name__}: {e})"


def _want_download(download) -> bool:
    if download is None:
        download = os.environ.get("CDP_FAST_NO_DOWNLOAD", "0") != "1"
    return bool(download) and _torchvision() is not None


def load_dataset(name: str, data_dir=None, *, real_limit: int | None = None, seed: int = 0,
                 download: bool | None = None) -> ImageData:
    """Load a dataset by name as uint8 NCHW tensors (on CPU).

    * ``digits``: scikit-learn's bundled 8x8 digits (offline), pixels 0..16 scaled to 0..255, a fixed
      stratified split of 1437 train / 360 test (independent of ``seed``).
    * ``mnist`` / ``fashion-mnist``: IDX files (``.gz`` or raw) in ``data_dir`` (or the torchvision
      layout ``data_dir/MNIST/raw``, ``data_dir/FashionMNIST/raw``).
    * ``cifar10``: ``data_dir/cifar-10-batches-py/{data_batch_1..5,test_batch}``.
    * ``gtsrb``: ``data_dir/{train,test}/<class>/*.ppm|png|jpg`` (also the torchvision and Kaggle
      layouts with a CSV for the flat test folder), resized to 32x32 (PIL).

    ``data_dir`` defaults to ``$CDP_FAST_DATA_DIR`` or ``./data``. Missing files are downloaded via
    torchvision when it is installed (``download=None`` -> unless ``CDP_FAST_NO_DOWNLOAD=1``);
    otherwise FileNotFoundError lists the expected files. GTSRB is decoded once and cached as
    ``data_dir/gtsrb-32x32.npz`` (delete it after changing the folder). ``real_limit=N`` keeps N
    training images, class-balanced and deterministic in ``seed`` (the test split is untouched).
    """
    key = canonical_name(name)
    if key == "digits":
        data = _load_digits()
    elif key in ("mnist", "fashion-mnist"):
        data = _load_idx_dataset(key, _default_dir(data_dir), download)
    elif key == "cifar10":
        data = _load_cifar10(_default_dir(data_dir), download)
    else:
        data = _load_gtsrb(_default_dir(data_dir), download)
    if real_limit is not None:
        keep = torch.from_numpy(balanced_subset(data.y_train, real_limit, seed))
        data = replace(data, x_train=data.x_train[keep].contiguous(), y_train=data.y_train[keep].contiguous())
    return data


def _load_digits() -> ImageData:
    xtr, ytr, xte, yte = (a.copy() for a in _digits_arrays())  # copies: callers may edit in place
    return _make("digits", xtr, ytr, xte, yte, 10)


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    # Fixed stratified split (our own, so it cannot drift with scikit-learn versions): per class,
    # a RandomState(0) permutation; 360 test images shared out by largest remainder.
    rng = np.random.RandomState(0)
    classes, counts = np.unique(y, return_counts=True)
    share = counts * 360 / len(y)
    n_test = np.floor(share).astype(int)
    n_test[np.argsort(-(share - n_test), kind="stable")[: 360 - n_test.sum()]] += 1
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, n_test, strict=True)])
    is_test = np.zeros(len(y), bool)
    is_test[test] = True
    return x[~is_test], y[~is_test], x[is_test], y[is_test]


# --- IDX (MNIST family) ----------------------------------------------------------------------
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read (corrupt or truncated gzip?): {e}") from None


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or ``.gz``), checking the magic number and the size."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim, dt = raw[3], _IDX_TYPES[raw[2]]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    want = head + int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    if len(raw) != want:
        raise ValueError(f"{path}: IDX size mismatch: header says {dims} ({want} bytes), file has {len(raw)} "
                         f"bytes (truncated or corrupt)")
    return np.frombuffer(raw, dt, offset=head).reshape(dims).astype(dt.newbyteorder("="))


def write_idx(path, array) -> Path:
    """Write an IDX file (gzip-compressed when the name ends in ``.gz``); for tests and tooling."""
    a = np.asarray(array)
    codes = {v.newbyteorder("=") if v.itemsize > 1 else v: k for k, v in _IDX_TYPES.items()}
    code = next((k for dt, k in codes.items() if a.dtype == dt), None)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {a.dtype}")
    be = _IDX_TYPES[code]
    payload = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(be).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload)
    return atomic_write_bytes(path, payload)


_IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
              "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def _find_idx(root: Path, key: str) -> dict:
    sub = {"mnist": ("MNIST/raw", "MNIST", "mnist"),
           "fashion-mnist": ("FashionMNIST/raw", "FashionMNIST", "fashion-mnist", "fashion_mnist")}[key]
    dirs = [root] + [root / s for s in sub]
    found = {}
    for k, base in _IDX_FILES.items():
        for d in dirs:
            for fn in (base, base + ".gz", base.replace("-idx", ".idx")):
                if (d / fn).is_file():
                    found.setdefault(k, d / fn)
    return found


def _load_idx_dataset(key: str, root: Path, download) -> ImageData:
    found, note = _find_idx(root, key), ""
    if len(found) < 4 and _want_download(download):
        tvd = _torchvision()
        cls = tvd.MNIST if key == "mnist" else tvd.FashionMNIST
        note = _try_download(key, lambda: [cls(str(root), train=t, download=True) for t in (True, False)])
        found = _find_idx(root, key)
    if len(found) < 4:
        missing = [b for k, b in _IDX_FILES.items() if k not in found]
        raise FileNotFoundError(
            f"{key}: missing IDX files {missing} (raw or .gz) in {root} (also looked in its "
            f"{'MNIST' if key == 'mnist' else 'FashionMNIST'}/raw); pass --data-dir, or install torchvision "
            f"to download them{note}")
    arr = {k: read_idx(p) for k, p in found.items()}
    for split in ("train", "test"):
        x, y = arr[f"x_{split}"], arr[f"y_{split}"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise ValueError(f"{found['x_' + split]}: expected uint8 images N x H x W, got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{found['y_' + split]}: expected {len(x)} labels, got shape {y.shape}")
    if arr["x_train"].shape[1:] != arr["x_test"].shape[1:]:
        raise ValueError(f"{key}: train/test image sizes differ")
    return _make(key, arr["x_train"][:, None], arr["y_train"].astype(np.int64),
                 arr["x_test"][:, None], arr["y_test"].astype(np.int64), 10)


# --- CIFAR-10 python batches -------------------------------------------------------------------
def _allowed_globals() -> dict:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    import _codecs

    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes at protocol <= 2 as _codecs.encode(str, "latin1"): harmless.
        ("_codecs", "encode"): _codecs.encode,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only plain containers/bytes/numbers and numpy arrays; refuses any other global."""

    def find_class(self, module, name):
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays and "
                                         f"plain data are allowed in a CIFAR batch")
        return obj


def read_cifar_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch with a restricted unpickler -> (uint8 [N,3,32,32], int64 [N])."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            d = _RestrictedUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, struct.error) as e:
        raise ValueError(f"{path}: corrupt or truncated CIFAR batch: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict in the CIFAR batch, got {type(d).__name__}")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or ("labels" not in d and "fine_labels" not in d):
        raise ValueError(f"{path}: CIFAR batch lacks 'data'/'labels' (keys: {sorted(map(str, d))})")
    x = np.asarray(d["data"])
    y = np.asarray(d.get("labels", d.get("fine_labels")))
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 [N, 3072], got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be {len(x)} integers, got {y.dtype} {y.shape}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar_dir(root: Path) -> Path | None:
    for d in (root / "cifar-10-batches-py", root):
        if all((d / f).is_file() for f in _CIFAR_FILES):
            return d
    return None


def _load_cifar10(root: Path, download) -> ImageData:
    d, note = _cifar_dir(root), ""
    if d is None and _want_download(download):
        # Download + md5 check only; torchvision's CIFAR10 class would unpickle the batches itself.
        from torchvision.datasets.utils import download_and_extract_archive
        c = _torchvision().CIFAR10
        note = _try_download("cifar10", lambda: download_and_extract_archive(
            c.url, str(root), filename=c.filename, md5=c.tgz_md5))
        d = _cifar_dir(root)
    if d is None:
        raise FileNotFoundError(f"cifar10: expected {', '.join(_CIFAR_FILES)} in {root / 'cifar-10-batches-py'} "
                                f"(the python version of CIFAR-10); pass --data-dir, or install torchvision "
                                f"to download it{note}")
    parts = [read_cifar_batch(d / f) for f in _CIFAR_FILES]
    xtr = np.concatenate([p[0] for p in parts[:5]])
    ytr = np.concatenate([p[1] for p in parts[:5]])
    return _make("cifar10", xtr, ytr, parts[5][0], parts[5][1], 10)


# --- GTSRB -------------------------------------------------------------------------------------
_IMG_EXT = {".ppm", ".png", ".jpg", ".jpeg", ".bmp"}


def _read_image(path: Path, size: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("gtsrb needs Pillow to read and resize images: pip install pillow") from None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except OSError as e:
        raise ValueError(f"{path}: cannot read image: {e}") from None


def _class_dirs(d: Path) -> list[Path]:
    return sorted([p for p in d.iterdir() if p.is_dir()], key=lambda p: (not p.name.isdigit(),
                                                                        int(p.name) if p.name.isdigit() else 0,
                                                                        p.name))


def _label_map(dirs: list[Path]) -> dict:
    names = [p.name for p in dirs]
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def _read_class_folders(d: Path, size: int, labels: dict | None = None):
    dirs = _class_dirs(d)
    labels = labels or _label_map(dirs)
    xs, ys = [], []
    for cd in dirs:
        if cd.name not in labels:
            raise ValueError(f"{cd}: class folder {cd.name!r} is not among the training classes")
        for f in sorted(cd.iterdir()):
            if f.suffix.lower() in _IMG_EXT:
                xs.append(_read_image(f, size))
                ys.append(labels[cd.name])
    if not xs:
        raise ValueError(f"{d}: no images ({', '.join(sorted(_IMG_EXT))}) in its class subfolders")
    return np.stack(xs), np.asarray(ys, np.int64), labels


def _has_class_id(p: Path) -> bool:
    with open(p, errors="replace") as fh:
        return "ClassId" in fh.readline()


def _read_csv_folder(d: Path, csv_path: Path, size: int):
    text = csv_path.read_text()
    head = text.splitlines()[0] if text else ""
    rows = list(csv.DictReader(io.StringIO(text), delimiter=";" if head.count(";") > head.count(",") else ","))
    if not rows or "ClassId" not in rows[0]:
        raise ValueError(f"{csv_path}: expected a CSV with a ClassId column")
    fcol = "Filename" if "Filename" in rows[0] else "Path"
    xs, ys = [], []
    for r in rows:
        f = d / Path(r[fcol]).name
        if not f.is_file():
            raise FileNotFoundError(f"{csv_path} lists {r[fcol]} but {f} does not exist")
        xs.append(_read_image(f, size))
        ys.append(int(r["ClassId"]))
    return np.stack(xs), np.asarray(ys, np.int64)


def _gtsrb_layout(root: Path):
    train = next((d for d in (root / "train", root / "Train", root / "gtsrb/GTSRB/Training",
                              root / "GTSRB/Training", root / "GTSRB/Final_Training/Images") if d.is_dir()), None)
    test = next((d for d in (root / "test", root / "Test", root / "gtsrb/GTSRB/Final_Test/Images",
                             root / "GTSRB/Final_Test/Images") if d.is_dir()), None)
    return train, test


def _load_gtsrb(root: Path, download, size: int = 32) -> ImageData:
    cache = root / f"gtsrb-{size}x{size}.npz"
    if cache.is_file():  # our own cache (no pickles), written after the first decode
        with np.load(cache, allow_pickle=False) as z:
            return _make("gtsrb", z["x_train"], z["y_train"], z["x_test"], z["y_test"], int(z["num_classes"]))
    train, test = _gtsrb_layout(root)
    note = ""
    if (train is None or test is None) and _want_download(download):
        tvd = _torchvision()
        note = _try_download("gtsrb", lambda: [tvd.GTSRB(str(root), split=sp, download=True)
                                               for sp in ("train", "test")])
        train, test = _gtsrb_layout(root)
    if train is None or test is None:
        raise FileNotFoundError(
            f"gtsrb: expected {root}/train/<class>/*.ppm|png|jpg and {root}/test/<class>/... (or the "
            f"torchvision layout {root}/gtsrb/GTSRB/Training + Final_Test/Images with GT-final_test.csv); "
            f"pass --data-dir, or install torchvision to download it{note}")
    xtr, ytr, labels = _read_class_folders(train, size)
    if _class_dirs(test):
        xte, yte, _ = _read_class_folders(test, size, labels)
    else:
        # the official zip also ships GT-final_test.test.csv without labels: want a ClassId column
        csvs = [p for d in (test, test.parent, test.parent.parent, root, root / "gtsrb") if d.is_dir()
                for p in sorted(d.glob("*.csv")) if "test" in p.name.lower() and _has_class_id(p)]
        if not csvs:
            raise FileNotFoundError(f"gtsrb: {test} has no class subfolders and no test CSV "
                                    f"(GT-final_test.csv / Test.csv) was found beside it")
        xte, yte = _read_csv_folder(test, csvs[0], size)
    # numeric folder names are the class ids (00000..00042); otherwise sorted names -> 0..K-1
    num_classes = max(labels.values()) + 1
    data = _make("gtsrb", xtr, ytr, xte, yte, num_classes)
    try:
        _atomic_savez(cache, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
                      num_classes=np.asarray(num_classes))
    except OSError:
        pass  # read-only data dir: just no cache
    return data


def _atomic_savez(path: Path, **arrays) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# conversions
def to_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 0..255 -> float in [0, 1]."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {x.dtype}")
    return x.to(dtype).div_(255.0)


def as_float01(x: torch.Tensor) -> torch.Tensor:
    """Images for a classifier: uint8 -> float [0, 1]; float images pass through (as float32)."""
    if x.dtype == torch.uint8:
        return to_float(x)
    if not torch.is_floating_point(x):
        raise TypeError(f"images must be uint8 or float in [0,1], got {x.dtype}")
    return x.float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [0, 1] -> uint8 (round to nearest, values outside [0, 1] clamped; NaN is an error)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 expects float images in [0, 1], got {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError("to_uint8: images contain NaN")
    return (x.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
