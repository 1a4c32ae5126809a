"""End-to-end sampling benchmarks: ``sample_guided`` and ``sample_unguided``.

Setting (GPU suite): the CIFAR-10 DDPM UNet (``build_unet("ddpm-cifar10")``: ch 128, mult 1-2-2-2,
2 res blocks, attention at 16x16, 35.7M parameters, random weights), a WRN-28-10 feature network
(random weights, 640-d pooled features) with the authors' head (Linear-ReLU-Linear-L2, Adam 1e-2),
HNM loss (T 10, tau+ 0.1, beta 1), scale 1e5, DDIM eta 0, 100 steps, guided at t >= 400 and never
the first step (59 of the 100 steps), contrastive group size 512.

Timing: a 100-step run is not executed; it is projected from short runs of the same code path.
For a mode (guided / unguided) and a variant, run the sampler with k1 and k2 steps (after one
warm-up run of kw steps, reported as ``warmup_s``, never part of the projection; kw is long enough
to contain every step kind and, on CUDA, a graph capture) and fit
T(k) = I + k * slope:
  - unguided runs: every step plain                        -> u (ms/step), I_u
  - guided runs: step 0 caches features, steps 1..k-1 guided -> g (ms/step), I_g
  I (the intercept) holds the per-run costs: initial noise, CUDA-graph warm-ups and captures
  (the engine captures each step kind after two eager steps, anew in every ``sample`` call),
  the final finiteness check. With k1 >= 6 every extra step of the k2 run is a graph replay.
Projections for 100 steps with n_g = 59 guided steps:
  unguided: P_u = I_u + 100 u
  guided  : P_g = I_g + I_u + (n_g + 1) g + (99 - n_g) u
images/s = batch / P; GPU-days for 100M images = 1e8 / (images/s) / 86400.

Baselines (``reference_ms``):
  guided   : ``authors_loop.AuthorsSampler`` (fp32, f on both states, weight gradients, state to
             host every step) at the authors' batch 512; a larger batch is batch / 512 such runs
             (``reference_scaled_from``), the authors' code cannot do more per run.
  unguided : diffusers' ``DDIMPipeline`` with an equal-size ``UNet2DModel`` (same 35.7M layout,
             random weights, fp32, output_type="np") when diffusers is installed, else the
             authors' loop without guidance. Both are reported in ``metric`` when available.
Our variants (``params.variant``): eager-fp32, bf16-cl (bf16 autocast + channels_last),
bf16-cl-graphs (+ CUDA graphs), bf16-cl-graphs-fused (+ Triton kernels: fused DDIM update, fused
HNM) via ``DDIMSampler``'s flags. On the CPU: eager-fp32 and "fused" (fused_kernels on, the
CUDA-only switches off: CPU bf16 autocast is slow and graphs need CUDA).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .timing import BenchTimeout, Ctx, free_memory, is_oom, make_result

SAMPLING_MODULES = ("cdp_fast.sampler", "cdp_fast.guidance", "cdp_fast.models", "cdp_fast.models.unet")
STEPS = 100
T_MIN = 400
SCALE = 1e5
GROUP = 512

VARIANTS = {
    # name: (bf16, channels_last, cuda_graphs, fused_kernels)
    "eager-fp32": (False, False, False, False),
    "fused": (False, False, False, True),  # CPU: the fast path minus the CUDA-only switches
    "bf16-cl": (True, True, False, False),
    "bf16-cl-graphs": (True, True, True, False),
    "bf16-cl-graphs-fused": (True, True, True, True),
}


@dataclass
class SamplingSizes:
    unet_preset: str
    image_size: int
    feature_net: str
    k1: int
    k2: int
    kw: int   # warm-up run length: must contain every step kind (and a graph capture on CUDA)
    authors_batch: int = 512


def sizes_for(suite: str) -> SamplingSizes:
    if suite == "gpu":
        return SamplingSizes("ddpm-cifar10", 32, "wrn-28-10", k1=6, k2=10, kw=6)
    if suite == "cpu":
        return SamplingSizes("ddpm-cifar10", 32, "wrn-16-4", k1=1, k2=2, kw=2)
    return SamplingSizes("tiny", 8, "wrn-10-1", k1=1, k2=2, kw=2)


class _Features(nn.Module):
    """Wraps a classifier so that ``forward`` returns its pooled features (a module, so the
    guidance can freeze it)."""

    def __init__(self, clf: nn.Module):
        super().__init__()
        self.clf = clf
        self.feature_dim = clf.feature_dim

    def forward(self, x01):
        return self.clf.features(x01)


class _Models:
    """Built once per suite run and shared by every sampling case (random weights, seed 0)."""

    def __init__(self, ctx: Ctx, sz: SamplingSizes):
        from cdp_fast.models import build
        from cdp_fast.models.unet import build_unet
        from cdp_fast.schedules import NoiseSchedule

        torch.manual_seed(0)
        self.unet = build_unet(sz.unet_preset, in_channels=3, image_size=sz.image_size).to(ctx.device).eval()
        clf = build(sz.feature_net, num_classes=10, in_channels=3, image_size=sz.image_size)
        self.features = _Features(clf).to(ctx.device).eval()
        self.schedule = NoiseSchedule.linear(1000)
        self.unet_params = sum(p.numel() for p in self.unet.parameters())
        self.sz = sz

    def reset_layout(self):
        # DDIMSampler converts the model to channels_last in place; variants must start equal.
        self.unet.to(memory_format=torch.contiguous_format)
        self.features.to(memory_format=torch.contiguous_format)


_MODELS: dict = {}


def models_for(ctx: Ctx) -> _Models:
    key = (str(ctx.device), ctx.suite)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = _Models(ctx, sizes_for(ctx.suite))
    return _MODELS[key]


def clear_models() -> None:
    _MODELS.clear()
    free_memory()


def authors_guided_count(steps: int = STEPS, t_min: int = T_MIN, T: int = 1000) -> int:
    seq = list(reversed(range(0, T, T // steps)))
    return sum(1 for i, t in enumerate(seq) if i > 0 and t >= t_min)


def _fit(t1: float, t2: float, k1: int, k2: int) -> tuple[float, float]:
    slope = (t2 - t1) / (k2 - k1)
    return max(slope, 0.0), max(t1 - k1 * slope, 0.0)


def _timed(ctx: Ctx, fn) -> tuple[float, float | None]:
    """(seconds, peak extra MB or None) of one call."""
    if ctx.is_cuda:
        ctx.sync()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        base = torch.cuda.memory_allocated(ctx.device)
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    dt = time.perf_counter() - t0
    mem = None
    if ctx.is_cuda:
        mem = max(0.0, (torch.cuda.max_memory_allocated(ctx.device) - base) / 2 ** 20)
    return dt, mem


def _measure(ctx: Ctx, run_k) -> dict:
    """Warm-up run (k1), then k1 and k2 runs; linear fit. ``run_k(k)`` runs a k-step sampling."""
    sz = models_for(ctx).sz
    warm, _ = _timed(ctx, lambda: run_k(sz.kw))
    t1, _ = _timed(ctx, lambda: run_k(sz.k1))
    t2, mem = _timed(ctx, lambda: run_k(sz.k2))
    slope, icpt = _fit(t1, t2, sz.k1, sz.k2)
    return {"warmup_s": warm, "t_k1_s": t1, "t_k2_s": t2, "step_ms": slope * 1e3,
            "intercept_ms": icpt * 1e3, "peak_mem_mb": mem}


def _guidance(ctx: Ctx, m: _Models, *, backend: str, fused: bool, all_steps: bool):
    from cdp_fast.guidance import ContrastiveGuidance

    when = (lambda t, i: i > 0) if all_steps else None
    return ContrastiveGuidance("hnm", m.features, head=True, scale=SCALE, t_min=T_MIN,
                               when=when, group_size=None, head_in_dim=m.features.feature_dim,
                               fused=fused, backend=backend)


def _our_runner(ctx: Ctx, m: _Models, batch: int, variant: str, guided: bool):
    from cdp_fast.sampler import DDIMSampler

    bf16, cl, graphs, fused = VARIANTS[variant]
    if not ctx.is_cuda:
        graphs = False  # CUDA graphs need CUDA; the sampler would ignore the flag anyway
    backend = "auto" if fused else "reference"
    shape = (3, m.sz.image_size, m.sz.image_size)

    def run_k(k: int):
        m.reset_layout()
        g = _guidance(ctx, m, backend=backend, fused=fused, all_steps=True) if guided else None
        s = DDIMSampler(m.unet, m.schedule, steps=k, eta=0.0, guidance=g, cuda_graphs=graphs,
                        bf16=bf16, channels_last=cl, fused_kernels=fused, backend=backend)
        with torch.no_grad():  # the guidance takes its gradient under its own enable_grad
            return s.sample(batch, shape, seed=0, device=ctx.device)
    return run_k


def _authors_runner(ctx: Ctx, m: _Models, batch: int, guided: bool):
    from .authors_loop import AuthorsSampler

    shape = (3, m.sz.image_size, m.sz.image_size)
    m.reset_layout()

    def run_k(k: int):
        s = AuthorsSampler(m.unet, m.features, m.schedule.alphas_cumprod, steps=k, scale=SCALE,
                           guided=(lambda t, i: i > 0) if guided else None,
                           feature_dim=m.features.feature_dim)
        for p in m.features.parameters():  # the authors never freeze f
            p.requires_grad_(True)
        return s.sample(batch, shape, device=ctx.device)
    return run_k


def _diffusers_runner(ctx: Ctx, m: _Models, batch: int):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    if m.sz.unet_preset == "ddpm-cifar10":
        kw = dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    else:  # tiny: same as our "tiny" preset in spirit
        kw = dict(block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  norm_num_groups=8)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=m.sz.image_size, in_channels=3, out_channels=3, norm_eps=1e-6,
                       downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, **kw).to(ctx.device).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=False, set_alpha_to_one=True)
    pipe = DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in unet.parameters())

    def run_k(k: int):
        gen = torch.Generator(device=ctx.device).manual_seed(0)
        return pipe(batch_size=batch, generator=gen, eta=0.0, num_inference_steps=k, output_type="np")
    return run_k, params


def _project(meas_u: dict, meas_g: dict | None, n_g: int) -> float:
    u = meas_u["step_ms"]
    if meas_g is None:
        return meas_u["intercept_ms"] + STEPS * u
    g = meas_g["step_ms"]
    return meas_g["intercept_ms"] + meas_u["intercept_ms"] + (n_g + 1) * g + (STEPS - 1 - n_g) * u


def _images(batch: int, ms: float | None) -> float | None:
    return None if not ms else batch / (ms * 1e-3)


def _gpu_days(ips: float | None) -> float | None:
    return None if not ips else 1e8 / ips / 86400.0


# Shared measurements of one suite run: (kind, batch[, variant]) -> dict or an exception string.
_CACHE: dict = {}


def _cached(key, fn, *, baseline: bool = False):
    """Measure once per suite run. Out of memory -> {"failed": msg, "oom": True}. A baseline's
    other failures (e.g. an incompatible diffusers) are recorded the same way instead of killing
    the case; ours re-raise. Timeouts always propagate."""
    if key not in _CACHE:
        try:
            _CACHE[key] = fn()
        except BenchTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            oom = is_oom(e)
            if not (oom or baseline):
                raise
            free_memory()
            _CACHE[key] = {"failed": f"{type(e).__name__}: {str(e)[:300]}", "oom": oom}
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


def sampling_case(ctx: Ctx, *, batch: int, variant: str, guided: bool) -> dict:
    m = models_for(ctx)
    sz = m.sz
    n_g = authors_guided_count()
    name = "sample_guided" if guided else "sample_unguided"

    # unguided per-step cost of this variant: needed by both projections
    meas_u = _cached(("ours", batch, variant, False),
                     lambda: _measure(ctx, _our_runner(ctx, m, batch, variant, False)))
    if "failed" in meas_u:
        raise MemoryError(f"our {variant} sampler ran out of memory (unguided): {meas_u['failed']}")
    meas_g = None
    if guided:
        meas_g = _cached(("ours", batch, variant, True),
                         lambda: _measure(ctx, _our_runner(ctx, m, batch, variant, True)))
        if "failed" in meas_g:
            raise MemoryError(f"our {variant} sampler ran out of memory (guided): {meas_g['failed']}")
    ours_ms = _project(meas_u, meas_g, n_g)

    # the authors' loop at min(batch, 512), scaled to the batch
    a_batch = min(batch, sz.authors_batch)
    scale_runs = batch / a_batch
    metric: dict = {"projection": "see benchmarks/bench_sampling.py docstring", "steps": STEPS,
                    "guided_steps": n_g if guided else 0, "k1": sz.k1, "k2": sz.k2, "kw": sz.kw,
                    "unet": sz.unet_preset, "unet_params": m.unet_params, "feature_net": sz.feature_net,
                    "group_size": GROUP, "scale": SCALE, "variant_flags": dict(zip(
                        ("bf16", "channels_last", "cuda_graphs", "fused_kernels"), VARIANTS[variant]))}
    metric.update({f"unguided_{k}": v for k, v in meas_u.items()})
    if meas_g is not None:
        metric.update({f"guided_{k}": v for k, v in meas_g.items()})
    a_u = _cached(("authors", a_batch, False), lambda: _measure(ctx, _authors_runner(ctx, m, a_batch, False)),
                  baseline=True)
    a_g = None
    if guided:
        a_g = _cached(("authors", a_batch, True), lambda: _measure(ctx, _authors_runner(ctx, m, a_batch, True)),
                      baseline=True)
    authors_ms = None
    if "failed" not in a_u and (a_g is None or "failed" not in a_g):
        authors_ms = _project(a_u, a_g, n_g) * scale_runs
        metric["authors_step_ms_unguided"] = a_u["step_ms"]
        if a_g is not None:
            metric["authors_step_ms_guided"] = a_g["step_ms"]
            metric["authors_peak_mem_mb"] = a_g.get("peak_mem_mb")
    else:
        bad = a_g if (a_g is not None and "failed" in a_g) else a_u
        metric["authors_oom" if bad.get("oom") else "authors_error"] = bad["failed"]
    metric["authors_ms"] = authors_ms
    metric["authors_batch"] = a_batch
    metric["reference_scaled_from"] = f"{a_batch} x {scale_runs:g} runs" if scale_runs != 1 else None

    reference_ms, ref_mem, ref_kind = authors_ms, None, "authors_loop"
    if a_g is not None and "failed" not in a_g and scale_runs == 1:
        ref_mem = a_g.get("peak_mem_mb")
    if not guided:
        ref_mem = a_u.get("peak_mem_mb") if scale_runs == 1 else None
        try:
            import diffusers  # noqa: F401
            have_diffusers = True
        except Exception as e:  # noqa: BLE001 - not installed, or broken against this torch
            have_diffusers = False
            if not isinstance(e, ImportError):
                metric["diffusers_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if have_diffusers:
            def _diff():
                run_k, params = _diffusers_runner(ctx, m, batch)
                out = _measure(ctx, run_k)
                out["params"] = params
                return out
            d = _cached(("diffusers", batch), _diff, baseline=True)
            if "failed" not in d:
                reference_ms = _project(d, None, 0)
                ref_mem, ref_kind = d.get("peak_mem_mb"), "diffusers.DDIMPipeline"
                metric["diffusers_ms"] = reference_ms
                metric["diffusers_step_ms"] = d["step_ms"]
                metric["diffusers_unet_params"] = d["params"]
            else:
                metric["diffusers_oom" if d.get("oom") else "diffusers_error"] = d["failed"]
    metric["reference_kind"] = ref_kind

    ips = _images(batch, ours_ms)
    metric["images_per_s"] = ips
    metric["gpu_days_100M"] = _gpu_days(ips)
    metric["reference_images_per_s"] = _images(batch, reference_ms)
    metric["reference_gpu_days_100M"] = _gpu_days(metric["reference_images_per_s"])
    if reference_ms is None:
        metric["note"] = "reference failed: " + str(metric.get("authors_oom") or metric.get("authors_error"))
    mem = (meas_g or meas_u).get("peak_mem_mb")
    params = {"batch": batch, "variant": variant, "steps": STEPS, "image_size": sz.image_size,
              "unet": sz.unet_preset, "feature_net": sz.feature_net if guided else None,
              "eta": 0.0, "t_min": T_MIN if guided else None}
    dtype = "bf16-autocast" if VARIANTS[variant][0] else "fp32"
    return make_result(name, params, dtype, reference_ms=reference_ms, fused_ms=ours_ms,
                       peak_mem_mb_reference=ref_mem, peak_mem_mb_fused=mem, metric=metric)


# ------------------------------------------------------------------------------------------------
# issue 20: NFE/img and images/s per sampler (``solver_nfe``), against the authors' 100-step DDIM
# ------------------------------------------------------------------------------------------------
SOLVER_MODULES = SAMPLING_MODULES + ("cdp_fast.solvers",)
# the points of the README's quality-vs-NFE table (DDIM's 100 steps is the reference itself)
SOLVER_POINTS = (("heun", 18), ("heun", 10), ("dpm-solver++", 20), ("dpm-solver++", 10), ("euler", 20))


def _solver_runner(ctx: Ctx, m: _Models, batch: int, sampler: str, steps: int, guided: bool):
    from cdp_fast.solvers import EDMSampler

    shape = (3, m.sz.image_size, m.sz.image_size)

    def run():
        m.reset_layout()
        # the authors' window, t >= 400, mapped to sigma (solvers module doc)
        g = _guidance(ctx, m, backend="auto", fused=False, all_steps=False) if guided else None
        s = EDMSampler(m.unet, m.schedule, sampler=sampler, steps=steps, guidance=g, bf16=ctx.is_cuda)
        with torch.no_grad():
            s.sample(batch, shape, seed=0, device=ctx.device)
        return s
    return run


def solver_case(ctx: Ctx, *, batch: int, sampler: str, steps: int, guided: bool) -> dict:
    """One full run of ``sampler`` with ``steps`` (after one warm-up run), timed end to end; the
    reference is the authors' 100-step DDIM loop (projected as in ``sampling_case``). Eager
    steps: EDMSampler does not capture CUDA graphs yet."""
    from cdp_fast.solvers import nfe

    m = models_for(ctx)
    run = _solver_runner(ctx, m, batch, sampler, steps, guided)
    warm, _ = _timed(ctx, run)
    box = {}
    ms, mem = _timed(ctx, lambda: box.setdefault("s", run()))
    ms *= 1e3
    n_guided = sum(box["s"].guided_steps()) if guided else 0
    n_g = authors_guided_count()
    a_batch = min(batch, m.sz.authors_batch)
    a_u = _cached(("authors", a_batch, False), lambda: _measure(ctx, _authors_runner(ctx, m, a_batch, False)),
                  baseline=True)
    a_g = None
    if guided:
        a_g = _cached(("authors", a_batch, True), lambda: _measure(ctx, _authors_runner(ctx, m, a_batch, True)),
                      baseline=True)
    ref = None
    if "failed" not in a_u and (a_g is None or "failed" not in a_g):
        ref = _project(a_u, a_g, n_g) * batch / a_batch
    k = nfe(sampler, steps)
    metric = {"sampler": sampler, "steps": steps, "nfe_per_image": k, "reference_nfe_per_image": STEPS,
              "reference_kind": "authors_loop DDIM 100 steps", "guided_steps": n_guided,
              "reference_guided_steps": n_g if guided else 0, "warmup_s": warm,
              "images_per_s": _images(batch, ms), "reference_images_per_s": _images(batch, ref),
              "unet": m.sz.unet_preset, "cuda_graphs": False, "bf16": ctx.is_cuda}
    params = {"batch": batch, "sampler": sampler, "steps": steps, "guided": guided,
              "image_size": m.sz.image_size, "unet": m.sz.unet_preset}
    return make_result("solver_nfe", params, "bf16-autocast" if ctx.is_cuda else "fp32", reference_ms=ref,
                       fused_ms=ms, peak_mem_mb_reference=None, peak_mem_mb_fused=mem, metric=metric)
