"""Test oracle: NVlabs/edm training/networks.py restated from the published architecture
(Karras et al. 2022, Appendix F / the released code's layer names), written independently of
cdp_fast/models/edm.py. Persistent classes (torch_utils stand-in) so that pickling an instance
writes EDM's real .pkl format. Small sizes only; fp32."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch_utils import persistence


def _w(shape, mode, fan_in, fan_out):
    u = torch.rand(*shape) * 2 - 1
    n = torch.randn(*shape)
    return {"xavier_uniform": math.sqrt(6 / (fan_in + fan_out)) * u,
            "xavier_normal": math.sqrt(2 / (fan_in + fan_out)) * n,
            "kaiming_uniform": math.sqrt(3 / fan_in) * u,
            "kaiming_normal": math.sqrt(1 / fan_in) * n}[mode]


@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(_w([out_features, in_features], init_mode, in_features, out_features)
                                         * init_weight)
        # nonzero biases in the oracle so that every bias path is exercised by the comparison
        self.bias = torch.nn.Parameter(torch.randn(out_features) * 0.1) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fi, fo = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = (torch.nn.Parameter(_w([out_channels, in_channels, kernel, kernel], init_mode, fi, fo)
                                          * max(init_weight, 0.3)) if kernel else None)
        self.bias = torch.nn.Parameter(torch.randn(out_channels) * 0.1) if kernel and bias else None
        f1 = torch.tensor(resample_filter, dtype=torch.float32)
        f2 = torch.outer(f1, f1)[None, None] / f1.sum() ** 2
        self.register_buffer("resample_filter", f2 if up or down else None)

    def _fir_up(self, x, pad):  # zero-insertion 2x upsampling, filtered (gain 4 keeps the DC level)
        f = (self.resample_filter * 4).expand(x.shape[1], 1, -1, -1)
        return F.conv_transpose2d(x, f, stride=2, padding=pad, groups=x.shape[1])

    def _fir_down(self, x, pad):
        f = self.resample_filter.expand(x.shape[1], 1, -1, -1)
        return F.conv2d(x, f, stride=2, padding=pad, groups=x.shape[1])

    def forward(self, x):
        k = 0 if self.weight is None else self.weight.shape[-1]
        fp = 0 if self.resample_filter is None else (self.resample_filter.shape[-1] - 1) // 2
        if self.fused_resample and self.up and k:
            x = F.conv2d(self._fir_up(x, k // 2 + fp), self.weight)
        elif self.fused_resample and self.down and k:
            x = self._fir_down(F.conv2d(x, self.weight, padding=k // 2 + fp), 0)
        else:
            if self.up:
                x = self._fir_up(x, fp)
            if self.down:
                x = self._fir_down(x, fp)
            if k:
                x = F.conv2d(x, self.weight, padding=k // 2)
        if self.bias is not None:
            x = x + self.bias[None, :, None, None]
        return x


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(num_channels))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(num_channels))

    def forward(self, x):
        n, c = x.shape[:2]
        g = x.reshape(n, self.num_groups, -1)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + self.eps)
        return g.reshape(x.shape) * self.weight[None, :, None, None] + self.bias[None, :, None, None]


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None,
                 init_attn=None):
        super().__init__()
        init = {} if init is None else init  # published defaults: dict() and dict(init_weight=0)
        init_zero = {"init_weight": 0} if init_zero is None else init_zero
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = (0 if not attention else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        rs = dict(resample_filter=resample_filter)
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, **rs, **init)
        self.affine = Linear(emb_channels, out_channels * 2 if adaptive_scale else out_channels, **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            k = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=k, up=up, down=down, **rs, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        e = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = e[:, :self.out_channels], e[:, self.out_channels:]
            h = F.silu(self.norm1(h) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm1(h + e))
        h = self.conv1(h)  # eval mode: dropout is the identity
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            n, c, hh, ww = h.shape
            d = c // self.num_heads
            qkv = self.qkv(self.norm2(h)).reshape(n * self.num_heads, d, 3, hh * ww)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            att = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(d), dim=2)  # [n, query, key]
            a = torch.bmm(v, att.transpose(1, 2))  # [n, d, query]
            h = (self.proj(a.reshape(n, c, hh, ww)) + h) * self.skip_scale
        return h


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        # fp32 throughout, as published: f_k = (1 / max_positions) ** (k / (half - endpoint))
        half = self.num_channels // 2
        denom = half - 1 if self.endpoint else half
        freqs = torch.pow(1 / self.max_positions, torch.arange(half, dtype=torch.float32) / denom)
        arg = torch.outer(x.float(), freqs)
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        arg = torch.outer(x.float(), self.freqs * (2 * math.pi))  # fp32, as published (large |arg| at VP's c_noise)
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


@persistence.persistent_class
class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1)):
        super().__init__()
        self.label_dropout = label_dropout
        E = model_channels * channel_mult_emb
        Nc = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        bk = dict(emb_channels=E, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                  resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                  init=init, init_zero=init_zero, init_attn=init_attn)
        self.map_noise = (PositionalEmbedding(Nc, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(Nc))
        self.map_label = Linear(label_dim, Nc, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, Nc, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(Nc, E, **init)
        self.map_layer1 = Linear(E, E, **init)
        self.enc = torch.nn.ModuleDict()
        c = caux = in_channels
        skips = []
        for lvl, mult in enumerate(channel_mult):
            r = img_resolution >> lvl
            if lvl == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(c, model_channels, kernel=3, **init)
                c = model_channels
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(c, c, down=True, **bk)
                if encoder_type == "skip":
                    self.enc[f"{r}x{r}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                           resample_filter=resample_filter)
                    self.enc[f"{r}x{r}_aux_skip"] = Conv2d(caux, c, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{r}x{r}_aux_residual"] = Conv2d(caux, c, kernel=3, down=True,
                                                               resample_filter=resample_filter,
                                                               fused_resample=True, **init)
                    caux = c
            skips.append(c)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(c, model_channels * mult, attention=r in attn_resolutions,
                                                          **bk)
                c = model_channels * mult
                skips.append(c)
        self.dec = torch.nn.ModuleDict()
        for lvl in reversed(range(len(channel_mult))):
            mult, r = channel_mult[lvl], img_resolution >> lvl
            if lvl == len(channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(c, c, attention=True, **bk)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(c, c, **bk)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(c, c, up=True, **bk)
            for i in range(num_blocks + 1):
                cin = c + skips.pop()
                c = model_channels * mult
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(cin, c, attention=i == num_blocks and r in attn_resolutions,
                                                          **bk)
            if decoder_type == "skip" or lvl == 0:
                if decoder_type == "skip" and lvl < len(channel_mult) - 1:
                    self.dec[f"{r}x{r}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                         resample_filter=resample_filter)
                self.dec[f"{r}x{r}_aux_norm"] = GroupNorm(c, eps=1e-6)
                self.dec[f"{r}x{r}_aux_conv"] = Conv2d(c, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        half = emb.shape[1] // 2
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)  # sin first
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips, aux = [], x
        for name, m in self.enc.items():
            if name.endswith("aux_down"):
                aux = m(aux)
            elif name.endswith("aux_skip"):
                x = x + m(aux)
                skips[-1] = x
            elif name.endswith("aux_residual"):
                x = (x + m(aux)) / math.sqrt(2)
                skips[-1] = aux = x
            else:
                x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
                skips.append(x)
        out = tmp = None
        for name, m in self.dec.items():
            if name.endswith("aux_up"):
                out = m(out)
            elif name.endswith("aux_norm"):
                tmp = m(x)
            elif name.endswith("aux_conv"):
                tmp = m(F.silu(tmp))
                out = tmp if out is None else out + tmp
            else:
                if x.shape[1] != m.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
        return out


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        E = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        bk = dict(emb_channels=E, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, E, **init)
        self.map_layer1 = Linear(E, E, **init)
        self.map_label = (Linear(label_dim, E, bias=False, init_mode="kaiming_normal", init_weight=np.sqrt(label_dim))
                          if label_dim else None)
        self.enc = torch.nn.ModuleDict()
        c = in_channels
        skips = []
        for lvl, mult in enumerate(channel_mult):
            r = img_resolution >> lvl
            if lvl == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(c, model_channels * mult, kernel=3, **init)
                c = model_channels * mult
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(c, c, down=True, **bk)
            skips.append(c)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(c, model_channels * mult, attention=r in attn_resolutions,
                                                          **bk)
                c = model_channels * mult
                skips.append(c)
        self.dec = torch.nn.ModuleDict()
        for lvl in reversed(range(len(channel_mult))):
            mult, r = channel_mult[lvl], img_resolution >> lvl
            if lvl == len(channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(c, c, attention=True, **bk)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(c, c, **bk)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(c, c, up=True, **bk)
            for i in range(num_blocks + 1):
                cin = c + skips.pop()
                c = model_channels * mult
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(cin, c, attention=r in attn_resolutions, **bk)
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
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


class _Precond(torch.nn.Module):
    def _setup(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs):
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[model_type](
            img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim,
            **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.double()
        s = torch.as_tensor(sigma).double().reshape(-1, 1, 1, 1)
        if self.label_dim:
            class_labels = (torch.zeros(1, self.label_dim) if class_labels is None
                            else class_labels.float().reshape(-1, self.label_dim))
        else:
            class_labels = None
        c_skip, c_out, c_in, c_noise = self.precond(s)
        F_x = self.model((c_in * x).float(), c_noise.flatten().float(), class_labels=class_labels, **model_kwargs)
        return (c_skip * x + c_out * F_x.double()).float()

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


@persistence.persistent_class
class EDMPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def precond(self, s):  # EDM Table 1, "ours"
        sd = self.sigma_data
        return sd ** 2 / (s ** 2 + sd ** 2), s * sd / torch.sqrt(s ** 2 + sd ** 2), 1 / torch.sqrt(sd ** 2 + s ** 2), \
            torch.log(s) / 4


@persistence.persistent_class
class VPPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000,
                 epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):  # sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
        t = torch.as_tensor(t)
        return torch.sqrt(torch.exp(0.5 * self.beta_d * t ** 2 + self.beta_min * t) - 1)

    def precond(self, s):  # EDM Table 1, VP; c_noise = (M - 1) t(sigma), t the inverse of sigma(t)
        t = (torch.sqrt(self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(s ** 2)) - self.beta_min) / self.beta_d
        return 1, -s, 1 / torch.sqrt(s ** 2 + 1), (self.M - 1) * t


@persistence.persistent_class
class VEPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type="SongUNet", **model_kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def precond(self, s):  # EDM Table 1, VE
        return 1, s, 1, torch.log(s / 2)
