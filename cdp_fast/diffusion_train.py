"""``cdp-fast train-diffusion``: train an epsilon-prediction UNet on the allowed real data.

Objective (DDPM): x0 in [-1, 1], t ~ U{0..T-1}, eps ~ N(0, I),
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, loss = mean ||eps_theta(x_t, t[, y]) - eps||^2.
AdamW, linear LR warm-up then constant, gradient clipping (1.0), EMA of the weights with the
warm-up decay min(ema_decay, (1 + n) / (10 + n)) so that short runs (digits, minutes on a CPU)
are not averaged with their random initialisation. bf16 autocast on CUDA (fp32 loss).
Horizontal flips only for CIFAR-10 (flipping traffic signs / digits changes what they mean).

No-leakage rule (the paper's MNIST study): with ``--real-limit N`` the diffusion model is trained
on exactly the N real images that ``load_dataset(..., real_limit=N, seed)`` keeps — the same ones
the classifiers get — and on nothing else.

Checkpoint folder (``--out``): ``model.safetensors`` (the EMA weights), ``config.json`` (UNet
arguments, schedule, dataset, image shape, classes, iterations, final loss — what
``load_diffusion`` needs), ``train_config.json`` (the resolved command config, reusable with
``--config``) and ``metrics.json`` (the loss log). Every file is written atomically; config.json
is written last, so its presence marks a complete checkpoint. With ``--save-every K`` each
checkpoint also writes ``train_state.pt`` (weights, EMA, optimizer, LR schedule, step, RNG states,
loss window), and ``--resume`` continues from it exactly: the result equals an uninterrupted run.
An existing checkpoint folder is refused unless ``--force`` (replaced) or ``--resume``.
"""
from __future__ import annotations

import copy
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from . import config as _config
from .config import field
from .data import canonical_name, load_dataset
from .models import edm
from .models.checkpoint import load_into, read_file
from .models.ddpm import DDPMUNet
from .models.edm_pickle import load_edm_pickle
from .models.external import is_diffusers_folder, load_external
from .models.unet import UNet, unet_kwargs
from .schedules import NoiseSchedule
from .training import ema_decay_at, ema_update
from .utils import (
    atomic_write_bytes,
    check_output,
    progress,
    replace_output,
    resolve_device,
    seed_everything,
    write_json,
)

__all__ = ["TrainDiffusionConfig", "run", "train_diffusion", "load_diffusion", "save_diffusion",
           "resolve_settings", "ConvertConfig", "convert", "ARCHS",
           "DATASET_DEFAULTS", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "cdp-fast-diffusion"
# config.json "arch" -> model class ("unet": trained here; "ddpm": Ho et al.'s released UNet)
ARCHS = {"unet": UNet, "ddpm": DDPMUNet}
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "gtsrb")

# Per-dataset "auto" values. Schedules follow the authors (linear for CIFAR-10, cosine for
# MNIST/GTSRB; cosine for digits too). iters for digits is sized for ~1-2 minutes on 2 CPU cores;
# the CIFAR-10 value is DDPM's 800k.
DATASET_DEFAULTS: dict[str, dict] = {
    "digits": dict(preset="tiny", schedule="cosine", iters=1000, batch_size=64),
    "mnist": dict(preset="small", schedule="cosine", iters=50_000, batch_size=128),
    "fashion-mnist": dict(preset="small", schedule="cosine", iters=50_000, batch_size=128),
    "cifar10": dict(preset="ddpm-cifar10", schedule="linear", iters=800_000, batch_size=128),
    "gtsrb": dict(preset="ddpm-cifar10", schedule="cosine", iters=200_000, batch_size=128),
}
PRESET_LR = {"tiny": 2e-3, "small": 2e-4, "ddpm-cifar10": 2e-4}
FLIP_DATASETS = ("cifar10",)


