"""The UNet of Ho et al. 2020 (DDPM) as released, with the original parameter names.

Written from the paper's architecture and the converted PyTorch checkpoints' layout
(``temb.dense.{0,1}``, ``conv_in``, ``down.{i}.block.{j}.{norm1,conv1,temb_proj,norm2,conv2,
nin_shortcut}``, ``down.{i}.attn.{j}.{norm,q,k,v,proj_out}``, ``down.{i}.downsample.conv``,
``mid.{block_1,attn_1,block_2}``, ``up.{i}.block.{j}``, ``up.{i}.attn.{j}``, ``up.{i}.upsample.conv``,
``norm_out``, ``conv_out``), so the original checkpoints (CIFAR-10 35.7M, LSUN / CelebA-HQ 256px)
load key for key and diffusers' ``UNet2DModel`` copies of them load through :func:`from_diffusers`.

Details that differ from ``cdp_fast.models.unet.UNet`` and matter for the released weights:
the downsample pads (0, 1, 0, 1) and convolves with stride 2, padding 0 (TF "SAME"); GroupNorm has
32 groups; the sinusoidal embedding is [sin, cos] with frequencies exp(-log(1e4) * i / (half - 1));
attention is one head over the H*W positions scaled by C^-1/2. ``forward(x, t[, y])`` has the
sampler's call signature (x in [-1, 1] -> eps); GroupNorm, convs and SDPA only, so bf16 autocast,
channels_last and CUDA-graph capture work as with the built-in UNets.

A few options cover the diffusers configs of the same family (``norm_groups``, ``attn_head_dim``
for multi-head attention, ``flip_sin_to_cos``/``freq_shift``, ``downsample_padding=1``); their
defaults are the original model.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Upsample  # the same nearest x2 + 3x3 conv as the original

__all__ = ["DDPMUNet", "DDPM_CONFIGS", "infer_config", "from_diffusers", "diffusers_config_to_kwargs"]


def _embed(t: torch.Tensor, dim: int, flip: bool, shift: float) -> torch.Tensor:
    # the operation order of diffusers' get_timestep_embedding (fp32 equality at t ~ 1000)
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - shift))
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_ch: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, groups: int, eps: float, heads: int = 1):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention: {ch} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        nh = self.heads
        # [B, heads, HW, C/heads]; reshape (not view) so channels_last inputs work
        q, k, v = (m(h).reshape(B, nh, C // nh, H * W).transpose(2, 3) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    def __init__(self, ch: int, padding: int = 0):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # the original: TF "SAME" for stride 2 pads right/bottom only
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class DDPMUNet(nn.Module):
    """Ho et al.'s eps-prediction UNet (see the module docstring). ``config`` rebuilds it."""

    arch = "ddpm"

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), image_size: int = 32, dropout: float = 0.1,
                 norm_groups: int = 32, norm_eps: float = 1e-6, attn_head_dim: int | None = None,
                 flip_sin_to_cos: bool = False, freq_shift: float = 1.0, downsample_padding: int = 0,
                 num_classes: None = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if num_classes is not None:
            raise ValueError("DDPMUNet is unconditional (num_classes must be None)")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("ch", ch),
                        ("num_res_blocks", num_res_blocks), ("image_size", image_size),
                        ("norm_groups", norm_groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DDPMUNet: {name} must be a positive int, got {v!r}")
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"DDPMUNet: ch_mult must be positive ints, got {ch_mult}")
        if downsample_padding not in (0, 1):
            raise ValueError(f"DDPMUNet: downsample_padding must be 0 (original) or 1, got {downsample_padding}")
        widths = [ch] + [ch * m for m in ch_mult]
        bad = sorted({w for w in widths if w % norm_groups})
        if bad:
            raise ValueError(f"DDPMUNet: widths {bad} are not divisible by norm_groups={norm_groups}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=list(ch_mult),
                           num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                           image_size=image_size, dropout=float(dropout), norm_groups=norm_groups,
                           norm_eps=float(norm_eps), attn_head_dim=attn_head_dim,
                           flip_sin_to_cos=bool(flip_sin_to_cos), freq_shift=float(freq_shift),
                           downsample_padding=downsample_padding, num_classes=None)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, None
        self.ch = ch
        g, eps = norm_groups, norm_eps

        def heads(c):
            return 1 if attn_head_dim is None else c // attn_head_dim

        temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        levels = len(ch_mult)
        in_mult = (1,) + ch_mult
        res = image_size
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(levels):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                lvl.block.append(ResnetBlock(block_in, block_out, temb_ch, dropout, g, eps))
                block_in = block_out
                if res in attn_resolutions:
                    lvl.attn.append(AttnBlock(block_in, g, eps, heads(block_in)))
            if i != levels - 1:
                lvl.downsample = Downsample(block_in, downsample_padding)
                res //= 2
            self.down.append(lvl)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, dropout, g, eps)
        self.mid.attn_1 = AttnBlock(block_in, g, eps, heads(block_in))
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, dropout, g, eps)

        up = []
        for i in reversed(range(levels)):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i]
            for j in range(num_res_blocks + 1):
                skip = ch * (in_mult[i] if j == num_res_blocks else ch_mult[i])
                lvl.block.append(ResnetBlock(block_in + skip, block_out, temb_ch, dropout, g, eps))
                block_in = block_out
                if res in attn_resolutions:
                    lvl.attn.append(AttnBlock(block_in, g, eps, heads(block_in)))
            if i != 0:
                lvl.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, lvl)
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(g, block_in, eps=eps)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            raise ValueError("DDPMUNet: this model is unconditional; labels y cannot be used")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DDPMUNet: expected x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        B = x.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device)
        t = t.to(x.device)
        if t.ndim == 0:
            t = t.expand(B)
        elif t.shape != (B,):
            raise ValueError(f"DDPMUNet: t must be a scalar or of shape [{B}], got {tuple(t.shape)}")
        c = self.config
        temb = _embed(t, self.ch, c["flip_sin_to_cos"], c["freq_shift"])
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for lvl in self.down:
            for j, block in enumerate(lvl.block):
                h = block(hs[-1], temb)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
                hs.append(h)
            if hasattr(lvl, "downsample"):
                hs.append(lvl.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for i in reversed(range(len(self.up))):
            lvl = self.up[i]
            for j, block in enumerate(lvl.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# The released configurations (Ho et al. 2020, Appendix B); dropout only matters for training.
DDPM_CONFIGS: dict[str, dict] = {
    "cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), image_size=32,
                    dropout=0.1),
    "lsun-celebahq-256": dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                              image_size=256, dropout=0.0),
}


