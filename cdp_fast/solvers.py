"""Continuous-sigma samplers: EDM's Euler / Heun / stochastic sampler and DPM-Solver++(2M), with
contrastive guidance (issue 20; METHOD.md §16).

    sampler = EDMSampler(denoiser, sampler="heun", steps=18)                  # any Denoiser
    sampler = EDMSampler(unet, schedule, sampler="dpm-solver++", steps=20)    # an eps-model
    x0 = sampler.sample(n, shape, seed=0, labels=None)                        # model space, [-1, 1]

Every sampler steps the EDM state x = y + sigma * n (y the clean image) with a denoiser
D(x; sigma) (:class:`cdp_fast.denoiser.Denoiser`). An epsilon-prediction (VP / DDPM-type) model
is wrapped by :class:`EpsDenoiser`: sigma(t) = sqrt((1 - abar_t) / abar_t), the network sees
x_vp = x / sqrt(1 + sigma^2) at the timestep t whose sigma is nearest (EDM's iDDPMPrecond), and
D = x - sigma * eps.

Samplers (``SAMPLERS``; NFE = network evaluations per image for ``steps`` = N):

- ``"euler"``: EDM Algorithm 1 without the correction, N NFE;
- ``"heun"``: EDM Algorithm 1 (2nd-order Heun, Euler at the last step to sigma = 0), 2N - 1 NFE;
- ``"edm-stochastic"``: EDM Algorithm 2 (``S_churn``, ``S_min``, ``S_max``, ``S_noise``), 2N - 1 NFE;
- ``"dpm-solver++"``: DPM-Solver++(2M) (Lu et al. 2022, multistep, midpoint; first order at the
  first and the last step, diffusers' ``lower_order_final`` with a final sigma of 0), N NFE.

Sigmas (``sigma_schedule``): ``"karras"`` is EDM's discretisation (rho 7, sigma in
[max(0.002, net.sigma_min), min(80, net.sigma_max)], ``round_sigma`` applied, then 0);
``"timesteps"`` (eps-models only) is diffusers' DPMSolverMultistepScheduler's "linspace" grid of
training timesteps (``linspace(0, T - 1, N + 1).round()``), so ``dpm-solver++`` equals diffusers'
scheduler with its default settings. Default: "timesteps" for dpm-solver++ on an eps-model, else
"karras".

Initial state: x = x_T * sigma_0 * s with x_T ~ N(0, I) from ``seed`` (the same draw as
DDIMSampler's x_T for the same seed), s = sqrt(1 + 1 / sigma_0^2) for an eps-model (its x_vp is
exactly x_T, as in DDIM and diffusers) and s = 1 for an EDM denoiser (EDM's ``latents * t_0``).

Guidance (``guidance=``, a :class:`cdp_fast.guidance.Guidance`): Algorithm 1's eps' = eps +
lambda * grad_{x_vp} L becomes D' = D - sigma * lambda * g with g = grad L taken w.r.t. the
VP-scaled state x_vp = x / sqrt(1 + sigma^2) (the image the features see, as in DDIM), at the
point where the step evaluates D first. Heun / stochastic: the corrector's derivative is guided
too, with the same g (one gradient and one head step per sampling step); DPM-Solver++ keeps the
guided D' in its history. The window: a step at sigma is guided when ``guidance.guided(t, i)``
with t the training timestep of the reference VP schedule whose sigma is nearest (the model's own
schedule for an eps-model, ``NoiseSchedule.linear()`` for an EDM denoiser).

Device: per-step sigmas / coefficients live in a device table indexed by a device step counter,
the multistep history in a static buffer, the NaN flag on the device (checked once at the end on
CUDA, every step on the CPU); no host sync inside the loop. ``fused_kernels`` (None = on CUDA):
pixel-space HNM guidance (``GuidanceRun.fused_ok``) fuses the gradient into the update
(``GuidanceRun.fused_affine`` -> ``kernels.hnm_guided_affine_update``). ``cuda_graphs`` (None =
on CUDA): each step kind is captured once as a CUDA graph (DDIMSampler's recipe) and replayed;
not for fp64 states, nor for edm-stochastic with ``churn_noise="generator"`` (METHOD.md §16).
``churn_noise`` (edm-stochastic): "generator" (torch.Generator(seed + 0x5EED), EDM's randn_like)
or "philox" (kernels/ddim.py's Philox stream from a device [seed, offset], graph-safe); None =
"philox" on CUDA, "generator" elsewhere.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .denoiser import Denoiser
from .guidance import Guidance, GuidanceRun, GuidanceStart
from .kernels.ddim import advance_rng, make_rng_state
from .kernels.ddim_ref import philox_normal_ref
from .sampler import _CAPTURABLE_WARNING, _WARMUP, step_kinds
from .schedules import NoiseSchedule
from .utils import progress

__all__ = ["SAMPLERS", "SIGMA_SCHEDULES", "CHURN_NOISE", "philox_seed", "EDMSampler", "EpsDenoiser", "edm_sigmas", "vp_sigmas",
           "timestep_sigmas", "nfe"]

SAMPLERS = ("euler", "heun", "edm-stochastic", "dpm-solver++")
SIGMA_SCHEDULES = ("karras", "timesteps")
# EDM's defaults (Karras et al. 2022, Table 1 / generate.py)
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0
NOISE_SEED_OFFSET = 0x5EED  # Algorithm 2's churn noise: Generator(seed + offset), as DDIMSampler's z
# churn noise source (edm-stochastic): None = "philox" on CUDA (device-side, CUDA-graph safe),
# "generator" elsewhere
CHURN_NOISE = (None, "generator", "philox")


# ------------------------------------------------------------------------------------------------
# sigma tables
# ------------------------------------------------------------------------------------------------
def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep t (float64, ascending)."""
    ab = alphas_cumprod.to(torch.float64)
    return ((1.0 - ab) / ab).sqrt()


