"""Classifiers used for robust training, pseudo-labelling and as guidance feature networks.

Every model takes float images in [0, 1], NCHW, normalises them internally (``mean``/``std``
buffers, saved with the weights), and exposes ``features(x) -> [B, feature_dim]`` (the
penultimate activations) with ``forward(x) = head(features(x))``.

* ``small-cnn``: the TRADES MNIST net (conv 32-32-pool-64-64-pool, FC 200-200-classes, dropout 0.5
  after the first FC). The original uses unpadded 3x3 convs (28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4,
  so 64*4*4 = 1024 inputs to the first FC). Unpadded convs would shrink an 8x8 image to nothing, so
  for images smaller than 20 px the convs are padded ("same"): 8 -> 8 -> 8 -> 4 -> 4 -> 4 -> 2. The
  flatten size is computed from ``image_size`` either way.
* ``preact-resnet18``: pre-activation ResNet-18 (He et al. 2016), 3x3 stem; global average
  pooling, so any image size >= 1 works (8x8 digits end at 1x1).
* ``wrn-D-W``: WideResNet (Zagoruyko & Komodakis, pre-activation blocks), depth D = 6n + 4, widen W.
* ``wrn-D-W-swish`` (or ``-relu``): the DeepMind WideResNet of Gowal et al. 2020 as the Contrastive-DP
  authors, DM-Improves-AT and imrahulr's adversarial_robustness_pytorch define it, with their
  parameter names (``init_conv``, ``layer.{g}.block.{i}.{batchnorm_0,conv_0,batchnorm_1,conv_1,
  shortcut}``, ``batchnorm``, ``logits``) so their checkpoints load: manual (1,1,1,1) / (0,1,0,1)
  padding before the unpadded first conv of each block, BatchNorm momentum 0.01, 8x8 average pool
  (global pooling for other sizes), 640-d features for WRN-28-10. ``features`` is the logits
  layer's input.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# Default normalisation (inputs are [0, 1]); overridable through build(..., mean=, std=).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


def _norm_stats(in_channels: int, mean, std, identity: bool):
    if mean is None:
        mean = (0.0,) * in_channels if identity else (CIFAR_MEAN if in_channels == 3 else (0.5,) * in_channels)
    if std is None:
        std = (1.0,) * in_channels if identity else (CIFAR_STD if in_channels == 3 else (0.5,) * in_channels)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values (one per channel), got {len(mean)}/{len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


class Classifier(nn.Module):
    """Base: input normalisation + ``features`` + linear ``head``."""

    feature_dim: int

    def __init__(self, in_channels: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, in_channels, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, in_channels, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected float images [B, {self.mean.shape[1]}, H, W] in [0, 1], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype} (use data.to_float)")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self._features(self.normalize(x))

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------
# small-cnn (TRADES MNIST)
class SmallCNN(Classifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, *,
                 dropout: float = 0.5, mean=None, std=None):
        # TRADES feeds raw [0, 1] pixels: identity normalisation by default.
        super().__init__(in_channels, *_norm_stats(in_channels, mean, std, identity=True))
        pad = 0 if image_size >= 20 else 1
        act = nn.ReLU
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=pad), act(),
            nn.Conv2d(32, 32, 3, padding=pad), act(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=pad), act(),
            nn.Conv2d(64, 64, 3, padding=pad), act(),
            nn.MaxPool2d(2, 2),
        )
        s = image_size
        for step in ("c", "c", "p", "c", "c", "p"):
            s = s - 2 * (1 - pad) if step == "c" else s // 2
        if s < 1:
            raise ValueError(f"small-cnn: image_size {image_size} is too small")
        self.flat_dim = 64 * s * s
        self.fc = nn.Sequential(
            nn.Linear(self.flat_dim, 200), act(), nn.Dropout(dropout),
            nn.Linear(200, 200), act(),
        )
        self.feature_dim = 200
        self.head = nn.Linear(200, num_classes)
        for m in self.modules():  # TRADES init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _features(self, x):
        return self.fc(self.conv(x).flatten(1))


# ---------------------------------------------------------------------------------------------
# PreAct ResNet-18
class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet18(Classifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, *,
                 mean=None, std=None):
        super().__init__(in_channels, *_norm_stats(in_channels, mean, std, identity=False))
        self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_PreActBlock(cin, cout, stride), _PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.feature_dim = 512
        self.head = nn.Linear(512, num_classes)

    def _features(self, x):
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


# ---------------------------------------------------------------------------------------------
# WideResNet
class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = act()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = act()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = self.act1(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(self.act2(self.bn2(self.conv1(out))))
        return out + sc


def _wrn_shape(depth: int, widen: int, activation: str):
    """Checked WideResNet settings: (blocks per group, activation class)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n + 4 (e.g. 16, 28, 34, 70), got {depth}")
    if widen < 1:
        raise ValueError(f"WideResNet widen factor must be >= 1, got {widen}")
    acts = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
    return (depth - 4) // 6, acts[activation]


