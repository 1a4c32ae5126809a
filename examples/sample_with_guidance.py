"""Contrastive-DP sampling with the Python API, from the outputs of `cdp-fast pipeline`.

    cdp-fast pipeline --out runs/pipeline
    python examples/sample_with_guidance.py --run runs/pipeline --n 100 --out runs/example

Loads the run's diffusion model (``load_diffusion``: UNet, noise schedule, image shape) and its
intermediate classifier (``cdp_fast.models.load``), guides DDIM with the HNM contrastive loss on
the classifier's penultimate features (the pipeline's settings: guided steps t >= 400, online
embedding head; the scale is the run's own choice from its guidance-scale sweep, or the default for
this feature space), pseudo-labels the images with the same classifier and writes
``samples.png`` and ``samples.npz`` (uint8 images, labels, confidences) to ``--out``.

The sampler returns x0 in the diffusion model's space, [-1, 1]; ``(x0.clamp(-1, 1) + 1) / 2`` gives
images in [0, 1], which is what the classifiers take. The scale must fit the loss, the feature space
and the contrastive group: HNM's gradient grows with the group, so the pipeline's scale (chosen at
its group of 500) is rescaled to this run's group (``guidance.default_scale`` does the same).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cdp_fast import ContrastiveGuidance, DDIMSampler, models
from cdp_fast.data import save_synthetic, to_uint8
from cdp_fast.diffusion_train import load_diffusion
from cdp_fast.figures import sample_grids
from cdp_fast.guidance import default_group_size, default_scale


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/pipeline", help="a finished `cdp-fast pipeline` output folder")
    p.add_argument("--n", type=int, default=100, help="images to sample")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--scale", type=float, default=None, help="guidance scale lambda (default: the run's "
                   "sweep choice rescaled to this group size, else guidance.default_scale)")
    p.add_argument("--t-min", type=int, default=400, help="guide only steps with t >= t_min")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--out", default="runs/example", help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    run, out = Path(args.run), Path(args.out)
    unet, schedule, meta = load_diffusion(run / "diffusion", device=args.device)
    classifier = models.load(run / "classifier", device=args.device)
    scale = args.scale if args.scale is not None else _default_scale(run, args.n)
    guide = ContrastiveGuidance("hnm", features=classifier.features, head=True, scale=scale,
                                t_min=args.t_min)
    sampler = DDIMSampler(unet, schedule, steps=args.steps, guidance=guide)
    x0 = sampler.sample(args.n, tuple(meta["image_shape"]), seed=args.seed, device=args.device)
    images = (x0.float().clamp(-1, 1) + 1) / 2  # model space [-1, 1] -> pixels [0, 1]
    with torch.no_grad():
        probs = classifier(images).float().softmax(1)
    conf, labels = probs.max(1)

    out.mkdir(parents=True, exist_ok=True)
    u8 = to_uint8(images).cpu()
    save_synthetic(out / "samples.npz", u8, labels.cpu(), confidence=conf.cpu().numpy())
    sample_grids({f"Contrastive-DP (HNM, scale {scale:g})": u8[:100].numpy()}, out / "samples.png")
    summary = {"n": args.n, "scale": scale, "x0_min": float(x0.min()), "x0_max": float(x0.max()),
               "label_counts": torch.bincount(labels.cpu(), minlength=int(meta.get("num_classes") or 10)).tolist(),
               "mean_confidence": float(conf.mean()), "out": str(out)}
    print(f"{args.n} images -> {out / 'samples.png'}, {out / 'samples.npz'}; x0 range "
          f"[{summary['x0_min']:.2f}, {summary['x0_max']:.2f}] (model space), labels {summary['label_counts']}")
    return summary


def _default_scale(run: Path, n: int) -> float:
    """The pipeline's chosen HNM scale (made at its sampling group) rescaled to this run's group."""
    G = default_group_size(n)
    try:
        r = json.loads((run / "results.json").read_text())
        cfg = r["config"]
        lam = float(r["guidance_scale"])
        G_run = int(cfg.get("group_size") or default_group_size(int(cfg["sample_batch"])))
        if cfg.get("guidance") == "hnm":
            return lam * G / G_run
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        pass
    return default_scale("hnm", "head", group_size=G)


if __name__ == "__main__":
    main()
