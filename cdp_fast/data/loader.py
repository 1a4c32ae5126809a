"""Device-side augmentation and the ``DeviceLoader``: batches of real + synthetic images, mixed on the
device with an exact synthetic count per batch; the synthetic images either kept on the device or read
lazily from a :class:`~cdp_fast.data.synthetic.SyntheticStore` with prefetch; one slice of every
global batch per rank under torch.distributed."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import _DEFAULTS, ImageData, to_float
from .synthetic import SyntheticStore

__all__ = ["random_crop", "random_flip", "augment_batch", "DeviceLoader"]


def _crop_offsets(b: int, padding: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    return oy, ox


def _crop(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, padding: int) -> torch.Tensor:
    b, c, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (padding, padding, padding, padding))
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(b, c, h, w + 2 * padding)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(b, c, h, w)
    return xp.gather(2, rows).gather(3, cols)


def _flip(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m[:, None, None, None], x.flip(3), x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched random crop with zero padding (torchvision RandomCrop(size, padding)), any dtype.

    One offset pair per image, drawn on x's device; two gathers, no per-image Python."""
    if padding <= 0:
        return x
    return _crop(x, *_crop_offsets(x.shape[0], padding, generator, x.device), padding)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 (batched)."""
    return _flip(x, torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5)


_AUGMENTS = ("none", "crop", "flip", "crop-flip")


def augment_batch(x: torch.Tensor, augment: str, padding: int, generator=None) -> torch.Tensor:
    if augment not in _AUGMENTS:
        raise ValueError(f"augment must be one of {_AUGMENTS}, got {augment!r}")
    if "crop" in augment:
        x = random_crop(x, padding, generator)
    if "flip" in augment:
        x = random_flip(x, generator)
    return x


class DeviceLoader:
    """Batches from uint8 tensors kept on the device; augmentation and mixing on the device.

    Each iteration (``for x, y in loader``) is one epoch = one pass over the real images (without
    replacement, reshuffled every epoch when ``shuffle``). With ``synthetic`` every batch holds
    exactly ``n_synthetic = round(batch_size * synthetic_fraction)`` synthetic images drawn with
    replacement and ``n_real = batch_size - n_synthetic`` real ones; the batch is the real images
    first, then the synthetic. Yields ``(x float [B, C, H, W] in [0, 1], y int64 [B])``.
    Deterministic given ``generator`` (a torch.Generator on the data's device) or ``seed``.

    ``synthetic``: ``(images uint8 [N, C, H, W], labels)`` kept on the device, or a
    :class:`SyntheticStore` read lazily: the epoch's synthetic indices are drawn when it starts and a
    background thread reads the next ``prefetch`` batches' rows from disk (into pinned memory
    when the device is CUDA). Both draw the same indices for the same seed.

    ``augment``: "none" | "crop" | "flip" | "crop-flip" (see ``dataset_defaults(name)["augment"]``).
    ``drop_last`` (default) keeps every batch the same size (static shapes for CUDA graphs); with
    ``drop_last=False`` the last batch is smaller and its synthetic count is scaled in proportion.

    ``rank`` / ``world_size`` (torch.distributed): every rank draws the same global batch (same
    generator, same seed) and keeps rows ``rank, rank + world_size, ...`` of it, so each rank holds
    ``batch_size / world_size`` images with its share of real and synthetic ones, augmented with the
    parameters one process would draw for those rows; only its own rows are gathered and read.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, synthetic=None,
                 synthetic_fraction: float | None = None, augment: str = "none", padding: int = 4,
                 shuffle: bool = True, drop_last: bool = True, device=None,
                 generator: torch.Generator | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1, prefetch: int = 2):
        dev = torch.device(device) if device is not None else x.device
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"y must be [N={len(x)}] labels, got {tuple(y.shape)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if augment not in _AUGMENTS:
            raise ValueError(f"augment must be one of {_AUGMENTS}, got {augment!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the number of processes "
                             f"({world_size}): every rank takes batch_size / {world_size} images")
        if synthetic_fraction is None:
            synthetic_fraction = 0.7 if synthetic is not None else 0.0
        if not 0.0 <= synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
        self.x, self.y = x.to(dev), y.to(device=dev, dtype=torch.int64)
        self.n_synthetic = int(round(batch_size * synthetic_fraction))
        self.store: SyntheticStore | None = None
        self.xs = self.ys = None
        if isinstance(synthetic, SyntheticStore):
            if synthetic.shape != tuple(x.shape[1:]):
                raise ValueError(f"synthetic images must be uint8 {tuple(x.shape[1:])} like the real ones, "
                                 f"got {synthetic.shape}")
            self.store = synthetic
        elif synthetic is not None:
            xs, ys = synthetic
            if xs.dtype != torch.uint8 or xs.shape[1:] != x.shape[1:]:
                raise ValueError(f"synthetic images must be uint8 {tuple(x.shape[1:])} like the real ones, "
                                 f"got {xs.dtype} {tuple(xs.shape[1:])}")
            if ys.dim() != 1 or len(ys) != len(xs) or len(xs) == 0:
                raise ValueError(f"synthetic labels must be [N={len(xs)}] (N > 0), got {tuple(ys.shape)}")
            self.xs, self.ys = xs.to(dev), ys.to(device=dev, dtype=torch.int64)
        elif self.n_synthetic:
            raise ValueError(f"synthetic_fraction={synthetic_fraction} but no synthetic data given")
        self.batch_size = batch_size
        self.n_real = batch_size - self.n_synthetic
        if self.n_real and drop_last and len(x) < self.n_real:
            raise ValueError(f"each batch takes {self.n_real} real images but there are only {len(x)}; "
                             f"lower batch_size or use drop_last=False")
        self.augment, self.padding = augment, int(padding)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.dtype, self.channels_last, self.device = dtype, channels_last, dev
        self.rank, self.world_size, self.prefetch = rank, world_size, max(1, int(prefetch))
        if generator is None:
            generator = torch.Generator(device=dev).manual_seed(seed)
        elif generator.device.type != dev.type:
            raise ValueError(f"generator is on {generator.device}, data on {dev}")
        self.generator = generator

    @classmethod
    def from_data(cls, data: ImageData, batch_size: int, *, train: bool = True, **kw) -> "DeviceLoader":
        """Training (augmented per ``dataset_defaults``, shuffled) or test (plain, ordered) loader."""
        if train:
            d = _DEFAULTS.get(data.name, {})
            kw.setdefault("augment", d.get("augment", "none"))
            kw.setdefault("padding", d.get("padding", max(1, data.size // 8)))
            return cls(data.x_train, data.y_train, batch_size, **kw)
        kw.setdefault("shuffle", False)
        kw.setdefault("drop_last", False)
        return cls(data.x_test, data.y_test, batch_size, **kw)

    def __len__(self) -> int:
        n, per = len(self.x), (self.n_real or self.batch_size)  # all-synthetic: as many images as real
        return n // per if self.drop_last else -(-n // per)

    @property
    def n_synthetic_total(self) -> int:
        if self.store is not None:
            return len(self.store)
        return 0 if self.xs is None else len(self.xs)

    def _finish(self, xb: torch.Tensor, rows: torch.Tensor | None, b: int) -> torch.Tensor:
        """Augment (parameters drawn for the global batch of ``b`` images, ``rows`` of it kept) and
        convert to float; with ``rows=None`` the batch is the whole global batch."""
        g, dev = self.generator, self.device
        if "crop" in self.augment and self.padding > 0:
            oy, ox = _crop_offsets(b, self.padding, g, dev)
            xb = _crop(xb, oy, ox, self.padding) if rows is None else _crop(xb, oy[rows], ox[rows], self.padding)
        if "flip" in self.augment:
            m = torch.rand(b, generator=g, device=dev) < 0.5
            xb = _flip(xb, m if rows is None else m[rows])
        xb = to_float(xb, self.dtype)
        return xb.contiguous(memory_format=torch.channels_last) if self.channels_last else xb

    def _lazy_batches(self, index_rows: list[np.ndarray]):
        """(images, labels) of the store at each index array, read ``prefetch`` batches ahead."""
        pin = self.device.type == "cuda"
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthetic-reader") as pool:
            pending = deque(pool.submit(self.store.take, r, pin_memory=pin) for r in index_rows[:self.prefetch])
            for i in range(len(index_rows)):
                xs, ys = pending.popleft().result()
                if i + self.prefetch < len(index_rows):
                    pending.append(pool.submit(self.store.take, index_rows[i + self.prefetch], pin_memory=pin))
                yield xs.to(self.device, non_blocking=True), ys.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, g, dev = len(self.x), self.generator, self.device
        nr, nb, W, r = self.n_real, len(self), self.world_size, self.rank
        order = torch.randperm(n, generator=g, device=dev) if self.shuffle else torch.arange(n, device=dev)
        # per batch: (real indices, number of synthetic images) of the global batch
        plan = []
        for i in range(nb):
            if nr:
                idx = order[i * nr:(i + 1) * nr]
                ns = self.n_synthetic if len(idx) == nr else int(round(len(idx) * self.n_synthetic / nr))
            else:
                idx = None
                ns = self.n_synthetic if (i + 1) * self.batch_size <= n else n - i * self.batch_size
            plan.append((idx, ns))
        # the epoch's synthetic draws (with replacement), all at once: a lazy store reads ahead
        n_syn = self.n_synthetic_total
        sidx = (torch.randint(n_syn, (nb, self.n_synthetic), generator=g, device=dev)
                if n_syn and self.n_synthetic else None)
        rows_of = {}  # global batch size -> (rows of this rank, of them real, synthetic positions)

        def rows_for(n_real_b: int, b: int):
            if (n_real_b, b) not in rows_of:
                pos = torch.arange(r, b, W, device=dev)
                rows_of[(n_real_b, b)] = (pos, pos[pos < n_real_b], pos[pos >= n_real_b] - n_real_b)
            return rows_of[(n_real_b, b)]

        local_syn = []  # this rank's synthetic indices per batch
        for i, (idx, ns) in enumerate(plan):
            n_real_b = 0 if idx is None else len(idx)
            spos = rows_for(n_real_b, n_real_b + ns)[2]
            local_syn.append(None if sidx is None or not ns else sidx[i, :ns] if W == 1 else sidx[i, :ns][spos])
        lazy = None
        if self.store is not None and sidx is not None and nb:
            sizes = [0 if s is None else len(s) for s in local_syn]
            flat = torch.cat([s for s in local_syn if s is not None]).cpu().numpy()  # one copy per epoch
            lazy = self._lazy_batches(np.split(flat, np.cumsum(sizes)[:-1]))
        for i, (idx, ns) in enumerate(plan):
            n_real_b = 0 if idx is None else len(idx)
            b = n_real_b + ns
            rows, rpos, _ = rows_for(n_real_b, b)
            parts_x, parts_y = [], []
            if idx is not None:
                ridx = idx if W == 1 else idx[rpos]
                parts_x.append(self.x[ridx]), parts_y.append(self.y[ridx])
            if lazy is not None:
                xs, ys = next(lazy)
                if ns:
                    parts_x.append(xs), parts_y.append(ys)
            elif ns:
                s = local_syn[i]
                parts_x.append(self.xs[s]), parts_y.append(self.ys[s])
            xb = parts_x[0] if len(parts_x) == 1 else torch.cat(parts_x)
            yb = parts_y[0] if len(parts_y) == 1 else torch.cat(parts_y)
            yield self._finish(xb, None if W == 1 else rows, b), yb
