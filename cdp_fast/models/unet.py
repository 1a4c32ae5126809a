"""DDPM-style UNet for epsilon prediction (Ho et al. 2020, the architecture of their CIFAR-10 model).

Layout (per resolution level ``i`` with width ``base_ch * ch_mult[i]``): ``num_res_blocks``
residual blocks (GroupNorm -> SiLU -> conv, time embedding added between the two convs, dropout
before the second conv), self-attention after each block whose feature map has a side length in
``attn_resolutions``, then a stride-2 conv downsample (not after the last level). Middle: res,
attention, res. The decoder mirrors it with ``num_res_blocks + 1`` blocks per level fed by
concatenated skips, nearest-neighbour x2 upsample + conv. A sinusoidal time embedding goes through
a two-layer MLP (width ``4 * base_ch``); with ``num_classes`` a learnt class embedding is added to
it. ``forward(x, t, y=None)`` returns eps with x's shape. With the DDPM CIFAR-10 settings
(``build_unet("ddpm-cifar10", in_channels=3, image_size=32)``) this has 35.7M parameters, as the
paper's model.

Image sizes: every downsample halves the side, so ``image_size`` must be divisible by
``2 ** (len(ch_mult) - 1)``. 8x8 digits use ch_mult (1, 2) (8 -> 4); 28x28 MNIST uses (1, 2, 2)
(28 -> 14 -> 7) — no padding needed; 32x32 data can use four levels (32 -> 4).

Autocast: only conv / linear / GroupNorm / SDPA ops, the time embedding is computed in fp32, so
bf16 autocast and channels_last work unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "build_unet", "PRESETS", "timestep_embedding", "unet_kwargs"]


def _groups(ch: int, max_groups: int = 32) -> int:
    """32 groups as DDPM when wide enough; at least 4 channels per group otherwise.

    With one channel per group GroupNorm would subtract each channel's spatial mean and so erase
    the per-channel time-embedding shift added inside the residual blocks (narrow tiny models).
    """
    g = max(1, min(max_groups, ch // 4))
    while ch % g:
        g -= 1
    return g


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(ch), ch, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM's sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim], fp32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * (-math.log(10000.0) / max(half - 1, 1)))
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (as DDPM), via SDPA."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, 1, HW, C]: one head; reshape (not view) so channels_last inputs work.
        q, k, v = (m(h).reshape(B, C, H * W).transpose(1, 2).unsqueeze(1)
                   for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, base_ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), image_size: int = 32,
                 dropout: float = 0.1, num_classes: int | None = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("base_ch", base_ch), ("num_res_blocks", num_res_blocks),
                        ("image_size", image_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"UNet: {name} must be a positive int, got {v!r}")
        if not ch_mult or any(m < 1 for m in ch_mult):
            raise ValueError(f"UNet: ch_mult must be non-empty positive ints, got {ch_mult}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"UNet: num_classes must be None or a positive int, got {num_classes!r}")
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"UNet: image_size {image_size} is not divisible by 2**(len(ch_mult)-1) = {factor} "
                f"(ch_mult={ch_mult}); use fewer levels (e.g. (1, 2, 2) for 28x28) or pad the images")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_ch=base_ch,
                           ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), image_size=image_size,
                           dropout=float(dropout), num_classes=num_classes)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.base_ch = base_ch
        temb_ch = 4 * base_ch
        self.temb = nn.Sequential(nn.Linear(base_ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.class_emb = nn.Embedding(num_classes, temb_ch) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, base_ch, 3, padding=1)

        # Encoder: a flat list, mirrored by the decoder through the skip stack.
        self.down = nn.ModuleList()
        skip_chs = [base_ch]
        ch, res = base_ch, image_size
        for level, mult in enumerate(ch_mult):
            out = base_ch * mult
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(ch, out, temb_ch, dropout),
                                                AttnBlock(out) if res in attn_resolutions else nn.Identity()]))
                ch = out
                skip_chs.append(ch)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(ch))
                res //= 2
                skip_chs.append(ch)

        self.mid1 = ResBlock(ch, ch, temb_ch, dropout)
        self.mid_attn = AttnBlock(ch)
        self.mid2 = ResBlock(ch, ch, temb_ch, dropout)

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            out = base_ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(ch + skip_chs.pop(), out, temb_ch, dropout),
                                              AttnBlock(out) if res in attn_resolutions else nn.Identity()]))
                ch = out
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2
        assert not skip_chs

        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: expected x of shape [B, {self.in_channels}, H, W], "
                             f"got {tuple(x.shape)}")
        B = x.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        elif t.shape != (B,):
            raise ValueError(f"UNet: t must be a scalar or of shape [{B}], got {tuple(t.shape)}")
        temb = self.temb(timestep_embedding(t.to(x.device), self.base_ch))
        if self.class_emb is not None:
            if y is None:
                raise ValueError("UNet: this model is class-conditional; pass labels y [B]")
            if y.shape != (B,):
                raise ValueError(f"UNet: y must have shape [{B}], got {tuple(y.shape)}")
            temb = temb + self.class_emb(y.to(x.device, torch.long))
        elif y is not None:
            raise ValueError("UNet: labels y given but the model is unconditional (num_classes=None)")

        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            if isinstance(block, Downsample):
                h = block(h)
            else:
                h = block[1](block[0](h, temb))
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block[1](block[0](torch.cat([h, hs.pop()], dim=1), temb))
        return self.conv_out(F.silu(self.norm_out(h)))


# name -> UNet keyword arguments (in/out channels, image size and classes come from the data).
PRESETS: dict[str, dict] = {
    # 8x8 digits on a CPU: ~1-2 minutes of training gives recognisable samples.
    "tiny": dict(base_ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
    # MNIST / Fashion-MNIST 28x28: 28 -> 14 -> 7, attention at 7x7.
    "small": dict(base_ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.1),
    # Ho et al. 2020 CIFAR-10 model: 35.7M parameters.
    "ddpm-cifar10": dict(base_ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                         dropout=0.1),
}


def unet_kwargs(preset: str, *, in_channels: int, image_size: int,
                num_classes: int | None = None) -> dict:
    """The full UNet keyword arguments of a preset (what a checkpoint's config.json stores)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose from {sorted(PRESETS)}")
    kw = dict(PRESETS[preset])
    kw.update(in_channels=in_channels, out_channels=in_channels, image_size=image_size,
              num_classes=num_classes)
    kw["ch_mult"] = list(kw["ch_mult"])
    kw["attn_resolutions"] = list(kw["attn_resolutions"])
    return kw


def build_unet(preset: str, *, in_channels: int, image_size: int,
               num_classes: int | None = None) -> UNet:
    return UNet(**unet_kwargs(preset, in_channels=in_channels, image_size=image_size,
                              num_classes=num_classes))
