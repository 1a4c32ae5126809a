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
was made with; a rerun reuses every stage whose settings are unchanged (and redoes the rest).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import field, to_dict
from .sweep import (
    DEFAULT_SCALES,
    SweepConfig,
    describe,
    run_sweep,
    sweep_table,
    validate_scales,
)
from .utils import resolve_device, seed_everything, write_json

ARMS = ("real", "ddim", "contrastive-dp")


@dataclass
class PipelineConfig:
    data: str = field("digits", help="dataset: digits (built in), mnist, fashion-mnist, cifar10, gtsrb")
    data_dir: str | None = field(None, help="folder with the dataset files (not needed for digits)")
    real_limit: int | None = field(None, help="real training images allowed (they alone train the "
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
                          choices=("hnm", "hnm-easy", "infonce"))
    scale: float | None = field(None, help="guidance scale lambda of the Contrastive-DP arm (None: "
                                "the scale the guidance sweep chooses)")
    t_min: int | None = field(400, help="guide steps with t >= t_min (the authors' CIFAR window)")
    t_max: int | None = field(None, help="guide steps with t < t_max")
    group_size: int | None = field(None, help="contrastive group (None: min(512, batch))")
    head: bool = field(True, help="online embedding head on the classifier features")
    # 2b. guidance-scale sweep
    sweep_scales: tuple[float, ...] = field(DEFAULT_SCALES, help="guidance sweep: scales lambda "
                                            "(>= 0, 0 always added)")
    sweep_n: int = field(500, help="guidance sweep: images per scale")
    sweep_steps: int = field(20, help="guidance sweep: DDIM steps")
    sweep_tolerance: float = field(0.5, help="guidance sweep rule: the largest scale whose "
                                   "classifier-feature Frechet distance to the real test set is at "
                                   "most (1 + tolerance) x lambda 0's")
    # 5. robust training
    robust_model: str | None = field(None, help="robust classifier (default: the dataset's model)")
    robust_epochs: int = field(12, help="TRADES epochs of the synthetic arms (passes over the real "
                                        "data); the real-only arm gets as many steps")
    batch_size: int = field(128, help="TRADES batch size")
    robust_optimizer: str = field("adamw", help="TRADES optimiser. adamw by default here: on digits "
                                  "the TRADES small-cnn sat at chance for 150+ SGD steps on some "
                                  "seeds, too long for a CPU budget; sgd is the field's choice",
                                  choices=("sgd", "adamw"))
    lr: float | None = field(None, help="TRADES peak learning rate (None: the trainer's default)")
    synthetic_fraction: float = field(0.5, help="synthetic fraction of each batch in the synthetic arms")
    eps: float | None = field(None, help="Linf radius (None: the dataset's, except digits: 0.1 here, "
                                         "since at 0.3 an 8x8 small-cnn reaches 0 robust accuracy "
                                         "in a CPU budget)")
    attack_steps: int | None = field(None, help="TRADES attack steps (default: the dataset's)")
    eval_attack_steps: int = field(20, help="PGD steps of the final evaluation")
    embedding: str = field("pca", help="2-D embedding of the feature figure", choices=("pca", "tsne"))
    force: bool = field(False, help="recompute every stage")


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stage:
    """A cached stage folder.

    ``stage.json`` holds the key of the settings the stage depends on and whether it finished.
    ``fresh``: finished with these settings (reuse). Unfinished with the same key: the folder is
    kept so the stage can resume (sampling shards, TRADES train_state). Another key: the folder's
    contents are stale and are removed.
    """

    def __init__(self, root: Path, name: str, settings: dict, force: bool):
        self.dir, self.settings, self.key = root / name, settings, _key(settings)
        marker = self.dir / "stage.json"
        old = None
        if marker.is_file():
            try:
                old = json.loads(marker.read_text())
            except (json.JSONDecodeError, OSError):
                old = None
        same = isinstance(old, dict) and old.get("key") == self.key and not force
        self.fresh = same and old.get("done", True)
        self.resuming = same and not self.fresh
        if not same and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.fresh:
            write_json(marker, {"key": self.key, "done": False, "settings": settings})

    def done(self, **info) -> None:
        write_json(self.dir / "stage.json", {"key": self.key, "done": True, "settings": self.settings, **info})