def infer_config(state, *, image_size: int | None = None, norm_groups: int | None = None) -> dict:
    """DDPMUNet keyword arguments from an original-format state dict's keys and shapes.

    Channels, levels, blocks per level and the attention levels come from the tensors. The image
    size is not stored in the weights: DDPM attends at 16x16, so it is 16 * 2**(attention level)
    unless ``image_size`` is given. GroupNorm groups: 32 (the original) unless ``norm_groups``."""
    need = ("conv_in.weight", "conv_out.weight", "temb.dense.0.weight", "down.0.block.0.conv1.weight")
    lacking = [k for k in need if k not in state]
    if lacking:
        sample = sorted(state)[:6]
        raise ValueError(f"not an original DDPM state dict: lacks {lacking} (keys start with {sample})")
    ch, cin = state["conv_in.weight"].shape[:2]
    cout = state["conv_out.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("down."))
    ch_mult, attn_levels = [], []
    for i in range(levels):
        w = state.get(f"down.{i}.block.0.conv1.weight")
        if w is None or w.shape[0] % ch:
            raise ValueError(f"original DDPM state dict: level {i} lacks down.{i}.block.0.conv1.weight "
                             f"or its width is not a multiple of {ch}")
        ch_mult.append(w.shape[0] // ch)
        if any(k.startswith(f"down.{i}.attn.") for k in state):
            attn_levels.append(i)
    nrb = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("down.0.block."))
    if image_size is None:
        if len(attn_levels) != 1:
            raise ValueError(f"cannot infer the image size (attention at levels {attn_levels}); pass image_size=")
        image_size = 16 * 2 ** attn_levels[0]
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size {image_size} is not divisible by 2**{levels - 1}")
    return dict(in_channels=int(cin), out_channels=int(cout), ch=int(ch), ch_mult=ch_mult, num_res_blocks=nrb,
                attn_resolutions=[image_size // 2 ** i for i in attn_levels], image_size=int(image_size),
                dropout=0.0, norm_groups=32 if norm_groups is None else int(norm_groups))


# ---------------------------------------------------------------------------------------------
# diffusers UNet2DModel <-> original names
_SUPPORTED = dict(center_input_sample=False, time_embedding_type="positional", act_fn="silu",
                  mid_block_scale_factor=1, resnet_time_scale_shift="default", add_attention=True,
                  class_embed_type=None, num_class_embeds=None, time_embedding_dim=None,
                  downsample_type="conv", upsample_type="conv", mid_block_type="UNetMidBlock2D")


def diffusers_config_to_kwargs(cfg: dict) -> dict:
    """DDPMUNet keyword arguments for a diffusers ``UNet2DModel`` config (ValueError if unsupported)."""
    where = "diffusers UNet2DModel config"
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"{where}: only UNet2DModel is supported, got {cls!r}")
    for k, v in _SUPPORTED.items():
        if k in cfg and cfg[k] != v and not (k == "mid_block_scale_factor" and float(cfg[k]) == 1.0):
            raise ValueError(f"{where}: {k}={cfg[k]!r} is not the DDPM architecture (supported: {v!r})")
    if cfg.get("attn_norm_num_groups") not in (None, cfg.get("norm_num_groups", 32)):
        raise ValueError(f"{where}: attn_norm_num_groups={cfg['attn_norm_num_groups']} is not supported")
    boc = list(cfg.get("block_out_channels", (224, 448, 672, 896)))
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    if len(down) != len(boc) or len(up) != len(boc):
        raise ValueError(f"{where}: {len(boc)} block_out_channels but {len(down)} down / {len(up)} up blocks")
    known_d, known_u = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")
    if any(d not in known_d for d in down) or any(u not in known_u for u in up):
        raise ValueError(f"{where}: block types {down} / {up} are not DDPM's ({known_d} / {known_u})")
    L = len(boc)
    attn_levels = [i for i, d in enumerate(down) if d.startswith("Attn")]
    if [L - 1 - i for i, u in enumerate(up) if u.startswith("Attn")][::-1] != attn_levels:
        raise ValueError(f"{where}: attention in down blocks {down} and up blocks {up} do not mirror")
    ch = int(boc[0])
    if any(c % ch for c in boc):
        raise ValueError(f"{where}: block_out_channels {boc} are not multiples of the first")
    size = cfg.get("sample_size", 32)
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ValueError(f"{where}: non-square sample_size {size} is not supported")
        size = int(size[0])
    freq_shift = cfg.get("freq_shift", 0)
    return dict(in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
                ch=ch, ch_mult=[c // ch for c in boc], num_res_blocks=int(cfg.get("layers_per_block", 2)),
                attn_resolutions=[size // 2 ** i for i in attn_levels], image_size=size,
                dropout=float(cfg.get("dropout", 0.0)), norm_groups=int(cfg.get("norm_num_groups", 32)),
                norm_eps=float(cfg.get("norm_eps", 1e-5)), attn_head_dim=cfg.get("attention_head_dim", 8),
                flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)), freq_shift=float(freq_shift),
                downsample_padding=int(cfg.get("downsample_padding", 1)))


_RES = {"time_emb_proj": "temb_proj", "conv_shortcut": "nin_shortcut"}
_ATT = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v",
        "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}


def _map_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RES.get(head, head)}.{tail}"


