"""EDM's networks and preconditioners (Karras et al. 2022), re-implemented (docs/METHOD.md §14,
"EDM networks and preconditioning").

``SongUNet`` (DDPM++ / NCSN++ of Song et al. 2021), ``DhariwalUNet`` (ADM of Dhariwal & Nichol
2021) and the ``EDMPrecond`` / ``VPPrecond`` / ``VEPrecond`` wrappers that turn a raw network F
into the denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise). Module names, parameter and
buffer names, constructor arguments and the order of every floating-point operation follow NVlabs'
published ``training/networks.py``, so a state dict taken from one of their ``.pkl`` files
(``cdp_fast.models.edm_pickle``) loads here unchanged and gives the same outputs in fp32.
Every preconditioner satisfies ``cdp_fast.denoiser.Denoiser``.

A converted / trained EDM model is stored as a folder: ``model.safetensors`` (the state dict) and
``config.json`` with ``"kind": "edm"`` and ``"edm": {"precond": NAME, "init_kwargs": {...}}``
(the constructor arguments, plain JSON) -- ``save_folder`` / ``load_folder``.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
           "SongUNet", "DhariwalUNet", "EDMPrecond", "VPPrecond", "VEPrecond", "NETWORKS", "PRECONDS",
           "build", "edm_loss", "save_folder", "load_folder", "is_edm_folder", "describe"]


_SKIP_INIT = [False]  # set by build(init=False): the weights come from a file


def _init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """EDM's initialisers (uniform ones scaled from U(-1, 1), normal ones from N(0, 1))."""
    if _SKIP_INIT[0]:
        return torch.zeros(*shape)
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode {mode!r}")


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1,
                 init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fan = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init([out_features, in_features], **fan) * init_weight)
        self.bias = nn.Parameter(_init([out_features], **fan) * init_bias) if bias else None

    def forward(self, x):
        y = x @ self.weight.to(x.dtype).t()
        return y.add_(self.bias.to(x.dtype)) if self.bias is not None else y


