"""`cdp-fast pipeline`: the paper's experiment end to end, on a built-in default that runs on a CPU.

1. load + split the real data; train the intermediate classifier (pseudo-labels, guidance features)
2. train the diffusion model on the real training subset only (no leakage)
2b. guidance-scale sweep (``cdp_fast.sweep``): same noise, a grid of lambdas; picks the
   Contrastive-DP scale by the rule it states in the report
3. sample two synthetic sets from the same initial noise: plain DDIM and Contrastive-DP
4. pseudo-label them with the intermediate classifier
5. TRADES-train robust classifiers on real only, real + DDIM, real + Contrastive-DP (same budget,
   same seeds)
6. evaluate clean and PGD robust accuracy on the held-out test split

Every stage lives in its own folder under ``--out`` with a ``stage.json`` holding the settings it
was made with, the fingerprints of what it consumed (the real images, upstream stages' outputs),
its own output fingerprint and the seconds it took; a rerun reuses a stage only when its settings
and inputs are unchanged and its files are still those it wrote (and redoes the rest), so a
changed upstream output recomputes every stage that used it.

Never lose work: every setting of every stage is resolved and checked (``resolve``, against the
data set's size too) before any stage runs, and a finished stage that must be redone is rebuilt
beside it (``.<name>.next``) and swapped in only once the replacement is complete, so a failure or
Ctrl-C leaves the finished stage as it was; a successful run removes leftover ``.next`` folders.
An intermediate classifier at chance is reported loudly; the sweep then chooses no scale and,
without ``--scale``, the run stops with an error after the sweep.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import diffusion_train, models, pseudolabel, trades
from . import generate as generate_mod
from .config import check_data_dir, check_eps, field, to_dict
from .figures import accuracy_bars, embedding_scatter, markdown_table, sample_grids
from .guidance import LOSSES
from .models.unet import PRESETS, UNet, unet_kwargs
from .sweep import (
    DEFAULT_SCALES,
    SweepConfig,
    at_chance,
    classifier_degenerate,
    describe,
    run_sweep,
    sweep_table,
    validate_scales,
)
from .utils import atomic_write_bytes, resolve_device, seed_everything, settings_fingerprint, write_json

ARMS = ("real", "ddim", "contrastive-dp")


@dataclass
class PipelineConfig:
    data: str = field("digits", help="dataset: digits (built in), mnist, fashion-mnist, cifar10, gtsrb")
    data_dir: str | None = field(None, help="folder with the dataset files (not needed for digits)")
    real_limit: int | None = field(None, help="real training images allowed: a class-balanced "
                                               "subset, deterministic in --seed (they alone train the "
                                               "diffusion model and the classifiers)")
    out: str = field("runs/pipeline", help="output folder (stages cached here)")
    device: str = field("auto", help="auto | cpu | cuda[:i]")
    seed: int = field(0, help="base seed")
    seeds: int = field(1, help="robust-training seeds per arm (mean and std are reported)")
    # 1. intermediate classifier
    classifier: str | None = field(None, help="intermediate classifier (default: the dataset's model)")
    classifier_epochs: int = field(15, help="intermediate classifier epochs")
    # 2. diffusion
    diffusion_iters: int | None = field(None, help="diffusion training iterations (None: dataset default)")
    diffusion_preset: str = field("auto", help="UNet size (auto: by dataset)")
    # 3. sampling
    n_synthetic: int = field(2000, help="synthetic images per set")
    sample_batch: int = field(500, help="sampling batch (= shard size)")
    sample_steps: int = field(50, help="DDIM steps")
    guidance: str = field("hnm", help="contrastive loss of Contrastive-DP",
                          choices=LOSSES)
    scale: float | None = field(None, help="guidance scale lambda of the Contrastive-DP arm (None: "
                                "the scale the guidance sweep chooses)")
    t_min: int | None = field(400, help="guide steps with t >= t_min (the authors' CIFAR window)")
    t_max: int | None = field(None, help="guide steps with t < t_max")
    group_size: int | None = field(None, help="contrastive group (None: min(512, batch))")
    head: bool = field(True, help="online embedding head on the classifier features")
    # 2b. guidance-scale sweep
    sweep_scales: tuple[float, ...] = field(DEFAULT_SCALES, help="guidance sweep: scales lambda "
                                            "(>= 0, 0 always added)")
    sweep_n: int | None = field(None, help="guidance sweep: images per scale (None: min(500, "
                                "--n-synthetic), at least 4)")
    sweep_steps: int | None = field(None, help="guidance sweep: DDIM steps (None: min(20, --sample-steps); "
                                    "too few and lambda 0's own samples sit far from the data, so the "
                                    "rule admits broken scales)")
    sweep_tolerance: float = field(0.5, help="guidance sweep rule: the largest scale whose "
                                   "classifier-feature Frechet distance to the real test set is at "
                                   "most (1 + tolerance) x lambda 0's")
    # 5. robust training
    robust_model: str | None = field(None, help="robust classifier (default: the dataset's model)")
    robust_epochs: int = field(10, help="TRADES epochs of the synthetic arms (passes over the real "
                                        "data); the real-only arm gets as many steps")
    batch_size: int = field(128, help="TRADES batch size")
    robust_optimizer: str | None = field(None, help="TRADES optimiser (default: the dataset's, as "
                                         "train-robust: adamw for digits / mnist / fashion-mnist, sgd for "
                                         "cifar10 / gtsrb)", choices=("sgd", "adamw"))
    lr: float | None = field(None, help="TRADES peak learning rate (default: the dataset's, as train-robust)")
    synthetic_fraction: float = field(0.5, help="synthetic fraction of each batch in the synthetic arms")
    eps: float | None = field(None, help="Linf radius in [0, 1] pixel units, fractions like 8/255 "
                                         "accepted (default: the dataset's, as train-robust: digits 0.1, "
                                         "cifar10 8/255, ...)")
    attack_steps: int | None = field(None, help="TRADES attack steps (default: the dataset's, as train-robust)")
    eval_attack_steps: int = field(20, help="PGD steps of the final evaluation")
    limit_test: int | None = field(None, help="evaluate on N test images (a class-balanced subset, the "
                                   "same for every stage: classifier accuracy, sweep fidelity, TRADES "
                                   "evaluation); None: the whole test split")
    embedding: str = field("pca", help="2-D embedding of the feature figure", choices=("pca", "tsne"))
    force: bool = field(False, help="recompute every stage")


def _key(d: dict) -> str:
    return settings_fingerprint(d)


def _read_marker(folder: Path) -> dict | None:
    try:
        m = json.loads((folder / "stage.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, OSError):
        return None
    return m if isinstance(m, dict) else None


# Not part of a stage's output: its own marker, hidden files (temporary writes) and the
# consolidated copy train-robust may write beside a synthetic set's shards (a cache of them).
_NOT_OUTPUT = ("stage.json", "consolidated")


def _output_files(folder: Path) -> list[Path]:
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if p.is_file() and rel[0] not in _NOT_OUTPUT and not any(s.startswith(".") for s in rel):
            out.append(p)
    return sorted(out, key=lambda p: str(p.relative_to(folder)))


def _listing(folder: Path) -> dict:
    """{relative path: [size, mtime_ns]} of a stage's output files (cheap: no reads)."""
    return {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns] for p in _output_files(folder)}