@dataclass
class TrainDiffusionConfig:
    data: str = field("digits", help="dataset name", choices=DATASETS)
    data_dir: str | None = field(None, help="folder with the dataset files (not needed for digits)")
    real_limit: int | None = field(
        None, help="train on N real images: a class-balanced subset, deterministic in --seed "
                      "(the same N the classifiers see; no leakage)")
    iters: int | None = field(None, help="training iterations (None: per-dataset default, "
                                         "digits 1000, MNIST 50k, CIFAR-10 800k)")
    batch_size: int | None = field(None, help="batch size (None: 64 for digits, 128 otherwise)")
    lr: float | None = field(None, help="AdamW learning rate (None: 2e-3 tiny, 2e-4 otherwise)")
    warmup: int | None = field(None, help="linear LR warm-up steps (None: min(5000, iters/20))")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    grad_clip: float = field(1.0, help="gradient-norm clip (0 disables)")
    preset: str = field("auto", help="UNet size (auto: tiny for digits, small for (fashion-)mnist, "
                                     "ddpm-cifar10 for cifar10/gtsrb)",
                        choices=("auto", "tiny", "small", "ddpm-cifar10"))
    schedule: str = field("auto", help="noise schedule (auto: linear for cifar10, cosine otherwise)",
                          choices=("auto", "linear", "cosine"))
    num_train_timesteps: int = field(1000, help="diffusion steps T")
    class_conditional: bool = field(False, help="condition the UNet on the class label")
    ema_decay: float = field(0.999, help="EMA decay (with warm-up min(decay, (1+n)/(10+n)))")
    precision: str = field("auto", help="auto: bf16 autocast on CUDA, fp32 on CPU",
                           choices=("auto", "bf16", "fp32"))
    channels_last: bool | None = field(None, help="channels_last memory format (None: on CUDA)")
    compile: bool = field(False, help="torch.compile the training forward pass")
    save_every: int = field(0, help="also checkpoint every K iterations, with train_state.pt for --resume "
                                    "(0: only at the end)")
    out: str = field("runs/train-diffusion", help="checkpoint folder")
    resume: bool = field(False, help="continue from --out's train_state.pt (the last --save-every checkpoint) "
                                     "with the same settings (--iters may grow)")
    force: bool = field(False, help="replace an existing checkpoint in --out (deleted before training; "
                                    "refused without it)")
    seed: int = field(0, help="random seed")
    device: str = field("auto", help="auto | cpu | cuda[:i]")
    log_every: int = field(50, help="progress-bar / loss-log interval (iterations)")
    objective: str = field("ddpm", help="ddpm: epsilon-prediction UNet (DDPM loss); edm: EDMPrecond(SongUNet) "
                                        "with EDM's loss (METHOD.md §14)",
                           choices=("ddpm", "edm"))


