"""Quality vs network evaluations per image (issue 20 §4): every sampler on the same model and the
same initial noise, with and without contrastive guidance.

    python -m cdp_fast.nfe_table --diffusion runs/p/diffusion --classifier runs/p/classifier --out runs/nfe

Quality is the guidance sweep's classifier-feature Frechet distance to the real test set
(``cdp_fast.sweep.set_metrics``: "fidelity", lower is better; also its separability, diversity
and confidence; for a guided row, ``pixel_change``: its mean |difference| to the same sampler's
unguided images in [0, 1] units, the sweep's measure of how much the guidance changed them).
Guidance: Contrastive-DP as the pipeline's arm (HNM on the classifier features
through the online head, t >= 400 mapped to sigma for the continuous samplers, never the first
step) at the scale the pipeline's sweep chose (``<diffusion>/../sweep/sweep.json``) or
``--scale``. Wall time per image: the sampling call alone (no labelling or writing), on the
machine it ran on. Writes ``nfe_table.json``, ``nfe_table.md`` and ``nfe_table.png``.

``--downstream`` adds the pipeline's downstream measure: each row's images, pseudo-labelled by the
classifier (as the pipeline's synthetic arms), train TRADES as the pipeline's synthetic arms do
(real + synthetic, half of every batch synthetic, the dataset's TRADES settings, e.g. digits: eps
0.1, AdamW 3e-3, constant LR; ``--downstream-epochs`` passes over the real data), and a real-only
run gets the same optimiser steps (twice the epochs); each is evaluated with PGD-20 on the test
split (``clean_acc`` / ``robust_acc``). One training seed (``--seed``): the spread between seeds is
not measured here.

Every row's images, pseudo-labels and metrics are cached under ``<out>/cache`` (``--cache``; keyed
by the sampler, steps, scale, n, batch size, seed, data and the model paths) and every TRADES run
under ``<out>/downstream``: a rerun skips what is done (its wall times are the first run's) and an
interrupted TRADES run resumes from its last epoch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from . import models, trades
from .data import load_dataset, load_synthetic, save_synthetic, to_uint8
from .diffusion_train import load_diffusion
from .figures import _plt, _save, markdown_table
from .generate import GenerateConfig, make_guidance, make_sampler, model_info
from .pseudolabel import pseudo_label
from .solvers import nfe
from .sweep import _features_probs, set_metrics
from .utils import resolve_device, write_json

# the issue's grid: DDIM 100/50/20 (the authors' loop is DDIM 100), Heun 18/10, DPM-Solver++ 20/10
# ("dpm-solver++", N) uses diffusers' grid; "dpm-solver++/karras" the EDM grid (sigma_max 80)
CONFIGS = (("ddim", 100), ("ddim", 50), ("ddim", 20), ("heun", 18), ("heun", 10),
           ("dpm-solver++", 20), ("dpm-solver++", 10), ("dpm-solver++/karras", 20), ("dpm-solver++/karras", 10))


# the pipeline's synthetic arms: half of every batch synthetic, batch 128 (PipelineConfig's defaults)
SYNTHETIC_FRACTION = 0.5
BATCH_SIZE = 128
# TRADES epochs of a synthetic arm (passes over the real data; the real-only run gets twice as many):
# 5 = ~100 optimiser steps on digits (half the study's final budget), ~30 s a run with 1 thread on a
# loaded 2-core CPU (the real-only run reaches PGD-20 robust accuracy ~0.6 there)
DOWNSTREAM_EPOCHS = 5


def run_table(diffusion: str, classifier: str, out: str, *, n: int = 500, batch_size: int = 500,
              scale: float | None = None, seed: int = 0, device: str = "cpu", data: str = "digits",
              configs=CONFIGS, guided=(False, True), downstream: bool = False,
              downstream_epochs: int = DOWNSTREAM_EPOCHS, cache: str | None = None,
              real_limit: int | None = None, limit_test: int | None = None) -> dict:
    """The table (see the module docstring). ``real_limit`` / ``limit_test``: TRADES on a class-
    balanced subset of the real training images / evaluated on the first test images (tests)."""
    for ok, msg in ((n >= 1, f"--n must be >= 1, got {n}"),
                    (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
                    (downstream_epochs >= 1, f"--downstream-epochs must be >= 1, got {downstream_epochs}"),
                    (len(configs) >= 1, "--configs: no sampler given")):
        if not ok:
            raise ValueError(msg)
    dev = resolve_device(device)
    model, sch, meta = load_diffusion(diffusion, device=dev)
    meta = model_info(model, meta)
    clf = models.load(classifier, device=dev)
    real = load_dataset(data, seed=seed)
    ref_f, _ = _features_probs(clf, real.x_test, dev)
    if scale is None:
        sw = Path(diffusion).parent / "sweep" / "sweep.json"
        if sw.is_file():
            scale = float(json.loads(sw.read_text())["guidance_scale"])
    shape = tuple(meta["image_shape"])
    outp = Path(out)
    cache_dir = Path(cache) if cache is not None else outp / "cache"
    ident = hashlib.sha256(json.dumps([n, batch_size, seed, data, str(Path(diffusion).resolve()),
                                       str(Path(classifier).resolve())]).encode()).hexdigest()[:10]
    rows = []
    real_row = None
    # the real-only arm's epochs: the same optimiser steps (pipeline._arm_epochs' rule)
    real_epochs = max(1, round(downstream_epochs / (1.0 - SYNTHETIC_FRACTION)))
    if downstream:  # the real-only arm first: the baseline every synthetic row is read against
        real_row = {"sampler": "real only", "steps": 0, "nfe": 0, "guided": False,
                    **_downstream(outp, f"real-{ident}", real, None, real_epochs, seed, dev,
                                  real_limit, limit_test, data)}
        _write_partial(outp, rows, real_row)
    for name, steps in configs:       # a config's unguided and guided runs together (partial results)
        plain = None                  # the config's unguided images: the guided row's pixel change
        for g_on in guided:
            base, _, grid = name.partition("/")
            key = f"{name.replace('/', '-')}-{steps}-{f'cdp{scale:g}' if g_on else 'none'}-{ident}"
            hit = _cached_row(cache_dir, key)
            if hit is not None:
                row, imgs, labels = hit
                print(f"[nfe-table] {name:>13} {steps:>3} steps guided={g_on}: cached ({cache_dir / key}.*)", flush=True)
            else:
                row, imgs, labels = _sample_row(diffusion, name, base, grid, steps, g_on, scale, n, batch_size,
                                                seed, dev, model, sch, meta, clf, shape, ref_f, plain)
                cache_dir.mkdir(parents=True, exist_ok=True)
                save_synthetic(cache_dir / f"{key}.npz", imgs, labels)
                write_json(cache_dir / f"{key}.json", row)
                print(f"[nfe-table] {name:>13} {steps:>3} steps NFE {row['nfe']:>3} guided={g_on}: "
                      f"FD {row['fid_features']:.3f}, {row['ms_per_image']:.2f} ms/img", flush=True)
            if not g_on:
                plain = imgs
            if downstream:
                row = {**row, **_downstream(outp, key, real, cache_dir / f"{key}.npz",
                                            downstream_epochs, seed, dev, real_limit, limit_test, data)}
            rows.append(row)
            _write_partial(outp, rows, real_row)  # an interrupted run keeps its rows
    res = {"rows": rows, "n": n, "batch_size": batch_size, "seed": seed, "device": str(dev),
           "threads": torch.get_num_threads(), "diffusion": diffusion, "classifier": classifier,
           "scale": scale, "data": data}
    if downstream:
        res["real_only"] = real_row
        res["downstream"] = {"epochs_synthetic_arms": downstream_epochs, "epochs_real_only": real_epochs,
                             "synthetic_fraction": SYNTHETIC_FRACTION, "batch_size": BATCH_SIZE,
                             "training_seeds": 1, "eval": "PGD-20 on the test split",
                             "n_test": real_row["n_test"]}
    outp.mkdir(parents=True, exist_ok=True)
    write_json(outp / "nfe_table.json", res)
    (outp / "nfe_table.partial.json").unlink(missing_ok=True)
    (outp / "nfe_table.md").write_text(table_markdown(res) + "\n")
    plot(res, outp / "nfe_table.png")
    return res


def _write_partial(outp: Path, rows: list, real_row: dict | None) -> None:
    outp.mkdir(parents=True, exist_ok=True)
    write_json(outp / "nfe_table.partial.json", {"rows": rows, "real_only": real_row})


def _cached_row(cache_dir: Path, key: str):
    """(row, images, pseudo-labels) of an earlier run with the same settings, or None."""
    j, z = cache_dir / f"{key}.json", cache_dir / f"{key}.npz"
    if not (j.is_file() and z.is_file()):
        return None
    imgs, labels = load_synthetic(z)
    return json.loads(j.read_text()), imgs, labels


def _sample_row(diffusion, name, base, grid, steps, g_on, scale, n, batch_size, seed, dev, model, sch, meta,
                clf, shape, ref_f, plain):
    cfg = GenerateConfig(checkpoint=diffusion, n=n, batch_size=batch_size, steps=steps, sampler=base,
                         sigma_schedule=grid or None,
                         guidance="hnm" if g_on else "none", scale=scale if g_on else None,
                         seed=seed, device=str(dev))
    g = make_guidance(cfg, dev, clf.features, image_shape=shape) if g_on else None
    sampler = make_sampler(cfg, model, sch, meta, g)
    imgs, wall = [], 0.0
    n_batches = -(-n // batch_size)
    for i in range(n_batches):
        t0 = time.perf_counter()
        x0 = sampler.sample(batch_size, shape, seed=seed + i, device=dev)
        wall += time.perf_counter() - t0
        imgs.append(to_uint8((x0.float().clamp(-1, 1) + 1) / 2).cpu())
    sampler.close()
    imgs = torch.cat(imgs)[:n]
    change = None if plain is None else float((imgs.float() - plain.float()).abs().mean() / 255.0)
    f, p = _features_probs(clf, imgs, dev)
    m = set_metrics(f, p, ref_f, seed=seed)
    labels, _ = pseudo_label(clf, imgs, device=dev)   # as the pipeline's synthetic arms (generate)
    row = {"sampler": name, "steps": steps, "nfe": nfe(base, steps), "guided": g_on,
           "scale": float(g.scale) if g is not None else 0.0,
           "guided_steps": sum(sampler.guided_steps()) if g is not None else 0,
           "pixel_change": change,   # mean |guided - unguided| in [0, 1] units, same noise
           "fid_features": m["fidelity"], **{k: m[k] for k in ("separability", "diversity", "confidence")},
           "wall_s": round(wall, 2), "ms_per_image": round(1e3 * wall / (batch_size * n_batches), 3)}
    return row, imgs, labels


def _downstream(outp: Path, key: str, real, synthetic, epochs: int, seed: int, dev, real_limit, limit_test,
                data: str) -> dict:
    """TRADES as the pipeline's arms (its TrainRobustConfig: the dataset's settings, batch 128, half of
    every batch synthetic), PGD-20 on the test split; a finished run is read back, an interrupted one
    resumed."""
    d = outp / "downstream" / (f"{key}-e{epochs}" + ("" if real_limit is None else f"-r{real_limit}")
                               + ("" if limit_test is None else f"-t{limit_test}"))
    res_p = d / "results.json"
    res = json.loads(res_p.read_text()) if res_p.is_file() else {}
    if "robust_acc" not in res:
        t0 = time.perf_counter()
        cfg = trades.TrainRobustConfig(data=data, real_limit=real_limit, synthetic=None if synthetic is None else str(synthetic),
                                       synthetic_fraction=SYNTHETIC_FRACTION, epochs=epochs, batch_size=BATCH_SIZE,
                                       eval_attack_steps=20, limit_test=limit_test, out=str(d), seed=seed,
                                       device=str(dev), resume=(d / trades.STATE_FILE).is_file())
        res = trades.train_robust(cfg, data=real, show_progress=False)
        print(f"[nfe-table] TRADES {key} ({epochs} epochs): clean {res['clean_acc']:.3f} robust "
              f"{res['robust_acc']:.3f} in {time.perf_counter() - t0:.0f}s", flush=True)
    return {"clean_acc": res["clean_acc"], "robust_acc": res["robust_acc"], "n_test": res["n_test"],
            "trades_epochs": epochs, "trades_seconds": round(res["train_seconds"], 1)}


def _acc(r: dict | None, k: str) -> str:
    return "-" if r is None or k not in r else f"{r[k]:.3f}"


def table_markdown(res: dict) -> str:
    by = {(r["sampler"], r["steps"], r["guided"]): r for r in res["rows"]}
    down = res.get("real_only") is not None
    body = []
    for (name, steps, g), r in by.items():
        if g:
            continue
        gr = by.get((name, steps, True))
        line = [name, steps, r["nfe"], f"{r['fid_features']:.3f}",
                "-" if gr is None else f"{gr['fid_features']:.3f}",
                f"{r['ms_per_image']:.2f}", "-" if gr is None else f"{gr['ms_per_image']:.2f}"]
        if down:
            line += [_acc(r, "clean_acc"), _acc(gr, "clean_acc"), _acc(r, "robust_acc"), _acc(gr, "robust_acc")]
        body.append(line)
    head = ["sampler", "steps", "NFE/img", "feature FD (none)", "feature FD (guided)",
            "ms/img (none)", "ms/img (guided)"]
    if down:
        ro = res["real_only"]
        body.append(["real only (no synthetic)", "-", "-", "-", "-", "-", "-", _acc(ro, "clean_acc"), "-",
                     _acc(ro, "robust_acc"), "-"])
        head += ["clean acc (none)", "clean acc (guided)", "robust acc (none)", "robust acc (guided)"]
    return markdown_table(body, head)


def plot(res: dict, path) -> Path:
    plt = _plt()
    down = res.get("real_only") is not None
    fig, axes = plt.subplots(1, 2 if down else 1, figsize=(11 if down else 6, 4), squeeze=False)
    for j, (key, label) in enumerate([("fid_features", "classifier-feature Frechet distance")]
                                     + ([("robust_acc", "robust accuracy (PGD-20, test)")] if down else [])):
        ax = axes[0, j]
        for name in dict.fromkeys(r["sampler"] for r in res["rows"]):
            for g, ls in ((False, "-"), (True, "--")):
                pts = sorted((r["nfe"], r[key]) for r in res["rows"] if r["sampler"] == name and r["guided"] == g)
                if pts:
                    ax.plot(*zip(*pts), ls, marker="o", label=f"{name}{' + CDP' if g else ''}")
        if key == "robust_acc":
            ref = ax.axhline(res["real_only"]["robust_acc"], color="k", lw=1, ls=":", label="real only")
            ax.set_title(f"TRADES, {res['downstream']['epochs_synthetic_arms']} epochs, one seed, "
                         f"n_test={res['downstream']['n_test']}", fontsize=9)
        else:
            ax.set_yscale("log")  # the failed rows would flatten the rest
            ax.set_title(f"{res['data']}: quality vs NFE (n={res['n']})", fontsize=9)
        ax.set_xlabel("network evaluations per image (NFE)")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        # the samplers' legend once (same colours in both panels), the baseline's beside its line
        ax.legend(**({"handles": [ref]} if key == "robust_acc" else {}), fontsize=7)
    return _save(fig, path)


def _configs(text: str):
    """"ddim:100,heun:18,dpm-solver++/karras:10" -> (("ddim", 100), ...)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, steps = part.rpartition(":")
        if not sep or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(f"--configs: {part!r} is not SAMPLER:STEPS (e.g. ddim:100)")
        out.append((name, int(steps)))
    return tuple(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cdp_fast.nfe_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--diffusion", default="runs/pipeline/diffusion")
    ap.add_argument("--classifier", default="runs/pipeline/classifier")
    ap.add_argument("--out", default="runs/nfe-table")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--configs", type=_configs, default=CONFIGS,
                    help="SAMPLER:STEPS,... (default: the issue's grid, " + ",".join(f"{a}:{b}" for a, b in CONFIGS) + ")")
    ap.add_argument("--downstream", action="store_true",
                    help="also train TRADES on each row's pseudo-labelled images, plus a real-only run, and "
                         "report PGD-20 clean / robust test accuracy (one seed)")
    ap.add_argument("--downstream-epochs", type=int, default=DOWNSTREAM_EPOCHS,
                    help="TRADES epochs of the synthetic runs (passes over the real data); the real-only run "
                         f"gets twice as many, i.e. the same optimiser steps (default {DOWNSTREAM_EPOCHS})")
    ap.add_argument("--cache", default=None, help="folder of the rows' cached images and metrics (default <out>/cache)")
    a = ap.parse_args(argv)
    res = run_table(a.diffusion, a.classifier, a.out, n=a.n, batch_size=a.batch_size, scale=a.scale,
                    seed=a.seed, device=a.device, data=a.data, configs=a.configs, downstream=a.downstream,
                    downstream_epochs=a.downstream_epochs, cache=a.cache)
    print(table_markdown(res))
    return res


if __name__ == "__main__":
    main()