# Settings that never change a stage's result: left out of the cache keys.
_UNKEYED = ("out", "checkpoint", "device", "bf16", "cuda_graphs")


def _keyed(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _UNKEYED}


def run(cfg: PipelineConfig) -> dict:
    from . import data as data_mod
    from . import models
    from .diffusion_train import TrainDiffusionConfig, load_diffusion, train_diffusion
    from .figures import accuracy_bars, embedding_scatter, markdown_table, sample_grids
    from .generate import GenerateConfig, generate
    from .pseudolabel import train_classifier
    from .trades import TrainRobustConfig, train_robust

    if cfg.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {cfg.seeds}")
    if not 0.0 < cfg.synthetic_fraction < 1.0:
        raise ValueError(f"--synthetic-fraction must be in (0, 1) (the real arm needs real images "
                         f"in every batch of the others), got {cfg.synthetic_fraction}")
    validate_scales(cfg.sweep_scales)  # the sweep's grid: refused before any stage runs
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    base = {"data": cfg.data, "data_dir": cfg.data_dir, "real_limit": cfg.real_limit, "seed": cfg.seed}
    data = data_mod.load_dataset(cfg.data, cfg.data_dir, real_limit=cfg.real_limit, seed=cfg.seed)
    defaults = data_mod.dataset_defaults(data.name)
    print(f"[pipeline] {data!r} on {device}")

    # 1. intermediate classifier ------------------------------------------------------------------
    t0 = time.perf_counter()
    clf_name = cfg.classifier or defaults["model"]
    st = _Stage(out, "classifier", {**base, "model": clf_name, "epochs": cfg.classifier_epochs}, cfg.force)
    if not st.fresh:
        print("[pipeline] 1/6 training the intermediate classifier")
        clf = train_classifier(data, clf_name, epochs=cfg.classifier_epochs, seed=cfg.seed, device=device)
        models.save(clf, st.dir, name=clf_name, data=data.name, role="intermediate classifier")
        st.done()
    clf = models.load(st.dir, device=device)
    with torch.no_grad():
        pred = _batched(lambda x: clf(x).argmax(1), data.x_test, device)
        clf_acc = float((pred == data.y_test).float().mean())
    timings["classifier"] = time.perf_counter() - t0
    print(f"[pipeline] intermediate classifier test accuracy {clf_acc:.3f}")

    # 2. diffusion model (real training subset only) -----------------------------------------------
    t0 = time.perf_counter()
    dcfg = TrainDiffusionConfig(data=cfg.data, data_dir=cfg.data_dir, real_limit=cfg.real_limit,
                                iters=cfg.diffusion_iters, preset=cfg.diffusion_preset,
                                out=str(out / "diffusion"), seed=cfg.seed, device=cfg.device)
    st = _Stage(out, "diffusion", {**base, **_keyed(to_dict(dcfg))}, cfg.force)
    if not st.fresh:
        print("[pipeline] 2/6 training the diffusion model on the real training subset")
        train_diffusion(dcfg, data=data)
        st.done()
    unet, schedule, meta = load_diffusion(st.dir, device=device)
    timings["diffusion"] = time.perf_counter() - t0

    # 2b. guidance-scale sweep: chooses the Contrastive-DP scale unless --scale is given ----------
    t0 = time.perf_counter()
    sweep_res = _sweep_stage(cfg, out, {**base, "diffusion": _key(_keyed(to_dict(dcfg))),
                                        "classifier": clf_name, "classifier_epochs": cfg.classifier_epochs},
                             unet=unet, schedule=schedule, meta=meta, clf=clf, data=data, device=device)
    scale = cfg.scale if cfg.scale is not None else sweep_res["guidance_scale"]
    timings["sweep"] = time.perf_counter() - t0

    # 3 + 4. synthetic sets from the same noise, pseudo-labelled ----------------------------------
    synth: dict[str, tuple] = {}
    gen_info: dict[str, dict] = {}
    for arm, guidance in (("ddim", "none"), ("contrastive-dp", cfg.guidance)):
        t0 = time.perf_counter()
        guided = guidance != "none"
        gcfg = GenerateConfig(checkpoint=str(out / "diffusion"), out=str(out / "synthetic" / arm),
                              n=cfg.n_synthetic, batch_size=cfg.sample_batch, steps=cfg.sample_steps,
                              guidance=guidance, seed=cfg.seed + 1000, device=cfg.device,
                              **(dict(scale=scale, t_min=cfg.t_min, t_max=cfg.t_max,
                                      group_size=cfg.group_size, head=cfg.head) if guided else {}))
        dep = {**base, "diffusion": _key(_keyed(to_dict(dcfg))), "classifier": clf_name,
               "classifier_epochs": cfg.classifier_epochs, **_keyed(to_dict(gcfg))}
        st = _Stage(out / "synthetic", arm, dep, cfg.force)
        if not st.fresh:
            print(f"[pipeline] 3/6 sampling {cfg.n_synthetic} images: {arm}")
            gen_info[arm] = generate(gcfg, model=unet, schedule=schedule, meta=meta,
                                     features_model=clf.features, labeler=clf)
            st.done(**gen_info[arm])
        else:
            gen_info[arm] = json.loads((st.dir / "summary.json").read_text())
        imgs, labels, extra = data_mod.load_synthetic(st.dir, like=data, with_extra=True)
        synth[arm] = (imgs, labels, extra.get("confidence"))
        timings[f"sample_{arm}"] = time.perf_counter() - t0

    # 5 + 6. TRADES per arm and seed, evaluated on the test split ---------------------------------
    per_arm: dict[str, list[dict]] = {a: [] for a in ARMS}
    for s in range(cfg.seeds):
        for arm in ARMS:
            t0 = time.perf_counter()
            eps = cfg.eps if cfg.eps is not None else (0.1 if data.name == "digits" else None)
            steps = cfg.attack_steps or defaults["attack_steps"]
            step_size = 2.5 * eps / steps if eps is not None else None
            rcfg = TrainRobustConfig(data=cfg.data, data_dir=cfg.data_dir, real_limit=cfg.real_limit,
                                     synthetic_fraction=cfg.synthetic_fraction, model=cfg.robust_model,
                                     epochs=_arm_epochs(cfg, arm), batch_size=cfg.batch_size, lr=cfg.lr,
                                     optimizer=cfg.robust_optimizer,
                                     eps=eps, step_size=step_size, attack_steps=cfg.attack_steps,
                                     eval_attack_steps=cfg.eval_attack_steps,
                                     out=str(out / "robust" / f"{arm}-seed{s}"), seed=cfg.seed + s,
                                     device=cfg.device)
            dep = {**base, **_keyed(to_dict(rcfg)), "arm": arm,
                   "synthetic": None if arm == "real" else json.loads(
                       (out / "synthetic" / arm / "stage.json").read_text())["key"]}
            st = _Stage(out / "robust", f"{arm}-seed{s}", dep, cfg.force)
            if not st.fresh:
                print(f"[pipeline] 5/6 TRADES on {arm} (seed {cfg.seed + s})")
                syn = None if arm == "real" else synth[arm][:2]
                # an interrupted run of the same stage continues from its last finished epoch
                rcfg.resume = st.resuming and (st.dir / "train_state.safetensors").is_file()
                res = train_robust(rcfg, data=data, synthetic=syn)
                st.done()
            else:
                res = json.loads((st.dir / "results.json").read_text())
            per_arm[arm].append(res)
            timings[f"robust_{arm}_seed{s}"] = time.perf_counter() - t0

    arms = {}
    for arm, rs in per_arm.items():
        c = np.array([r["clean_acc"] for r in rs])
        r_ = np.array([r["robust_acc"] for r in rs])
        arms[arm] = {"clean_acc": float(c.mean()), "robust_acc": float(r_.mean()),
                     "clean_acc_std": float(c.std()), "robust_acc_std": float(r_.std()),
                     "seeds": len(rs), "eps": rs[0]["eps"], "n_synthetic": rs[0]["n_synthetic"]}

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
    timings["total"] = time.perf_counter() - t_start
    results = {
        "arms": arms,
        "data": data.name, "n_real_train": int(data.x_train.shape[0]), "n_test": int(data.x_test.shape[0]),
        "intermediate_classifier_acc": clf_acc,
        "synthetic": {a: {**syn_stats[a], "images_per_s": gen_info[a].get("images_per_s")} for a in synth},
        **_sweep_results(sweep_res, scale, cfg.scale is None, synth),
        "per_seed": per_arm, "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "device": str(device), "figures": {k: str(v) for k, v in figs.items()},
        "config": to_dict(cfg),
    }
    write_json(out / "results.json", results)
    (out / "report.md").write_text(_report(cfg, results, markdown_table))
    print(f"[pipeline] done in {timings['total']:.0f}s: {out / 'report.md'}")
    return results


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
    from .data import to_float

    return torch.cat([fn(to_float(images_uint8[i:i + batch].to(device))).cpu()
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
            "label_entropy_normalised": round(label_entropy, 4),
            "mean_confidence": None if conf is None else round(float(torch.as_tensor(conf).float().mean()), 4),
            "label_counts": counts.long().tolist()}


def _report(cfg: PipelineConfig, r: dict, markdown_table) -> str:
    rows = []
    for arm, a in r["arms"].items():
        pm = (lambda k: f"{100 * a[k]:.2f} ± {100 * a[k + '_std']:.2f}") if a["seeds"] > 1 else \
            (lambda k: f"{100 * a[k]:.2f}")
        rows.append([arm, a["n_synthetic"], pm("clean_acc"), pm("robust_acc")])
    syn = [[a, s["n"], s["mean_pairwise_cosine"], s["label_entropy_normalised"], s["mean_confidence"],
            s["images_per_s"]] for a, s in r["synthetic"].items()]
    tim = [[k, v] for k, v in r["timings_s"].items()]
    eps = r["arms"]["real"]["eps"]
    return "\n\n".join([
        f"# cdp-fast pipeline: {r['data']}",
        f"Real training images: {r['n_real_train']}; test images: {r['n_test']}; device: {r['device']}; "
        f"seeds: {cfg.seeds}. Intermediate classifier test accuracy: {100 * r['intermediate_classifier_acc']:.2f}%.",
        "## Robust accuracy (TRADES, test split)",
        f"Linf eps = {eps:.4g}; robust = PGD-{cfg.eval_attack_steps} accuracy (%).",
        markdown_table(rows, ["arm", "synthetic images", "clean acc", "robust acc"]),
        "![accuracy](accuracy.png)",
        "## Synthetic sets",
        "Mean pairwise cosine of the classifier features (lower = more diverse), normalised entropy "
        "of the pseudo-label distribution, mean pseudo-label confidence, sampling throughput.",
        markdown_table(syn, ["set", "n", "mean cos", "label entropy", "confidence", "images/s"]),
        "![samples](samples.png)\n\n![embedding](embedding.png)",
        *_sweep_report(r, markdown_table),
        "## Settings",
        "```json\n" + json.dumps(r["config"], indent=2) + "\n```",
        "## Wall time (s)",
        markdown_table(tim, ["stage", "seconds"]),
    ]) + "\n"


# guidance-scale sweep stage (issue 13) -------------------------------------------------------------
def _sweep_stage(cfg: PipelineConfig, out: Path, dep: dict, *, unet, schedule, meta, clf, data,
                 device) -> dict:
    """Run (or reuse) the sweep in ``out/sweep`` with the Contrastive-DP arm's guidance settings."""
    scfg = SweepConfig(checkpoint=str(out / "diffusion"), classifier=str(out / "classifier"),
                       data=cfg.data, data_dir=cfg.data_dir, real_limit=cfg.real_limit,
                       out=str(out / "sweep"), scales=tuple(validate_scales(cfg.sweep_scales)),
                       guidance=cfg.guidance, features="classifier", head=cfg.head, n=cfg.sweep_n,
                       batch_size=min(cfg.sample_batch, cfg.sweep_n), steps=cfg.sweep_steps,
                       t_min=cfg.t_min, t_max=cfg.t_max, group_size=cfg.group_size,
                       tolerance=cfg.sweep_tolerance, seed=cfg.seed + 1000, device=cfg.device)
    # no paths in the key (the classifier checkpoint is keyed by dep's model name + epochs)
    key = {k: v for k, v in _keyed(to_dict(scfg)).items() if k not in ("classifier", "seed")}
    st = _Stage(out, "sweep", {**dep, **key, "sweep_seed": scfg.seed}, cfg.force)
    if st.fresh:
        return json.loads((st.dir / "sweep.json").read_text())
    print(f"[pipeline] 2b/6 guidance sweep: {len(scfg.scales)} scales x {scfg.n} images")
    res = run_sweep(scfg, model=unet, schedule=schedule, meta=meta, clf=clf, data=data, device=device)
    st.done(guidance_scale=res["guidance_scale"])
    return res


def _sweep_results(res: dict, scale: float, chosen: bool, synth: dict) -> dict:
    """results.json entries: the sweep rows, the arm's scale, and the arm's own pixel change."""
    keys = ("scale", "pixel_change", "separability", "probe_accuracy", "diversity", "fidelity",
            "confidence", "broken")
    ddim, cdp = synth["ddim"][0], synth["contrastive-dp"][0]
    return {"guidance_sweep": [{k: r.get(k) for k in keys} for r in res["guidance_sweep"]],
            "guidance_scale": scale,
            "guidance_scale_source": "sweep" if chosen else "--scale",
            "guidance_choice": res["choice"],
            "guidance_reference_real_train": res["reference_real_train"],
            # the arm at its own step count, same noise as DDIM
            "contrastive_dp_pixel_change_vs_ddim": float((cdp.float() - ddim.float()).abs().mean() / 255.0)}


def _sweep_report(r: dict, markdown_table) -> list[str]:
    res = {"guidance_sweep": r["guidance_sweep"], "guidance_scale": r["guidance_choice"]["scale"],
           "reference_real_train": r["guidance_reference_real_train"]}
    rows, header = sweep_table(res)
    c = r["guidance_choice"]
    used = (f"The Contrastive-DP arm uses lambda = {r['guidance_scale']:g}"
            + (" (the sweep's choice)." if r["guidance_scale_source"] == "sweep" else
               f" (given by --scale; the sweep's choice was {c['scale']:g})."))
    return [
        "## Guidance-scale sweep",
        describe(),
        markdown_table(rows, header),
        f"Rule: {c['rule']}. Chosen: lambda = {c['scale']:g}. {c['note']}".strip(),
        used + f" At its own step count the arm's images differ from the DDIM set's (same noise) by "
               f"{r['contrastive_dp_pixel_change_vs_ddim']:.4f} on average in [0, 1] pixel units.",
        "![guidance sweep](sweep/sweep.png)\n\n![same noise across scales](sweep/sweep_images.png)",
    ]
