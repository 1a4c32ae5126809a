"""``EDMPipeline``: DDIMPipeline's sibling for the continuous-sigma samplers (issue 20).

    pipe = EDMPipeline.from_pretrained("runs/p/diffusion")          # an eps-model, or an EDM model
    images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0), sampler="heun",
                  num_inference_steps=18, class_labels=None, output_type="np").images

``denoiser``: any :class:`cdp_fast.denoiser.Denoiser` (EDM's networks), or an eps-model given with
its ``schedule`` (wrapped by :class:`cdp_fast.solvers.EpsDenoiser`). The initial noise is drawn
as diffusers' ``randn_tensor`` draws it (from ``generator``), the steps are
:class:`cdp_fast.solvers.EDMSampler`'s; ``guidance=ContrastiveGuidance(...)`` adds Contrastive-DP
(METHOD.md §16). ``class_labels``: integer labels [batch_size] for a conditional model
(None: classes in turn).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .ddim_pipeline import OUTPUT_TYPES, DDIMPipeline, ImagePipelineOutput, randn_tensor
from .diffusion_train import load_diffusion
from .schedules import NoiseSchedule
from .solvers import EDMSampler, EpsDenoiser

__all__ = ["EDMPipeline"]


class EDMPipeline:
    """See the module docstring."""

    def __init__(self, denoiser, schedule: Optional[NoiseSchedule] = None, *, label_dim: int = 0,
                 image_shape: Optional[Sequence[int]] = None):
        if schedule is not None:
            denoiser = EpsDenoiser(denoiser, schedule, label_dim=label_dim)
        self.denoiser = denoiser
        if image_shape is None:
            C, R = int(getattr(denoiser, "img_channels", 0)), int(getattr(denoiser, "img_resolution", 0))
            image_shape = (C, R, R) if C and R else None
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)

    @classmethod
    def from_pretrained(cls, path, device="cpu", **load_kw) -> "EDMPipeline":
        """A pipeline from anything ``load_diffusion`` reads (EDM models included)."""
        model, schedule, meta = load_diffusion(path, device=device, **load_kw)
        if meta.get("kind") == "edm":
            pipe = cls(model)
        else:
            label_dim = int(meta.get("num_classes") or 0) if meta.get("class_conditional") else 0
            pipe = cls(model, schedule, label_dim=label_dim, image_shape=meta["image_shape"])
        pipe.meta = meta
        return pipe

    def _module(self):
        d = self.denoiser
        return d.model if isinstance(d, EpsDenoiser) else d

    @property
    def device(self) -> torch.device:
        m = self._module()
        p = next(iter(m.parameters()), None) if isinstance(m, torch.nn.Module) else None
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
                 num_inference_steps: int = 18, sampler: str = "heun", class_labels: Optional[torch.Tensor] = None,
                 output_type: Optional[str] = "pil", return_dict: bool = True, *, guidance=None, seed: int = 0,
                 **sampler_options):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if self.image_shape is None:
            raise ValueError("unknown image shape: pass image_shape= to EDMPipeline")
        smp = EDMSampler(self.denoiser, sampler=sampler, steps=num_inference_steps, guidance=guidance,
                         **sampler_options)
        label_dim = int(self.denoiser.label_dim)
        if class_labels is None and label_dim > 0:
            class_labels = torch.arange(batch_size) % label_dim
        device = self.device
        x_T = randn_tensor((batch_size,) + self.image_shape, generator=generator, device=device,
                           dtype=torch.float32)
        image = smp.sample(batch_size, self.image_shape, seed=seed, labels=class_labels, x_T=x_T,
                           device=device, dtype=torch.float32)
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.float().cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = DDIMPipeline.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