def edm_sigmas(steps: int, *, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
               rho: float = EDM_RHO, denoiser=None) -> torch.Tensor:
    """EDM's time steps (Karras et al. eq. 5), float64 [steps + 1] ending in 0.

    sigma_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho, with s_min / s_max
    clipped to the denoiser's supported range and every sigma rounded by its ``round_sigma``
    (EDM's generate.py).
    """
    steps = _check_steps(steps)
    if denoiser is not None:
        sigma_min = max(sigma_min, float(denoiser.sigma_min))
        sigma_max = min(sigma_max, float(denoiser.sigma_max))
    if not (0 < sigma_min <= sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(steps, dtype=torch.float64)
    denom = max(steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if denoiser is not None:
        t = denoiser.round_sigma(t).to(torch.float64)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def timestep_sigmas(alphas_cumprod: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """diffusers' DPMSolverMultistepScheduler grid ("linspace" spacing, final sigma 0): the
    training timesteps and float64 sigmas [steps + 1]."""
    steps = _check_steps(steps)
    T = alphas_cumprod.numel()
    ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    sig = vp_sigmas(alphas_cumprod)[torch.from_numpy(ts.copy())]
    return [int(t) for t in ts], torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations per image of ``sampler`` with ``steps`` (see the module doc)."""
    if sampler in ("heun", "edm-stochastic"):
        return 2 * steps - 1
    if sampler in ("euler", "dpm-solver++", "ddim", "ddpm"):
        return steps
    raise ValueError(f"unknown sampler {sampler!r}")


def philox_seed(seed: int) -> int:
    """The Philox seed of edm-stochastic's churn noise for a run's ``seed`` (DDIMSampler's
    rng_state mixing, applied to seed + NOISE_SEED_OFFSET)."""
    return ((int(seed) + NOISE_SEED_OFFSET) * 2654435761 + 12345) % (2 ** 62)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return int(steps)


# ------------------------------------------------------------------------------------------------
# the eps-model adapter
# ------------------------------------------------------------------------------------------------
class EpsDenoiser(nn.Module):
    """An epsilon-prediction model on a discrete schedule as a :class:`Denoiser` (METHOD.md §16).

    D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma)), t(sigma) the training timestep
    whose sigma_t is nearest to sigma (EDM's iDDPMPrecond rounding); ``round_sigma`` returns that
    sigma_t. ``model(x, t[, y])`` as DDIMSampler takes it (eps, ``.sample`` or a tuple);
    ``label_dim`` > 0: one-hot ``class_labels`` are passed to the model as integer y.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, *, label_dim: int = 0,
                 img_resolution: int = 0, img_channels: int = 0):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable (x, t[, y]) -> eps, got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.model, self.schedule = model, schedule
        self.register_buffer("sigmas", vp_sigmas(schedule.alphas_cumprod), persistent=False)
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self.label_dim, self.img_resolution, self.img_channels = int(label_dim), img_resolution, img_channels
        self._tables: dict = {}  # (device, dtype) -> the sigma table there (one copy, not one per call)

    def _table(self, sigma: torch.Tensor) -> torch.Tensor:
        key = (sigma.device, sigma.dtype)
        if key not in self._tables:
            self._tables[key] = self.sigmas.to(device=sigma.device, dtype=sigma.dtype)
        return self._tables[key]

    def t_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep whose sigma is nearest (device op, no sync)."""
        table = self._table(sigma)
        return (sigma.reshape(-1, 1) - table.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)

    def round_sigma(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return self._table(sigma)[self.t_index(sigma)]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        sigma = torch.as_tensor(sigma, device=x.device)
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        t = self.t_index(sigma.to(x.dtype)).reshape(-1).expand(x.shape[0]).contiguous()
        x_vp = x / (1 + s * s).sqrt()
        if class_labels is None or self.label_dim == 0:
            out = self.model(x_vp, t)
        else:
            out = self.model(x_vp, t, class_labels.argmax(dim=1))
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the model returned eps of shape {got} for an input of shape {tuple(x.shape)}")
        return x - s * out.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# the sampler
# ------------------------------------------------------------------------------------------------
class EDMSampler:
    """Euler / Heun / EDM-stochastic / DPM-Solver++(2M) sampler; see the module doc.

    ``model``: a :class:`Denoiser`, or an eps-model with its ``schedule`` (wrapped in
    :class:`EpsDenoiser`). ``steps``: EDM's N (sigma points before 0); DPM-Solver++: model
    evaluations. ``sigma_min`` / ``sigma_max`` / ``rho``: the "karras" grid (EDM's defaults).
    ``S_churn``, ``S_min``, ``S_max``, ``S_noise``: Algorithm 2 (edm-stochastic only).
    ``guidance``: contrastive guidance (Guidance protocol). ``class_conditional``: None = the
    denoiser gets one-hot labels whenever ``sample`` gets labels and ``label_dim`` > 0.
    ``fused_kernels`` / ``cuda_graphs``: the fast path (module doc; None = on for CUDA).
    """

    def __init__(self, model, schedule: Optional[NoiseSchedule] = None, *, sampler: str = "heun",
                 steps: int = 18, sigma_schedule: Optional[str] = None,
                 sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX, rho: float = EDM_RHO,
                 S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                 guidance: Optional[Guidance] = None, class_conditional: Optional[bool] = None,
                 bf16: Optional[bool] = None, label_dim: Optional[int] = None,
                 fused_kernels: Optional[bool] = None, cuda_graphs: Optional[bool] = None,
                 churn_noise: Optional[str] = None):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if schedule is not None:
            model = EpsDenoiser(model, schedule, label_dim=label_dim or 0)
        elif not isinstance(model, Denoiser):
            raise TypeError("model must be a Denoiser (D(x; sigma), sigma_min/max, round_sigma, label_dim), "
                            "or an eps-model passed with its NoiseSchedule")
        self.denoiser, self.sampler, self.steps = model, sampler, _check_steps(steps)
        self.eps_model = isinstance(model, EpsDenoiser)
        if sigma_schedule is None:
            sigma_schedule = "timesteps" if (sampler == "dpm-solver++" and self.eps_model) else "karras"
        if sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {sigma_schedule!r}")
        if sigma_schedule == "timesteps" and not self.eps_model:
            raise ValueError("sigma_schedule='timesteps' needs an eps-model on a discrete schedule")
        for name, v in (("S_churn", S_churn), ("S_min", S_min), ("S_noise", S_noise), ("rho", rho)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if sampler != "edm-stochastic" and S_churn != 0:
            raise ValueError("S_churn applies to sampler='edm-stochastic' only")
        if churn_noise not in CHURN_NOISE:
            raise ValueError(f"churn_noise must be one of {CHURN_NOISE}, got {churn_noise!r}")
        self.churn_noise = churn_noise
        self.sigma_schedule, self.guidance = sigma_schedule, guidance
        self.S_churn, self.S_min, self.S_max, self.S_noise = float(S_churn), float(S_min), float(S_max), float(S_noise)
        self.class_conditional, self.bf16 = class_conditional, bf16
        # None = on for CUDA (METHOD.md §16: the fused guided step, per-step CUDA graphs)
        self.fused_kernels, self.cuda_graphs = fused_kernels, cuda_graphs

        if sigma_schedule == "timesteps":
            _, sig = timestep_sigmas(model.schedule.alphas_cumprod, self.steps)
        else:
            sig = edm_sigmas(self.steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, denoiser=model)
        self.sigmas = sig                                        # float64 [N + 1], last 0
        N = self.steps
        # Algorithm 2 line 4-5: gamma_i and the raised sigma t_hat (rounded)
        gamma = torch.zeros(N, dtype=torch.float64)
        if sampler == "edm-stochastic":
            g = min(self.S_churn / N, math.sqrt(2) - 1)
            for i in range(N):
                if self.S_min <= float(sig[i]) <= self.S_max:
                    gamma[i] = g
        t_hat = sig[:N] + gamma * sig[:N]
        if sampler == "edm-stochastic":
            t_hat = model.round_sigma(t_hat).to(torch.float64)
        self.t_hat = t_hat
        # reference VP schedule for the guidance window (t of the nearest sigma)
        ref = model.sigmas if self.eps_model else vp_sigmas(NoiseSchedule.linear().alphas_cumprod)
        ref = ref.to(torch.float64).cpu()
        self.window_t = [int((ref - float(s)).abs().argmin()) for s in t_hat]

    # --------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.steps

    @property
    def nfe(self) -> int:
        return nfe(self.sampler, self.steps)

    def guided_steps(self) -> list[bool]:
        g = self.guidance
        if g is None:
            return [False] * self.steps
        return [bool(g.guided(t, i)) for i, t in enumerate(self.window_t)]

    def coefficient_table(self) -> torch.Tensor:
        """float64 [N, 7]: t_hat, t_next, churn noise std, 1/sqrt(1 + t_hat^2) (x -> x_vp),
        DPM-Solver++ ratio sigma_t / sigma_s, its 2nd-order coefficient 0.5 h / h_prev, t_cur."""
        N, sig, th = self.steps, self.sigmas, self.t_hat
        t_cur, t_next = sig[:N], sig[1:]
        std = (th ** 2 - t_cur ** 2).clamp_min(0).sqrt() * self.S_noise
        c_vp = 1.0 / (1.0 + th ** 2).sqrt()
        ratio = t_next / t_cur
        c2 = torch.zeros(N, dtype=torch.float64)
        for i in range(1, N - 1):  # h = log(s_i / s_{i+1}), h_prev = log(s_{i-1} / s_i)
            h = math.log(float(sig[i]) / float(sig[i + 1]))
            h0 = math.log(float(sig[i - 1]) / float(sig[i]))
            c2[i] = 0.5 * h / h0
        return torch.stack([th, t_next, std, c_vp, ratio, c2, t_cur], dim=1)

    # --------------------------------------------------------------------------------------------
    def sample(self, n: int, shape: Sequence[int], seed: int = 0, labels: Optional[torch.Tensor] = None,
               x_T: Optional[torch.Tensor] = None, *, device=None, dtype: Optional[torch.dtype] = None,
               progress: bool = False) -> torch.Tensor:
        """Draw ``n`` samples of ``shape``; returns x0 [n, *shape] in model space."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        shape = tuple(int(s) for s in shape)
        if any(s < 1 for s in shape):
            raise ValueError(f"shape must have positive sizes, got {shape}")
        device, dtype = self._resolve_device_dtype(device, dtype, x_T)
        run = _Run(self, int(n), shape, int(seed), labels, x_T, device, dtype)
        try:
            return run.loop(progress)
        finally:
            run.close()

    def close(self) -> None:  # DDIMSampler's interface (no run is kept)
        pass

    def _resolve_device_dtype(self, device, dtype, x_T):
        m = self.denoiser
        params = list(m.parameters()) if isinstance(m, nn.Module) else []
        if isinstance(m, EpsDenoiser) and isinstance(m.model, nn.Module):
            params = params or list(m.model.parameters()) + list(m.model.buffers())
        if device is None:
            device = x_T.device if x_T is not None else (params[0].device if params else torch.device("cpu"))
        device = torch.device(device)
        if dtype is None:
            floats = [p.dtype for p in params if p.is_floating_point()]
            dtype = floats[0] if floats and floats[0] in (torch.float32, torch.float64) else torch.float32
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"the sampler state is fp32 (or fp64); got dtype {dtype} (use bf16=True)")
        return device, dtype


class _Run:
    """One sampling run: static state, device tables, the per-step function."""

    def __init__(self, s: EDMSampler, n, shape, seed, labels, x_T, device, dtype):
        self.s, self.n, self.shape, self.device, self.dtype = s, n, shape, device, dtype
        self.cuda = device.type == "cuda"
        self.bf16 = bool(self.cuda if s.bf16 is None else s.bf16)
        # Algorithm 2's churn noise: the Philox stream of kernels/ddim.py from a device
        # [seed, offset] (graph-safe), or a host-seeded torch.Generator (not capturable)
        self.philox = s.sampler == "edm-stochastic" and (
            s.churn_noise == "philox" or (s.churn_noise is None and self.cuda))
        # CUDA graphs: one per step kind (METHOD.md §16); not for fp64 (the pure-PyTorch kernel
        # references) nor for Generator churn noise
        self.graphs = bool(self.cuda and (s.cuda_graphs is None or s.cuda_graphs)
                           and dtype != torch.float64 and (s.sampler != "edm-stochastic" or self.philox))
        den = s.denoiser
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.shape != (n,):
                raise ValueError(f"labels must be an integer tensor of shape [n]=[{n}]")
            labels = labels.to(device=device, dtype=torch.long)
        self.labels = labels
        use = labels is not None and den.label_dim > 0 and s.class_conditional is not False
        if s.class_conditional and (labels is None or den.label_dim == 0):
            raise ValueError("class_conditional=True needs labels and a conditional denoiser (label_dim > 0)")
        if labels is not None and use and int(labels.max()) >= den.label_dim:
            raise ValueError(f"labels must be < label_dim={den.label_dim}")
        self.onehot = (torch.nn.functional.one_hot(labels, den.label_dim).to(dtype) if use else None)
        if den.label_dim > 0 and self.onehot is None and s.class_conditional is not False:
            raise ValueError(f"the denoiser is class-conditional (label_dim={den.label_dim}): pass labels")

        sig0 = float(s.sigmas[0])
        init = sig0 * math.sqrt(1.0 + 1.0 / (sig0 * sig0)) if s.eps_model else sig0
        if x_T is not None:
            if tuple(x_T.shape) != (n,) + shape:
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {(n,) + shape}")
            z = x_T.detach().to(device=device, dtype=dtype)
        else:
            z = torch.randn((n,) + shape, generator=torch.Generator(device=device).manual_seed(seed),
                            device=device, dtype=dtype)
        self.x = (z * init).contiguous()                            # static state
        self.d_prev = torch.zeros_like(self.x) if s.sampler == "dpm-solver++" else None  # multistep history
        self.noise_gen = torch.Generator(device=device).manual_seed(seed + NOISE_SEED_OFFSET)
        self.rng_state = make_rng_state(philox_seed(seed), device) if self.philox else None
        self.coef = s.coefficient_table().to(device=device, dtype=dtype)   # [N, 7]
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.bad_step = torch.full((1,), -1, dtype=torch.long, device=device)
        self.kinds = self._kinds()
        self.grun: Optional[GuidanceRun] = None
        if s.guidance is not None and any(k != "plain" for k in self.kinds):
            self.grun = s.guidance.start(GuidanceStart(
                n=n, shape=shape, labels=labels, device=device, dtype=dtype, seed=seed, bf16=self.bf16,
                capturable=self.graphs))
        self.scale = float(s.guidance.scale) if s.guidance is not None else 0.0
        # pixel-space HNM: the gradient fused into the solver's update (fused_affine, §16)
        # lambda = 0 takes the unfused step: D - 0 g is D exactly, so it equals the unguided sampler
        # bit for bit (the fused DPM-Solver++ form regroups the update and rounds differently)
        self.fused = bool(self.scale != 0.0 and (self.cuda if s.fused_kernels is None else s.fused_kernels)
                          and self.grun is not None and getattr(self.grun, "fused_ok", False)
                          and callable(getattr(self.grun, "fused_affine", None)))
        self.graph: dict = {}
        self.seen: dict = {}
        self.eager_keys: set = set()
        self.side = None

    def _kinds(self) -> list[str]:
        return step_kinds(self.s.guided_steps(), self.s.guidance)

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def D(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.s.denoiser(x, sigma, self.onehot)
        return out.to(self.dtype)

    # one step (eager; static buffers and device tables only; also what CUDA graphs capture) ------
    def step(self, kind: str, first: bool, last: bool) -> None:
        s, x = self.s, self.x
        row = self.coef.index_select(0, self.counter).view(-1)
        if s.sampler == "edm-stochastic":  # Algorithm 2 lines 4-6 (EDM draws at every step)
            if self.philox:   # device ops only: [seed, offset] read and advanced on the device
                noise = philox_normal_ref(self.rng_state, x.numel(), x.dtype).view(x.shape)
                advance_rng(self.rng_state, x.numel())
            else:
                noise = torch.randn(x.shape, generator=self.noise_gen, device=x.device, dtype=x.dtype)
            x_hat = x + row[2] * noise
        else:
            x_hat = x
        if kind == "guided" and self.fused:
            x_next = self._fused_guided(x, x_hat, row, last)
        else:
            x_next = self._step(x, x_hat, row, kind, first, last)
        x.copy_(x_next)
        bad = ~torch.isfinite(x).all()
        self.bad_step.copy_(torch.where((self.bad_step < 0) & bad, self.counter, self.bad_step))
        self.counter.add_(1)

    def _step(self, x, x_hat, row, kind, first, last):
        s = self.s
        t_hat, t_next = row[0], row[1]
        g = None
        if kind == "prime":
            self.grun.prime(x_hat * row[3])
        elif kind == "guided":
            # grad of L w.r.t. x_vp = x / sqrt(1 + sigma^2), taken where D is first evaluated
            g = self.grun.gradient(x_hat * row[3]).to(x.dtype)
        denoised = self.D(x_hat, t_hat)
        if g is not None:
            denoised = denoised - (t_hat * self.scale) * g       # D' = D - sigma lambda grad L
        if s.sampler == "dpm-solver++":
            ratio = row[4]
            if first or last:    # first order (DDIM in sigma): x_t = r x + (1 - r) D
                x_next = ratio * x + (1 - ratio) * denoised
            else:                # 2M, midpoint: D + 0.5 / r0 (D - D_prev)
                x_next = ratio * x + (1 - ratio) * (denoised + row[5] * (denoised - self.d_prev))
            self.d_prev.copy_(denoised)
        else:
            d_cur = (x_hat - denoised) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur
            if s.sampler != "euler" and not last:    # Heun's 2nd-order correction
                denoised = self.D(x_next, t_next)
                if g is not None:
                    denoised = denoised - (t_next * self.scale) * g   # same g: METHOD.md §16
                d_prime = (x_next - denoised) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        return x_next

    def _fused_guided(self, x, x_hat, row, last):
        """A guided step with the pixel-space HNM gradient fused into the update (METHOD.md §16).
        The op gets x_vp (its gradient is w.r.t. x_vp) and writes out = c_e (eps + lambda g) + h
        (its c_x = 0: the state itself comes in through h, so lambda = 0 rounds like the unfused
        step instead of through x_vp * sqrt(1 + sigma^2))."""
        s = self.s
        t_hat, t_next = row[0], row[1]
        x_vp = (x_hat * row[3]).contiguous()
        D = self.D(x_hat, t_hat)
        if s.sampler == "dpm-solver++":
            # e = -D / t + lambda g = -D' / t; out = r x + (1 - r)((1 + c2) D' - c2 D_prev)
            r, c2 = row[4], row[5]
            h = (r * x - (1 - r) * c2 * self.d_prev).contiguous()
            c_e = -(1 - r) * (1 + c2) * t_hat     # c2 = 0 at the first-order steps
            x_next, e = self.grun.fused_affine(x_vp, (D / -t_hat).contiguous(), 0.0, c_e, h=h, c_h=1.0,
                                               write_eps=True)
            self.d_prev.copy_(e * -t_hat)   # the guided D' goes into the history
            return x_next
        d = ((x_hat - D) / t_hat).contiguous()       # e = d + lambda g = (x_hat - D') / t_hat
        c_e = t_next - t_hat                          # device values, as the unfused step's
        if s.sampler == "euler" or last:
            return self.grun.fused_affine(x_vp, d, 0.0, c_e, h=x_hat.contiguous(), c_h=1.0)
        x_next, e = self.grun.fused_affine(x_vp, d, 0.0, c_e, h=x_hat.contiguous(), c_h=1.0, write_eps=True)
        # Heun's corrector with the same g: lambda g = e - d (no second gradient)
        d_prime = (x_next - self.D(x_next, t_next)) / t_next + (e - d)
        return x_hat + (t_next - t_hat) * (0.5 * e + 0.5 * d_prime)

    def loop(self, show_progress: bool) -> torch.Tensor:
        s = self.s
        rng = progress(range(s.steps), total=s.steps, desc=s.sampler) if show_progress else range(s.steps)
        with torch.no_grad():
            for i in rng:
                args = (self.kinds[i], i == 0, i == s.steps - 1)
                key = "{}:{:d}:{:d}".format(*args)
                if self.graphs and key not in self.eager_keys:
                    self._graph_step(key, args)
                else:
                    self.step(*args)
                if not self.cuda:
                    self._check_finite()
        self._check_finite()
        return self.x

    def _graph_step(self, key: str, args) -> None:
        """DDIMSampler's recipe (sampler.py): two eager warm-ups of a step kind on one side
        stream, then one capture, replayed at every later step of that kind; a failed capture
        warns once and runs that kind eagerly."""
        count = self.seen.get(key, 0)
        self.seen[key] = count + 1
        if key in self.graph:
            self.graph[key].replay()
            return
        if count < _WARMUP:
            if self.side is None:
                self.side = torch.cuda.Stream(device=self.device)
            side = self.side
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_CAPTURABLE_WARNING, category=UserWarning)
                self.step(*args)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step(*args)  # recorded, not run: the state is untouched if capture fails
        except Exception as err:  # noqa: BLE001 - e.g. a host sync in the denoiser
            warnings.warn(f"CUDA graph capture of the {key!r} step failed ({type(err).__name__}: {err}); "
                          "running that step eagerly", RuntimeWarning, stacklevel=3)
            self.eager_keys.add(key)
            torch.cuda.synchronize(self.device)
            self.step(*args)
            return
        self.graph[key] = graph
        graph.replay()

    def _check_finite(self) -> None:
        bad = int(self.bad_step.item())
        if bad >= 0:
            raise ValueError(f"NaN/inf in the sampler state after step {bad} of {self.s.steps} "
                             f"(sigma={float(self.s.t_hat[bad]):.4g}); sampling stopped")

    def close(self) -> None:
        if self.grun is not None:
            self.grun.finish()
            self.grun = None
        self.graph.clear()
