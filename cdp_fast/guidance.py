"""Contrastive guidance (the paper's Algorithm 1, METHOD.md §5), passed to DDIMSampler as ``guidance=``.

At a guided step the sampler adds ``scale * grad_{x_t} L`` to the predicted noise, where

    L = loss(emb(x_t), emb(positive))          emb(x) = head(f(to_features(x)))  (or f, or pixels)

Losses: "hnm" (METHOD.md §6, hard estimator, T 10, tau_plus 0.1, beta 1), "hnm-easy" (easy
estimator), "infonce" (METHOD.md §8, T 0.1). With labels (``conditional``, auto = labels given to
``sample``) a row's negatives are only other classes. Pair strategies (``pair=``):
"previous" (default: the same sample's previous, noisier state x_{t+1}), "real-positive" (real
images of the anchor's class; one real image per anchor, drawn from the seed at the start of a run,
so its features are computed once), "real-negative" (previous-state positives plus all real images
as an extra bank of negatives; bank features computed once).

Groups: the batch is split into independent groups of ``group_size`` anchors (default: the
authors' 512, the whole batch when smaller; for a larger batch that 512 does not divide, the largest
divisor of the batch below 512). The guidance loss is the SUM of per-group means, so every sample
receives the gradient it would get in the authors' own batch of G, at any sampling batch size.

When: ``t_min <= t < t_max`` and, with ``skip_first``, never the first step (CIFAR default:
t_min=400, t_max=None; MNIST's 50 < t < 150 is t_min=51, t_max=150); or a callable
``when(t, step_index) -> bool``. The "previous" and "real-negative" pairs are never guided at step 0
(there is no previous state yet).

Fast path, with exactly the authors' gradient w.r.t. x_t: f is frozen (its parameters get
requires_grad False for the run and no weight gradients; eval mode), f(x_{t+1}) is the previous
step's f(x_t) kept in a static cache (detached) instead of being recomputed, and the backward goes
through the anchor branch of f only. The optional online head (Linear-ReLU-Linear-L2 normalise,
Adam lr 1e-2, one step per guided step on the same loss) gets its gradient from both branches, and
the gradient for x is taken BEFORE its Adam step, as the authors do. Pixel space (features=None,
no head, no normalisation) with an HNM loss uses ``kernels.hnm_guided_ddim_update`` (gradient
fused into the DDIM update) when ``fused=True`` (on deterministic steps; steps that draw noise use
the gradient + ``kernels.ddim_update`` path, which has the in-kernel Philox noise).

The authors' settings (METHOD.md §5, §9):

    # CIFAR-10, DDIM 100 steps, eta 0
    g = ContrastiveGuidance("hnm", wrn.features, head=True, scale=1e5, t_min=400)   # group 512
    DDIMSampler(unet, NoiseSchedule.linear(), steps=100, guidance=g).sample(512, (3, 32, 32))
    # MNIST, DDPM 250 respaced steps, cosine schedule, 50 < t < 150
    g = ContrastiveGuidance("hnm", cnn.features, head=True, head_dims=(64, 64), scale=1e5,
                            t_min=51, t_max=150, group_size=128)
    DDIMSampler(unet, NoiseSchedule.cosine(), steps=250, method="ddpm", guidance=g)
    # InfoNCE variant: no head, lambda 1000 (the default scale for loss="infonce")
    g = ContrastiveGuidance("infonce", wrn.features, t_min=400)
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import hnm_guided_affine_update, hnm_guided_ddim_update, hnm_loss, infonce_loss
from .kernels.hnm_ref import check_label_negatives

__all__ = ["ContrastiveGuidance", "EmbeddingHead", "Guidance", "GuidanceRun", "GuidanceStart", "LOSSES",
           "PAIRS", "default_group_size", "default_scale"]

LOSSES = ("hnm", "hnm-easy", "infonce")
PAIRS = ("previous", "real-positive", "real-negative")
DEFAULT_TEMPERATURE = {"hnm": 10.0, "hnm-easy": 10.0, "infonce": 0.1}
DEFAULT_SCALE = {"hnm": 1e5, "hnm-easy": 1e5, "infonce": 1e3}  # the authors' lambdas
AUTHORS_GROUP = 512


# ------------------------------------------------------------------------------------------------
# the sampler <-> guidance contract (docs/ARCHITECTURE.md, "Sampling")
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuidanceStart:
    """What the sampler tells the guidance at the start of one sampling run.

    ``n`` samples of ``shape`` (model space) on ``device`` in the state ``dtype``; ``labels`` [n]
    (or None) as given to ``sample``; ``seed`` of the run (head init, real-positive draws);
    ``bf16`` autocast for the feature network; ``capturable``: the steps will be captured in
    CUDA graphs (no host syncs, capturable Adam); ``channels_last`` 4-D samples; ``backend`` of
    the kernels (None: the guidance's own); ``eps_from_clipped_x0`` and ``clip_x0``: the sampler's
    DDIM step options (METHOD.md §3), which decide whether the fused pixel-space step applies.
    """

    n: int
    shape: tuple
    labels: Optional[torch.Tensor] = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    seed: int = 0
    bf16: bool = False
    capturable: bool = False
    channels_last: bool = False
    backend: Optional[str] = None
    eps_from_clipped_x0: bool = False
    clip_x0: Optional[float] = None


class GuidanceRun(Protocol):
    """The per-run object the sampler drives (returned by :meth:`Guidance.start`)."""

    fused_ok: bool  # fused_update may be called (pixel-space HNM)

    def prime(self, x: torch.Tensor) -> None:
        """Step before a guided one: remember x, it is the next step's positive x_{t+1}."""

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x L at a guided step (fp32, x's shape); the sampler adds scale * it to eps."""

    def fused_update(self, x: torch.Tensor, e: torch.Tensor, a_t: torch.Tensor, a_next: torch.Tensor, *,
                     clip_x0: Optional[float] = None) -> torch.Tensor:
        """x_next of a deterministic guided step with the gradient fused in (when ``fused_ok``)."""

    def finish(self) -> None:
        """End of the run (also on error): restore what ``start`` changed."""

    # optional: ``fused_affine(x, eps, c_x, c_e, h=None, c_h=0.0, write_eps=False)`` (when
    # ``fused_ok``): out = c_x x + c_e (eps + scale grad_x L) + c_h h, the continuous-sigma
    # samplers' fused guided step (METHOD.md §16)
    # optional: ``restart(seed, labels) -> bool`` starts the run again IN PLACE (after ``finish``)
    # for a new seed and labels of the same shape, keeping every tensor the sampler's CUDA graphs
    # captured; False = cannot, the sampler then calls ``start`` again (see DDIMSampler reuse_runs)


class Guidance(Protocol):
    """What :class:`cdp_fast.sampler.DDIMSampler` calls on its ``guidance=`` argument."""

    scale: float  # lambda of Algorithm 1 line 7

    @property
    def needs_previous(self) -> bool:
        """True when the positive is the previous state (the sampler then primes the step before)."""

    def guided(self, t: int, index: int) -> bool:
        """Host-side: is the step at training timestep t (step ``index``) guided?"""

    def start(self, options: GuidanceStart) -> GuidanceRun:
        """Per-run state for one ``sample`` call."""


class EmbeddingHead(nn.Module):
    """Linear(in, hidden) - ReLU - Linear(hidden, out) - L2 normalise (the authors' projection)."""

    def __init__(self, in_dim: int, hidden: int = 128, out_dim: int = 128,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        if generator is not None:  # nn.Linear's default init, but from our own generator
            for lin in (self.fc1, self.fc2):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(lin.in_features)
                with torch.no_grad():
                    lin.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc2(F.relu(self.fc1(h))), dim=1)


def default_group_size(n: int, authors: int = AUTHORS_GROUP) -> int:
    """n if n <= 512, else the largest divisor of n that is <= 512."""
    if n <= authors:
        return n
    return max(d for d in range(1, authors + 1) if n % d == 0)


# Default lambda per feature space (issue 13), for a contrastive group of 512. HNM (T 10, a flat
# softmax) gives a sample ~1/G of its row's gradient (the loss is a sum of group means), so a run
# with group G gets x G / 512; InfoNCE (T 0.1) saturates on the near-identical positive, and its
# per-sample gradient is ~independent of G, so it is not scaled. In pixel space (L2-normalised
# pixels) the per-pixel gradient falls as 1/(C H W) (measured: 64 -> 784 -> 3072 pixels gave
# 3.0e-6 -> 2.4e-7 -> 6.3e-8), so the pixel values are per 64 pixels (digits) and scaled by
# C H W / 64. Values read off `cdp-fast sweep` on digits with its rule (the largest scale whose
# classifier-feature Frechet distance to the real test set stays within 1.5x lambda 0's; all of
# them change the images by >= 0.01 in [0, 1] units): head + HNM at G 500, 20 steps chose 1e5
# (the authors'), the rest at G 100, 10 steps (head + InfoNCE: 3e2; the authors' 1e3 is for their
# head-less WRN features and moved the digits features 2.6x further from the real ones).
SPACE_SCALES = {
    "head": {"hnm": 1e5, "hnm-easy": 1e5, "infonce": 3e2},
    "features": {"hnm": 5e4, "hnm-easy": 5e4, "infonce": 3e2},
    "pixel": {"hnm": 5e4, "hnm-easy": 5e4, "infonce": 1e4},
}


def default_scale(loss: str, space: str, *, dim: Optional[int] = None,
                  group_size: int = AUTHORS_GROUP) -> float:
    """The default guidance scale lambda of ``loss`` in a feature ``space`` (see SPACE_SCALES).

    ``space``: "head" (features + online embedding head), "features" (L2-normalised features, no
    head) or "pixel" (L2-normalised pixels; ``dim`` = C*H*W required). ``group_size``: the
    contrastive group G the run will use (HNM losses only).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if space not in SPACE_SCALES:
        raise ValueError(f"space must be one of {tuple(SPACE_SCALES)}, got {space!r}")
    lam = SPACE_SCALES[space][loss]
    if loss != "infonce":
        lam *= group_size / AUTHORS_GROUP
    if space == "pixel":
        if not dim or dim < 1:
            raise ValueError("the pixel-space default scale needs dim = C*H*W")
        lam *= dim / 64
    return float(lam)


def _scaled01(x: torch.Tensor) -> torch.Tensor:
    return (x + 1.0) * 0.5


def _num(name, v, *, lo=None, lo_open=False, hi=None, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")
    return float(v)


class ContrastiveGuidance:
    """Configuration of the contrastive guidance; see the module doc for every option.

    ``features``: ``nn.Module`` or a bound method of one (frozen for the run; any other callable
    is used as is) mapping
    ``to_features(x)`` to [B, ...] features, or None for pixel space. ``to_features``: "auto"
    ((x+1)/2 for a features module, identity for pixels), None (identity) or a callable.
    ``head``: None/False (no head), True (EmbeddingHead(in_dim, *head_dims), initialised from the
    run's seed), or an ``nn.Module`` (deep-copied at every run, so every run starts from the same
    weights and the caller's module is never trained). ``normalize`` (no head only): L2-normalise
    the embeddings; None = True for a features module, False in pixel space. ``scale`` (lambda):
    None = the authors' 1e5 for HNM, 1e3 for InfoNCE.
    """

    def __init__(self, loss: str = "hnm", features: Optional[Callable] = None, *,
                 head: Union[None, bool, nn.Module] = None, scale: Optional[float] = None,
                 t_min: Optional[int] = 400, t_max: Optional[int] = None, skip_first: bool = True,
                 when: Optional[Callable[[int, int], bool]] = None,
                 temperature: Optional[float] = None, tau_plus: float = 0.1, beta: float = 1.0,
                 pair: str = "previous", real_images: Optional[torch.Tensor] = None,
                 real_labels: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
                 conditional: Optional[bool] = None, to_features: Union[str, None, Callable] = "auto",
                 normalize: Optional[bool] = None, head_dims: tuple = (128, 128),
                 head_in_dim: Optional[int] = None, head_lr: float = 1e-2, fused: bool = True,
                 backend: str = "auto"):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if pair not in PAIRS:
            raise ValueError(f"pair must be one of {PAIRS}, got {pair!r}")
        if features is not None and not callable(features):
            raise TypeError(f"features must be an nn.Module / callable or None, got {type(features).__name__}")
        self.loss, self.features, self.pair = loss, features, pair
        self.scale = _num("scale", DEFAULT_SCALE[loss] if scale is None else scale)
        self.temperature = _num("temperature", DEFAULT_TEMPERATURE[loss] if temperature is None else temperature,
                                lo=0.0, lo_open=True)
        self.tau_plus = _num("tau_plus", tau_plus, lo=0.0, hi=1.0, hi_open=True)
        self.beta = _num("beta", beta, lo=0.0)
        for name, v in (("t_min", t_min), ("t_max", t_max)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"{name} must be an int or None, got {v!r}")
        if when is not None and not callable(when):
            raise TypeError("when must be a callable (t, step_index) -> bool")
        self.t_min, self.t_max, self.skip_first, self.when = t_min, t_max, bool(skip_first), when
        if group_size is not None:
            if isinstance(group_size, bool) or not isinstance(group_size, int):
                raise TypeError(f"group_size must be an int or None, got {group_size!r}")
            if group_size < 2:
                raise ValueError(f"group_size must be >= 2 (a row needs negatives), got {group_size}")
        self.group_size = group_size
        if pair != "previous":
            if not isinstance(real_images, torch.Tensor) or real_images.ndim < 2 or real_images.shape[0] < 1:
                raise ValueError(f"pair={pair!r} needs real_images, a tensor [M, ...] in model space")
        if real_labels is not None:
            if real_images is None:
                raise ValueError("real_labels given without real_images")
            if not isinstance(real_labels, torch.Tensor) or real_labels.is_floating_point() \
                    or real_labels.shape != (real_images.shape[0],):
                raise ValueError(f"real_labels must be an integer tensor [M]=[{real_images.shape[0]}]")
        self.real_images, self.real_labels = real_images, real_labels
        if conditional is not None and not isinstance(conditional, bool):
            raise TypeError("conditional must be None (auto), True or False")
        self.conditional = conditional
        if to_features == "auto":
            to_features = _scaled01 if features is not None else None
        if to_features is not None and not callable(to_features):
            raise TypeError("to_features must be 'auto', None or a callable")
        self.to_features = to_features
        if head is not None and not isinstance(head, (bool, nn.Module)):
            raise TypeError(f"head must be None, a bool or an nn.Module, got {type(head).__name__}")
        self.head = head if head is not False else None
        self.head_dims = tuple(int(d) for d in head_dims)
        if len(self.head_dims) != 2 or min(self.head_dims) < 1:
            raise ValueError(f"head_dims must be (hidden, out) positive ints, got {head_dims!r}")
        self.head_in_dim = head_in_dim
        self.head_lr = _num("head_lr", head_lr, lo=0.0)
        self.normalize = (features is not None) if normalize is None else bool(normalize)
        self.fused, self.backend = bool(fused), backend

    # --------------------------------------------------------------------------------------------
    @property
    def needs_previous(self) -> bool:
        """True when the positive (or part of it) is the previous state x_{t+1}."""
        return self.pair in ("previous", "real-negative")

    def guided(self, t: int, index: int) -> bool:
        """Host-side decision: is the step at training timestep t (step ``index``) guided?"""
        if index == 0 and self.needs_previous:
            return False
        if self.when is not None:
            return bool(self.when(int(t), int(index)))
        if index == 0 and self.skip_first:
            return False
        if self.t_min is not None and t < self.t_min:
            return False
        if self.t_max is not None and t >= self.t_max:
            return False
        return True

    def resolve_group_size(self, n: int) -> int:
        G = default_group_size(n) if self.group_size is None else self.group_size
        if n % G != 0:
            raise ValueError(f"guidance group_size={G} does not divide the batch size n={n}")
        if G < 2 and not (self.loss == "infonce" and self.pair == "real-negative"):
            raise ValueError(f"the contrastive loss needs groups of >= 2 samples; batch n={n} gives "
                             f"group size {G} (pass an explicit group_size that divides n)")
        return G

    def start(self, options: GuidanceStart) -> "_GuidanceRun":
        """Per-run state (static buffers, head, optimiser); called by the sampler."""
        if not isinstance(options, GuidanceStart):
            raise TypeError(f"start expects a GuidanceStart, got {type(options).__name__}")
        return _GuidanceRun(self, options)


class _GuidanceRun:
    """ContrastiveGuidance's :class:`GuidanceRun`."""

    def __init__(self, g: ContrastiveGuidance, options: GuidanceStart):
        self._restore = []
        try:
            self._setup(g, options)
        except BaseException:
            self.finish()  # never leave the caller's feature net frozen
            raise

    def _setup(self, g: ContrastiveGuidance, o: GuidanceStart):
        n, shape, labels, seed = int(o.n), tuple(o.shape), o.labels, o.seed
        device, dtype = torch.device(o.device), o.dtype
        self.g, self.n, self.shape, self.device, self.dtype = g, n, shape, device, dtype
        self.bf16, self.backend, self.capturable = o.bf16, o.backend or g.backend, o.capturable
        self.channels_last = o.channels_last and len(shape) == 3
        cond = (labels is not None) if g.conditional is None else g.conditional
        if cond and labels is None:
            raise ValueError("the guidance loss is conditional (conditional=True) but sample() got no labels")
        self.labels = labels if cond else None
        self.G = g.resolve_group_size(n)
        self.ngroups = n // self.G

        self._settings = _settings(g)  # what restart() checks has not changed

        # freeze f for the run (restored by finish) -------------------------------------------------
        self._restore = []
        f = g.features
        # a module, or a bound method of one (e.g. ``classifier.features``): freeze the owner
        owner = f if isinstance(f, nn.Module) else getattr(f, "__self__", None)
        self.owner = owner if isinstance(owner, nn.Module) else None
        self._freeze()

        # fused pixel-space path? ---------------------------------------------------------------------
        # (the fused step has no eps_from_clipped_x0 option)
        self.fused_ok = bool(g.fused and f is None and g.head is None and not g.normalize
                             and g.to_features is None and g.loss in ("hnm", "hnm-easy")
                             and g.pair in ("previous", "real-negative")
                             and not (o.eps_from_clipped_x0 and o.clip_x0 is not None))

        # real-image features (f is frozen: computed once) ---------------------------------------------
        self.bank = self.bank_labels = self.pos_feats = None
        self._real_feats = self._real_labels = None
        real_feats = None
        if g.real_images is not None and g.pair != "previous":
            real = g.real_images.to(device=device, dtype=dtype)
            if tuple(real.shape[1:]) != shape:
                raise ValueError(f"real_images have sample shape {tuple(real.shape[1:])}, the sampler draws {shape}")
            real_labels = None if g.real_labels is None else g.real_labels.to(device=device, dtype=torch.long)
            with torch.no_grad():  # chunked: a large real bank must not blow up the memory
                real_feats = real if self.fused_ok else torch.cat(
                    [self._features(real[i:i + 256]) for i in range(0, real.shape[0], 256)])
            if g.pair == "real-negative":
                self.bank = real_feats.flatten(1) if self.fused_ok else real_feats
                self.bank_labels = real_labels if (self.labels is not None and real_labels is not None) else None
            else:  # real-positive: one real image per anchor, of the anchor's class when known
                self._real_feats, self._real_labels = real_feats, real_labels
                self.pos_feats = real_feats[self._positive_index(seed, self.labels)].contiguous()

        # static buffers: feature cache (positives = previous state's features) ----------------------
        # pixel (fused) mode keeps the raw flattened state in the state's dtype
        if self.fused_ok:
            fdim = math.prod(shape)
            self.cache = torch.zeros(n, fdim, device=device, dtype=dtype) if g.needs_previous else None
        else:
            with torch.no_grad():
                probe = self._features(torch.zeros((min(n, 2),) + shape, device=device, dtype=dtype))
            fdim = probe.shape[1]
            self.cache = torch.zeros(n, fdim, device=device, dtype=torch.float32) if g.needs_previous else None

        # online embedding head --------------------------------------------------------------------------
        self.fdim = fdim
        self.head, self.opt, self.params = None, None, []
        if g.head is not None:
            self.head = self._new_head(seed)
            self.params = [p for p in self.head.parameters() if p.requires_grad]
            for p in self.params:
                p.grad = torch.zeros_like(p)
            use_cap = bool(o.capturable and device.type == "cuda")
            self.opt = torch.optim.Adam(self.params, lr=g.head_lr, capturable=use_cap)
        self._check_once()

    def _check_once(self, labels=None) -> None:
        """The HNM loss's input checks, once per run: the per-step calls pass check=False and make
        no host sync. Labels and bank are fixed for the run; a NaN/inf reaching the embeddings
        makes the gradient, hence the state, non-finite: the sampler's own NaN check reports it."""
        if self.g.loss not in ("hnm", "hnm-easy"):
            return
        labels = self.labels if labels is None else labels
        if labels is not None:
            check_label_negatives(labels, self.G, bank_labels=self.bank_labels,
                                  n_bank=0 if self.bank is None else self.bank.shape[0])
        if self.bank is not None and not bool(torch.isfinite(self.bank).all()):
            raise ValueError("the guidance's real-image bank contains NaN or inf")

    def _freeze(self) -> None:
        """Freeze f (requires_grad False, eval mode) for the run; ``finish`` restores it."""
        if self.owner is None or self._restore:
            return
        self._was_training = self.owner.training
        self._restore = [(p, p.requires_grad) for p in self.owner.parameters()] + [(None, None)]
        for p in self.owner.parameters():
            p.requires_grad_(False)
        self.owner.eval()
        if self.channels_last:
            self.owner.to(memory_format=torch.channels_last)

    def _positive_index(self, seed: int, labels) -> torch.Tensor:
        """real-positive: the real image of each anchor, drawn from the seed (of its class when known)."""
        gen = torch.Generator().manual_seed(seed + 0xC0DE)
        real_labels, n = self._real_labels, self.n
        if labels is not None and real_labels is not None:
            lab_cpu, rl_cpu = labels.cpu(), real_labels.cpu()
            idx = torch.empty(n, dtype=torch.long)
            for c in lab_cpu.unique().tolist():
                rows = (lab_cpu == c).nonzero().view(-1)
                pool = (rl_cpu == c).nonzero().view(-1)
                if pool.numel() == 0:
                    raise ValueError(f"pair='real-positive': no real image of class {c}")
                idx[rows] = pool[torch.randint(pool.numel(), (rows.numel(),), generator=gen)]
        else:
            idx = torch.randint(self._real_feats.shape[0], (n,), generator=gen)
        return idx.to(self.device)

    def _new_head(self, seed: int) -> nn.Module:
        """The head a run with this seed starts from (a copy of the given module, or seeded init)."""
        g = self.g
        if isinstance(g.head, nn.Module):
            head = copy.deepcopy(g.head)
        else:
            head = EmbeddingHead(int(g.head_in_dim or self.fdim), *g.head_dims,
                                 generator=torch.Generator().manual_seed(seed + 0x4EAD))
        return head.to(device=self.device, dtype=torch.float32).train()

    def restart(self, seed: int, labels: Optional[torch.Tensor]) -> bool:
        """Start this run again in place for a new ``seed`` and ``labels`` (same n, shape, device and
        label presence), exactly as a fresh ``start`` would, keeping every tensor object (static
        buffers, head weights, Adam state) that CUDA graphs may have captured. False when the
        guidance settings changed since ``start`` (the sampler then starts a fresh run)."""
        g = self.g
        if _settings(g) != self._settings:
            return False
        cond = (labels is not None) if g.conditional is None else g.conditional
        if cond != (self.labels is not None):
            return False
        if labels is not None and tuple(labels.shape) != (self.n,):
            return False
        if cond:
            self._check_once(labels)   # before anything changes: a refused restart keeps the run
        self._freeze()
        try:
            if self.labels is not None:
                self.labels.copy_(labels)
            if self.pos_feats is not None:
                self.pos_feats.copy_(self._real_feats[self._positive_index(seed, self.labels)])
            if self.cache is not None:
                self.cache.zero_()
            if self.head is not None:
                fresh = self._new_head(seed)
                with torch.no_grad():
                    for old, new in zip(self.head.state_dict(keep_vars=True).values(),
                                        fresh.state_dict(keep_vars=True).values()):
                        old.copy_(new)
                    for p in self.params:
                        p.grad.zero_()
                self.head.train()
                # a fresh Adam's lazily created state is all zeros (step 0): zero it in place
                for st in self.opt.state.values():
                    for v in st.values():
                        if isinstance(v, torch.Tensor):
                            v.zero_()
        except BaseException:
            self.finish()
            raise
        return True

    # features / embeddings ------------------------------------------------------------------------
    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              cache_enabled=not self.capturable)  # no cast cache under graph capture

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        g = self.g
        h = x if g.to_features is None else g.to_features(x)
        if g.features is not None:
            if self.channels_last and h.ndim == 4:
                h = h.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                h = g.features(h)
        return h.flatten(1).float()

    def _embed(self, h: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return self.head(h).float()
        return F.normalize(h, dim=1) if self.g.normalize else h

    def _loss(self, za, zp, bank):
        g = self.g
        if g.loss in ("hnm", "hnm-easy"):
            loss = hnm_loss(za, zp, temperature=g.temperature, tau_plus=g.tau_plus, beta=g.beta,
                            estimator="hard" if g.loss == "hnm" else "easy", labels=self.labels,
                            bank=bank, bank_labels=self.bank_labels if bank is not None else None,
                            group_size=self.G if self.G < self.n else None, backend=self.backend,
                            check=False)   # checked once per run (_check_once): no host sync per step
            return loss * self.ngroups  # hnm_loss averages over all groups' rows: sum of group means
        total = za.new_zeros(())
        for k in range(self.ngroups):  # static host loop: graph-safe
            sl = slice(k * self.G, (k + 1) * self.G)
            if self.labels is None:
                total = total + infonce_loss(za[sl], zp[sl], temperature=g.temperature, negatives=bank,
                                             backend=self.backend)
            else:
                total = total + _infonce_conditional(za[sl], zp[sl], self.labels[sl], g.temperature,
                                                     bank, self.bank_labels)
        return total

    # the calls the sampler makes ---------------------------------------------------------------------
    def _positive_feats(self):
        return (self.pos_feats if self.g.pair == "real-positive" else self.cache).float()

    def prime(self, x: torch.Tensor) -> None:
        """Cache the features of x: it is the positive (x_{t+1}) of the next, guided step."""
        if self.cache is None:
            return
        with torch.no_grad():
            self.cache.copy_(x.flatten(1) if self.fused_ok else self._features(x))

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x L at the current state (fp32, x's shape); one head Adam step after it."""
        xa = x.detach().requires_grad_(True)
        with torch.enable_grad():
            fa = self._features(xa)
            za = self._embed(fa)
            zp = self._embed(self._positive_feats())
            bank = None if self.bank is None else self._embed(self.bank.float())
            loss = self._loss(za, zp, bank)
            if self.head is not None:
                grads = torch.autograd.grad(loss, [xa] + self.params)
                gx = grads[0]
                for p, gp in zip(self.params, grads[1:]):
                    p.grad.copy_(gp)
            else:
                (gx,) = torch.autograd.grad(loss, [xa])
        if self.opt is not None:
            self.opt.step()  # after the x gradient, as the authors do
        if self.cache is not None:  # f(x_t) is the next step's f(x_{t+1})
            self.cache.copy_(x.detach().flatten(1) if self.fused_ok else fa.detach())
        return gx.float()

    def fused_update(self, x, e, a_t, a_next, *, clip_x0=None):
        """Pixel-space HNM gradient fused into a deterministic (eta = 0) DDIM update
        (kernels.hnm_guided_ddim_update); steps that draw noise use gradient() + ddim_update."""
        g = self.g
        out = hnm_guided_ddim_update(
            x, e, a_t, a_next, self.cache.view(x.shape), scale=g.scale * self.ngroups, temperature=g.temperature,
            tau_plus=g.tau_plus, beta=g.beta, estimator="hard" if g.loss == "hnm" else "easy",
            labels=self.labels, bank=self.bank, bank_labels=self.bank_labels,
            group_size=self.G if self.G < self.n else None, eta=0.0, clip_x0=clip_x0,
            backend=self.backend, check=False)   # checked once per run (_check_once)
        self.cache.copy_(x.flatten(1))  # x_t is the next step's positive
        return out

    def fused_affine(self, x, eps, c_x, c_e, h=None, c_h=0.0, write_eps=False):
        """Pixel-space HNM gradient fused into an affine solver update (when ``fused_ok``):
        out = c_x x + c_e (eps + scale grad_x L) + c_h h (kernels.hnm_guided_affine_update; the
        continuous-sigma samplers' steps, METHOD.md §16); (out, e) with ``write_eps``."""
        g = self.g
        out = hnm_guided_affine_update(
            x, eps, self.cache.view(x.shape), c_x=c_x, c_e=c_e, h=h, c_h=c_h, scale=g.scale * self.ngroups,
            temperature=g.temperature, tau_plus=g.tau_plus, beta=g.beta,
            estimator="hard" if g.loss == "hnm" else "easy", labels=self.labels, bank=self.bank,
            bank_labels=self.bank_labels, group_size=self.G if self.G < self.n else None,
            write_eps=write_eps, backend=self.backend, check=False)   # checked once per run (_check_once)
        self.cache.copy_(x.flatten(1))  # x is the next step's positive
        return out

    def finish(self) -> None:
        """Restore the feature net's requires_grad flags and train/eval mode."""
        for p, flag in self._restore:
            if p is not None:
                p.requires_grad_(flag)
        if self._restore and self.owner is not None:
            self.owner.train(self._was_training)
        self._restore = []


def _settings(g: ContrastiveGuidance) -> tuple:
    """The guidance settings a run (and its captured graphs) baked in; identity for objects."""
    return tuple(id(v) if isinstance(v, (nn.Module, torch.Tensor)) or callable(v) else v
                 for v in vars(g).values())


def _infonce_conditional(q, k, labels, temperature, bank=None, bank_labels=None):
    """InfoNCE whose negatives exclude same-class columns (the pair's own column always stays)."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    B = q.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=q.device)
    if bank is None:
        logits = q @ k.t() / temperature
        same = (labels[:, None] == labels[None, :]) & ~eye
        logits = logits.masked_fill(same, float("-inf"))
        target = torch.arange(B, device=q.device)
    else:
        n = F.normalize(bank.float(), dim=1)
        neg = q @ n.t() / temperature
        if bank_labels is not None:
            neg = neg.masked_fill(labels[:, None] == bank_labels[None, :], float("-inf"))
        logits = torch.cat([(q * k).sum(1, keepdim=True) / temperature, neg], dim=1)
        target = torch.zeros(B, dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)