def output_fingerprint(folder: Path, names=None) -> str:
    """sha256 over a stage's output files (relative path, size and content), 16 hex digits: what a
    dependent stage consumed, recorded in its cache key. ``names``: only these relative paths."""
    folder = Path(folder)
    files = _output_files(folder) if names is None else [folder / n for n in sorted(names)]
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder)}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' bytes (the real images a stage trains or evaluates on), 16 hex digits."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class _Stage:
    """A cached stage folder.

    ``stage.json`` holds the key of what the stage depends on (its settings and, with ``inputs``,
    the fingerprints of what it consumed: upstream stages' outputs, the real data), whether it
    finished, how many seconds it took and, once finished, its own output fingerprint
    (``output``, see :func:`output_fingerprint`) with a size/mtime listing of its files.
    ``fresh``: finished with the same key and its files still those it wrote (reuse, with the
    seconds of the run that computed it); a file changed since (the listing differs and so does
    the content hash) makes it stale. Unfinished with the same key: the folder is kept so the
    stage can resume (sampling shards, TRADES train_state). Anything else (other settings, other
    inputs, changed files, ``--force``) is rebuilt in ``.<name>.next`` beside the old folder, which
    stays untouched until ``done()`` swaps the complete replacement in; a swap cut short is
    completed (or undone) on the next run, and a leftover ``.next`` beside a reused stage is removed.
    ``reason`` says why the stage is reused or (re)computed; ``output`` is the fingerprint a
    dependent stage passes in its ``inputs`` (None until the stage is finished).
    """

    def __init__(self, root: Path, name: str, settings: dict, force: bool, *, inputs: dict | None = None):
        self.final, self.settings, self.inputs = root / name, settings, inputs
        # without inputs, the key is the settings' alone (as before inputs existed)
        self.key = _key(settings) if inputs is None else _key({**settings, "_inputs": inputs})
        self.name = name
        self._next, self._old = root / f".{name}.next", root / f".{name}.old"
        self._recover()
        old = _read_marker(self.final)
        same = old is not None and old.get("key") == self.key and not force
        self.fresh = same and old.get("done", True)
        self.output = None
        if self.fresh:
            self.output, changed = self._verify(old)
            if changed:
                same = self.fresh = False
                self.reason = f"recomputed: its files changed since it finished ({changed})"
        if not same:
            self.reason = getattr(self, "reason", None) or self._why(old, force)
        self.resuming = same and not self.fresh
        self.seconds = old.get("seconds") if self.fresh else None
        self.info = old if self.fresh else {}
        self.dir = self.final
        if self.fresh:
            self.reason = "cached: settings and inputs unchanged"
            if self._next.exists():  # an unfinished rebuild with other settings: superseded
                shutil.rmtree(self._next)
                print(f"[pipeline] removed {self._next}: an unfinished rebuild of {name} with other settings")
            return
        if self.resuming:
            self.reason = "resuming an unfinished run with the same settings"
        if not same and self.final.exists():  # keep the finished work until its replacement is done
            self.dir = self._next
            nxt = _read_marker(self._next)
            self.resuming = (nxt is not None and nxt.get("key") == self.key and not nxt.get("done")
                             and not force)
            if not self.resuming and self._next.exists():
                shutil.rmtree(self._next)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.resuming:
            write_json(self.dir / "stage.json", {"key": self.key, "done": False, "settings": self.settings,
                                                 "inputs": self.inputs})

    def _why(self, old: dict | None, force: bool) -> str:
        if force:
            return "recomputed: --force"
        if old is None:
            return "computed: not run before"
        if old.get("settings") is not None and _key(old["settings"]) != _key(self.settings):
            return "recomputed: settings changed"
        if self.inputs is not None and old.get("inputs") is None:
            return "recomputed: made by an older version that did not record its inputs"
        if self.inputs is not None:
            changed = sorted(k for k, v in self.inputs.items() if (old.get("inputs") or {}).get(k) != v)
            if changed:
                return f"recomputed: its input changed ({', '.join(changed)})"
        return "recomputed: settings changed"

    def _verify(self, marker: dict) -> tuple[str | None, str | None]:
        """(output fingerprint, None) when the files the stage wrote are still there, unchanged
        (files added since, e.g. an eval.json, do not count), else (None, the first changed file).
        Cheap when their sizes and mtimes match the marker's listing."""
        recorded, fp = marker.get("files"), marker.get("output")
        if not recorded or not fp:  # a marker from before fingerprints: take the folder as it is
            return output_fingerprint(self.final), None
        for rel, (size, _) in sorted(recorded.items()):
            p = self.final / rel
            if not p.is_file() or p.stat().st_size != size:
                return None, rel
        if all([p.stat().st_size, p.stat().st_mtime_ns] == recorded[rel]
               for rel, p in ((r, self.final / r) for r in recorded)):
            return fp, None
        # touched (a copy with new mtimes?): the content decides
        return (fp, None) if output_fingerprint(self.final, names=recorded) == fp else (None, "content")

    def _recover(self) -> None:
        if not self.final.exists():
            nxt = _read_marker(self._next)
            if nxt is not None and nxt.get("done"):
                os.replace(self._next, self.final)
            elif self._old.exists():
                os.replace(self._old, self.final)
        if self._old.exists() and self.final.exists():
            shutil.rmtree(self._old)

    def done(self, seconds: float | None = None, **info) -> None:
        self.seconds = seconds
        self.output = output_fingerprint(self.dir)
        self.info = {"key": self.key, "done": True, "settings": self.settings, "seconds": seconds, **info,
                     "inputs": self.inputs, "output": self.output, "files": _listing(self.dir)}
        write_json(self.dir / "stage.json", self.info)
        if self.dir != self.final:  # swap: final -> .old, .next -> final, drop .old
            if self._old.exists():
                shutil.rmtree(self._old)
            os.replace(self.final, self._old)
            os.replace(self.dir, self.final)
            shutil.rmtree(self._old)
            self.dir = self.final


