"""DDIM / DDPM-ancestral sampling engine with optional contrastive guidance (METHOD.md §3-§5;
Ouyang et al. 2023, Algorithm 1).

    sampler = DDIMSampler(model, schedule, steps=100, eta=0.0, skip="uniform", guidance=None)
    x0 = sampler.sample(n, shape, seed=0, labels=None, x_T=None)     # model space, [-1, 1]

Timesteps (ascending lists as in the authors' code; sampling walks them backwards and the step
after the smallest goes to alphabar = 1, i.e. ``set_alpha_to_one``):

- ``method="ddim"``, ``skip="uniform"``: ``range(0, T, T // steps)`` (the authors' DDIM; when
  ``T % steps != 0`` this has *more* than ``steps`` entries, exactly as their code does).
- ``method="ddim"``, ``skip="quad"``: ``int(s)`` for s in ``linspace(0, sqrt(0.8 T), steps)**2``
  (the DDIM paper's quadratic spacing, duplicates kept as in their code: a repeated timestep is an
  identity step).
- ``method="ddpm"``: ancestral sampling with the posterior variance on the improved-diffusion
  respacing (``space_timesteps(T, [steps])``: round(i (T-1)/(steps-1))), the authors'
  MNIST/GTSRB sampler (250 steps). The respaced betas are 1 - abar_i / abar_{i-1}; the step is
  x_next = coef1 x0 + coef2 x_t + sigma z with x0 clipped to [-1, 1] by default. That is exactly
  a DDIM step with eta = 1 whose direction term is re-derived from the clipped x0
  (``eps_from_clipped_x0``, METHOD.md §4), which is how it is computed here (one fused kernel
  for both methods).

Performance (each switch can be turned off so benchmarks can compare; ``None`` = on for CUDA):
``cuda_graphs`` (the plain, the guided and the "prime" step are each captured once as a
torch.cuda.CUDAGraph after two eager warm-ups and replayed), ``bf16`` (autocast for the eps model
and the guidance features; loss statistics and the update stay fp32), ``channels_last`` (4-D
samples on CUDA; the model is converted in place), ``fused_kernels`` (``kernels.ddim_update`` with
in-kernel Philox noise from a device ``rng_state`` and, for pixel-space HNM guidance,
``kernels.hnm_guided_ddim_update``). Per-step coefficients and timesteps live in device tables
indexed by a device step counter; no per-step host sync; no history is kept (peak memory does
not grow with the number of steps). NaN/inf in the state: checked every step on the CPU, through
a device flag checked every ``nan_check_every`` steps (default: once, at the end) on CUDA.
Graphs are not used for fp64 states, nor for noisy steps with ``fused_kernels=False`` (their noise
comes from a host-seeded torch.Generator); a step kind whose capture fails (e.g. a kernel's
argument checks reading a device value) warns once and runs eagerly.

Reuse (``reuse_runs=True``, opt-in; ``generate`` turns it on): the sampler keeps its last run (static
buffers, captured graphs, the guidance run with its head and capturable Adam) and restarts it in
place when the next ``sample`` call has the same n, shape, device, dtype, label and x_T presence
(and unchanged guidance settings): the state is refilled from the new seed (or x_T), the noise
generator, Philox ``rng_state``, step counter and NaN flag are reset, the labels are copied into
the captured label buffer, and the guidance run restarts itself (``GuidanceRun.restart``). So the
steps are captured once per process, not once per call, and the result is exactly that of a
fresh run. Anything else (other shapes, a guidance without ``restart``) builds a fresh run. The
kept run holds its memory until ``close()`` (or the next non-matching call); ``sample`` always
returns a copy.

Other options: ``class_conditional`` (None: the model gets ``y`` whenever ``sample`` gets labels;
False: labels only steer the guidance), ``backend`` ("auto" | "reference" | "triton", passed to
the kernels).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .guidance import Guidance, GuidanceRun, GuidanceStart
from .kernels import ddim_update
from .kernels._backend import cuda_device_of
from .kernels.ddim_ref import ddim_coefficients, ddim_step_ref
from .schedules import NoiseSchedule
from .utils import progress

__all__ = ["DDIMSampler", "ddim_timesteps", "ddpm_timesteps", "SKIPS", "METHODS"]

SKIPS = ("uniform", "quad")
METHODS = ("ddim", "ddpm")
_WARMUP = 2  # eager runs of a step kind before it is captured (CUDA graph recipe)
# torch.optim warning of a capturable optimiser stepped outside a graph capture (the warm-ups)
_CAPTURABLE_WARNING = r"This instance was constructed with capturable=True"
# noise streams derived from `seed`: x_T = randn(Generator(seed)); per-step z (fused_kernels=False)
# from Generator(seed + NOISE_SEED_OFFSET); with fused kernels, Philox from rng_state below
NOISE_SEED_OFFSET = 0x5EED


# ------------------------------------------------------------------------------------------------
# timestep plans
# ------------------------------------------------------------------------------------------------
def _check_steps(T: int, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    steps = int(steps)
    if steps < 1 or steps > T:
        raise ValueError(f"steps must be in [1, T={T}], got {steps}")
    return steps


def ddim_timesteps(T: int, steps: int, skip: str = "uniform") -> list[int]:
    """Ascending training timesteps of the authors' DDIM (see the module doc)."""
    steps = _check_steps(T, steps)
    if skip == "uniform":
        return list(range(0, T, T // steps))
    if skip == "quad":
        seq = np.linspace(0, np.sqrt(T * 0.8), steps) ** 2
        return [int(s) for s in seq]
    raise ValueError(f"skip must be one of {SKIPS}, got {skip!r}")


def ddpm_timesteps(T: int, steps: int) -> list[int]:
    """Ascending respaced timesteps of improved-diffusion's ``space_timesteps(T, [steps])``."""
    steps = _check_steps(T, steps)
    stride = 1.0 if steps <= 1 else (T - 1) / (steps - 1)
    cur, taken = 0.0, []
    for _ in range(steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


# ------------------------------------------------------------------------------------------------
# the sampler
# ------------------------------------------------------------------------------------------------
def step_kinds(guided: Sequence[bool], guidance) -> list[str]:
    """Each step's kind: "guided", "prime" (the step before a guided one when the positive is the
    previous state: cache this state's features) or "plain". Shared by every sampler."""
    need_prev = guidance is not None and guidance.needs_previous
    return ["guided" if g else "prime" if need_prev and i + 1 < len(guided) and guided[i + 1] else "plain"
            for i, g in enumerate(guided)]


class DDIMSampler:
    """DDIM (eta >= 0) or DDPM-ancestral sampler for an eps-prediction model; see the module doc.

    ``model(x, t)`` (``model(x, t, y)`` when ``labels`` are given) returns eps, or an object with
    ``.sample`` (diffusers), or a tuple whose first item is eps. ``clip_x0``: None = the method's
    default (DDIM: no clip; DDPM: 1.0), False = never, a float c = clamp x0 to [-c, c].
    ``guidance``: a :class:`cdp_fast.guidance.ContrastiveGuidance` (Algorithm 1), or anything
    that follows the :class:`cdp_fast.guidance.Guidance` protocol.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, steps: int = 100, eta: float = 0.0,
                 skip: str = "uniform", guidance: Optional[Guidance] = None, clip_x0=None, *,
                 method: str = "ddim",
                 cuda_graphs: Optional[bool] = None, bf16: Optional[bool] = None,
                 channels_last: Optional[bool] = None, fused_kernels: bool = True,
                 nan_check_every: Optional[int] = None, class_conditional: Optional[bool] = None,
                 backend: str = "auto", reuse_runs: bool = False):
        if not callable(model):
            raise TypeError(f"model must be callable (x, t[, y]) -> eps, got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {skip!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if nan_check_every is not None and (not isinstance(nan_check_every, int) or nan_check_every < 1):
            raise ValueError(f"nan_check_every must be None or an int >= 1, got {nan_check_every!r}")
        T = schedule.num_train_timesteps
        self.model, self.schedule, self.method = model, schedule, method
        self.steps, self.skip, self.guidance = _check_steps(T, steps), skip, guidance
        if method == "ddpm":
            if skip != "uniform":
                raise ValueError("skip applies to method='ddim'; method='ddpm' uses the respacing")
            self.eta = 1.0
            self.clip_x0 = 1.0 if clip_x0 is None else clip_x0
            asc = ddpm_timesteps(T, self.steps)
        else:
            self.eta = float(eta)
            self.clip_x0 = clip_x0
            asc = ddim_timesteps(T, self.steps, skip)
        if self.clip_x0 is False:
            self.clip_x0 = None
        if self.clip_x0 is not None:
            c = self.clip_x0
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not (c > 0) or not math.isfinite(c):
                raise ValueError(f"clip_x0 must be None, False or a positive float, got {clip_x0!r}")
            self.clip_x0 = float(c)
        # DDPM: direction term from the clipped x0 == improved-diffusion's posterior mean (§4)
        self.eps_from_clipped_x0 = method == "ddpm"
        self.cuda_graphs, self.bf16, self.channels_last = cuda_graphs, bf16, channels_last
        self.fused_kernels, self.nan_check_every, self.backend = bool(fused_kernels), nan_check_every, backend
        # None: the model gets y whenever sample() gets labels; False: labels only steer guidance
        self.class_conditional = class_conditional
        # kept run (reuse_runs): restarted in place when the next call matches its key
        self.reuse_runs = bool(reuse_runs)
        self._kept: Optional[_Run] = None
        self._kept_key = None

        ab = schedule.alphas_cumprod  # float64
        self.timesteps: list[int] = list(reversed(asc))                 # sampling order
        self.next_timesteps: list[int] = list(reversed([-1] + asc[:-1]))  # -1 -> alphabar 1
        self.a_t = ab[self.timesteps]
        self.a_next = torch.tensor([1.0 if s < 0 else float(ab[s]) for s in self.next_timesteps],
                                   dtype=torch.float64)

    # --------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def coefficient_table(self) -> torch.Tensor:
        """float64 [S, 7]: a_t, a_next, sqrt a_t, sqrt(1 - a_t), sqrt a_next, c1, c2 (METHOD.md §3)."""
        at, an = self.a_t, self.a_next
        return torch.stack([at, an, *ddim_coefficients(at, an, self.eta)], dim=1)

    def guided_steps(self) -> list[bool]:
        g = self.guidance
        if g is None:
            return [False] * self.num_steps
        return [bool(g.guided(t, i)) for i, t in enumerate(self.timesteps)]

    def _draws_noise(self, i: int) -> bool:
        # c1 is 0 at the last step (a_next = 1) and whenever eta = 0
        return self.eta > 0.0 and self.next_timesteps[i] >= 0 and float(self.a_next[i]) < 1.0

    # --------------------------------------------------------------------------------------------
    def sample(self, n: int, shape: Sequence[int], seed: int = 0, labels: Optional[torch.Tensor] = None,
               x_T: Optional[torch.Tensor] = None, *, device=None, dtype: Optional[torch.dtype] = None,
               progress: bool = False) -> torch.Tensor:
        """Draw ``n`` samples of ``shape``; returns x0 [n, *shape] in model space."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        n = int(n)
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise TypeError(f"shape must be a tuple of ints, got {shape!r}") from None
        if any(s < 1 for s in shape):
            raise ValueError(f"shape must have positive sizes, got {shape}")
        device, dtype = self._resolve_device_dtype(device, dtype, x_T)
        # graphs, side streams and kernel launches all go to the sampling device's GPU
        with cuda_device_of(torch.device(device)):
            if not self.reuse_runs:
                run = _Run(self, n, shape, int(seed), labels, x_T, device, dtype)
                try:
                    return run.loop(progress)
                finally:
                    run.close()
            key = self._run_key(n, shape, labels, x_T, device, dtype)
            run, self._kept = self._kept, None
            if run is not None:
                try:
                    ok = key == self._kept_key and run.restart(int(seed), labels, x_T)
                except BaseException:
                    run.close()
                    raise
                if not ok:
                    run.close()
                    run = None
            if run is None:
                run = _Run(self, n, shape, int(seed), labels, x_T, device, dtype)
            try:
                x0 = run.loop(progress).clone()  # the state buffer is reused by the next call
            except BaseException:
                run.close()  # a failed run is not kept
                raise
            run.end()
            self._kept, self._kept_key = run, key
            return x0

    def _run_key(self, n, shape, labels, x_T, device, dtype):
        """What a kept run must match to be restarted in place (everything its graphs baked in)."""
        g = self.guidance
        return (n, shape, torch.device(device), dtype, labels is not None, x_T is not None,
                id(self.model), id(g), None if g is None else float(g.scale), tuple(self.guided_steps()),
                self.eta, self.clip_x0, self.fused_kernels, self.cuda_graphs, self.bf16, self.channels_last,
                self.class_conditional, self.backend, self.nan_check_every)

    def close(self) -> None:
        """Free the kept run (reuse_runs): its buffers, graphs and guidance state."""
        run, self._kept, self._kept_key = self._kept, None, None
        if run is not None:
            run.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def _resolve_device_dtype(self, device, dtype, x_T):
        params = list(self.model.parameters()) if isinstance(self.model, torch.nn.Module) else []
        bufs = list(self.model.buffers()) if isinstance(self.model, torch.nn.Module) else []
        if device is None:
            if x_T is not None:
                device = x_T.device
            elif params:
                device = params[0].device
            elif bufs:
                device = bufs[0].device
            else:
                device = torch.device("cpu")
        device = torch.device(device)
        if dtype is None:
            floats = [p.dtype for p in params if p.is_floating_point()]
            dtype = floats[0] if floats and floats[0] in (torch.float32, torch.float64) else torch.float32
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"the sampler state is fp32 (or fp64); got dtype {dtype} "
                            "(use bf16=True for mixed precision)")
        return device, dtype


# ------------------------------------------------------------------------------------------------
# one sampling run: static buffers, the per-step function, graph capture and replay
# ------------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, s: DDIMSampler, n, shape, seed, labels, x_T, device, dtype):
        self.s, self.n, self.shape, self.device, self.dtype = s, n, shape, device, dtype
        cuda = device.type == "cuda"
        self.cuda = cuda
        self.graphs = bool(cuda and (s.cuda_graphs is None or s.cuda_graphs))
        self.bf16 = bool(cuda if s.bf16 is None else s.bf16)
        self.channels_last = bool((cuda if s.channels_last is None else s.channels_last) and len(shape) == 3)
        S = s.num_steps

        if labels is not None:
            # the run's own buffer (graphs capture it; a restart copies new labels into it)
            labels = self._check_labels(labels).clone()
        self.labels = labels
        self.model_labels = labels if s.class_conditional is not False else None
        if s.class_conditional and labels is None:
            raise ValueError("class_conditional=True: sample() needs labels")

        # static buffers --------------------------------------------------------------------------
        self.x = self._initial_state(seed, x_T)
        self.noise_gen = torch.Generator(device=device).manual_seed(seed + NOISE_SEED_OFFSET)
        self.rng_state = self._rng_state(seed)
        self.coef = s.coefficient_table().to(device=device, dtype=dtype)  # [S, 7], state dtype
        self.t_table = torch.tensor(s.timesteps, dtype=torch.long, device=device)  # [S]
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.bad_step = torch.full((1,), -1, dtype=torch.long, device=device)
        self.kinds = self._kinds()

        # graph mode needs device noise: in-kernel Philox (fused) or nothing to draw
        needs_noise = any(s._draws_noise(i) for i in range(S))
        if self.graphs and needs_noise and not s.fused_kernels:
            self.graphs = False  # a custom torch.Generator cannot be captured portably
        if dtype == torch.float64:
            self.graphs = False  # fp64 runs the pure-PyTorch references, not written to be graph-safe

        self.grun: Optional[GuidanceRun] = None
        if s.guidance is not None and any(k != "plain" for k in self.kinds):
            self.grun = s.guidance.start(GuidanceStart(
                n=n, shape=shape, labels=labels, device=device, dtype=dtype, seed=seed, bf16=self.bf16,
                capturable=self.graphs, channels_last=self.channels_last, backend=s.backend,
                eps_from_clipped_x0=s.eps_from_clipped_x0, clip_x0=s.clip_x0))
        if self.channels_last and isinstance(s.model, torch.nn.Module):
            s.model.to(memory_format=torch.channels_last)
        self.eager_kinds: set[str] = set()
        self.graph: dict[str, torch.cuda.CUDAGraph] = {}
        self.seen: dict[str, int] = {}
        self.side: torch.cuda.Stream | None = None   # one warm-up stream per run (see _graph_step)
        self.checked_shape = False

    def _check_labels(self, labels) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
            raise TypeError("labels must be an integer tensor [n]")
        if labels.shape != (self.n,):
            raise ValueError(f"labels must have shape [n]=[{self.n}], got {tuple(labels.shape)}")
        return labels.to(device=self.device, dtype=torch.long)

    def _initial_state(self, seed: int, x_T) -> torch.Tensor:
        n, shape, device, dtype = self.n, self.shape, self.device, self.dtype
        if x_T is not None:
            if not isinstance(x_T, torch.Tensor):
                raise TypeError("x_T must be a tensor")
            if tuple(x_T.shape) != (n,) + shape:
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {(n,) + shape}")
            x = x_T.detach().to(device=device, dtype=dtype).clone()
        else:
            g = torch.Generator(device=device).manual_seed(seed)
            x = torch.randn((n,) + shape, generator=g, device=device, dtype=dtype)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x_T contains NaN or inf")
        return x

    def _rng_state(self, seed: int) -> torch.Tensor:
        return torch.tensor([(seed * 2654435761 + 12345) % (2 ** 62), 0], dtype=torch.int64, device=self.device)

    def restart(self, seed: int, labels, x_T) -> bool:
        """Start this run again in place for a new seed / labels / x_T (same shapes: the caller checks
        the key). Every tensor the captured graphs read stays the same object. False: cannot (the
        guidance run has no ``restart`` or refuses), build a fresh run instead."""
        if self.grun is not None and not callable(getattr(self.grun, "restart", None)):
            return False
        new_labels = None if labels is None else self._check_labels(labels)
        if (new_labels is None) != (self.labels is None):
            return False
        x = self._initial_state(seed, x_T)  # validates before anything is changed
        if self.grun is not None and not self.grun.restart(seed, new_labels):
            return False
        self.x.copy_(x)
        if new_labels is not None:
            self.labels.copy_(new_labels)
        self.noise_gen.manual_seed(seed + NOISE_SEED_OFFSET)
        self.rng_state.copy_(self._rng_state(seed))
        self.counter.zero_()
        self.bad_step.fill_(-1)
        return True

    def _kinds(self) -> list[str]:
        return step_kinds(self.s.guided_steps(), self.s.guidance)

    # the model ------------------------------------------------------------------------------------
    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        # the autocast weight-cast cache must be off while capturing CUDA graphs
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              cache_enabled=not self.graphs)

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inp = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        try:
            with self._autocast():
                y = self.model_labels
                out = self.s.model(inp, t) if y is None else self.s.model(inp, t, y)
        except Exception as err:  # noqa: BLE001 - re-raised with the shape that was rejected
            if self.checked_shape:
                raise
            raise ValueError(f"the model rejected a sampler input of shape {tuple(x.shape)} "
                             f"(n={self.n}, sample shape {self.shape}): {type(err).__name__}: {err}") from err
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the model returned eps of shape {got} for an input of shape {tuple(x.shape)}")
        self.checked_shape = True
        return out.to(self.x.dtype).contiguous()

    # one step (eager code; also what CUDA graphs capture) -----------------------------------------
    def step(self, kind: str, draw: bool) -> None:
        s, x = self.s, self.x
        idx = self.counter
        row = self.coef.index_select(0, idx).view(-1)
        a_t, a_next = row[0], row[1]
        t = self.t_table.index_select(0, idx).expand(self.n).contiguous()  # LongTensor [n]
        if kind == "prime":
            self.grun.prime(x)
        e = self.eps(x, t)
        noise = None
        if draw and not s.fused_kernels:
            noise = torch.randn(x.shape, generator=self.noise_gen, device=x.device, dtype=x.dtype)
        rng = self.rng_state if draw else None
        if kind == "guided" and self.grun.fused_ok and s.fused_kernels and not draw:
            # hnm_guided_ddim_update has no rng_state: steps that draw noise take the path below
            x_next = self.grun.fused_update(x, e, a_t, a_next, clip_x0=s.clip_x0)
        else:
            grad, scale = None, 0.0
            if kind == "guided":
                grad, scale = self.grun.gradient(x), float(s.guidance.scale)
            x_next = self.update(x, e, row, grad, scale, draw, noise, rng)
        x.copy_(x_next)
        # remember the first step whose result is not finite (device op, no sync)
        bad = ~torch.isfinite(x).all()
        self.bad_step.copy_(torch.where((self.bad_step < 0) & bad, idx, self.bad_step))
        self.counter.add_(1)

    def update(self, x, e, row, grad, scale, draw, noise, rng):
        s = self.s
        if s.fused_kernels:
            a_t, a_next = row[0], row[1]
            return ddim_update(x, e, a_t, a_next, eta=s.eta if draw else 0.0, noise=None,
                               grad=grad, scale=scale, clip_x0=s.clip_x0, rng_state=rng,
                               eps_from_clipped_x0=s.eps_from_clipped_x0, backend=s.backend)
        # the reference step with the precomputed (float64-derived) table
        if grad is not None and scale != 0.0:
            e = e + scale * grad.to(x.dtype)
        out, _ = ddim_step_ref(x, e, tuple(row[k] for k in range(2, 7)), clip_x0=s.clip_x0,
                               eps_from_clipped_x0=s.eps_from_clipped_x0, noise=noise if draw else None)
        return out

    # the loop --------------------------------------------------------------------------------------
    def loop(self, show_progress: bool) -> torch.Tensor:
        s = self.s
        bar = progress(range(s.num_steps), total=s.num_steps, desc="sampling") \
            if show_progress else range(s.num_steps)
        every = s.nan_check_every if self.cuda else 1
        # no autograd history across steps (the guidance enables grad for its own backward only)
        with torch.no_grad():
            for i in bar:
                kind, draw = self.kinds[i], s._draws_noise(i)
                if self.graphs and kind not in self.eager_kinds:
                    self._graph_step(kind, draw)
                else:
                    self.step(kind, draw)
                if every is not None and (i + 1) % every == 0:
                    self._check_finite()
        self._check_finite()
        return self.x

    def _check_finite(self) -> None:
        bad = int(self.bad_step.item())  # one host sync (every step on CPU, where it is free)
        if bad >= 0:
            raise ValueError(f"NaN/inf in the sampler state after step {bad} of {self.s.num_steps} "
                             f"(timestep t={self.s.timesteps[bad]}); sampling stopped")

    def _graph_step(self, kind: str, draw: bool) -> None:
        key = f"{kind}:{int(draw)}"
        count = self.seen.get(key, 0)
        self.seen[key] = count + 1
        if key in self.graph:
            self.graph[key].replay()
            return
        if count < _WARMUP:  # eager warm-up on a side stream (allocator / cuBLAS / Adam state)
            # one side stream for the whole run: the caching allocator does not share blocks
            # across streams, so a new stream per warm-up would hold a new activation pool each
            if self.side is None:
                self.side = torch.cuda.Stream(device=self.device)
            side = self.side
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), warnings.catch_warnings():
                # capturable Adam (the guidance head) warns on every step run outside a capture;
                # these eager warm-ups are meant to be
                warnings.filterwarnings("ignore", message=_CAPTURABLE_WARNING, category=UserWarning)
                self.step(kind, draw)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step(kind, draw)  # recorded, not run: state is untouched if capture fails
        except Exception as err:  # noqa: BLE001 - e.g. a host sync inside a kernel's argument checks
            warnings.warn(f"CUDA graph capture of the {kind!r} step failed ({type(err).__name__}: {err}); "
                          "running that step eagerly", RuntimeWarning, stacklevel=3)
            self.eager_kinds.add(kind)
            torch.cuda.synchronize(self.device)
            self.step(kind, draw)
            return
        self.graph[key] = graph
        graph.replay()

    def end(self) -> None:
        """End of one sample() call on a kept run: restore what the guidance changed (f's flags)."""
        if self.grun is not None:
            self.grun.finish()

    def close(self) -> None:
        self.end()
        self.graph.clear()
