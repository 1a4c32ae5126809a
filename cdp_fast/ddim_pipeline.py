"""``DDIMPipeline``: a drop-in for ``diffusers.DDIMPipeline`` (diffusers itself stays optional).

    pipe = DDIMPipeline.from_pretrained("path/to/ddpm-cifar10-32")     # or DDIMPipeline(unet=, scheduler=)
    images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0), eta=0.0,
                  num_inference_steps=50, output_type="np").images

Called like diffusers' pipeline it returns the same images for the same generator: x_T is drawn
as diffusers' ``randn_tensor`` draws it and the loop is diffusers' (model -> ``DDIMScheduler.step``,
the drop-in of ``cdp_fast.diffusers_compat``). ``unet`` may be a diffusers ``UNet2DModel`` or any
model ``load_diffusion`` returns; ``from_pretrained`` reads everything ``load_diffusion`` reads.

Two additions:
* ``guidance=ContrastiveGuidance(...)``: Contrastive-DP (Algorithm 1) during sampling;
* ``engine="fast"`` (the default on CUDA and whenever guidance is given): the cdp-fast engine
  (:class:`~cdp_fast.sampler.DDIMSampler`: CUDA graphs, bf16 autocast, fused kernels) runs the
  same DDIM steps from the same x_T. It needs a schedule whose timesteps the engine walks
  (``timestep_spacing="leading"``, ``steps_offset=0``, ``set_alpha_to_one=True``, T divisible
  into the steps) and ``use_clipped_model_output`` off; ``engine="auto"`` falls back to the eager
  loop otherwise (without guidance). With ``eta > 0`` its noise comes from the engine's own
  generator (seeded from ``generator``), so only eta = 0 reproduces diffusers image for image.
  ``engine_options`` go to DDIMSampler (e.g. ``{"bf16": False}`` for fp32 on CUDA).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch

from .diffusers_compat import DDIMScheduler
from .diffusion_train import load_diffusion
from .sampler import DDIMSampler
from .schedules import NoiseSchedule
from .utils import progress

__all__ = ["DDIMPipeline", "ImagePipelineOutput", "randn_tensor"]

OUTPUT_TYPES = ("pil", "np", "pt")
ENGINES = ("auto", "eager", "fast")


@dataclass
class ImagePipelineOutput:
    images: Union[List[Any], np.ndarray, torch.Tensor]

    def __getitem__(self, k):
        return getattr(self, k) if isinstance(k, str) else (self.images,)[k]


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn as diffusers draws it (per-sample generators, CPU generators
    for CUDA tensors), so a seeded generator gives diffusers' x_T."""
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn_tensor((1,) + tuple(shape[1:]), g, device, dtype) for g in generator])
    rand_device = device
    if generator is not None and generator.device.type != device.type:
        rand_device = generator.device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def _first_param(model):
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p
    return None