def _remove_leftovers(roots) -> list[str]:
    """Remove ``.<name>.next`` / ``.<name>.old`` folders left beside stages (after a successful run
    every stage is complete, so these are superseded rebuilds); returns what was removed."""
    gone = []
    for root in roots:
        for p in sorted(Path(root).glob(".*")):
            if p.is_dir() and (p.name.endswith(".next") or p.name.endswith(".old")):
                shutil.rmtree(p)
                gone.append(str(p))
    return gone


# Settings that never change a stage's result: left out of the cache keys.
_UNKEYED = ("out", "checkpoint", "device", "bf16", "cuda_graphs", "force", "resume")


def _keyed(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _UNKEYED}


# The steps the log numbers ("[pipeline] k/N ...").
_STEPS = ("intermediate classifier", "diffusion model", "guidance-scale sweep", "synthetic sets + pseudo-labels",
          "TRADES + test evaluation", "figures and report")


def _log(step: str, what: str, cached: bool = False, note: str | None = None) -> None:
    """One numbered log line; ``note`` (a ``_Stage.reason``) says why it is reused or computed."""
    k = _STEPS.index(step) + 1
    note = note or ("cached: settings unchanged" if cached else None)
    print(f"[pipeline] {k}/{len(_STEPS)} {what}{f' ({note})' if note else ''}")


@dataclass
class _Plan:
    """Every stage's resolved config, made (and checked) before any stage runs."""
    cfg: PipelineConfig
    base: dict
    defaults: dict
    dcfg: object          # TrainDiffusionConfig
    gcfgs: dict           # arm -> GenerateConfig (contrastive-dp: scale None = the sweep's choice)
    rcfgs: dict           # (arm, seed index) -> TrainRobustConfig


def _positive(cfg: PipelineConfig) -> list[tuple[bool, str]]:
    """Pipeline-level checks (the stage-level ones are the stages' own, run in ``_plan``)."""
    c = cfg
    return [
        (c.seeds >= 1, f"--seeds must be >= 1, got {c.seeds}"),
        (0.0 < c.synthetic_fraction < 1.0, f"--synthetic-fraction must be in (0, 1) (the real arm needs "
                                           f"real images in every batch of the others), got {c.synthetic_fraction}"),
        (c.classifier_epochs >= 1, f"--classifier-epochs must be >= 1, got {c.classifier_epochs}"),
        (c.diffusion_iters is None or c.diffusion_iters >= 1,
         f"--diffusion-iters must be >= 1, got {c.diffusion_iters}"),
        (c.n_synthetic >= 1, f"--n-synthetic must be >= 1, got {c.n_synthetic}"),
        (c.sample_batch >= 1, f"--sample-batch must be >= 1, got {c.sample_batch}"),
        (c.sample_steps >= 1, f"--sample-steps must be >= 1, got {c.sample_steps}"),
        (c.scale is None or (math.isfinite(c.scale) and c.scale >= 0),
         f"--scale (the guidance scale lambda) must be a finite number >= 0, got {c.scale}"),
        (c.t_min is None or c.t_min >= 0, f"--t-min must be >= 0, got {c.t_min}"),
        (c.t_max is None or c.t_max >= 1, f"--t-max must be >= 1, got {c.t_max}"),
        (c.t_min is None or c.t_max is None or c.t_min < c.t_max,
         f"--t-min {c.t_min} must be below --t-max {c.t_max} (no step would be guided)"),
        (c.group_size is None or c.group_size >= 2, f"--group-size must be >= 2, got {c.group_size}"),
        (c.robust_epochs >= 1, f"--robust-epochs must be >= 1, got {c.robust_epochs}"),
        (c.batch_size >= 1, f"--batch-size must be >= 1, got {c.batch_size}"),
        (c.lr is None or (math.isfinite(c.lr) and c.lr > 0), f"--lr must be > 0, got {c.lr}"),
        (c.eps is None or c.eps > 0, f"--eps must be > 0 (0 would be plain training), got {c.eps}"),
        (c.attack_steps is None or c.attack_steps >= 1, f"--attack-steps must be >= 1, got {c.attack_steps}"),
        (c.eval_attack_steps >= 1, f"--eval-attack-steps must be >= 1, got {c.eval_attack_steps}"),
        (c.real_limit is None or c.real_limit >= 1, f"--real-limit must be >= 1, got {c.real_limit}"),
        (c.limit_test is None or c.limit_test >= 1, f"--limit-test must be >= 1, got {c.limit_test}"),
        (c.sweep_n is None or c.sweep_n >= 4, f"--sweep-n must be >= 4, got {c.sweep_n}"),
        (c.sweep_steps is None or c.sweep_steps >= 1, f"--sweep-steps must be >= 1, got {c.sweep_steps}"),
    ]


