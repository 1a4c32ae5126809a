"""`cdp-fast generate`: a synthetic data set (npz shards) from a diffusion checkpoint.

DDIM (or DDPM ancestral) sampling, optionally with contrastive guidance (Contrastive-DP,
Algorithm 1), pseudo-labelled by a classifier unless the model is class-conditional.

**Shards.** The set is cut into shards of ``batch_size`` images, ``shard-NNNNN.npz`` (``image``
uint8 NHWC, ``label`` int64, ``confidence`` float32). Shard i depends only on the settings and on
its seed ``seed + i`` (initial noise, noise draws, guidance head): never on which process made it,
in which order, or how often the run was interrupted. A DDIM and a Contrastive-DP run with the
same seed start from the same x_T, image for image. One sampler serves every shard of a process.

**Several processes.** ``torchrun --nproc_per_node K -m cdp_fast generate ...`` (multi-node
torchrun too, with ``--out`` on a filesystem every node sees). Shard i belongs to rank
``i mod world``: a static split, no work queue, no collective while sampling. torch.distributed
(gloo on CPU, nccl on GPU) gives rank and world and two barriers (after the resume check, before
the final manifest). ``--device auto``/``cuda`` puts each rank on ``cuda:LOCAL_RANK``. Rank 0
shows images/s and the ETA over all ranks (from the shard records on disk) and a per-step bar
inside its shards.

**Records, resume, faults** (formats in ``cdp_fast.manifest``). Each shard is written atomically
(temp file + rename), then recorded (images, bytes, sha256) in ``manifest.d/`` by its rank; rank 0
merges the records into ``manifest.json``. A rerun of the same command checks every recorded
shard (size + sha256), regenerates a missing, truncated or corrupt one, and ignores with a warning
(then replaces) a shard file without a record. SIGINT/SIGTERM stop with a hint to rerun; a
SIGKILL leaves at most a hidden temp file. Settings are validated before anything is written; the
folder is claimed (``generate.json``: settings, fingerprint, provenance of model, features and
labeler) with the first shard, and a folder holding shards of other settings (or another
command's files) is refused, as is a smaller ``--n`` that would delete or shorten finished shards:
``--force`` deletes the other set first, or cuts this one down (utils.check_output's rule). A full
disk or an unwritable folder is a clear error that leaves no partial shard; NaN/inf in a batch
stops before its shard is written, naming the shard, the step and the timestep.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import models
from .config import field, to_dict
from .data import load_synthetic, save_synthetic, to_uint8
from .diffusion_train import load_diffusion
from .figures import sample_grids
from .guidance import LOSSES, ContrastiveGuidance, default_group_size, default_scale
from .manifest import (
    FORMAT,
    RECORDS,
    SETTINGS,
    check_shard,
    read_json,
    read_records,
    record_names,
    remove_record,
    shard_images,
    shard_index,
    shard_name,
    write_manifest,
    write_record,
)
from .pseudolabel import pseudo_label
from .sampler import METHODS, SKIPS, DDIMSampler
from .solvers import SAMPLERS, SIGMA_SCHEDULES, EDMSampler
from .utils import check_output, note, progress, replace_output, resolve_device, settings_fingerprint, write_json

GUIDANCE = ("none", *LOSSES)
SAMPLER_NAMES = (*METHODS, *SAMPLERS)  # --sampler: ddim | ddpm (DDIMSampler), the rest EDMSampler


@dataclass
class GenerateConfig:
    checkpoint: str = field("runs/pipeline/diffusion", help="diffusion checkpoint: cdp-fast or diffusers folder, "
                                                             "or an original DDPM .ckpt file")
    out: str = field("runs/generate", help="output folder for the npz shards, manifest.json, grid.png, "
                                           "summary.json")
    n: int = field(1000, help="number of images (--num-images: the same; torchrun cannot mistake it for "
                              "one of its own options)", aliases=("--num-images",))
    batch_size: int = field(500, help="images per sampling batch (= one shard)")
    steps: int = field(100, help="sampling steps")
    method: str = field("ddim", help="ddim, or ddpm ancestral (the authors' MNIST/GTSRB sampler)",
                        choices=METHODS)
    eta: float = field(0.0, help="DDIM eta (0 deterministic)")
    skip: str = field("uniform", help="DDIM timestep spacing", choices=SKIPS)
    guidance: str = field("none", help="contrastive loss for Contrastive-DP guidance", choices=GUIDANCE)
    scale: float | None = field(None, help="guidance scale lambda >= 0. None: the feature space's default "
                                "(guidance.SPACE_SCALES, chosen with `cdp-fast sweep` on digits), for "
                                "HNM x G/512 for contrastive group G. HNM / InfoNCE: with the head 1e5 "
                                "(the authors') / 3e2; features without head 5e4 / 3e2; pixel space "
                                "(L2-normalised pixels) 5e4 / 1e4 x C*H*W/64 (MNIST 6.1e5 / 1.2e5, "
                                "CIFAR-10 2.4e6 / 4.8e5)")
    t_min: int | None = field(400, help="guide only steps with t >= t_min (authors' CIFAR-10: 400)")
    t_max: int | None = field(None, help="guide only steps with t < t_max (authors' MNIST: 150)")
    group_size: int | None = field(None, help="contrastive group size (None: 512 or the whole batch)")
    features: str = field("identity", help="'identity' (pixel space) or a classifier checkpoint "
                                           "folder whose penultimate features guide")
    head: bool = field(True, help="online embedding head (Linear-ReLU-Linear-L2) trained during sampling")
    features_arch: str | None = field(None, help="architecture of an external --features weights file "
                                                 "(e.g. wrn-28-10-swish)")
    labeler: str | None = field(None, help="classifier checkpoint folder for pseudo-labels "
                                           "(class-conditional models use their conditioning labels)")
    labeler_arch: str | None = field(None, help="architecture of an external --labeler weights file")
    seed: int = field(0, help="seed of the first shard's initial noise (shard i: seed + i)")
    device: str = field("auto", help="auto | cpu | cuda[:i] (under torchrun: cuda:LOCAL_RANK)")
    bf16: bool | None = field(None, help="bf16 autocast for the networks (None: on CUDA)")
    cuda_graphs: bool | None = field(None, help="capture the sampling steps as CUDA graphs (None: on CUDA)")
    force: bool = field(False, help="replace what --out holds: another settings' set is deleted first, and "
                                    "a set of these settings is cut down to --n (finished shards beyond it "
                                    "are deleted); without it both are refused")
    # issue 20: continuous-sigma samplers and class-conditional labels (solvers.py, METHOD.md §16)
    sampler: str | None = field(None, help="ddim | ddpm | euler | heun | edm-stochastic | dpm-solver++ "
                                "(None: --method for eps-models, heun for EDM models). --steps is EDM's N "
                                "for euler/heun/edm-stochastic (NFE N, 2N-1, 2N-1), the model "
                                "evaluations for dpm-solver++", choices=SAMPLER_NAMES)
    sigma_schedule: str | None = field(None, help="sigma grid of the continuous samplers: karras (EDM, "
                                       "rho 7, 0.002..80) or timesteps (diffusers' DPM-Solver grid, eps-models); "
                                       "None: timesteps for dpm-solver++ on an eps-model, else karras",
                                       choices=SIGMA_SCHEDULES)
    s_churn: float = field(0.0, help="edm-stochastic: S_churn (EDM Algorithm 2)")
    s_min: float = field(0.0, help="edm-stochastic: S_min")
    s_max: float | None = field(None, help="edm-stochastic: S_max (None: infinity)")
    s_noise: float = field(1.0, help="edm-stochastic: S_noise")
    class_labels: str = field("uniform", help="labels of a class-conditional model: 'uniform' (classes "
                              "in turn), K (K images per class, --n = K x classes) or a comma list of "
                              "per-class counts summing to --n")

    def __post_init__(self):
        # checked at construction, so a bad flag fails before anything is written
        for name, lo in (("n", 1), ("batch_size", 1), ("steps", 1)):
            _check_int(name, getattr(self, name), lo)
        for name in ("t_min", "t_max"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0)
        if self.guidance != "none" and self.t_min is not None and self.t_max is not None \
                and self.t_min >= self.t_max:
            raise ValueError(f"--t-min {self.t_min} --t-max {self.t_max}: the guidance window t_min <= t < "
                             f"t_max is empty, so no step would be guided; give --t-min < --t-max")
        if self.group_size is not None:
            _check_int("group_size", self.group_size, 2)
        _check_int("seed", self.seed, None)
        _check_number("eta", self.eta)
        for name in ("s_churn", "s_min", "s_noise") + (("s_max",) if self.s_max is not None else ()):
            _check_number(name, getattr(self, name))
        if self.s_churn and self.sampler != "edm-stochastic":
            raise ValueError("--s-churn applies to --sampler edm-stochastic only")
        counts = parse_class_labels(self.class_labels)
        if isinstance(counts, list) and sum(counts) != self.n:
            raise ValueError(f"--class-labels counts sum to {sum(counts)}, not --n {self.n}")
        if self.scale is not None:
            _check_number("scale", self.scale, lo=None)
            if self.scale < 0:
                raise ValueError(f"--scale must be >= 0, got {self.scale}: a negative guidance scale pulls "
                                 "each sample towards its negatives and the sampler ends in NaN")


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"--{name.replace('_', '-')} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")


def _check_number(name, v, lo=0.0):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {v!r}")


def parse_class_labels(spec: str):
    """'uniform' -> None; 'K' -> K (per class); 'a,b,c' -> [a, b, c] (per-class counts)."""
    if not isinstance(spec, str):
        raise ValueError(f"--class-labels must be a string, got {spec!r}")
    if spec == "uniform":
        return None
    try:
        vals = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--class-labels must be 'uniform', an int K or a comma list of counts, got {spec!r}") from None
    if any(v < 0 for v in vals) or sum(vals) < 1:
        raise ValueError(f"--class-labels counts must be >= 0 with a positive sum, got {spec!r}")
    return vals[0] if len(vals) == 1 and "," not in spec else vals


def class_label_sequence(cfg: GenerateConfig, num_classes: int) -> torch.Tensor | None:
    """The labels of the whole set in order (None: uniform, classes in turn); checked against --n."""
    counts = parse_class_labels(cfg.class_labels)
    if counts is None:
        return None
    if isinstance(counts, int):
        counts = [counts] * num_classes
        if sum(counts) != cfg.n:
            raise ValueError(f"--class-labels {cfg.class_labels} x {num_classes} classes = {sum(counts)} images, "
                             f"not --n {cfg.n}")
    if len(counts) != num_classes:
        raise ValueError(f"--class-labels gives {len(counts)} counts for a model of {num_classes} classes")
    return torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))


def model_info(model, meta: dict) -> dict:
    """meta with image_shape / class_conditional / num_classes filled in for an EDM denoiser."""
    if meta.get("kind") != "edm":
        return meta
    meta = dict(meta)
    C, R = int(model.img_channels), int(model.img_resolution)
    meta.setdefault("image_shape", [C, R, R])
    meta.setdefault("class_conditional", int(model.label_dim) > 0)
    if int(model.label_dim) > 0:
        meta.setdefault("num_classes", int(model.label_dim))
    return meta


def make_sampler(cfg: GenerateConfig, model, schedule, meta: dict, guidance, *, reuse_runs: bool = False):
    """The sampler of cfg.sampler (or cfg.method): DDIMSampler for ddim / ddpm, else EDMSampler
    (``reuse_runs``: DDIMSampler's; EDMSampler keeps no run)."""
    edm = meta.get("kind") == "edm"
    name = cfg.sampler or ("heun" if edm else cfg.method)
    if name in METHODS:
        if edm:
            raise ValueError(f"--sampler {name} needs an eps-model; an EDM model takes "
                             f"{' | '.join(SAMPLERS)}")
        return DDIMSampler(model, schedule, steps=cfg.steps, eta=cfg.eta, skip=cfg.skip, guidance=guidance,
                           method=name, bf16=cfg.bf16, cuda_graphs=cfg.cuda_graphs, reuse_runs=reuse_runs)
    label_dim = int(meta.get("num_classes") or 0) if meta.get("class_conditional") else 0
    return EDMSampler(model, None if edm else schedule, sampler=name, steps=cfg.steps, guidance=guidance,
                      sigma_schedule=cfg.sigma_schedule,
                      S_churn=cfg.s_churn, S_min=cfg.s_min,
                      S_max=float("inf") if cfg.s_max is None else cfg.s_max, S_noise=cfg.s_noise,
                      bf16=cfg.bf16, label_dim=None if edm else label_dim)


def shard_seed(seed: int, i: int) -> int:
    """Seed of shard ``i``: a function of the run's seed and the shard index only."""
    return seed + i


def make_guidance(cfg: GenerateConfig, device: torch.device, features_model=None, image_shape=None):
    """ContrastiveGuidance from the config (None when cfg.guidance == 'none')."""
    if cfg.guidance == "none":
        return None
    feats = features_model
    if feats is None and cfg.features != "identity":
        feats = models.load(cfg.features, device=device, arch=cfg.features_arch).features
    head = bool(cfg.head) and feats is not None
    return ContrastiveGuidance(cfg.guidance, feats, head=head,
                               scale=resolve_scale(cfg, feats, head, image_shape),
                               t_min=cfg.t_min, t_max=cfg.t_max, group_size=cfg.group_size,
                               normalize=True)  # pixel space too: raw pixels vanish / overflow


def resolve_scale(cfg: GenerateConfig, feats, head: bool, image_shape=None) -> float:
    """cfg.scale, or the feature space's default (guidance.default_scale) for this group size."""
    if cfg.scale is not None:
        return cfg.scale
    G = cfg.group_size or default_group_size(cfg.batch_size)
    space = "head" if head else ("features" if feats is not None else "pixel")
    dim = None
    if space == "pixel":
        if image_shape is None:
            raise ValueError("the pixel-space default scale depends on the image size: pass image_shape "
                             "(the diffusion model's meta['image_shape']) or set cfg.scale")
        dim = int(np.prod(image_shape))
    return default_scale(cfg.guidance, space, dim=dim, group_size=G)


# ------------------------------------------------------------------------------------------------
# provenance and the folder claim
# ------------------------------------------------------------------------------------------------
def weights_sha256(module: nn.Module) -> str:
    """Short sha256 of a module's state (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(v.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def provenance(obj, source: str | None) -> dict | None:
    """What a model / features callable is: its class (and method), a hash of its weights, and
    the checkpoint folder it came from (``source``) or that it was passed as an object."""
    if obj is None:
        return None
    module, attr = obj, None
    if not isinstance(obj, nn.Module) and isinstance(getattr(obj, "__self__", None), nn.Module):
        module, attr = obj.__self__, obj.__func__.__name__
    d: dict = {"source": source or "object passed to generate()"}
    if isinstance(module, nn.Module):
        d["class"] = type(module).__name__ + (f".{attr}" if attr else "")
        d["weights_sha256"] = weights_sha256(module)
    else:
        d["callable"] = getattr(obj, "__qualname__", type(obj).__name__)
    return d


# settings that never change a shard's images (n only decides how many shards there are; the
# model, features and labeler are recorded by content in "used", their paths in "paths")
_NOT_FINGERPRINTED = ("out", "device", "n", "bf16", "cuda_graphs", "checkpoint", "features", "labeler",
                      "features_arch", "labeler_arch", "force")


# issue 20's settings at their defaults stay out of the fingerprint: folders made before them resume
_NEW_DEFAULTS = {"sampler": None, "sigma_schedule": None, "s_churn": 0.0, "s_min": 0.0, "s_max": None, "s_noise": 1.0,
                 "class_labels": "uniform"}


def settings_doc(cfg: GenerateConfig, *, model, model_source, features, features_source, labeler,
                 labeler_source, guidance, conditional) -> dict:
    """The content of ``generate.json``: what determines the images, and what was used."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_FINGERPRINTED
                and not (k in _NEW_DEFAULTS and v == _NEW_DEFAULTS[k])}
    used = {
        "model": provenance(model, model_source),
        "features": None if guidance is None else (
            provenance(features, features_source) if features is not None else "identity (pixel space)"),
        "labeler": "the class-conditional model's conditioning labels" if conditional
        else provenance(labeler, labeler_source),
        "scale": None if guidance is None else float(guidance.scale),
    }
    fp = settings_fingerprint({"settings": settings, "used": used})
    return {"format": FORMAT, "fingerprint": fp, "settings": settings, "used": used,
            "paths": {"checkpoint": cfg.checkpoint, "features": cfg.features, "labeler": cfg.labeler}}


