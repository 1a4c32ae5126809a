"""Device-side augmentation and the ``DeviceLoader``: batches of real + synthetic images, mixed on the
device with an exact synthetic count per batch."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .datasets import _DEFAULTS, ImageData, to_float

__all__ = ["random_crop", "random_flip", "augment_batch", "DeviceLoader"]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched random crop with zero padding (torchvision RandomCrop(size, padding)), any dtype.

    One offset pair per image, drawn on x's device; two gathers, no per-image Python."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(b, c, h, w + 2 * padding)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(b, c, h, w)
    return xp.gather(2, rows).gather(3, cols)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 (batched)."""
    m = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(m[:, None, None, None], x.flip(3), x)


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
    replacement, reshuffled every epoch when ``shuffle``). With ``synthetic=(xs, ys)`` every batch
    holds exactly ``n_synthetic = round(batch_size * synthetic_fraction)`` synthetic images drawn
    with replacement and ``n_real = batch_size - n_synthetic`` real ones; the batch is the real
    images first, then the synthetic. Yields ``(x float [B, C, H, W] in [0, 1], y int64 [B])``.
    Deterministic given ``generator`` (a torch.Generator on the data's device) or ``seed``.

    ``augment``: "none" | "crop" | "flip" | "crop-flip" (see ``dataset_defaults(name)["augment"]``).
    ``drop_last`` (default) keeps every batch the same size (static shapes for CUDA graphs); with
    ``drop_last=False`` the last batch is smaller and its synthetic count is scaled in proportion.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, synthetic=None,
                 synthetic_fraction: float | None = None, augment: str = "none", padding: int = 4,
                 shuffle: bool = True, drop_last: bool = True, device=None,
                 generator: torch.Generator | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False):
        dev = torch.device(device) if device is not None else x.device
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"y must be [N={len(x)}] labels, got {tuple(y.shape)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if augment not in _AUGMENTS:
            raise ValueError(f"augment must be one of {_AUGMENTS}, got {augment!r}")
        if synthetic_fraction is None:
            synthetic_fraction = 0.7 if synthetic is not None else 0.0
        if not 0.0 <= synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
        self.x, self.y = x.to(dev), y.to(device=dev, dtype=torch.int64)
        self.n_synthetic = int(round(batch_size * synthetic_fraction))
        if synthetic is not None:
            xs, ys = synthetic
            if xs.dtype != torch.uint8 or xs.shape[1:] != x.shape[1:]:
                raise ValueError(f"synthetic images must be uint8 {tuple(x.shape[1:])} like the real ones, "
                                 f"got {xs.dtype} {tuple(xs.shape[1:])}")
            if ys.dim() != 1 or len(ys) != len(xs) or len(xs) == 0:
                raise ValueError(f"synthetic labels must be [N={len(xs)}] (N > 0), got {tuple(ys.shape)}")
            self.xs, self.ys = xs.to(dev), ys.to(device=dev, dtype=torch.int64)
        else:
            if self.n_synthetic:
                raise ValueError(f"synthetic_fraction={synthetic_fraction} but no synthetic data given")
            self.xs = self.ys = None
        self.batch_size = batch_size
        self.n_real = batch_size - self.n_synthetic
        if self.n_real and drop_last and len(x) < self.n_real:
            raise ValueError(f"each batch takes {self.n_real} real images but there are only {len(x)}; "
                             f"lower batch_size or use drop_last=False")
        self.augment, self.padding = augment, int(padding)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.dtype, self.channels_last, self.device = dtype, channels_last, dev
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

    def _finish(self, xb: torch.Tensor) -> torch.Tensor:
        if self.augment != "none":
            xb = augment_batch(xb, self.augment, self.padding, self.generator)
        xb = to_float(xb, self.dtype)
        return xb.contiguous(memory_format=torch.channels_last) if self.channels_last else xb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, g, dev = len(self.x), self.generator, self.device
        nr = self.n_real
        order = torch.randperm(n, generator=g, device=dev) if self.shuffle else torch.arange(n, device=dev)
        for i in range(len(self)):
            if nr:
                idx = order[i * nr:(i + 1) * nr]
                xb, yb = self.x[idx], self.y[idx]
                ns = self.n_synthetic if len(idx) == nr else int(round(len(idx) * self.n_synthetic / nr))
            else:
                xb = yb = None
                ns = self.n_synthetic if (i + 1) * self.batch_size <= n else n - i * self.batch_size
            if ns:
                sidx = torch.randint(len(self.xs), (ns,), generator=g, device=dev)
                xs, ys = self.xs[sidx], self.ys[sidx]
                xb = xs if xb is None else torch.cat([xb, xs])
                yb = ys if yb is None else torch.cat([yb, ys])
            yield self._finish(xb), yb