def resolve_settings(cfg: TrainDiffusionConfig, dataset: str | None = None) -> dict:
    """Fill every "auto"/None setting for ``dataset`` (default cfg.data); validates the values."""
    name = dataset or cfg.data
    if name not in DATASET_DEFAULTS:
        raise ValueError(f"unknown dataset {name!r}; choose from {list(DATASET_DEFAULTS)}")
    d = DATASET_DEFAULTS[name]
    preset = d["preset"] if cfg.preset == "auto" else cfg.preset
    schedule = d["schedule"] if cfg.schedule == "auto" else cfg.schedule
    iters = d["iters"] if cfg.iters is None else int(cfg.iters)
    batch_size = d["batch_size"] if cfg.batch_size is None else int(cfg.batch_size)
    lr = PRESET_LR.get(preset, 2e-4) if cfg.lr is None else float(cfg.lr)
    warmup = min(5000, iters // 20) if cfg.warmup is None else int(cfg.warmup)
    checks = [(iters >= 1, f"iters must be >= 1, got {iters}"),
              (batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
              (lr > 0 and math.isfinite(lr), f"lr must be positive, got {lr}"),
              (warmup >= 0, f"warmup must be >= 0, got {warmup}"),
              (0.0 <= cfg.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {cfg.ema_decay}"),
              (cfg.grad_clip >= 0, f"grad_clip must be >= 0, got {cfg.grad_clip}"),
              (cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every}"),
              (cfg.save_every >= 0, f"save_every must be >= 0, got {cfg.save_every}"),
              (cfg.real_limit is None or cfg.real_limit >= 1,
               f"real_limit must be >= 1 (or unset), got {cfg.real_limit}"),
              (schedule in ("linear", "cosine"), f"unknown schedule {schedule!r}"),
              (cfg.precision in ("auto", "bf16", "fp32"), f"unknown precision {cfg.precision!r}"),
              (cfg.objective in ("ddpm", "edm"), f"--objective must be ddpm or edm, got {cfg.objective!r}"),
              (cfg.objective != "edm" or cfg.schedule == "auto",
               f"--schedule {cfg.schedule} does not apply to --objective edm (EDM draws sigma continuously)"),
              (cfg.objective != "edm" or not getattr(cfg, "resume", False),
               "--resume is not supported with --objective edm yet (rerun without it; --force replaces the folder)")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"train-diffusion: {msg}")
    return dict(preset=preset, schedule=schedule, iters=iters, batch_size=batch_size, lr=lr,
                warmup=warmup)


def save_diffusion(folder, model, meta: dict, loss_log: list | None = None) -> Path:
    """Write a checkpoint folder: ``model.safetensors`` (``model``'s weights) + ``config.json``.

    ``meta`` must hold ``schedule`` ({"name", "num_train_timesteps", "params"}) and may hold any
    other JSON-able facts (dataset, num_classes, iters, final_loss, ...); the UNet arguments
    (``model.config``), ``image_shape`` and the format tag are filled in here.
    """
    from safetensors.torch import save as st_save

    folder = Path(folder)
    if "schedule" not in meta:
        raise ValueError("save_diffusion: meta needs a 'schedule' entry")
    ukw = dict(model.config)
    meta = dict(meta, format=CHECKPOINT_FORMAT, version=1, unet=ukw,
                image_shape=[ukw["in_channels"], ukw["image_size"], ukw["image_size"]])
    meta.setdefault("num_classes", ukw["num_classes"])
    meta.setdefault("arch", getattr(model, "arch", "unet"))
    meta.setdefault("class_conditional", ukw["num_classes"] is not None)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise ValueError("save_diffusion: refusing to save non-finite weights (loss diverged?)")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "model.safetensors", st_save(state, metadata={"format": CHECKPOINT_FORMAT}))
    if loss_log is not None:
        write_json(folder / "metrics.json", {"loss_log": loss_log})
    write_json(folder / "config.json", meta)  # last: marks the checkpoint complete
    return folder


# A folder holding only these is an unfinished run's start (no weights yet): not a result to protect.
_STARTED_ONLY = ("train_config.json", "config.json", "metrics.json")
STATE_FILE = "train_state.pt"
# settings --resume may change (the rest must equal the interrupted run's)
_RESUMABLE = ("out", "resume", "force", "iters", "log_every", "save_every", "compile")


def resolve(cfg):
    """Checks before anything runs or is written (the CLI calls it): train-diffusion's settings
    and its --out rule, or convert's."""
    if isinstance(cfg, ConvertConfig):
        if not cfg.path:
            raise ValueError("convert: give the checkpoint to convert (cdp-fast convert PATH --out DIR)")
        if not Path(cfg.path).exists():
            raise FileNotFoundError(f"convert: {cfg.path} does not exist")
        src, out = Path(cfg.path).resolve(), Path(cfg.out).resolve()
        if out == src or out in src.parents:
            raise ValueError(f"convert: --out {cfg.out} would hold the input {cfg.path}; choose another --out")
        check_output(cfg.out, force=cfg.force, what="a checkpoint")
        return cfg
    resolve_settings(cfg)
    folder = Path(cfg.out)
    if cfg.resume:
        if cfg.force:
            raise ValueError("train-diffusion: --resume continues the run in --out, --force replaces it: give one")
        if not (folder / STATE_FILE).is_file():
            raise ValueError(f"train-diffusion --resume: {folder / STATE_FILE} does not exist (it is written by "
                             f"runs with --save-every K); rerun without --resume (and with --force to replace "
                             f"{folder})")
    else:
        check_output(folder, force=cfg.force, what="a diffusion checkpoint",
                     ignore=() if (folder / "model.safetensors").exists() else _STARTED_ONLY)
    return cfg


def _state_settings(cfg, s: dict) -> dict:
    return {**{k: v for k, v in _config.to_dict(cfg).items() if k not in _RESUMABLE},
            **{k: v for k, v in s.items() if k != "iters"}}


def train_diffusion(cfg: TrainDiffusionConfig, data=None) -> Path:
    """Train and write the checkpoint folder ``cfg.out``; returns it.

    ``data``: an already loaded ``ImageData`` (the pipeline passes the same real_limit-ed data
    its classifiers use); otherwise ``load_dataset(cfg.data, cfg.data_dir, real_limit, seed)``.
    """
    if data is None:
        data = load_dataset(cfg.data, cfg.data_dir, real_limit=cfg.real_limit, seed=cfg.seed)
    name = getattr(data, "name", cfg.data)
    name = canonical_name(name)
    s = resolve_settings(cfg, name)
    x_all = data.x_train
    if x_all.dtype != torch.uint8 or x_all.ndim != 4:
        raise ValueError(f"train-diffusion: expected uint8 [N, C, H, W] training images, got "
                         f"{x_all.dtype} {tuple(x_all.shape)}")
    N, C, H, W = x_all.shape
    if N < 1:
        raise ValueError("train-diffusion: the dataset has no training images")
    if H != W:
        raise ValueError(f"train-diffusion: square images expected, got {H}x{W}")
    if cfg.real_limit is not None and N > cfg.real_limit:
        raise ValueError(f"train-diffusion: real_limit={cfg.real_limit} but the given data holds {N} "
                         f"training images; pass load_dataset(..., real_limit={cfg.real_limit}) data so "
                         f"only the allowed real images train the model")
    num_classes = int(data.num_classes)
    if s["batch_size"] > N:
        raise ValueError(f"train-diffusion: --batch-size {s['batch_size']} is larger than the {N} training "
                         f"images of {name}; use --batch-size {N} or less")
    folder = Path(cfg.out)
    resume = bool(getattr(cfg, "resume", False))
    state = None
    if resume:
        state = read_file(folder / STATE_FILE)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"{folder / STATE_FILE} is not a train-diffusion state")
        want, have = _state_settings(cfg, s), state.get("settings", {})
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            raise ValueError(f"train-diffusion --resume: {', '.join(diff)} differ from the run in {folder} "
                             f"(resume keeps every setting but --iters); rerun with the run's settings")
        if int(state["step"]) >= s["iters"]:
            raise ValueError(f"train-diffusion --resume: {folder} is already at step {int(state['step'])} "
                             f">= --iters {s['iters']}; give a larger --iters to train further")
    elif getattr(cfg, "force", False) and check_output(
            folder, force=True, ignore=() if (folder / "model.safetensors").exists() else _STARTED_ONLY):
        replace_output(folder)  # --force: the old checkpoint goes, none of its files stay beside the new
    if cfg.objective == "edm":  # EDM's loss and preconditioning: cdp_fast.edm_train
        from .edm_train import train_edm
        return train_edm(cfg, data, name, s)

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    mf = torch.channels_last if channels_last else torch.contiguous_format

    ukw = unet_kwargs(s["preset"], in_channels=C, image_size=H,
                      num_classes=num_classes if cfg.class_conditional else None)
    model = UNet(**ukw).to(device=device, memory_format=mf)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters()]
    fwd = torch.compile(model) if cfg.compile else model

    sched = NoiseSchedule.from_name(s["schedule"], cfg.num_train_timesteps)
    abar = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
    sqrt_ab, sqrt_1mab = abar.sqrt(), (1 - abar).sqrt()
    T = cfg.num_train_timesteps

    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=cfg.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    warm = s["warmup"]
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0)

    x_dev = x_all.to(device)  # uint8 on the device: batches are gathered there, no host loop
    y_dev = data.y_train.to(device=device, dtype=torch.long)
    flip = name in FLIP_DATASETS
    B = s["batch_size"]
    folder.mkdir(parents=True, exist_ok=True)
    settings = _config.to_dict(cfg)
    write_json(folder / "train_config.json", settings)

    meta = {
        "preset": s["preset"],
        "schedule": {"name": s["schedule"], "num_train_timesteps": T, "params": {}},
        "prediction": "epsilon", "data_range": [-1.0, 1.0],
        "dataset": name, "num_classes": num_classes,
        "class_conditional": bool(cfg.class_conditional), "real_images": N,
        "real_limit": cfg.real_limit, "seed": cfg.seed,
        "num_params": sum(p.numel() for p in params),
        "lr": s["lr"], "warmup": warm, "batch_size": B, "ema_decay": cfg.ema_decay,
        "precision": "bf16" if bf16 else "fp32", "device": str(device),
    }

    def save(step: int, final_loss: float | None, wall: float) -> None:
        if cfg.save_every:  # first: a kill between the two files leaves a state no newer than the weights
            st = {"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                  "lr_sched": lr_sched.state_dict(), "gen": gen.get_state(), "cpu_rng": torch.get_rng_state(),
                  "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                  "losses": losses, "loss_sum": loss_sum, "window": window, "last_loss": last_loss,
                  "wall_s": wall, "settings": _state_settings(cfg, s)}
            buf = io.BytesIO()
            torch.save(st, buf)
            atomic_write_bytes(folder / STATE_FILE, buf.getvalue())
        save_diffusion(folder, ema, dict(meta, iters=step, final_loss=final_loss, wall_s=round(wall, 2),
                                         train_config=settings), losses)

    losses: list[list] = []  # [step, mean loss over the window ending there]
    loss_sum = torch.zeros((), device=device)
    window = 0
    last_loss = None
    first, wall0 = 1, 0.0
    if state is not None:  # --resume: every piece of state as it was after state["step"]
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr_sched"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["cpu_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        losses, window, last_loss = [list(x) for x in state["losses"]], int(state["window"]), state["last_loss"]
        loss_sum = state["loss_sum"].to(device)
        first, wall0 = int(state["step"]) + 1, float(state.get("wall_s", 0.0))
        print(f"train-diffusion: resuming {folder} at step {first - 1} of {s['iters']}", file=sys.stderr)
    model.train()
    t0 = time.perf_counter() - wall0
    bar = progress(range(first, s["iters"] + 1), total=s["iters"], initial=first - 1, desc="train-diffusion")
    for step in bar:
        idx = torch.randint(0, N, (B,), device=device, generator=gen)
        x0 = x_dev[idx].to(torch.float32).div_(127.5).sub_(1.0)
        if flip:
            m = torch.rand(B, device=device, generator=gen) < 0.5
            x0 = torch.where(m[:, None, None, None], x0.flip(3), x0)
        x0 = x0.contiguous(memory_format=mf)
        t = torch.randint(0, T, (B,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen).contiguous(memory_format=mf)
        xt = sqrt_ab[t].view(B, 1, 1, 1) * x0 + sqrt_1mab[t].view(B, 1, 1, 1) * noise
        y = y_dev[idx] if cfg.class_conditional else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = fwd(xt, t, y)
        loss = (pred.float() - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        lr_sched.step()
        ema_update(ema, model, ema_decay_at(step - 1, 0, cfg.ema_decay))  # no warm-up copy phase
        loss_sum += loss.detach()
        window += 1
        if step % cfg.log_every == 0 or step == s["iters"]:
            last_loss = (loss_sum / window).item()  # the only host sync, once per window
            if not math.isfinite(last_loss):
                raise ValueError(f"train-diffusion: loss became {last_loss} by step {step} "
                                 f"(last good checkpoint, if any, kept in {folder}); lower --lr?")
            losses.append([step, round(last_loss, 6)])
            loss_sum.zero_()
            window = 0
            bar.set_postfix(loss=f"{last_loss:.4f}")
        if cfg.save_every and step % cfg.save_every == 0 and step != s["iters"]:
            save(step, last_loss, time.perf_counter() - t0)
    bar.close()
    save(s["iters"], last_loss, time.perf_counter() - t0)
    return folder


def run(cfg: TrainDiffusionConfig) -> dict:
    folder = train_diffusion(cfg)
    meta = json.loads((folder / "config.json").read_text())
    keys = ("dataset", "preset", "schedule", "iters", "final_loss", "wall_s", "num_params",
            "real_images", "class_conditional", "precision", "device")
    out = {k: meta[k] for k in keys}
    out["schedule"] = (meta["schedule"] or {}).get("name")  # None for an EDM denoiser
    out["checkpoint"] = str(folder)
    return out


def _read_meta(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a diffusion checkpoint "
                                f"(or training did not finish)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt (not valid JSON): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} is not a cdp-fast diffusion checkpoint config (format={got!r}); "
                         f"was training interrupted, or is this another kind of checkpoint?")
    for key in ("unet", "schedule", "image_shape"):
        if key not in meta:
            raise ValueError(f"{path} lacks the {key!r} entry")
    return meta


def load_diffusion(path, device="cpu", *, image_size: int | None = None):
    """Load a diffusion model -> (model in eval mode, NoiseSchedule, meta dict).

    ``path``: a cdp-fast checkpoint folder (``train-diffusion`` / ``convert``), a diffusers
    ``UNet2DModel`` or pipeline folder, or an original DDPM checkpoint file (see
    ``cdp_fast.models.external``). The model maps (x in [-1, 1], t[, y]) to eps. Weights are read
    with safetensors / ``torch.load(weights_only=True)`` only. ``image_size`` overrides the size
    inferred for an original DDPM file (not stored in its tensors).

    EDM models (an NVlabs ``.pkl``, read by ``cdp_fast.models.edm_pickle`` without running its
    code, or an EDM folder from ``convert`` / ``--objective edm``) come back as
    ``(Denoiser, None, meta)`` with ``meta["kind"] == "edm"``: D(x; sigma), no schedule.
    """
    folder = Path(path)
    dev = resolve_device(device) if isinstance(device, str) else device
    if not folder.exists():
        raise FileNotFoundError(f"diffusion checkpoint not found: {folder} (a cdp-fast or diffusers "
                                f"folder, or an original DDPM .ckpt file)")
    if folder.is_file() and folder.suffix == ".pkl":  # NVlabs EDM network pickle, restricted reader
        return load_edm_pickle(folder, dev)
    if folder.is_file() or is_diffusers_folder(folder):
        return load_external(folder, dev, image_size=image_size)
    if edm.is_edm_folder(folder):  # EDM denoiser folder (convert / --objective edm)
        return edm.load_folder(folder, dev, fmt=CHECKPOINT_FORMAT)
    meta = _read_meta(folder)
    wpath = folder / "model.safetensors"
    if not wpath.is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors")
    ukw = meta["unet"]
    C, H, W = meta["image_shape"]
    if not isinstance(ukw, dict) or ukw.get("in_channels") != C or ukw.get("image_size") != H:
        raise ValueError(f"{folder}/config.json: unet settings {ukw} do not match image_shape "
                         f"{meta['image_shape']}")
    arch = meta.get("arch", "unet")
    if arch not in ARCHS:
        raise ValueError(f"{folder}/config.json: unknown arch {arch!r} (known: {sorted(ARCHS)})")
    try:
        with torch.device("meta"):  # no random init: the weights come from the file
            model = ARCHS[arch](**ukw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder}/config.json: invalid unet settings {ukw}: {e}") from e
    state = read_file(wpath)
    load_into(model, state, str(wpath), what="the UNet described by config.json")
    model = model.to(dev).eval()
    sch = meta["schedule"]
    try:
        sched = NoiseSchedule.from_name(sch["name"], int(sch["num_train_timesteps"]),
                                        **sch.get("params", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder}/config.json: invalid schedule entry {sch}: {e}") from e
    return model, sched, meta


@dataclass
class ConvertConfig:
    POSITIONAL: ClassVar[str] = "path"  # `cdp-fast convert PATH --out DIR`
    path: str | None = field(None, help="diffusers folder, original DDPM .ckpt/.pt file, NVlabs EDM .pkl "
                                        "or cdp-fast folder")
    out: str = field("runs/converted", help="cdp-fast checkpoint folder to write")
    force: bool = field(False, help="replace an existing --out folder (deleted first; refused without it)")
    image_size: int | None = field(None, help="image size of an original DDPM file (default: inferred, "
                                              "16 * 2**attention level)")


def convert(cfg: ConvertConfig) -> dict:
    """``cdp-fast convert``: any loadable diffusion checkpoint -> a cdp-fast safetensors folder."""
    if not cfg.path:
        raise ValueError("convert: give the checkpoint to convert (cdp-fast convert PATH --out DIR)")
    model, _, meta = load_diffusion(cfg.path, "cpu", image_size=cfg.image_size)
    keep = {k: v for k, v in meta.items() if k not in ("format", "version", "unet", "image_shape")}
    if check_output(cfg.out, force=getattr(cfg, "force", False), what="a checkpoint"):
        replace_output(cfg.out)  # --force: no metrics or state of the old model stay beside the new weights
    if meta.get("kind") == "edm":  # EDM .pkl / folder -> EDM safetensors folder
        folder = edm.save_folder(cfg.out, model, keep, fmt=CHECKPOINT_FORMAT)
        return {"out": str(folder), "source": meta.get("source", "cdp-fast"), "arch": meta["arch"],
                "precond": meta["precond"], "num_params": sum(p.numel() for p in model.parameters()),
                "image_shape": meta["image_shape"], "schedule": None}
    folder = save_diffusion(cfg.out, model, keep)
    return {"out": str(folder), "source": meta.get("source", "cdp-fast"), "arch": meta.get("arch", "unet"),
            "num_params": sum(p.numel() for p in model.parameters()),
            "image_shape": meta["image_shape"], "schedule": meta["schedule"]["name"]}


if __name__ == "__main__":  # pragma: no cover
    run(TrainDiffusionConfig())