def _map_attn(rest: str) -> str:
    for k, v in _ATT.items():
        if rest.startswith(k + "."):
            return v + rest[len(k):]
    return rest


def from_diffusers(state, cfg: dict) -> tuple[dict, dict]:
    """(original-name state dict, DDPMUNet kwargs) from a diffusers UNet2DModel state dict + config.

    Both attention spellings are read (``query/key/value/proj_attn`` and ``to_q/.../to_out.0``);
    linear attention weights [C, C] become the 1x1 convs [C, C, 1, 1] of the original. Keys the
    mapping does not know are kept under their own name, so the key check reports them."""
    kw = diffusers_config_to_kwargs(cfg)
    L = len(kw["ch_mult"])
    out = {}
    for k, v in state.items():
        nk = k
        parts = k.split(".")
        if k.startswith("time_embedding.linear_"):
            nk = f"temb.dense.{int(parts[1][-1]) - 1}.{parts[-1]}"
        elif k.startswith("conv_norm_out."):
            nk = "norm_out." + parts[-1]
        elif parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3:
            lvl = int(parts[1]) if parts[0] == "down_blocks" else L - 1 - int(parts[1])
            side = "down" if parts[0] == "down_blocks" else "up"
            kind, j, rest = parts[2], parts[3], ".".join(parts[4:])
            if kind == "resnets":
                nk = f"{side}.{lvl}.block.{j}.{_map_resnet(rest)}"
            elif kind == "attentions":
                nk = f"{side}.{lvl}.attn.{j}.{_map_attn(rest)}"
            elif kind in ("downsamplers", "upsamplers") and j == "0":
                nk = f"{side}.{lvl}.{kind[:-2]}.{rest}"  # downsamplers.0 -> downsample
        elif parts[0] == "mid_block" and len(parts) > 3:
            j, rest = int(parts[2]), ".".join(parts[3:])
            if parts[1] == "resnets":
                nk = f"mid.block_{j + 1}.{_map_resnet(rest)}"
            elif parts[1] == "attentions" and j == 0:
                nk = f"mid.attn_1.{_map_attn(rest)}"
        if ".attn" in nk and nk.endswith(".weight") and v.ndim == 2 and not nk.split(".")[-2] == "norm":
            v = v[:, :, None, None]
        out[nk] = v
    return out, kw
