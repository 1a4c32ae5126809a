"""``DDIMScheduler``: a drop-in for ``diffusers.DDIMScheduler`` (diffusers itself is optional).

Same constructor arguments, ``config``, ``from_config``, ``set_timesteps``, ``timesteps``,
``init_noise_sigma``, ``scale_model_input``, ``add_noise``, ``get_velocity`` and ``step`` (returning
``.prev_sample`` / ``.pred_original_sample``, or a tuple with ``return_dict=False``), numerically
equal to diffusers (fp32; tested against diffusers 0.42). The epsilon-prediction step runs through
the fused :func:`cdp_fast.kernels.ddim_update` (Triton on CUDA, reference on CPU).

Deliberate quirks kept for equality with diffusers:
- betas are built in float32 exactly as diffusers builds them (``noise_schedule`` gives the same
  betas as a float64 :class:`~cdp_fast.schedules.NoiseSchedule` for the cdp-fast samplers);
- the previous timestep is always ``t - T // num_inference_steps``, whatever the spacing;
- the direction term uses the model's eps (not re-derived from the clipped x0) unless
  ``use_clipped_model_output=True``;
- with ``eta > 0`` and no ``variance_noise`` the noise is ``torch.randn`` from ``generator`` (or
  the global generator), as diffusers draws it.
Not supported: ``thresholding=True`` (NotImplementedError); epsilon prediction at alphabar_t = 0
(``rescale_betas_zero_snr`` with trailing spacing) raises ValueError where diffusers returns inf;
where rounding makes 1 - alphabar_prev - sigma^2 slightly negative (alphabar_t ~ 0 with eta = 1)
we clamp it to 0 (finite result) where diffusers returns NaN.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .kernels import ddim_update
from .kernels.ddim_ref import ddim_coefficients, ddim_step_ref
from .schedules import NoiseSchedule

__all__ = ["DDIMScheduler", "DDIMSchedulerOutput", "DPMSolverMultistepScheduler", "SchedulerConfig",
           "SchedulerOutput"]

_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("leading", "trailing", "linspace")
_PREDICTIONS = ("epsilon", "sample", "v_prediction")


class SchedulerConfig(dict):
    """Read-only dict with attribute access (like diffusers' FrozenDict)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _readonly(self, *a, **k):
        raise TypeError("scheduler config is read-only; build a new scheduler with from_config(cfg, **changes)")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _readonly
    __setattr__ = _readonly

    def __reduce__(self):  # copy / deepcopy / pickle rebuild from a plain dict
        return (type(self), (dict(self),))


@dataclass
class DDIMSchedulerOutput:
    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None

    def to_tuple(self):
        return (self.prev_sample, self.pred_original_sample)

    def __getitem__(self, k):
        if isinstance(k, str):
            return getattr(self, k)
        return self.to_tuple()[k]


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1 (as diffusers computes it, float32)."""
    ab_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - aT) * (a0 / (a0 - aT))
    ab = ab_sqrt ** 2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


class DDIMScheduler:
    """Drop-in for ``diffusers.DDIMScheduler`` (see the module docstring)."""

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 clip_sample: bool = True, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        num_train_timesteps = int(num_train_timesteps)
        if trained_betas is None and beta_schedule not in _SCHEDULES:
            raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented; choose from {_SCHEDULES}")
        if timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {timestep_spacing!r}")
        if prediction_type not in _PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {_PREDICTIONS}, got {prediction_type!r}")
        if thresholding:
            raise NotImplementedError("thresholding=True (dynamic thresholding) is not supported by cdp_fast's "
                                      "DDIMScheduler; use clip_sample")
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
        if int(steps_offset) != steps_offset or steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")

        given = dict(locals())
        cfg = {k: given[k] for k in _init_params()}
        if isinstance(cfg["trained_betas"], torch.Tensor) or isinstance(cfg["trained_betas"], np.ndarray):
            cfg["trained_betas"] = [float(b) for b in cfg["trained_betas"]]
        object.__setattr__(self, "_config", SchedulerConfig(cfg))

        T = num_train_timesteps
        if trained_betas is not None:
            betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
            if betas.ndim != 1 or betas.numel() != T:
                raise ValueError(f"trained_betas must have length num_train_timesteps={T}, got {tuple(betas.shape)}")
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
        else:  # squaredcos_cap_v2: the same float64 formula, cast like diffusers
            betas = NoiseSchedule.cosine(T).betas.to(torch.float32)
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps: Optional[int] = None
        self.timesteps = torch.from_numpy(np.arange(0, T)[::-1].copy().astype(np.int64))

    # config ------------------------------------------------------------------------------------
    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], Any] = None, **overrides) -> "DDIMScheduler":
        """Build from a diffusers scheduler, a cdp-fast scheduler, their ``.config`` or a dict.

        Keys that are not constructor arguments (``_class_name``, other schedulers' options) are
        ignored, as diffusers does; ``overrides`` win.
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping) and hasattr(config, "config"):
            config = config.config
        if not isinstance(config, Mapping):
            raise TypeError(f"from_config expects a scheduler, its config or a dict, got {type(config).__name__}")
        params = _init_params()
        kw = {k: v for k, v in dict(config).items() if k in params}
        kw.update(overrides)
        unknown = [k for k in overrides if k not in params]
        if unknown:
            raise TypeError(f"unknown DDIMScheduler arguments: {unknown}")
        return cls(**kw)

    def to_diffusers(self):
        """The equivalent ``diffusers.DDIMScheduler`` (needs diffusers installed)."""
        try:
            from diffusers import DDIMScheduler as _D
        except ImportError as exc:  # pragma: no cover
            raise ImportError("to_diffusers() needs diffusers (pip install 'cdp-fast[interop]')") from exc
        return _D(**dict(self.config))

    @property
    def noise_schedule(self) -> NoiseSchedule:
        """The training schedule as a float64 NoiseSchedule (for DDIMSampler)."""
        return NoiseSchedule(self.betas.to(torch.float64))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __setattr__(self, name, value):
        if name == "config":
            raise AttributeError("config is read-only")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items() if k != 'trained_betas')})"

    # timesteps ---------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
        n = int(num_inference_steps)
        if n > T:
            raise ValueError(f"num_inference_steps={n} cannot be larger than num_train_timesteps={T}")
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        self.num_inference_steps = n
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = T // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
            ts += self.config.steps_offset
        else:  # trailing
            ratio = T / n
            ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64)
            ts -= 1
        self.timesteps = torch.from_numpy(ts).to(device)

    def _prev_timestep(self, timestep: int) -> int:
        return timestep - self.config.num_train_timesteps // self.num_inference_steps

    def _alpha_prev(self, prev_t: int) -> torch.Tensor:
        return self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

    # the step ----------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             eta: float = 0.0, use_clipped_model_output: bool = False,
             generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]] = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True):
        """One DDIM step from ``timestep``; see diffusers' ``DDIMScheduler.step``."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps() before step()")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}")
        t = int(timestep)  # host value: diffusers branches on it too
        T = self.config.num_train_timesteps
        if not 0 <= t < T:
            raise ValueError(f"timestep {t} outside [0, {T})")
        prev_t = self._prev_timestep(t)
        a_t = self.alphas_cumprod[t]
        a_prev = self._alpha_prev(prev_t)
        eta = float(eta)
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise; leave one of them None")
            if variance_noise is None:
                variance_noise = _randn(model_output.shape, generator, model_output.device, model_output.dtype)
            elif variance_noise.shape != sample.shape:
                raise ValueError(f"variance_noise shape {tuple(variance_noise.shape)} != sample shape "
                                 f"{tuple(sample.shape)}")
        else:
            variance_noise = None
        clip = float(self.config.clip_sample_range) if self.config.clip_sample else None
        ptype = self.config.prediction_type

        if ptype == "epsilon":
            if float(a_t) <= 0.0:
                raise ValueError(f"alphabar at timestep {t} is 0 (zero terminal SNR): epsilon prediction cannot "
                                 f"recover x0 there; use prediction_type='v_prediction'")
            prev, x0 = ddim_update(sample, model_output, float(a_t), float(a_prev), eta=eta,
                                   noise=variance_noise, clip_x0=clip,
                                   eps_from_clipped_x0=bool(use_clipped_model_output), return_x0=True)
        else:  # "sample" / "v_prediction": the model gives x0 (and eps) directly, then METHOD.md §3
            b_t = 1 - a_t
            if ptype == "sample":
                x0 = model_output
                e = (sample - a_t ** 0.5 * x0) / b_t ** 0.5
            else:
                x0 = a_t ** 0.5 * sample - b_t ** 0.5 * model_output
                e = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
            # c2 is clamped at 0: rounding can make 1 - a_prev - c1^2 slightly negative at
            # alphabar_t ~ 0, eta = 1 (diffusers: NaN)
            prev, x0 = ddim_step_ref(sample, e, ddim_coefficients(a_t, a_prev, eta), x0=x0, clip_x0=clip,
                                     eps_from_clipped_x0=bool(use_clipped_model_output),
                                     noise=variance_noise)
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # forward process ---------------------------------------------------------------------------
    def _sqrt_terms(self, x: torch.Tensor, timesteps: torch.Tensor):
        self.alphas_cumprod = self.alphas_cumprod.to(device=x.device)
        ab = self.alphas_cumprod.to(dtype=x.dtype)
        timesteps = torch.as_tensor(timesteps).to(x.device)
        sa = (ab[timesteps] ** 0.5).flatten()
        sb = ((1 - ab[timesteps]) ** 0.5).flatten()
        shape = (-1,) + (1,) * (x.ndim - 1)
        if sa.numel() == 1:
            shape = (1,) * max(x.ndim, 1)
        return sa.reshape(shape), sb.reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (diffusers' add_noise)."""
        return self._sqrt_terms_add(original_samples, noise, timesteps)

    def _sqrt_terms_add(self, original_samples, noise, timesteps):
        sa, sb = DDIMScheduler._sqrt_terms(self, original_samples, timesteps)
        return sa * original_samples + sb * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sa, sb = self._sqrt_terms(sample, timesteps)
        return sa * noise - sb * sample


