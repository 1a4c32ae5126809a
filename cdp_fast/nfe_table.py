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
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import models
from .data import load_dataset, to_uint8
from .diffusion_train import load_diffusion
from .figures import _plt, _save, markdown_table
from .generate import GenerateConfig, make_guidance, make_sampler, model_info
from .solvers import nfe
from .sweep import _features_probs, set_metrics
from .utils import resolve_device, write_json

# the issue's grid: DDIM 100/50/20 (the authors' loop is DDIM 100), Heun 18/10, DPM-Solver++ 20/10
# ("dpm-solver++", N) uses diffusers' grid; "dpm-solver++/karras" the EDM grid (sigma_max 80)
CONFIGS = (("ddim", 100), ("ddim", 50), ("ddim", 20), ("heun", 18), ("heun", 10),
           ("dpm-solver++", 20), ("dpm-solver++", 10), ("dpm-solver++/karras", 20), ("dpm-solver++/karras", 10))


def run_table(diffusion: str, classifier: str, out: str, *, n: int = 500, batch_size: int = 500,
              scale: float | None = None, seed: int = 0, device: str = "cpu", data: str = "digits",
              configs=CONFIGS, guided=(False, True)) -> dict:
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
    rows = []
    for name, steps in configs:       # a config's unguided and guided runs together (partial results)
        plain = None                  # the config's unguided images: the guided row's pixel change
        for g_on in guided:
            base, _, grid = name.partition("/")
            cfg = GenerateConfig(checkpoint=diffusion, n=n, batch_size=batch_size, steps=steps, sampler=base,
                                 sigma_schedule=grid or None,
                                 guidance="hnm" if g_on else "none", scale=scale if g_on else None,
                                 seed=seed, device=str(dev))
            g = make_guidance(cfg, dev, clf.features, image_shape=shape) if g_on else None
            sampler = make_sampler(cfg, model, sch, meta, g)
            imgs, wall = [], 0.0
            for i in range(-(-n // batch_size)):
                t0 = time.perf_counter()
                x0 = sampler.sample(batch_size, shape, seed=seed + i, device=dev)
                wall += time.perf_counter() - t0
                imgs.append(to_uint8((x0.float().clamp(-1, 1) + 1) / 2).cpu())
            sampler.close()
            imgs = torch.cat(imgs)[:n]
            change = None if plain is None else float((imgs.float() - plain.float()).abs().mean() / 255.0)
            if not g_on:
                plain = imgs
            f, p = _features_probs(clf, imgs, dev)
            m = set_metrics(f, p, ref_f, seed=seed)
            row = {"sampler": name, "steps": steps, "nfe": nfe(base, steps), "guided": g_on,
                   "scale": float(g.scale) if g is not None else 0.0,
                   "guided_steps": sum(sampler.guided_steps()) if g is not None else 0,
                   "pixel_change": change,   # mean |guided - unguided| in [0, 1] units, same noise
                   "fid_features": m["fidelity"], **{k: m[k] for k in ("separability", "diversity", "confidence")},
                   "wall_s": round(wall, 2), "ms_per_image": round(1e3 * wall / (batch_size * len(range(-(-n // batch_size)))), 3)}
            rows.append(row)
            outp = Path(out)
            outp.mkdir(parents=True, exist_ok=True)
            write_json(outp / "nfe_table.partial.json", {"rows": rows})  # an interrupted run keeps its rows
            print(f"[nfe-table] {name:>13} {steps:>3} steps NFE {row['nfe']:>3} guided={g_on}: "
                  f"FD {row['fid_features']:.3f}, {row['ms_per_image']:.2f} ms/img", flush=True)
    res = {"rows": rows, "n": n, "batch_size": batch_size, "seed": seed, "device": str(dev),
           "threads": torch.get_num_threads(), "diffusion": diffusion, "classifier": classifier,
           "scale": scale, "data": data}
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    write_json(outp / "nfe_table.json", res)
    (outp / "nfe_table.partial.json").unlink(missing_ok=True)
    (outp / "nfe_table.md").write_text(table_markdown(res) + "\n")
    plot(res, outp / "nfe_table.png")
    return res


def table_markdown(res: dict) -> str:
    by = {(r["sampler"], r["steps"], r["guided"]): r for r in res["rows"]}
    body = []
    for (name, steps, g), r in by.items():
        if g:
            continue
        gr = by.get((name, steps, True))
        body.append([name, steps, r["nfe"], f"{r['fid_features']:.3f}",
                     "-" if gr is None else f"{gr['fid_features']:.3f}",
                     f"{r['ms_per_image']:.2f}", "-" if gr is None else f"{gr['ms_per_image']:.2f}"])
    return markdown_table(body, ["sampler", "steps", "NFE/img", "feature FD (none)", "feature FD (guided)",
                                 "ms/img (none)", "ms/img (guided)"])


def plot(res: dict, path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["sampler"] for r in res["rows"]):
        for g, ls in ((False, "-"), (True, "--")):
            pts = sorted((r["nfe"], r["fid_features"]) for r in res["rows"] if r["sampler"] == name and r["guided"] == g)
            if pts:
                ax.plot(*zip(*pts), ls, marker="o", label=f"{name}{' + CDP' if g else ''}")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel("classifier-feature Frechet distance")
    ax.set_xscale("log")
    ax.set_yscale("log")  # the failed rows would flatten the rest
    ax.legend(fontsize=7)
    ax.set_title(f"{res['data']}: quality vs NFE (n={res['n']})", fontsize=9)
    return _save(fig, path)


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
    a = ap.parse_args(argv)
    res = run_table(a.diffusion, a.classifier, a.out, n=a.n, batch_size=a.batch_size, scale=a.scale,
                    seed=a.seed, device=a.device, data=a.data)
    print(table_markdown(res))
    return res


if __name__ == "__main__":
    main()