def _plan(cfg: PipelineConfig) -> _Plan:
    """Resolve and check every setting of every stage; raises ValueError naming the first bad one.

    Nothing is trained or written here; the data set is loaded (kept for ``run``) so that every
    check that depends on its size runs too. The returned plan's ``cfg`` has every default filled
    in with the value actually used (no None left for eps, lr, attack steps, models, sweep size).
    """
    for ok, msg in _positive(cfg):
        if not ok:
            raise ValueError(msg)
    check_eps(cfg.eps)
    name = data_mod.canonical_name(cfg.data)
    check_data_dir(name, cfg.data_dir)
    resolve_device(cfg.device)
    defaults = data_mod.dataset_defaults(name)
    for flag, model in (("--classifier", cfg.classifier), ("--robust-model", cfg.robust_model)):
        if model is not None and model.lower().replace("_", "-") not in models.NAMES:
            raise ValueError(f"{flag} {model!r} is not a classifier this package builds; choose one of "
                             f"{', '.join(models.NAMES)}")
    if cfg.diffusion_preset != "auto" and cfg.diffusion_preset not in PRESETS:
        raise ValueError(f"--diffusion-preset {cfg.diffusion_preset!r} is not a UNet preset; choose auto or "
                         f"one of {', '.join(PRESETS)}")
    dcfg = diffusion_train.TrainDiffusionConfig(data=name, data_dir=cfg.data_dir, real_limit=cfg.real_limit,
                                iters=cfg.diffusion_iters, preset=cfg.diffusion_preset, seed=cfg.seed,
                                device=cfg.device)
    ds = diffusion_train.resolve_settings(dcfg, name)
    dcfg = dataclasses.replace(dcfg, iters=ds["iters"], preset=ds["preset"])
    T = dcfg.num_train_timesteps
    sweep_n, sweep_steps = _sweep_size(cfg)
    for flag, n in (("--sample-steps", cfg.sample_steps), ("--sweep-steps", sweep_steps)):
        if n > T:
            raise ValueError(f"{flag} {n} exceeds the diffusion model's {T} training timesteps")
    _check_window(cfg, T, ds["schedule"], {"--sample-steps": (cfg.sample_steps, cfg.sample_batch),
                                           "--sweep-steps": (sweep_steps, min(cfg.sample_batch, sweep_n))})
    data = _load_data(name, cfg.data_dir, cfg.real_limit, cfg.seed)
    _check_sizes(cfg, data)
    try:  # the preset fits the images (UNet checks the size on construction; no memory on "meta")
        with torch.device("meta"):
            UNet(**unet_kwargs(ds["preset"], in_channels=data.channels, image_size=data.size))
    except ValueError as e:
        raise ValueError(f"--diffusion-preset {ds['preset']}: {e}") from None
    # TRADES: the dataset's defaults (data.DEFAULTS), resolved by train-robust's own rule
    rcfgs = {}
    for s in range(cfg.seeds):
        for arm in ARMS:
            rcfg = trades.TrainRobustConfig(data=name, data_dir=cfg.data_dir, real_limit=cfg.real_limit,
                                     synthetic_fraction=cfg.synthetic_fraction,
                                     model=cfg.robust_model or defaults["model"],
                                     epochs=_arm_epochs(cfg, arm), batch_size=cfg.batch_size, lr=cfg.lr,
                                     optimizer=cfg.robust_optimizer, eps=cfg.eps,
                                     attack_steps=cfg.attack_steps, eval_attack_steps=cfg.eval_attack_steps,
                                     out=str(Path(cfg.out) / "robust" / f"{arm}-seed{s}"),
                                     seed=cfg.seed + s, device=cfg.device)
            trades._check_cfg(rcfg)
            r = trades.resolve_settings(rcfg, name)  # also checks the attack settings
            rcfgs[arm, s] = dataclasses.replace(rcfg, **{k: r[k] for k in (
                "eps", "step_size", "attack_steps", "beta", "optimizer", "lr", "schedule", "ema", "ema_warmup")})
    r0 = rcfgs["real", 0]
    resolved = dataclasses.replace(
        cfg, data=name, classifier=cfg.classifier or defaults["model"],
        robust_model=cfg.robust_model or defaults["model"], diffusion_iters=ds["iters"],
        diffusion_preset=ds["preset"], eps=r0.eps, attack_steps=r0.attack_steps, lr=r0.lr,
        robust_optimizer=r0.optimizer, sweep_n=sweep_n, sweep_steps=sweep_steps)
    gcfgs = {}
    for arm, guidance in (("ddim", "none"), ("contrastive-dp", cfg.guidance)):
        guided = guidance != "none"
        gcfgs[arm] = generate_mod.GenerateConfig(
            checkpoint=str(Path(cfg.out) / "diffusion"), out=str(Path(cfg.out) / "synthetic" / arm),
            n=cfg.n_synthetic, batch_size=cfg.sample_batch, steps=cfg.sample_steps, guidance=guidance,
            seed=cfg.seed + 1000, device=cfg.device,
            **(dict(scale=cfg.scale, t_min=cfg.t_min, t_max=cfg.t_max, group_size=cfg.group_size,
                    head=cfg.head) if guided else {}))
    _sweep_config(resolved)  # the sweep's settings: checked on construction
    base = {"data": name, "data_dir": cfg.data_dir, "real_limit": cfg.real_limit, "seed": cfg.seed}
    return _Plan(resolved, base, defaults, dcfg, gcfgs, rcfgs)


def _sweep_size(cfg: PipelineConfig) -> tuple[int, int]:
    """The sweep's images per scale and DDIM steps: given, or scaled with the run (at most the
    synthetic sets' size and step count, at most 500 images and 20 steps)."""
    return (cfg.sweep_n if cfg.sweep_n is not None else max(4, min(500, cfg.n_synthetic)),
            cfg.sweep_steps if cfg.sweep_steps is not None else min(20, cfg.sample_steps))


_DATA: dict = {}  # the data set _plan loaded, for run() (one entry)


def _load_data(name: str, data_dir, real_limit, seed: int):
    """load_dataset once per (name, folder, limit, seed): _plan checks its size, run() trains on it."""
    k = (name, None if data_dir is None else str(Path(data_dir).expanduser().resolve()), real_limit, seed)
    if k not in _DATA:
        _DATA.clear()
        try:
            _DATA[k] = data_mod.load_dataset(name, data_dir, real_limit=real_limit, seed=seed)
        except ValueError as e:
            if real_limit is not None and "real_limit" in str(e):
                raise ValueError(f"--real-limit {real_limit}: {e}") from None
            raise
    return _DATA[k]


def _limit_test(data, n: int | None):
    """A class-balanced subset of n test images (the same for every seed), or data unchanged."""
    if n is None or n >= data.x_test.shape[0]:
        return data
    keep = torch.from_numpy(data_mod.balanced_subset(data.y_test, n, 0))
    return dataclasses.replace(data, x_test=data.x_test[keep].contiguous(), y_test=data.y_test[keep].contiguous())