def _check_folder(out: Path, doc: dict, n: int | None = None, batch_size: int | None = None,
                  force: bool = False) -> bool | str:
    """Read-only check before any work: is ``out`` free (False), ours (True), or someone else's
    (an error; with ``force`` "replace": rank 0 deletes it before the first shard)? A set of these
    settings that ``n`` images would cut down (finished shards deleted or shortened) is refused
    unless ``force``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    anc = out
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"--out {out}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {anc} is not writable; choose another --out")
    if not out.is_dir():
        return False
    cur = read_json(out / SETTINGS)
    fp = doc["fingerprint"]
    if isinstance(cur, dict) and cur.get("fingerprint") == fp:
        if n is not None and batch_size is not None and not force:
            _check_shrink(out, fp, n, batch_size)
        return True
    if isinstance(cur, dict) and "fingerprint" in cur:
        # another run's folder: refused only while it holds shards of those settings
        held = [r for r in read_records(out).values()
                if r.get("fingerprint") == cur["fingerprint"] and (out / str(r.get("file"))).is_file()]
        if held:
            diff = sorted({k for k in doc["settings"] if cur.get("settings", {}).get(k) != doc["settings"][k]}
                          | {f"used.{k}" for k in doc["used"] if cur.get("used", {}).get(k) != doc["used"][k]})
            if force:
                return "replace"
            raise ValueError(f"{out} holds {sum(int(r.get('images', 0)) for r in held)} images in {len(held)} "
                             f"shard(s) made with other settings ({', '.join(diff) or 'fingerprint'} differ); "
                             f"choose a new --out, or pass --force to delete that set first")
        return False
    if any(out.glob("shard-*.npz")):
        what = "an older cdp-fast (no fingerprint)" if isinstance(cur, dict) else "unknown origin (no generate.json)"
        if force and isinstance(cur, dict):
            return "replace"
        raise ValueError(f"{out} holds shards of {what}; choose a new --out"
                         + (", or pass --force to delete them first" if isinstance(cur, dict) else ""))
    # no set here: anything but a failed run's config.json is some other command's result
    # (stage.json: the pipeline's stage marker, written before it calls generate)
    if check_output(out, force=force, what="files of another kind (not a generate set)",
                    ignore=("config.json", "stage.json", RECORDS)):
        return "replace"
    return False


def _check_shrink(out: Path, fp: str, n: int, batch_size: int) -> None:
    """Refuse a rerun whose ``n`` would delete or shorten finished shards of this set."""
    n_shards = -(-n // batch_size)
    recs = {i: r for i, r in read_records(out).items() if r.get("fingerprint") == fp}
    cut = sorted(i for i, r in recs.items() if int(r.get("images", 0)) > shard_images(i, n, batch_size)
                 and (out / shard_name(i)).is_file())
    if not cut:
        return
    have = sum(int(r.get("images", 0)) for r in recs.values())
    m = read_json(out / "manifest.json")
    whole = (f"a complete set of {m['n']} images" if isinstance(m, dict) and m.get("complete")
             and m.get("fingerprint") == fp else f"{have} finished images")
    gone = [i for i in cut if i >= n_shards]
    names = ", ".join(shard_name(i) for i in cut[:3]) + (", ..." if len(cut) > 3 else "")
    raise ValueError(f"{out} holds {whole} ({len(recs)} shards) made with these settings; --n {n} asks for "
                     f"{n_shards} shard(s), which would delete {len(gone)} finished shard(s) and shorten "
                     f"{len(cut) - len(gone)} ({names}). To keep them, choose a new --out (or rerun with "
                     f"the earlier --n); to cut this set down to {n} images, pass --force")


def check_guidance_window(cfg: GenerateConfig, sampler, schedule) -> None:
    """A guidance whose window holds none of the sampled steps would run unguided while
    generate.json says guided: refused before anything is written."""
    if cfg.guidance == "none":
        return
    T = int(getattr(schedule, "num_train_timesteps", 0) or 0)
    if T and cfg.t_min is not None and cfg.t_min >= T:
        raise ValueError(f"--t-min {cfg.t_min} is not below the model's T = {T} diffusion steps: no step "
                         f"would be guided (guidance acts where t_min <= t < t_max); give --t-min < {T}")
    steps = getattr(sampler, "guided_steps", None)
    if callable(steps) and not any(steps()):
        ts = [int(t) for t in getattr(sampler, "timesteps", [])]
        span = f" (sampled t: {ts[0]} ... {ts[-1]})" if ts else ""
        raise ValueError(f"the guidance window t_min={cfg.t_min} <= t < t_max={cfg.t_max} holds none of the "
                         f"{cfg.steps} sampled steps{span} (the first step is never guided): widen "
                         f"--t-min / --t-max, or use --guidance none")


def _claim(out: Path, doc: dict, rank: int, world: int) -> None:
    """Make the folder ours: with the first shard a process writes."""
    out.mkdir(parents=True, exist_ok=True)
    cur = read_json(out / SETTINGS)
    if not (isinstance(cur, dict) and cur.get("fingerprint") == doc["fingerprint"]):
        write_json(out / SETTINGS, doc)
    for name in record_names(out):  # records of other settings, of the shards this rank owns
        i = shard_index(name[:-5] + ".npz")
        if i is not None and i % world == rank:
            rec = read_json(out / RECORDS / name)
            if not isinstance(rec, dict) or rec.get("fingerprint") != doc["fingerprint"]:
                remove_record(out, i)


def _tidy(out: Path, n_shards: int, rank: int, world: int) -> None:
    """In a folder of ours: drop this rank's recorded shards beyond the set (an earlier run with a
    larger --n) and its temp files of killed writes. Unrecorded files are left alone."""
    gone = []
    for i in read_records(out):
        if i >= n_shards and i % world == rank:
            remove_record(out, i)  # record first: a kill in between leaves a stray, never a lie
            (out / shard_name(i)).unlink(missing_ok=True)
            gone.append(i)
    if gone:  # only under --force (a smaller --n is refused without it)
        note(f"cdp-fast generate: deleted {len(gone)} finished shard(s) beyond --n ({shard_name(min(gone))} "
             f"... {shard_name(max(gone))})")
    for p in list(out.glob(".shard-*.npz.*.tmp")):
        i = shard_index(p.name[1:].split(".npz.")[0] + ".npz")
        if i is not None and i % world == rank:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# processes and signals
# ------------------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


@dataclass
class _Ranks:
    rank: int = 0
    world: int = 1
    group: bool = False  # torch.distributed in use
    owned: bool = False  # initialised here (and destroyed here)

    def barrier(self, device: torch.device) -> None:
        if self.group:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[device.index or 0])
            else:
                dist.barrier()


def _device(name: str) -> torch.device:
    device = resolve_device(name)
    local = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local is not None and int(os.environ.get(
            "WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(local))
    return device


def _ranks(device: torch.device) -> _Ranks:
    if dist.is_available() and dist.is_initialized():
        return _Ranks(dist.get_rank(), dist.get_world_size(), group=True)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Ranks()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # long timeout: the final barrier waits for the slowest rank's last shard
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(days=7))
    return _Ranks(dist.get_rank(), dist.get_world_size(), group=True, owned=True)


def _raise_terminated(signum, frame):
    raise Terminated()


# ------------------------------------------------------------------------------------------------
# sampling and writing one shard
# ------------------------------------------------------------------------------------------------
def sample_shard(sampler: DDIMSampler, cfg: GenerateConfig, meta: dict, i: int, *, labeler=None,
                 device=None, show: bool = False):
    """Images uint8 NCHW, labels, confidence of shard ``i`` (not written)."""
    C, H, W = meta["image_shape"]
    conditional = bool(meta.get("class_conditional"))
    num_classes = int(meta.get("num_classes") or 10)
    n, bs = shard_images(i, cfg.n, cfg.batch_size), cfg.batch_size
    y = None
    if conditional:
        seq = class_label_sequence(cfg, num_classes)
        if seq is None:
            y = (torch.arange(bs, device=device) + i * bs) % num_classes
        else:  # the set's labels in order; a short last shard is padded with classes in turn
            y = seq[i * bs:(i + 1) * bs].to(device)
            y = torch.cat([y, torch.arange(bs - len(y), device=device) % num_classes])
    try:
        # always a full batch (then trimmed): a short last shard keeps whole contrastive groups
        x0 = sampler.sample(bs, (C, H, W), seed=shard_seed(cfg.seed, i), labels=y, device=device,
                            progress=show)[:n]
    except ValueError as e:
        raise ValueError(f"{shard_name(i)} (shard {i}, seed {shard_seed(cfg.seed, i)}) not written: {e}") from e
    imgs = to_uint8((x0.float().clamp(-1, 1) + 1) / 2).cpu()
    if conditional:
        labels, conf = y[:n].cpu(), torch.ones(n)
    else:
        labels, conf = pseudo_label(labeler, imgs.to(device))
        labels, conf = labels.cpu(), conf.cpu().float()
        if not bool(torch.isfinite(conf).all()):
            raise ValueError(f"{shard_name(i)} (shard {i}) not written: the labeler gave non-finite confidences")
    return imgs, labels, conf


def _write_failed(out: Path, what: str, err: OSError) -> ValueError:
    return ValueError(f"cannot write {what} in {out}: {err.strerror or err}. No partial file was left and "
                      f"the shards written before are intact; free space or fix the folder, then rerun the "
                      f"same command to resume")


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
_MANIFEST_EVERY_S = 5.0  # rank 0 rewrites manifest.json at most this often while shards land


def generate(cfg: GenerateConfig, *, model=None, schedule=None, meta=None, features_model=None,
             labeler=None) -> dict:
    """Sample ``cfg.n`` images into ``cfg.out`` (this process's share of the shards under
    torchrun); returns a summary dict (rank 0 also writes it to summary.json)."""
    out = Path(cfg.out)
    device = _device(cfg.device)
    model_source = None
    if model is None:
        model, schedule, meta = load_diffusion(cfg.checkpoint, device=device)
        model_source = cfg.checkpoint
    elif meta is None or (schedule is None and meta.get("kind") != "edm"):
        raise ValueError("generate(model=...) also needs schedule= and meta= (see load_diffusion)")
    meta = model_info(model, meta)
    conditional = bool(meta.get("class_conditional"))
    labeler_source = None
    if labeler is None and cfg.labeler and not conditional:
        labeler = models.load(cfg.labeler, device=device, arch=cfg.labeler_arch)
        labeler_source = cfg.labeler
    if not conditional and labeler is None:
        raise ValueError("an unconditional diffusion model needs a --labeler classifier checkpoint "
                         "to pseudo-label the synthetic images")
    features, features_source = features_model, None
    if features is None and cfg.guidance != "none" and cfg.features != "identity":
        features = models.load(cfg.features, device=device, arch=cfg.features_arch).features
        features_source = cfg.features
    guidance = make_guidance(cfg, device, features, image_shape=meta["image_shape"])
    if conditional:
        class_label_sequence(cfg, int(meta.get("num_classes") or 10))  # checked before anything is written
    elif cfg.class_labels != "uniform":
        raise ValueError("--class-labels applies to class-conditional models; this model is unconditional "
                         "(its labels come from --labeler)")
    # validates steps against the schedule, eta, method/skip: before anything is written
    sampler = make_sampler(cfg, model, schedule, meta, guidance, reuse_runs=True)  # DDIM: captured once per process
    check_guidance_window(cfg, sampler, schedule)
    doc = settings_doc(cfg, model=model, model_source=model_source, features=features,
                       features_source=features_source, labeler=labeler, labeler_source=labeler_source,
                       guidance=guidance, conditional=conditional)
    claimed = _check_folder(out, doc, cfg.n, cfg.batch_size, force=bool(getattr(cfg, "force", False)))

    ranks = _ranks(device)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _generate(cfg, out, doc, claimed, ranks, sampler, meta, labeler, device)
    finally:
        sampler.close()  # frees the kept run (buffers, graphs, guidance head)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if ranks.owned:
            # tearing down after an error must not mask that error
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _generate(cfg, out, doc, claimed, ranks, sampler, meta, labeler, device) -> dict:
    fp, n, bs = doc["fingerprint"], cfg.n, cfg.batch_size
    n_shards = -(-n // bs)
    rank0 = ranks.rank == 0
    num_classes = int(meta.get("num_classes") or 10)

    # 0. --force over another settings' set: rank 0 deletes it before anything is written
    if claimed == "replace":
        if rank0:
            note(f"cdp-fast generate: --force: deleting the earlier contents of {out}")
            try:
                replace_output(out)
            except OSError as e:
                raise _write_failed(out, "(deleting the earlier set for --force)", e) from e
        ranks.barrier(device)
        claimed = False

    # 1. resume check of this rank's shards (read-only until the folder is ours). Only the shards
    # on disk are looked at: the rest are to be made (O(files), never O(n) before sampling).
    records = read_records(out) if claimed else {}
    if claimed:
        try:
            _tidy(out, n_shards, ranks.rank, ranks.world)
        except OSError as e:
            raise _write_failed(out, "(tidying stale shards)", e) from e
    on_disk = {i for i in (shard_index(p.name) for p in out.glob("shard-*.npz")) if i is not None} \
        if out.is_dir() else set()
    done = set()
    for i in sorted(set(records) | on_disk):
        if i >= n_shards or i % ranks.world != ranks.rank:
            continue
        rec = records.get(i)
        if rec is not None and rec.get("fingerprint") == fp:
            bad = check_shard(out, rec, shard_images(i, n, bs))
            if bad is None:
                done.add(i)
                continue
            note(f"cdp-fast generate: {out / shard_name(i)}: {bad}; regenerating it")
            remove_record(out, i)
        elif i in on_disk:
            note(f"cdp-fast generate: {out / shard_name(i)}: not in the manifest (left by an interrupted run, "
                 f"or put there by hand); ignored, it will be regenerated")
    todo = (i for i in range(ranks.rank, n_shards, ranks.world) if i not in done)
    if rank0:
        note(f"cdp-fast generate: {n} images in {n_shards} shard(s) of {bs} into {out}"
             + (f"; {len(done)} shard(s) already finished" if done else ""))
    ranks.barrier(device)  # every rank's bad records are gone before rank 0 counts records

    # 2. sampling: this rank's missing shards, in order
    cache: dict[str, dict] = {}

    def global_images() -> int:
        recs = read_records(out, cache) if out.is_dir() else {}
        return sum(r["images"] for i, r in recs.items() if i < n_shards and r.get("fingerprint") == fp)

    t0 = time.perf_counter()
    start_images = global_images() if rank0 else 0
    bar = progress(total=n, initial=start_images, desc=f"generate ({cfg.guidance}, {ranks.world} proc)",
                   unit="img", disable=None if rank0 else True)
    last_manifest, made, warned = 0.0, 0, False
    try:
        for i in todo:
            imgs, labels, conf = sample_shard(sampler, cfg, meta, i, labeler=labeler, device=device,
                                              show=rank0 and not bar.disable)
            counts = np.bincount(labels.numpy(), minlength=num_classes)
            if labeler is not None and not warned:
                warned = _warn_degenerate_labels(counts, f"shard {i}")
            try:
                if not claimed:
                    _claim(out, doc, ranks.rank, ranks.world)
                    claimed = True
                save_synthetic(out / shard_name(i), imgs, labels, confidence=conf.numpy().astype(np.float32))
                write_record(out, i, images=len(labels), seed=shard_seed(cfg.seed, i), label_counts=counts,
                             fingerprint=fp)
                made += len(labels)
                if rank0:
                    bar.update(global_images() - bar.n)
                    if time.perf_counter() - last_manifest >= _MANIFEST_EVERY_S:
                        write_manifest(out, fingerprint=fp, n=n, batch_size=bs, records=read_records(out, cache))
                        last_manifest = time.perf_counter()
            except OSError as e:
                raise _write_failed(out, shard_name(i), e) from e
    finally:
        bar.close()
    ranks.barrier(device)  # every shard has landed
    wall = time.perf_counter() - t0
    if not rank0:
        return {"rank": ranks.rank, "world_size": ranks.world, "images_made": made, "wall_s": round(wall, 2)}

    # 3. rank 0: the final manifest, grid and summary from the records
    try:
        records = read_records(out)
        manifest = write_manifest(out, fingerprint=fp, n=n, batch_size=bs, records=records)
        if not manifest["complete"]:
            raise ValueError(f"{out}: only {manifest['images']} of {n} images are recorded after every rank "
                             f"finished; rerun the same command (see `cdp-fast verify {out}`)")
        first, k = [], 0
        while sum(len(x) for x in first) < 100 and k < n_shards:
            first.append(load_synthetic(out / shard_name(k))[0])
            k += 1
        sample_grids({f"{cfg.guidance if cfg.guidance != 'none' else (cfg.sampler or cfg.method)}": torch.cat(first)[:100].numpy()},
                     out / "grid.png")
        counts = np.zeros(num_classes, dtype=np.int64)
        for r in manifest["shards"]:
            counts += np.asarray(r["label_counts"][:num_classes], dtype=np.int64)
        images_made = manifest["images"] - start_images
        summary = {"n": n, "shards": n_shards, "out": str(out), "guidance": cfg.guidance,
                   "wall_s": round(wall, 2), "images_made": images_made,
                   "images_per_s": round(images_made / wall, 2) if wall > 0 and images_made > 0 else None,
                   "label_counts": counts.tolist(), "device": str(device), "world_size": ranks.world,
                   "fingerprint": fp}
        if labeler is not None:
            why = degenerate_labels(counts)
            if why:
                summary["warning"] = f"pseudo-labels: {why}"
                if not warned:
                    _warn_degenerate_labels(counts, "the set")
        write_json(out / "summary.json", summary)
    except OSError as e:
        raise _write_failed(out, "manifest.json / grid.png / summary.json", e) from e
    return summary


def degenerate_labels(counts, share: float = 0.9, min_images: int = 20) -> str | None:
    """Why pseudo-label counts look like a labeler at chance (None: they do not): 90% or more of at
    least ``min_images`` images in one class of several (issue 21: an intermediate classifier at
    chance labelled every image class 0 and generate carried on silently)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if len(counts) < 2 or total < min_images:
        return None
    top = int(counts.argmax())
    if counts[top] >= share * total:
        return f"{int(counts[top])} of {total} images ({counts[top] / total:.0%}) are labelled class {top}"
    return None


def _warn_degenerate_labels(counts, where: str) -> bool:
    why = degenerate_labels(counts)
    if why:
        note(f"cdp-fast generate: WARNING: {where}: {why}; the --labeler looks untrained or at chance, so "
             f"these labels carry no class information (check its accuracy, or retrain it)")
    return bool(why)


def run(cfg: GenerateConfig) -> dict:
    try:
        return generate(cfg)
    except KeyboardInterrupt as e:
        how = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\ncdp-fast generate: interrupted ({how}). Finished shards are kept and nothing "
                  f"half-written is visible: rerun the same command to resume "
                  f"(`cdp-fast verify {cfg.out}` shows what is there).", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None