class DDIMPipeline:
    """See the module docstring."""

    def __init__(self, unet, scheduler=None):
        if not callable(unet):
            raise TypeError(f"unet must be a model (x, t) -> eps, got {type(unet).__name__}")
        self.unet = unet
        # like diffusers: whatever scheduler is given, its config drives a DDIM scheduler
        self.scheduler = DDIMScheduler.from_config(scheduler if scheduler is not None else {})

    # construction --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device="cpu", **load_kw) -> "DDIMPipeline":
        """A pipeline from anything ``load_diffusion`` reads (diffusers folder, original DDPM file,
        cdp-fast folder); the scheduler from the folder's ``scheduler_config.json`` when present."""
        model, schedule, meta = load_diffusion(path, device=device, **load_kw)
        if meta.get("class_conditional"):
            raise ValueError(f"{path}: a class-conditional model; DDIMPipeline samples unconditional models")
        cfg = None
        p = Path(path)
        for cand in (p / "scheduler" / "scheduler_config.json", p / "scheduler_config.json"):
            if p.is_dir() and cand.is_file():
                cfg = json.loads(cand.read_text())
                break
        if cfg is None:
            sch = meta["schedule"]
            names = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
            if sch["name"] not in names:
                raise ValueError(f"{path}: schedule {sch['name']!r} has no DDIMScheduler equivalent")
            cfg = dict(num_train_timesteps=int(sch["num_train_timesteps"]), beta_schedule=names[sch["name"]],
                       **{k: v for k, v in sch.get("params", {}).items() if k in ("beta_start", "beta_end")})
        pipe = cls(model, DDIMScheduler.from_config(cfg))
        pipe.meta = meta
        return pipe

    def to(self, device) -> "DDIMPipeline":
        if isinstance(self.unet, torch.nn.Module):
            self.unet.to(device)
        return self

    @property
    def device(self) -> torch.device:
        p = _first_param(self.unet)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = _first_param(self.unet)
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def _sample_shape(self) -> tuple:
        cfg = getattr(self.unet, "config", None) or {}
        get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
        size = get("sample_size") or get("image_size")
        ch = get("in_channels")
        if size is None or ch is None:
            raise ValueError("cannot tell the sample shape: unet.config needs in_channels and sample_size "
                             "(or image_size)")
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return (int(ch),) + tuple(int(s) for s in hw)

    # sampling --------------------------------------------------------------------------------------
    def _fast_ok(self, steps: int, use_clipped: bool) -> Optional[str]:
        c = self.scheduler.config
        if c.prediction_type != "epsilon":
            return f"prediction_type={c.prediction_type!r}"
        if use_clipped:
            return "use_clipped_model_output=True"
        if not c.set_alpha_to_one:
            return "set_alpha_to_one=False"
        T = c.num_train_timesteps
        ours = list(reversed(range(0, T, T // steps)))
        theirs = self.scheduler.timesteps.tolist()
        if ours != theirs:
            return f"timesteps {theirs[:3]}... (spacing {c.timestep_spacing!r}, offset {c.steps_offset})"
        return None

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
                 eta: float = 0.0, num_inference_steps: int = 50, use_clipped_model_output: Optional[bool] = None,
                 output_type: Optional[str] = "pil", return_dict: bool = True, *, guidance=None,
                 engine: str = "auto", engine_options: Optional[dict] = None):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested "
                             f"an effective batch size of {batch_size}.")
        device = self.device
        shape = (batch_size,) + self._sample_shape()
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        why_not = self._fast_ok(num_inference_steps, bool(use_clipped_model_output))
        fast = engine == "fast" or (engine == "auto" and (guidance is not None or device.type == "cuda"))
        if fast and why_not is not None:
            if engine == "fast" or guidance is not None:
                raise ValueError(f"the fast engine cannot run this schedule ({why_not}); use engine='eager' "
                                 f"(without guidance)")
            fast = False
        if fast:
            image = self._fast(image, eta, num_inference_steps, guidance, generator, engine_options or {})
        else:
            if guidance is not None:
                raise ValueError("guidance needs the fast engine (engine='auto' or 'fast')")
            for t in progress(self.scheduler.timesteps, desc="DDIMPipeline"):
                out = self.unet(image, t)
                out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
                image = self.scheduler.step(out, t, image, eta=eta,
                                            use_clipped_model_output=bool(use_clipped_model_output),
                                            generator=generator).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.float().cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _fast(self, x_T, eta, steps, guidance, generator, options):
        c = self.scheduler.config
        schedule = NoiseSchedule(self.scheduler.betas.to(torch.float64))
        clip = float(c.clip_sample_range) if c.clip_sample else False
        sampler = DDIMSampler(self.unet, schedule, steps=steps, eta=float(eta), guidance=guidance, clip_x0=clip,
                              **options)
        g = generator[0] if isinstance(generator, (list, tuple)) else generator
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g, device=g.device)) if g is not None else 0
        return sampler.sample(x_T.shape[0], tuple(x_T.shape[1:]), seed=seed, x_T=x_T, device=x_T.device,
                              dtype=torch.float32)

    @staticmethod
    def numpy_to_pil(images: np.ndarray):
        from PIL import Image

        if images.ndim == 3:
            images = images[None]
        images = (images * 255).round().astype("uint8")
        if images.shape[-1] == 1:
            return [Image.fromarray(im.squeeze(), mode="L") for im in images]
        return [Image.fromarray(im) for im in images]