def _check_sizes(cfg: PipelineConfig, data) -> None:
    """What the data set's size decides: every class present, every stage's batch filled."""
    n, C, n_test = int(data.x_train.shape[0]), int(data.num_classes), int(data.x_test.shape[0])
    present = int(torch.unique(data.y_train).numel())
    if present < C:
        raise ValueError(f"--real-limit {cfg.real_limit}: the real training subset holds {present} of the "
                         f"{C} classes of {data.name}; at least {C} images (one per class) are needed, and "
                         f"far more to train anything")
    # TRADES holds out min(1024, n // 10) images for validation (trades.train_robust's default
    # --val-size); every real-only batch takes --batch-size of the rest (synthetic arms fewer)
    val = min(1024, n // 10)
    if cfg.batch_size > n - val:
        raise ValueError(f"--batch-size {cfg.batch_size}: each TRADES batch of the real-only arm takes "
                         f"{cfg.batch_size} real images but there are only {n - val} ({n} real training "
                         f"images{f' (--real-limit {cfg.real_limit})' if cfg.real_limit else ''}, {val} "
                         f"held out for validation); lower --batch-size or raise --real-limit")
    if cfg.limit_test is not None and not C <= cfg.limit_test <= n_test:
        raise ValueError(f"--limit-test {cfg.limit_test} must be between {C} (one image per class) and the "
                         f"{n_test} images of {data.name}'s test split")


def _check_window(cfg: PipelineConfig, T: int, schedule: str, runs: dict) -> None:
    """The guidance window must hold a sampled step, and the contrastive group divide the batch:
    checked with the sampler's own step list and the guidance's own rule (never the first step)."""
    from .guidance import ContrastiveGuidance, default_group_size
    from .sampler import DDIMSampler
    from .schedules import NoiseSchedule

    window = f"--t-min {cfg.t_min} / --t-max {cfg.t_max}"
    if cfg.t_min is not None and cfg.t_min >= T:
        raise ValueError(f"{window}: no step would be guided, the diffusion model's timesteps are 0..{T - 1} "
                         f"(Contrastive-DP would be plain DDIM)")
    sched = NoiseSchedule.from_name(schedule, T)
    g = ContrastiveGuidance(cfg.guidance, None, scale=1.0, t_min=cfg.t_min, t_max=cfg.t_max)
    for flag, (steps, batch) in runs.items():
        sampler = DDIMSampler(lambda x, t: x, sched, steps=steps, guidance=g)
        if not any(sampler.guided_steps()):
            raise ValueError(f"{window}: none of the {steps} DDIM steps ({flag}, timesteps "
                             f"{sampler.timesteps[0]}..{sampler.timesteps[-1]}, the first never guided) lies "
                             f"in the guidance window t_min <= t < t_max (Contrastive-DP would be plain DDIM)")
        G = cfg.group_size if cfg.group_size is not None else default_group_size(batch)
        if G < 2 or batch % G:
            raise ValueError(f"the contrastive group ({G}, --group-size) must be >= 2 and divide the sampling "
                             f"batch {batch} ({'--sample-batch' if flag == '--sample-steps' else 'min(--sample-batch, --sweep-n)'})")


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """The config with every default filled in, after checking every stage's settings (CLI hook:
    runs before anything is written, so a bad setting costs nothing and changes no file)."""
    return _plan(cfg).cfg


def run(cfg: PipelineConfig) -> dict:
    plan = _plan(cfg)  # every setting of every stage is checked before any stage runs
    cfg, base = plan.cfg, plan.base
    t_start = time.perf_counter()
    timings: dict[str, float | None] = {}
    cached: list[str] = []
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data = _load_data(cfg.data, cfg.data_dir, cfg.real_limit, cfg.seed)  # loaded (and checked) by _plan
    _DATA.clear()
    data = _limit_test(data, cfg.limit_test)
    print(f"[pipeline] {data!r} on {device}")
    # what the stages consume, by content (see _Stage): the real images, then upstream outputs
    real = {"real_train": data_fingerprint(data.x_train, data.y_train),
            "real_test": data_fingerprint(data.x_test, data.y_test)}
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        print(f"[pipeline] WARNING: {msg}", file=sys.stderr)

    def finish(stage_name: str, st: _Stage, t0: float, **info) -> None:
        if st.fresh:
            cached.append(stage_name)
        else:
            st.done(seconds=round(time.perf_counter() - t0, 2), **info)
        timings[stage_name] = st.seconds  # from the run that computed the stage

    # 1. intermediate classifier ------------------------------------------------------------------
    t0 = time.perf_counter()
    clf_name = cfg.classifier
    st = _Stage(out, "classifier", {**base, "model": clf_name, "epochs": cfg.classifier_epochs}, cfg.force,
                inputs={"real_train": real["real_train"]})
    _log("intermediate classifier", f"intermediate classifier ({clf_name})", st.fresh, st.reason)
    if not st.fresh:
        clf = pseudolabel.train_classifier(data, clf_name, epochs=cfg.classifier_epochs, seed=cfg.seed, device=device)
        models.save(clf, st.dir, name=clf_name, data=data.name, role="intermediate classifier")
    finish("classifier", st, t0)
    clf_out = st.output
    clf = models.load(st.dir, device=device)
    with torch.no_grad():
        pred = _batched(lambda x: clf(x).argmax(1), data.x_test, device)
        clf_acc = float((pred == data.y_test).float().mean())
    print(f"[pipeline] intermediate classifier test accuracy {clf_acc:.3f}")
    bad = classifier_degenerate(pred, data.y_test, data.num_classes)
    if bad:  # its pseudo-labels and guidance features would carry no class information
        warn(f"{bad}: the synthetic sets' pseudo-labels and the guidance features are meaningless "
             f"(raise --classifier-epochs or --real-limit)")

    # 2. diffusion model (real training subset only) -----------------------------------------------
    t0 = time.perf_counter()
    dcfg = plan.dcfg
    st = _Stage(out, "diffusion", {**base, **_keyed(to_dict(dcfg))}, cfg.force,
                inputs={"real_train": real["real_train"]})
    _log("diffusion model", "diffusion model on the real training subset", st.fresh, st.reason)
    if not st.fresh:
        diffusion_train.train_diffusion(dataclasses.replace(dcfg, out=str(st.dir)), data=data)
    finish("diffusion", st, t0)
    diff_out = st.output
    unet, schedule, meta = diffusion_train.load_diffusion(st.dir, device=device)

    # 2b. guidance-scale sweep: chooses the Contrastive-DP scale unless --scale is given ----------
    sweep_res = _sweep_stage(cfg, out, {**base, "diffusion": _key(_keyed(to_dict(dcfg))), "classifier": clf_name,
                                        "classifier_epochs": cfg.classifier_epochs},
                             unet=unet, schedule=schedule, meta=meta, clf=clf, data=data, device=device,
                             finish=finish, inputs={**real, "classifier": clf_out, "diffusion": diff_out})
    scale = cfg.scale if cfg.scale is not None else sweep_res["guidance_scale"]
    if scale is None:  # the sweep refused to choose (degenerate metrics): nothing to fall back on
        raise ValueError(f"the guidance-scale sweep chose no scale: {sweep_res['choice']['note']} Fix the "
                         f"intermediate classifier (e.g. more --classifier-epochs), or give --scale to run "
                         f"the Contrastive-DP arm anyway (the finished stages are kept)")

    # 3 + 4. synthetic sets from the same noise, pseudo-labelled ----------------------------------
    synth: dict[str, tuple] = {}
    gen_info: dict[str, dict] = {}
    syn_keys: dict[str, str] = {}
    syn_out: dict[str, str] = {}
    for arm, gcfg in plan.gcfgs.items():
        t0 = time.perf_counter()
        if gcfg.guidance != "none":
            gcfg = dataclasses.replace(gcfg, scale=scale)
        dep = {**base, "diffusion": _key(_keyed(to_dict(dcfg))), "classifier": clf_name,
               "classifier_epochs": cfg.classifier_epochs, **_keyed(to_dict(gcfg))}
        st = _Stage(out / "synthetic", arm, dep, cfg.force, inputs={"classifier": clf_out, "diffusion": diff_out})
        _log("synthetic sets + pseudo-labels", f"{cfg.n_synthetic} images: {arm}", st.fresh, st.reason)
        if not st.fresh:
            gen_info[arm] = generate_mod.generate(dataclasses.replace(gcfg, out=str(st.dir)), model=unet, schedule=schedule,
                                     meta=meta, features_model=clf.features, labeler=clf)
            gen_info[arm]["load_during_sampling"] = _load_note()
            gen_info[arm]["out"] = str(st.final)
        else:
            gen_info[arm] = {k: st.info.get(k) for k in ("images_per_s", "wall_s", "load_during_sampling")}
        finish(f"sample_{arm}", st, t0, **gen_info[arm])
        syn_keys[arm] = st.key
        syn_out[arm] = st.output
        imgs, labels, extra = data_mod.load_synthetic(st.dir, like=data, with_extra=True)
        synth[arm] = (imgs, labels, extra.get("confidence"))

    # 5 + 6. TRADES per arm and seed, evaluated on the test split ---------------------------------
    per_arm: dict[str, list[dict]] = {a: [] for a in ARMS}
    for s in range(cfg.seeds):
        for arm in ARMS:
            t0 = time.perf_counter()
            rcfg = plan.rcfgs[arm, s]
            dep = {**base, **_keyed(to_dict(rcfg)), "arm": arm,
                   "synthetic": None if arm == "real" else syn_keys[arm]}
            inputs = {**real, **({} if arm == "real" else {"synthetic": syn_out[arm]})}
            st = _Stage(out / "robust", f"{arm}-seed{s}", dep, cfg.force, inputs=inputs)
            _log("TRADES + test evaluation", f"TRADES on {arm} (seed {cfg.seed + s})", st.fresh, st.reason)
            if not st.fresh:
                syn = None if arm == "real" else synth[arm][:2]
                # an interrupted run of the same stage continues from its last finished epoch
                resume = st.resuming and (st.dir / "train_state.safetensors").is_file()
                trades.train_robust(dataclasses.replace(rcfg, out=str(st.dir), resume=resume), data=data,
                             synthetic=syn)
            finish(f"robust_{arm}_seed{s}", st, t0)
            res = json.loads((st.dir / "results.json").read_text())
            per_arm[arm].append(res)

    _log("figures and report", "figures and report")
    arms = {}
    for arm, rs in per_arm.items():
        c = np.array([r["clean_acc"] for r in rs])
        r_ = np.array([r["robust_acc"] for r in rs])
        arms[arm] = {"clean_acc": float(c.mean()), "robust_acc": float(r_.mean()),
                     "clean_acc_std": float(c.std()), "robust_acc_std": float(r_.std()),
                     "seeds": len(rs), "eps": rs[0]["eps"], "n_synthetic": rs[0]["n_synthetic"]}
        if at_chance(arms[arm]["clean_acc"], data.num_classes):
            warn(f"the TRADES {arm} arm ends at chance (clean accuracy {arms[arm]['clean_acc']:.3f}, "
                 f"{data.num_classes} classes): it learned nothing at this budget")

    # synthetic-set statistics + figures -----------------------------------------------------------
    feats, labs, syn_stats = {}, {}, {}
    with torch.no_grad():
        for arm, (imgs, labels, conf) in synth.items():
            f = _batched(lambda x: clf.features(x).float(), imgs, device)
            feats[arm], labs[arm] = f.numpy(), labels.numpy()
            syn_stats[arm] = _set_stats(f, labels, conf, data.num_classes)
    figs = {
        "samples": sample_grids({a: synth[a][0][:100].numpy() for a in synth}, out / "samples.png",
                                title="same initial noise: DDIM vs Contrastive-DP"),
        "accuracy": accuracy_bars({a: arms[a] for a in ARMS}, out / "accuracy.png",
                                  errors={a: {"clean_acc": arms[a]["clean_acc_std"],
                                              "robust_acc": arms[a]["robust_acc_std"]} for a in ARMS}
                                  if cfg.seeds > 1 else None,
                                  title=f"{data.name}: TRADES, eps={arms['real']['eps']:.3g}"),
        "embedding": embedding_scatter(feats, labs, out / "embedding.png", method=cfg.embedding,
                                       title=f"classifier features ({cfg.embedding.upper()})"),
    }
    timings["total_this_run"] = round(time.perf_counter() - t_start, 2)
    results = {
        "arms": arms,
        "data": data.name, "n_real_train": int(data.x_train.shape[0]), "n_test": int(data.x_test.shape[0]),
        "intermediate_classifier_acc": clf_acc,
        "synthetic": {a: {**syn_stats[a], "images_per_s": gen_info[a].get("images_per_s"),
                          "load_during_sampling": gen_info[a].get("load_during_sampling")} for a in synth},
        "synthetic_difference": _set_difference(synth["ddim"][0], synth["contrastive-dp"][0]),
        "comparisons": _comparisons(arms, int(data.x_test.shape[0])),
        **_sweep_results(sweep_res, scale, cfg.scale is None),
        "per_seed": per_arm, "timings_s": timings, "cached_stages": cached, "warnings": warnings,
        "device": str(device), "figures": {k: str(v) for k, v in figs.items()},
        "config": to_dict(cfg),
    }
    write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", _report(cfg, results, markdown_table).encode())
    for p in _remove_leftovers([out, out / "synthetic", out / "robust"]):
        print(f"[pipeline] removed {p}: an unfinished rebuild superseded by this run")
    print(f"[pipeline] done in {timings['total_this_run']:.0f}s: {out / 'report.md'}")
    return results


def _load_note() -> dict | None:
    """The machine's load while a stage ran: throughput measured under load is not a benchmark."""
    try:
        return {"load_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    except (AttributeError, OSError):  # no getloadavg on this platform
        return None


def _arm_epochs(cfg: PipelineConfig, arm: str) -> int:
    """Same budget for every arm: the same number of optimiser steps at the same batch size.

    An epoch is one pass over the real images; a synthetic arm's batch holds only
    (1 - synthetic_fraction) real images, so its epoch has 1/(1 - fraction) times more steps.
    The real-only arm gets correspondingly more epochs.
    """
    if arm != "real":
        return cfg.robust_epochs
    return max(1, round(cfg.robust_epochs / max(1e-6, 1.0 - cfg.synthetic_fraction)))


def _batched(fn, images_uint8: torch.Tensor, device, batch: int = 1024) -> torch.Tensor:
    return torch.cat([fn(data_mod.to_float(images_uint8[i:i + batch].to(device))).cpu()
                      for i in range(0, len(images_uint8), batch)])


def _set_stats(f: torch.Tensor, labels: torch.Tensor, conf, num_classes: int) -> dict:
    """Diversity/separability of a synthetic set in the classifier's feature space."""
    fn = torch.nn.functional.normalize(f.double(), dim=1)
    n = len(fn)
    # mean over pairs i != j of cos(f_i, f_j) = (||sum_i f_i||^2 - n) / (n (n - 1)), in O(n d)
    mean_cos = float((fn.sum(0).square().sum() - n) / (n * (n - 1)))
    counts = torch.bincount(labels, minlength=num_classes).float()
    p = counts / counts.sum()
    label_entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / np.log(num_classes))
    return {"n": n, "mean_pairwise_cosine": round(mean_cos, 4),
            "label_entropy_normalised": round(label_entropy, 4) + 0.0,  # + 0.0: no "-0.0"
            "mean_confidence": None if conf is None else round(float(torch.as_tensor(conf).float().mean()), 4),
            "label_counts": counts.long().tolist()}


def _set_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far apart two uint8 sets made from the same noise are (guided vs unguided)."""
    d = (a.to(torch.int16) - b.to(torch.int16)).abs()
    return {"mean_abs_diff_255": round(float(d.float().mean()), 3),
            "identical_pixel_fraction": round(float((d == 0).float().mean()), 4)}


def _comparisons(arms: dict, n_test: int) -> list[dict]:
    """Each synthetic arm against real, and Contrastive-DP against DDIM, with a noise level.

    noise = the larger of the binomial standard error of a difference of two accuracies on
    ``n_test`` images (sqrt(p1 q1 / n + p2 q2 / n)) and, with several seeds, the standard error
    of the difference of the seed means. A difference is "within noise" when it is below twice
    that (about a 95% interval).
    """
    out = []
    for a, b in (("ddim", "real"), ("contrastive-dp", "real"), ("contrastive-dp", "ddim")):
        for metric in ("clean_acc", "robust_acc"):
            pa, pb = arms[a][metric], arms[b][metric]
            k = arms[a]["seeds"]
            binom = math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n_test)
            seed = math.sqrt((arms[a][metric + "_std"] ** 2 + arms[b][metric + "_std"] ** 2) / (k - 1)) \
                if k > 1 else 0.0  # std over seeds is the population std (ddof 0): / (k - 1)
            noise = max(binom, seed)
            out.append({"a": a, "b": b, "metric": metric, "difference": pa - pb, "noise_se": noise,
                        "noise_from": "seeds" if seed > binom else f"binomial, {n_test} test images",
                        "within_noise": abs(pa - pb) < 2 * noise})
    return out


def _report(cfg: PipelineConfig, r: dict, markdown_table) -> str:
    rows = []
    for arm, a in r["arms"].items():
        pm = [f"{100 * a[k]:.2f} ± {100 * a[k + '_std']:.2f}" if a["seeds"] > 1 else f"{100 * a[k]:.2f}"
              for k in ("clean_acc", "robust_acc")]
        rows.append([arm, a["n_synthetic"], *pm])
    cmp_rows = [[f"{c['a']} − {c['b']}", c["metric"].replace("_acc", ""), f"{100 * c['difference']:+.2f}",
                 f"± {200 * c['noise_se']:.2f} ({c['noise_from']})",
                 "within noise" if c["within_noise"] else "beyond noise"] for c in r["comparisons"]]
    syn = [[a, s["n"], s["mean_pairwise_cosine"], s["label_entropy_normalised"], s["mean_confidence"],
            s["images_per_s"]] for a, s in r["synthetic"].items()]
    loads = [s.get("load_during_sampling") for s in r["synthetic"].values()]
    load_txt = "; ".join(f"1-min load average {ld['load_1min']} on {ld['cpus']} CPUs" for ld in loads if ld) \
        or "machine load not recorded"
    sd = r["synthetic_difference"]
    cached = set(r["cached_stages"])
    tim = [[k, "n/a (not recorded)" if v is None else v,
            "an earlier run (cached)" if k in cached else "this run"] for k, v in r["timings_s"].items()]
    eps = r["arms"]["real"]["eps"]
    one_seed = (" With one seed the interval covers only the test-set sampling, not training randomness "
                "(use --seeds 3 or more)." if cfg.seeds == 1 else "")
    return "\n\n".join([
        f"# cdp-fast pipeline: {r['data']}",
        f"Real training images: {r['n_real_train']}; test images: {r['n_test']}; device: {r['device']}; "
        f"seeds: {cfg.seeds}. Intermediate classifier test accuracy: {100 * r['intermediate_classifier_acc']:.2f}%.",
        *(["## Warnings", "\n".join(f"- {w}" for w in r["warnings"])] if r.get("warnings") else []),
        "## Robust accuracy (TRADES, test split)",
        f"Linf eps = {eps:.4g}; robust = PGD-{cfg.eval_attack_steps} accuracy (%).",
        markdown_table(rows, ["arm", "synthetic images", "clean acc", "robust acc"]),
        "Differences (percentage points) with a 95% noise interval (2 standard errors: binomial on the "
        "test-set size, or the spread over seeds when larger). A difference inside it is not evidence "
        "that one arm is better." + one_seed,
        markdown_table(cmp_rows, ["arms", "accuracy", "difference", "noise (95%)", "verdict"]),
        "![accuracy](accuracy.png)",
        "## Synthetic sets",
        f"Both sets start from the same initial noise; guidance changed the images by "
        f"{sd['mean_abs_diff_255']:.2f}/255 per pixel on average, and "
        f"{100 * sd['identical_pixel_fraction']:.0f}% of pixels are identical in the two sets.",
        "Mean pairwise cosine of the classifier features (lower = more diverse), normalised entropy "
        "of the pseudo-label distribution, mean pseudo-label confidence, and sampling throughput. "
        f"images/s is wall-clock time measured while the machine was loaded ({load_txt}): "
        "it is not a benchmark and a difference between the sets is not a speed result "
        "(use `cdp-fast bench`).",
        markdown_table(syn, ["set", "n", "mean cos", "label entropy", "confidence", "images/s (under load)"]),
        "![samples](samples.png)\n\n![embedding](embedding.png)",
        *_sweep_report(r, markdown_table),
        "## Settings",
        "```json\n" + json.dumps(r["config"], indent=2) + "\n```",
        "## Wall time (s)",
        "Each stage's time is from the run that computed it; reused (cached) stages keep their "
        "original time. total_this_run is this invocation only.",
        markdown_table(tim, ["stage", "seconds", "computed by"]),
    ]) + "\n"


# guidance-scale sweep (issue 13) ---------------------------------------------------------------------
def _sweep_config(cfg: PipelineConfig) -> SweepConfig:
    """The sweep with the Contrastive-DP arm's guidance settings (checked on construction)."""
    out = Path(cfg.out)
    sweep_n, sweep_steps = _sweep_size(cfg)
    return SweepConfig(checkpoint=str(out / "diffusion"), classifier=str(out / "classifier"),
                       data=cfg.data, data_dir=cfg.data_dir, real_limit=cfg.real_limit,
                       out=str(out / "sweep"), scales=tuple(validate_scales(cfg.sweep_scales)),
                       guidance=cfg.guidance, features="classifier", head=cfg.head, n=sweep_n,
                       batch_size=min(cfg.sample_batch, sweep_n), steps=sweep_steps,
                       t_min=cfg.t_min, t_max=cfg.t_max, group_size=cfg.group_size,
                       tolerance=cfg.sweep_tolerance, seed=cfg.seed + 1000, device=cfg.device)


def _sweep_stage(cfg: PipelineConfig, out: Path, dep: dict, *, unet, schedule, meta, clf, data, device,
                 finish=None, inputs: dict | None = None) -> dict:
    """Run (or reuse) the sweep stage ``out/sweep``; returns its sweep.json. ``finish(name, st, t0,
    **info)`` records the stage (run()'s bookkeeping); by default the stage is just marked done.
    ``inputs``: fingerprints of what the sweep consumes (see ``_Stage``)."""
    scfg = _sweep_config(cfg)
    t0 = time.perf_counter()
    # no paths in the key (the classifier checkpoint is keyed by dep's model name + epochs)
    keyed = {k: v for k, v in _keyed(to_dict(scfg)).items() if k not in ("classifier", "seed")}
    st = _Stage(out, "sweep", {**dep, **keyed, "sweep_seed": scfg.seed}, cfg.force, inputs=inputs)
    _log("guidance-scale sweep", f"guidance-scale sweep: {len(scfg.scales)} scales x {scfg.n} images x "
         f"{scfg.steps} steps", st.fresh, st.reason)
    info = {}
    if not st.fresh:
        res = run_sweep(dataclasses.replace(scfg, out=str(st.dir)), model=unet, schedule=schedule, meta=meta,
                        clf=clf, data=data, device=device)
        info = {"guidance_scale": res["guidance_scale"]}
    if finish is not None:
        finish("sweep", st, t0, **info)
    elif not st.fresh:
        st.done(seconds=round(time.perf_counter() - t0, 2), **info)
    return json.loads((st.dir / "sweep.json").read_text())


def _sweep_results(res: dict, scale: float, chosen: bool) -> dict:
    """results.json entries: the sweep rows and the scale the Contrastive-DP arm used."""
    keys = ("scale", "pixel_change", "separability", "probe_accuracy", "diversity", "fidelity",
            "confidence", "broken")
    return {"guidance_sweep": [{k: r.get(k) for k in keys} for r in res["guidance_sweep"]],
            "guidance_scale": scale,
            "guidance_scale_source": "sweep" if chosen else "--scale",
            "guidance_choice": res["choice"],
            "guidance_reference_real_train": res["reference_real_train"]}


def _sweep_report(r: dict, markdown_table) -> list[str]:
    res = {"guidance_sweep": r["guidance_sweep"], "guidance_scale": r["guidance_choice"]["scale"],
           "reference_real_train": r["guidance_reference_real_train"]}
    rows, header = sweep_table(res)
    c = r["guidance_choice"]
    choice = "none" if c["scale"] is None else f"{c['scale']:g}"
    used = (f"The Contrastive-DP arm uses lambda = {r['guidance_scale']:g}"
            + (" (the sweep's choice)." if r["guidance_scale_source"] == "sweep" else
               f" (given by --scale; the sweep's choice was {choice})."))
    return [
        "## Guidance-scale sweep",
        describe(),
        markdown_table(rows, header),
        f"Rule: {c['rule']}. Chosen: lambda = {choice}. {c['note']}".strip(),
        used + f" At its own step count the arm's images differ from the DDIM set's (same noise) by "
               f"{r['synthetic_difference']['mean_abs_diff_255'] / 255:.4f} on average in [0, 1] pixel units.",
        "![guidance sweep](sweep/sweep.png)\n\n![same noise across scales](sweep/sweep_images.png)",
    ]