class WideResNet(Classifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, *,
                 depth: int = 28, widen: int = 10, activation: str = "relu", mean=None, std=None):
        super().__init__(in_channels, *_norm_stats(in_channels, mean, std, identity=False))
        n, act = _wrn_shape(depth, widen, activation)
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(_WideBlock(cin, cout, stride if i == 0 else 1, act))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.act = act()
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _features(self, x):
        out = self.act(self.bn(self.blocks(self.stem(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def _same_pad2(h: int, w: int) -> tuple[int, int, int, int]:
    """TF "SAME" padding of a 3x3 stride-2 conv: (0, 1, 0, 1) for even sizes (the reference's
    fixed padding), (1, 1, 1, 1) for odd ones (where the fixed padding would break the residual)."""
    ph, pw = 1 + h % 2, 1 + w % 2  # total = (ceil(n/2) - 1) * 2 + 3 - n
    return (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)


class _DMBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module]):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(cin, momentum=0.01)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)  # padded by hand (TF "SAME")
        self.batchnorm_1 = nn.BatchNorm2d(cout, momentum=0.01)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None

    def forward(self, x):
        a = self.relu_0(self.batchnorm_0(x))
        # with a projection shortcut it sees the activated input, otherwise the raw one
        sc = self.shortcut(a) if self.shortcut is not None else x
        a = F.pad(a, (1, 1, 1, 1) if self.stride == 1 else _same_pad2(a.shape[-2], a.shape[-1]))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(a))))
        return sc + out


class _DMBlockGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, act):
        super().__init__()
        self.block = nn.Sequential(*[_DMBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, act)
                                     for i in range(n)])

    def forward(self, x):
        return self.block(x)


class DMWideResNet(Classifier):
    """Gowal et al. 2020's WideResNet (DeepMind / imrahulr / DM-Improves-AT layout); see the module doc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, *,
                 depth: int = 28, widen: int = 10, activation: str = "swish", mean=None, std=None):
        super().__init__(in_channels, *_norm_stats(in_channels, mean, std, identity=False))
        n, act = _wrn_shape(depth, widen, activation)
        w = (16, 16 * widen, 32 * widen, 64 * widen)
        self.init_conv = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(_DMBlockGroup(n, w[0], w[1], 1, act), _DMBlockGroup(n, w[1], w[2], 2, act),
                                   _DMBlockGroup(n, w[2], w[3], 2, act))
        self.batchnorm = nn.BatchNorm2d(w[3], momentum=0.01)
        self.relu = act()
        self.logits = nn.Linear(w[3], num_classes)
        self.feature_dim = w[3]
        for m in self.modules():  # the reference initialisation
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / k) ** 0.5)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> nn.Linear:
        return self.logits

    @property
    def act(self) -> nn.Module:
        return self.relu

    def _features(self, x):
        out = self.relu(self.batchnorm(self.layer(self.init_conv(x))))
        if out.shape[-2:] == (8, 8):
            return F.avg_pool2d(out, 8).flatten(1)  # the reference's pooling (32x32 inputs)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x):
        return self.logits(self.features(x))


_WRN = re.compile(r"^wrn-(\d+)-(\d+)(?:-(swish|silu|relu))?$")
NAMES = ("small-cnn", "preact-resnet18", "wrn-28-10", "wrn-28-10-swish", "wrn-34-10-swish", "wrn-70-16-swish")


def build(name: str, *, num_classes: int, in_channels: int, image_size: int, **kwargs) -> Classifier:
    """Build a classifier by name (see module docstring); extra kwargs go to the constructor
    (e.g. ``dropout`` for small-cnn, ``mean``/``std`` for all). The returned model remembers how it
    was built (``model.build_config``) so ``save``/``load`` can rebuild it."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    for what, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    key = name.lower().replace("_", "-")
    if key in ("small-cnn", "smallcnn"):
        key, model = "small-cnn", SmallCNN(num_classes, in_channels, image_size, **kwargs)
    elif key in ("preact-resnet18", "preactresnet18", "preact-resnet-18"):
        key, model = "preact-resnet18", PreActResNet18(num_classes, in_channels, image_size, **kwargs)
    elif (m := _WRN.match(key)):
        depth, widen, act = int(m.group(1)), int(m.group(2)), m.group(3)
        if "activation" in kwargs:
            raise ValueError("give the WRN activation through the name (wrn-D-W-swish), not activation=")
        # an activation suffix names the DeepMind WRN (Gowal et al.), none the classic one
        cls = DMWideResNet if act else WideResNet
        model = cls(num_classes, in_channels, image_size, depth=depth, widen=widen,
                    activation=act or "relu", **kwargs)
    else:
        raise ValueError(f"unknown model {name!r}; choose small-cnn, preact-resnet18 or wrn-D-W[-swish] "
                         f"(e.g. {', '.join(NAMES)})")
    model.name = key
    model.num_classes, model.in_channels, model.image_size = num_classes, in_channels, image_size
    model.build_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    return model