class Conv2d(nn.Module):
    """Conv with optional 2x FIR up/downsampling (``kernel == 0``: resampling only)."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False, init_mode="kaiming_normal", init_weight=1,
                 init_bias=0):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        k2 = kernel * kernel
        fan = dict(mode=init_mode, fan_in=in_channels * k2, fan_out=out_channels * k2)
        self.weight = (nn.Parameter(_init([out_channels, in_channels, kernel, kernel], **fan) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(_init([out_channels], **fan) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()  # separable 2-D filter, unit gain
        self.register_buffer("resample_filter", f if (up or down) else None)

    def forward(self, x):
        dt = x.dtype
        w = None if self.weight is None else self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        f = None if self.resample_filter is None else self.resample_filter.to(dt)
        wp = 0 if w is None else w.shape[-1] // 2
        fp = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and (self.up or self.down):
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=wp + fp)
                x = F.conv2d(x, w)
            else:
                x = F.conv2d(x, w, padding=wp + fp)
                x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=fp)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=fp)
            if w is not None:
                x = F.conv2d(x, w, padding=wp)
        return x.add_(b.reshape(1, -1, 1, 1)) if b is not None else x


class GroupNorm(nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def _attention_weights(q, k):
    """softmax_k(q . k / sqrt(C)) computed in fp32, returned in q's dtype (as EDM's AttentionOp)."""
    scaled_k = (k / math.sqrt(k.shape[1])).to(torch.float32)
    return torch.einsum("ncq,nck->nqk", q.to(torch.float32), scaled_k).softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """The residual block shared by DDPM++, NCSN++ and ADM, with optional resampling + attention."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True,
                 init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = {} if init is None else dict(init)
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            k = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, k, up=up, down=down, resample_filter=resample_filter,
                               **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        p = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        if self.adaptive_scale:
            scale, shift = p.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h.add_(p)))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = h.add_(x if self.skip is None else self.skip(x))
        h = h * self.skip_scale
        if self.num_heads:
            n, c = h.shape[0], h.shape[1]
            q, k, v = self.qkv(self.norm2(h)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            a = torch.einsum("nqk,nck->ncq", _attention_weights(q, k), v)
            h = self.proj(a.reshape(*h.shape)).add_(h)
            h = h * self.skip_scale
        return h


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos | sin] of a (continuous) noise label (DDPM++, ADM)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(0, half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos | sin] of the noise label (NCSN++); ``freqs`` is a buffer."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", _init([num_channels // 2], "kaiming_normal", 1, 1) * scale)  # N(0, scale^2)

    def forward(self, x):
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _label_keep(x, labels, p):
    # label dropout for classifier-free guidance training (identity in eval or with p = 0)
    return labels * (torch.rand([x.shape[0], 1], device=x.device) >= p).to(labels.dtype)


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, standard encoder, [1,1] filter) / NCSN++ (Fourier embedding,
    residual encoder, [1,3,3,1] filter) as EDM restates them."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, label_dropout=0, embedding_type="positional",
                 channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                 resample_filter=(1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"SongUNet: embedding_type must be fourier|positional, got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"SongUNet: encoder_type must be standard|skip|residual, got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"SongUNet: decoder_type must be standard|skip, got {decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_ch = model_channels * channel_mult_emb
        noise_ch = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        bk = dict(emb_channels=emb_ch, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                  resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                  init=init, init_zero=init_zero, init_attn=init_attn)

        self.map_noise = (PositionalEmbedding(noise_ch, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_ch))
        self.map_label = Linear(label_dim, noise_ch, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_ch, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_ch, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = Conv2d(cout, model_channels, 3, **init)
                cout = model_channels
            else:
                self.enc[f"{tag}_down"] = UNetBlock(cout, cout, down=True, **bk)
                if encoder_type == "skip":
                    self.enc[f"{tag}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{tag}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                elif encoder_type == "residual":
                    self.enc[f"{tag}_aux_residual"] = Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                                             fused_resample=True, **init)
                    caux = cout
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{tag}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **bk)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        last = len(channel_mult) - 1
        for level in range(last, -1, -1):
            mult = channel_mult[level]
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == last:
                self.dec[f"{tag}_in0"] = UNetBlock(cout, cout, attention=True, **bk)
                self.dec[f"{tag}_in1"] = UNetBlock(cout, cout, **bk)
            else:
                self.dec[f"{tag}_up"] = UNetBlock(cout, cout, up=True, **bk)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{tag}_block{i}"] = UNetBlock(cin, cout, attention=(i == num_blocks and res in attn_resolutions),
                                                        **bk)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last:
                    self.dec[f"{tag}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                       resample_filter=resample_filter)
                self.dec[f"{tag}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{tag}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [sin | cos], as Song et al.
        if self.map_label is not None:
            lab = class_labels
            if self.training and self.label_dropout:
                lab = _label_keep(x, lab, self.label_dropout)
            emb = emb + self.map_label(lab * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, m in self.enc.items():
            if "aux_down" in name:
                aux = m(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + m(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + m(aux)) / np.sqrt(2)
            else:
                x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
                skips.append(x)

        aux = tmp = None
        for name, m in self.dec.items():
            if "aux_up" in name:
                aux = m(aux)
            elif "aux_norm" in name:
                tmp = m(x)
            elif "aux_conv" in name:
                tmp = m(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != m.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
        return aux


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021) as EDM restates it."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_ch = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        bk = dict(emb_channels=emb_ch, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)
        self.map_label = (Linear(label_dim, emb_ch, bias=False, init_mode="kaiming_normal",
                                 init_weight=np.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = Conv2d(cout, model_channels * mult, 3, **init)
                cout = model_channels * mult
            else:
                self.enc[f"{tag}_down"] = UNetBlock(cout, cout, down=True, **bk)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{tag}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **bk)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        last = len(channel_mult) - 1
        for level in range(last, -1, -1):
            mult = channel_mult[level]
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == last:
                self.dec[f"{tag}_in0"] = UNetBlock(cout, cout, attention=True, **bk)
                self.dec[f"{tag}_in1"] = UNetBlock(cout, cout, **bk)
            else:
                self.dec[f"{tag}_up"] = UNetBlock(cout, cout, up=True, **bk)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{tag}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **bk)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            lab = class_labels
            if self.training and self.label_dropout:
                lab = _label_keep(x, lab, self.label_dropout)
            emb = emb + self.map_label(lab)
        emb = F.silu(emb)
        skips = []
        for m in self.enc.values():
            x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
            skips.append(x)
        for m in self.dec.values():
            if x.shape[1] != m.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = m(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


NETWORKS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class _Precond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM Table 1); subclasses give the c's.

    Satisfies ``cdp_fast.denoiser.Denoiser``. ``init_kwargs`` keeps the constructor arguments
    (what a checkpoint folder stores to rebuild the module)."""

    default_model = "SongUNet"

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type=None,
                 **model_kwargs):
        super().__init__()
        model_type = model_type or self.default_model
        if model_type not in NETWORKS:
            raise ValueError(f"{type(self).__name__}: unknown model_type {model_type!r} (known: {sorted(NETWORKS)})")
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        self.label_dim, self.use_fp16, self.model_type = int(label_dim), bool(use_fp16), model_type
        self.model = NETWORKS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                          out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma):  # -> c_skip, c_out, c_in, c_noise (sigma: [N, 1, 1, 1] fp32)
        raise NotImplementedError

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)  # continuous sigma

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if fp16 else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        if augment_labels is not None:
            model_kwargs["augment_labels"] = augment_labels
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)


class EDMPrecond(_Precond):
    """EDM's own preconditioning (sigma_data = 0.5): unit-variance input and training target."""

    default_model = "DhariwalUNet"

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


class VPPrecond(_Precond):
    """Song et al.'s VP SDE as a denoiser: F predicts -epsilon, c_noise = (M - 1) t(sigma)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        with torch.device("cpu"):  # fp32 on the CPU as EDM, whatever device the net is built on
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """Song et al.'s VE SDE as a denoiser: F predicts epsilon, c_noise = ln(sigma / 2)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


PRECONDS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond}


def _plain(v, where):
    """JSON-able copy of an init argument (numbers, strings, bools, None, lists, str-keyed dicts)."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x, where) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _plain(x, f"{where}.{k}") for k, x in v.items()}
    raise ValueError(f"{where}: unsupported value of type {type(v).__name__} (only numbers, strings, "
                     f"lists and dicts are accepted as network arguments)")


def build(precond: str, init_kwargs: dict, *, device=None, init: bool = True) -> _Precond:
    """A preconditioner ``precond`` ("EDMPrecond" | "VPPrecond" | "VEPrecond") from its constructor
    arguments; ``init=False`` skips the random init (zeros: the weights are loaded next)."""
    if precond not in PRECONDS:
        raise ValueError(f"unknown EDM preconditioner {precond!r} (supported: {sorted(PRECONDS)})")
    kw = _plain(dict(init_kwargs), precond)
    _SKIP_INIT[0] = not init
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            net = PRECONDS[precond](**kw)
    except TypeError as e:
        raise ValueError(f"{precond}: constructor arguments {kw} not accepted: {e}") from None
    finally:
        _SKIP_INIT[0] = False
    net.init_kwargs = kw
    return net


def describe(net: _Precond) -> dict:
    """The facts a sampler needs about an EDM denoiser (load_diffusion's meta)."""
    L = net.label_dim
    return {"kind": "edm", "precond": type(net).__name__, "arch": net.model_type,
            "image_shape": [net.img_channels, net.img_resolution, net.img_resolution],
            "label_dim": L, "class_conditional": L > 0,
            "sigma_min": float(net.sigma_min), "sigma_max": float(net.sigma_max),
            "sigma_data": float(getattr(net, "sigma_data", 0.5)),
            "prediction": "denoiser", "data_range": [-1.0, 1.0], "schedule": None}


def edm_loss(net: _Precond, y: torch.Tensor, labels: Optional[torch.Tensor] = None, *, P_mean: float = -1.2,
             P_std: float = 1.2, sigma_data: float = 0.5, generator=None) -> torch.Tensor:
    """EDM's training loss (METHOD.md §14), per element:
    ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    weight * (D(y + sigma n; sigma) - y)^2."""
    rnd = torch.randn([y.shape[0], 1, 1, 1], device=y.device, generator=generator)
    sigma = (rnd * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    n = torch.randn(y.shape, device=y.device, generator=generator) * sigma
    return weight * (net(y + n, sigma, labels) - y) ** 2


# --- checkpoint folder --------------------------------------------------------------------------

def is_edm_folder(path) -> bool:
    """Whether ``path`` is a folder whose config.json says ``"kind": "edm"``."""
    import json
    cf = Path(path) / "config.json"
    if not cf.is_file():
        return False
    try:
        cfg = json.loads(cf.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("kind") == "edm"


def save_folder(folder, net: _Precond, meta: dict, *, fmt: str, loss_log: list | None = None) -> Path:
    """``model.safetensors`` + ``config.json`` (``fmt`` the format tag, ``"kind": "edm"``, the
    preconditioner name and init_kwargs, ``describe(net)``, then ``meta``); config.json last."""
    from safetensors.torch import save as st_save

    from ..utils import atomic_write_bytes, write_json

    net = getattr(net, "_orig_mod", net)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise ValueError("save: refusing to save non-finite weights (loss diverged?)")
    facts = describe(net)  # what the network says wins over the caller's meta
    cfg = dict(facts, **{k: v for k, v in meta.items() if k not in ("format", "version", "edm", *facts)})
    # strict JSON: EDMPrecond's default sigma_max is inf (no limit) -> null
    cfg = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in cfg.items()}
    cfg.update(format=fmt, version=1, kind="edm",
               edm={"precond": type(net).__name__, "init_kwargs": net.init_kwargs})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "model.safetensors", st_save(state, metadata={"format": fmt}))
    if loss_log is not None:
        write_json(folder / "metrics.json", {"loss_log": loss_log})
    write_json(folder / "config.json", cfg)
    return folder


def load_folder(folder, device="cpu", *, fmt: str):
    """-> (denoiser in eval mode, None, meta) from a folder written by ``save_folder``."""
    from .checkpoint import load_into, read_file, read_json_object

    folder = Path(folder)
    cfg = read_json_object(folder / "config.json")
    if cfg.get("format") != fmt or cfg.get("kind") != "edm":
        raise ValueError(f"{folder}/config.json is not a cdp-fast EDM checkpoint (format={cfg.get('format')!r}, "
                         f"kind={cfg.get('kind')!r})")
    e = cfg.get("edm")
    if not isinstance(e, dict) or not isinstance(e.get("init_kwargs"), dict):
        raise ValueError(f"{folder}/config.json lacks the 'edm' entry (precond + init_kwargs)")
    wpath = folder / "model.safetensors"
    if not wpath.is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors")
    net = build(e.get("precond"), e["init_kwargs"], init=False)
    load_into(net, read_file(wpath), str(wpath), what=f"the {e.get('precond')} described by config.json")
    net = net.to(device).eval().requires_grad_(False)
    return net, None, dict(cfg, **describe(net))