def _init_params(cls=None):
    cls = DDIMScheduler if cls is None else cls
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def _randn(shape, generator, device, dtype):
    """diffusers' randn_tensor: draw on the generator's device (CPU generators for CUDA samples)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([_randn((1,) + tuple(shape[1:]), g, device, dtype) for g in generator]).to(device)
    rand_device = device
    if generator is not None and generator.device.type != torch.device(device).type:
        rand_device = generator.device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


# ------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (issue 20)
# ------------------------------------------------------------------------------------------------
@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor

    def to_tuple(self):
        return (self.prev_sample,)

    def __getitem__(self, k):
        if isinstance(k, str):
            return getattr(self, k)
        return self.to_tuple()[k]


_DPM_SPACINGS = ("linspace", "leading", "trailing")


class DPMSolverMultistepScheduler:
    """Drop-in for ``diffusers.DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``
    (DPM-Solver++, Lu et al. 2022), ``solver_order`` 1 or 2, ``solver_type="midpoint"``,
    ``final_sigmas_type`` "zero" or "sigma_min": the same float32 tables and formulas as diffusers
    0.42, hence the same numbers (tested). Other options (SDE variants, order 3, Karras / Lu /
    exponential / beta sigmas, thresholding, learned variance, flow sigmas) raise
    NotImplementedError; :class:`cdp_fast.solvers.EDMSampler` ``sampler="dpm-solver++"`` is the
    engine's graph-safe sampler with the same steps (METHOD.md §16).
    """

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 solver_order: int = 2, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: Optional[str] = None,
                 timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        if algorithm_type != "dpmsolver++":
            raise NotImplementedError(f"algorithm_type {algorithm_type!r}: only 'dpmsolver++' is implemented")
        if solver_order not in (1, 2):
            raise NotImplementedError(f"solver_order {solver_order!r}: only 1 and 2 are implemented")
        if solver_type != "midpoint":
            raise NotImplementedError(f"solver_type {solver_type!r}: only 'midpoint' is implemented")
        if prediction_type not in _PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {_PREDICTIONS}, got {prediction_type!r}")
        for name in ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                     "use_lu_lambdas", "use_flow_sigmas", "rescale_betas_zero_snr"):
            if locals()[name]:
                raise NotImplementedError(f"{name}=True is not implemented by cdp_fast's DPMSolverMultistepScheduler")
        if variance_type is not None:
            raise NotImplementedError("variance_type (learned variance) is not implemented")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if timestep_spacing not in _DPM_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_DPM_SPACINGS}, got {timestep_spacing!r}")
        if trained_betas is None and beta_schedule not in _SCHEDULES:
            raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented; choose from {_SCHEDULES}")
        given = dict(locals())
        cfg = {k: given[k] for k in _init_params(DPMSolverMultistepScheduler)}
        if isinstance(cfg["trained_betas"], (torch.Tensor, np.ndarray)):
            cfg["trained_betas"] = [float(b) for b in cfg["trained_betas"]]
        object.__setattr__(self, "_config", SchedulerConfig(cfg))
        T = int(num_train_timesteps)
        if trained_betas is not None:
            betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
        else:
            betas = NoiseSchedule.cosine(T).betas.to(torch.float32)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0
        self.num_inference_steps: Optional[int] = None
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self.model_outputs: list = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index: Optional[int] = None

    config = DDIMScheduler.config
    __setattr__ = DDIMScheduler.__setattr__
    __len__ = DDIMScheduler.__len__
    __repr__ = DDIMScheduler.__repr__
    noise_schedule = DDIMScheduler.noise_schedule

    @classmethod
    def from_config(cls, config=None, **overrides) -> "DPMSolverMultistepScheduler":
        """Build from a diffusers scheduler, a cdp-fast scheduler, their ``.config`` or a dict
        (unknown keys ignored, as diffusers does; ``overrides`` win)."""
        if config is None:
            config = {}
        if not isinstance(config, Mapping) and hasattr(config, "config"):
            config = config.config
        if not isinstance(config, Mapping):
            raise TypeError(f"from_config expects a scheduler, its config or a dict, got {type(config).__name__}")
        params = _init_params(cls)
        unknown = [k for k in overrides if k not in params]
        if unknown:
            raise TypeError(f"unknown DPMSolverMultistepScheduler arguments: {unknown}")
        kw = {k: v for k, v in dict(config).items() if k in params}
        kw.update(overrides)
        return cls(**kw)

    def to_diffusers(self):
        """The equivalent ``diffusers.DPMSolverMultistepScheduler`` (needs diffusers installed)."""
        from diffusers import DPMSolverMultistepScheduler as _D
        return _D(**dict(self.config))

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """diffusers' grid: timesteps by ``timestep_spacing``, sigmas interpolated there (float32)."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        n, cfg = int(num_inference_steps), self.config
        T = cfg.num_train_timesteps
        clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
        last = int((T - clipped_idx).item())
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            ts += cfg.steps_offset
        else:
            ratio = T / n
            ts = np.arange(last, 0, -ratio).round().copy().astype(np.int64)
            ts -= 1
        sig = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sig = np.interp(ts, np.arange(0, len(sig)), sig)
        last_sigma = 0 if cfg.final_sigmas_type == "zero" else \
            ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        self.sigmas = torch.from_numpy(np.concatenate([sig, [last_sigma]]).astype(np.float32))
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(ts)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._step_index = None

    @staticmethod
    def _alpha_sigma(sigma):
        alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def convert_model_output(self, model_output: torch.Tensor, *, sample: torch.Tensor) -> torch.Tensor:
        """The data prediction x0 (DPM-Solver++ integrates it)."""
        ptype = self.config.prediction_type
        if ptype == "sample":
            return model_output
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self._step_index])
        if ptype == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output  # v_prediction

    def _index_for(self, timestep) -> int:
        cand = (self.timesteps == torch.as_tensor(timestep).to(self.timesteps.device)).nonzero()
        if len(cand) == 0:
            return len(self.timesteps) - 1
        return int(cand[1 if len(cand) > 1 else 0].item())

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             generator=None, variance_noise=None, return_dict: bool = True):
        """One DPM-Solver++ step (first order at the first / final step, else 2M midpoint)."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps() before step()")
        if self._step_index is None:
            self._step_index = self._index_for(timestep)
        cfg, i, n = self.config, self._step_index, len(self.timesteps)
        if i >= n:
            raise ValueError(f"step() called {i + 1} times for {n} timesteps; call set_timesteps() again")
        lower_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                      or cfg.final_sigmas_type == "zero")
        m = self.convert_model_output(model_output, sample=sample)
        for k in range(cfg.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = m
        sample = sample.to(torch.float32)
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            prev = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m
        else:
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            D0, D1 = m0, (1.0 / r0) * (m0 - m1)
            prev = ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                    - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) at training timesteps (as DDIMScheduler.add_noise)."""
        return DDIMScheduler._sqrt_terms_add(self, original_samples, noise, timesteps)
