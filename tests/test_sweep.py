"""The guidance-scale sweep: metrics on data with known answers, the choice rule, bad input,
the command end to end at a tiny size, and the pipeline's cached sweep stage."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cdp_fast import sweep

PNG = b"\x89PNG\r\n\x1a\n"


def _blobs(n, d, delta, sigma, seed=0):
    """Two equal classes: N(0, s^2 I) and N(delta e_1, s^2 I) in d dimensions."""
    g = torch.Generator().manual_seed(seed)
    x = sigma * torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    y = torch.arange(2 * n) % 2
    x[y == 1, 0] += delta
    return x, y


def test_fisher_ratio_two_blobs_closed_form():
    d, delta, sigma = 4, 3.0, 1.5
    x, y = _blobs(20000, d, delta, sigma)
    # tr(S_B) = delta^2 / 4, tr(S_W) = d sigma^2
    assert sweep.fisher_ratio(x, y) == pytest.approx(delta ** 2 / (4 * d * sigma ** 2), rel=0.03)
    # identical classes: nothing between them
    x0, y0 = _blobs(20000, d, 0.0, sigma)
    assert sweep.fisher_ratio(x0, y0) < 1e-3


def test_within_class_spread_is_exact_rms_pairwise_distance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 12 + [1] * 18)
    want = 0.0
    for c, n in ((0, 12), (1, 18)):
        xc = x[y == c]
        d2 = torch.cdist(xc, xc).square()
        want += n * math.sqrt(float(d2.sum() / (n * (n - 1))))  # mean over i != j
    assert sweep.within_class_spread(x, y) == pytest.approx(want / 30, rel=1e-10)
    # Gaussian blobs: E|x_i - x_j|^2 = 2 d sigma^2
    xb, yb = _blobs(20000, 3, 5.0, 0.7)
    assert sweep.within_class_spread(xb, yb) == pytest.approx(math.sqrt(2 * 3 * 0.7 ** 2), rel=0.02)


def test_probe_accuracy_matches_bayes_accuracy():
    # equal isotropic classes delta apart: the Bayes (and LDA) accuracy is Phi(delta / (2 sigma))
    delta, sigma = 2.0, 1.0
    x, y = _blobs(4000, 3, delta, sigma)
    bayes = 0.5 * (1 + math.erf(delta / (2 * sigma) / math.sqrt(2)))
    assert sweep.probe_accuracy(x, y) == pytest.approx(bayes, abs=0.02)
    far, yf = _blobs(500, 3, 40.0, 1.0)
    assert sweep.probe_accuracy(far, yf) == 1.0
    same, ys = _blobs(4000, 3, 0.0, 1.0)
    assert abs(sweep.probe_accuracy(same, ys) - 0.5) < 0.04


def test_frechet_distance_closed_form():
    d = 6
    mu1, mu2 = torch.zeros(d), torch.full((d,), 0.5)
    a, b = 1.0, 2.0
    # N(mu1, a^2 I) vs N(mu2, b^2 I): |mu1 - mu2|^2 + d (a - b)^2
    exact = sweep.frechet_from_stats(mu1, a ** 2 * torch.eye(d), mu2, b ** 2 * torch.eye(d))
    assert exact == pytest.approx(d * 0.25 + d * (a - b) ** 2, rel=1e-9)
    # non-commuting covariances against scipy's sqrtm
    scipy = pytest.importorskip("scipy.linalg")
    g = np.random.default_rng(0)
    A, B = g.normal(size=(d, d)), g.normal(size=(d, d))
    c1, c2 = A @ A.T, B @ B.T
    want = np.trace(c1 + c2 - 2 * scipy.sqrtm(c1 @ c2).real)
    assert sweep.frechet_from_stats(np.zeros(d), c1, np.zeros(d), c2) == pytest.approx(want, rel=1e-6)
    # from samples
    x1 = torch.randn(20000, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * a
    x2 = torch.randn(20000, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * b + 0.5
    assert sweep.frechet_distance(x1, x2) == pytest.approx(d * 0.25 + d * (a - b) ** 2, rel=0.05)
    assert sweep.frechet_distance(x1, x1) == pytest.approx(0.0, abs=1e-6)


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="empty"):
        sweep.validate_scales([])
    with pytest.raises(ValueError, match=">= 0"):
        sweep.validate_scales([0, 1e3, -5.0])
    with pytest.raises(ValueError, match="finite"):
        sweep.validate_scales([0, float("nan")])
    with pytest.raises(ValueError, match="no positive"):
        sweep.validate_scales([0.0])
    assert sweep.validate_scales([1e4, 10, 10]) == [0.0, 10.0, 1e4]  # 0 added, sorted, unique


def _row(scale, change, fid, broken=False):
    return {"scale": scale, "pixel_change": change, "fidelity": fid, "broken": broken}


def test_choose_scale_rule():
    rows = [_row(0, 0.0, 10.0), _row(1e3, 0.005, 10.5), _row(1e4, 0.02, 14.0), _row(1e5, 0.1, 40.0),
            _row(1e6, None, None, broken=True)]
    c = sweep.choose_scale(rows, tolerance=0.5, min_change=0.01)
    assert c["scale"] == 1e4 and c["visible"] and c["note"] == ""
    # tighter limit: the visible scale is excluded, and the report must say the change is invisible
    c = sweep.choose_scale(rows, tolerance=0.1, min_change=0.01)
    assert c["scale"] == 1e3 and not c["visible"] and "only" in c["note"]
    # nothing within the limit: the smallest positive scale, said plainly
    c = sweep.choose_scale([_row(0, 0.0, 10.0), _row(1e3, 0.2, 50.0)], tolerance=0.1)
    assert c["scale"] == 1e3 and "No positive scale" in c["note"]
    # a classifier that measures nothing: no choice at all, and the note says why
    c = sweep.choose_scale(rows, tolerance=0.5, degenerate="the intermediate classifier is at chance")
    assert c["scale"] is None and "No scale chosen: the intermediate classifier is at chance" in c["note"]


def test_classifier_degenerate():
    y = torch.arange(200) % 10
    # the issue: every pseudo-label class 0 (10% accuracy)
    assert "at chance" in sweep.classifier_degenerate(torch.zeros(200), y, 10)
    one = torch.full((200,), 3)
    one[:15] = y[:15]  # accuracy 0.165 (above chance), 187 of 200 labels 3
    assert "94% of 200 real test images as class 3" in sweep.classifier_degenerate(one, y, 10)
    weak = y.clone()
    weak[:140] = (y[:140] + 1) % 10  # 30% accuracy, labels spread: weak but informative
    assert sweep.classifier_degenerate(weak, y, 10) is None
    assert sweep.at_chance(0.14, 10) and not sweep.at_chance(0.15, 10)
    assert sweep.at_chance(0.06, 43) and not sweep.at_chance(0.08, 43)


# ---------------------------------------------------------------------------------------------
# defaults that work in every feature space
def _gmm_model(C, H, K):
    from cdp_fast.gmm import GaussianMixtureEps
    from cdp_fast.schedules import NoiseSchedule

    sch = NoiseSchedule.cosine()
    means = torch.rand(K, C * H * H, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    meta = {"image_shape": [C, H, H], "class_conditional": True, "num_classes": K}
    return GaussianMixtureEps(means, 0.3, torch.ones(K), sch), sch, meta


@pytest.mark.parametrize("dataset", ["digits", "mnist", "fashion-mnist", "cifar10", "gtsrb"])
def test_default_pixel_space_scale_runs_and_changes_images(dataset, tmp_path):
    """`generate --guidance X` with the default (pixel) space and scale, at every built-in data
    set's image shape, with an exact Gaussian-mixture eps model standing in for the UNet."""
    from cdp_fast.data import dataset_defaults, load_synthetic
    from cdp_fast.generate import GenerateConfig, generate

    d = dataset_defaults(dataset)
    model, sch, meta = _gmm_model(d["channels"], d["size"], d["num_classes"])
    sets = {}
    for loss in ("none", "hnm", "hnm-easy", "infonce"):
        cfg = GenerateConfig(out=str(tmp_path / loss), n=16, batch_size=16, steps=12, guidance=loss,
                             device="cpu")
        assert cfg.scale is None and cfg.features == "identity"  # the defaults under test
        generate(cfg, model=model, schedule=sch, meta=meta)  # raises on NaN/inf
        sets[loss] = load_synthetic(tmp_path / loss)[0].float() / 255
    for loss in ("hnm", "hnm-easy", "infonce"):
        change = float((sets[loss] - sets["none"]).abs().mean())
        assert change >= 0.005, f"{dataset} {loss}: the default guidance changes the images by only {change:.4f}"
        assert change <= 0.2, f"{dataset} {loss}: the default guidance wrecks the images ({change:.3f})"


# ---------------------------------------------------------------------------------------------
# the command and the pipeline stage
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from cdp_fast import models
    from cdp_fast.data import load_dataset
    from cdp_fast.diffusion_train import TrainDiffusionConfig, train_diffusion
    from cdp_fast.pseudolabel import train_classifier

    root = tmp_path_factory.mktemp("sweep")
    data = load_dataset("digits", real_limit=100)
    train_diffusion(TrainDiffusionConfig(data="digits", real_limit=100, iters=3, batch_size=16,
                                         out=str(root / "diffusion"), device="cpu"), data=data)
    # 20 epochs: at 2 this classifier labelled every test image 3 (chance), and the sweep now refuses it
    clf = train_classifier(data, "small-cnn", epochs=20, seed=0, device="cpu", show_progress=False)
    models.save(clf, root / "classifier", name="small-cnn", data="digits", role="test")
    return root


def test_sweep_command_end_to_end(checkpoints, tmp_path):
    from cdp_fast.cli import main as cli_main

    out = tmp_path / "s"
    assert cli_main(["sweep", "--checkpoint", str(checkpoints / "diffusion"), "--classifier",
                     str(checkpoints / "classifier"), "--real-limit", "100", "--out", str(out),
                     "--scales", "1e3", "1e5", "1e12", "--n", "24", "--batch-size", "12", "--steps", "6",
                     "--device", "cpu"]) == 0
    r = json.loads((out / "sweep.json").read_text())
    rows = r["guidance_sweep"]
    assert [row["scale"] for row in rows] == [0.0, 1e3, 1e5, 1e12]
    assert rows[0]["pixel_change"] == 0.0
    for row in rows:
        if not row["broken"]:
            for k in sweep.METRICS:
                assert math.isfinite(row[k]), (row["scale"], k)
            assert 0 < row["confidence"] <= 1 and row["fidelity"] >= 0
    assert rows[2]["pixel_change"] > rows[1]["pixel_change"] >= 0  # more guidance, more change
    assert r["guidance_scale"] in [row["scale"] for row in rows if row["scale"] > 0 and not row["broken"]]
    for name in ("sweep.png", "sweep_images.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_sweep_refuses_to_overwrite_without_force(checkpoints, tmp_path, capsys):
    from cdp_fast.cli import main as cli_main

    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text("{}")  # an earlier sweep's result
    args = ["sweep", "--checkpoint", str(checkpoints / "diffusion"), "--classifier", str(checkpoints / "classifier"),
            "--real-limit", "100", "--out", str(out), "--scales", "1e3", "--n", "8", "--batch-size", "8",
            "--steps", "3", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"] and (out / "sweep.json").read_text() == "{}"
    assert cli_main([*args, "--force"]) == 0
    assert json.loads((out / "sweep.json").read_text())["n"] == 8


def test_sweep_with_a_chance_classifier_chooses_nothing(checkpoints, tmp_path, capsys):
    """The issue: a classifier at chance (every pseudo-label one class) and the sweep still "chose"."""
    from cdp_fast import models
    from cdp_fast.cli import main as cli_main

    torch.manual_seed(0)
    dead = models.build("small-cnn", num_classes=10, in_channels=1, image_size=8)  # zero head: all class 0
    models.save(dead, tmp_path / "dead", name="small-cnn", data="digits", role="test")
    out = tmp_path / "s"
    assert cli_main(["sweep", "--checkpoint", str(checkpoints / "diffusion"), "--classifier", str(tmp_path / "dead"),
                     "--real-limit", "100", "--out", str(out), "--scales", "1e3", "--n", "8", "--batch-size", "8",
                     "--steps", "3", "--device", "cpu"]) == 0
    r = json.loads((out / "sweep.json").read_text())
    assert r["guidance_scale"] is None and r["choice"]["scale"] is None
    assert "at chance" in r["choice"]["refused"]
    err = capsys.readouterr().err
    assert "WARNING" in err and "no scale chosen" in err


def test_sweep_bad_input(checkpoints, tmp_path, capsys):
    from cdp_fast.cli import main as cli_main

    base = ["sweep", "--checkpoint", str(checkpoints / "diffusion"), "--classifier",
            str(checkpoints / "classifier"), "--out", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as e:
        cli_main([*base, "--scales", "0", "-5"])
    assert e.value.code == 2 and ">= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty"):
        sweep.run(sweep.SweepConfig(scales=(), out=str(tmp_path / "e")))
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()  # refused before any work


def test_pipeline_sweep_stage_cache(tmp_path, monkeypatch):
    """A rerun reuses the sweep stage; a changed grid recomputes it; its choice feeds the arm."""
    import dataclasses

    from cdp_fast import models, pipeline
    from cdp_fast.data import load_dataset

    data = load_dataset("digits", real_limit=100)
    model, sch, meta = _gmm_model(1, 8, 10)
    torch.manual_seed(0)
    clf = models.build("small-cnn", num_classes=10, in_channels=1, image_size=8).eval()
    cfg = pipeline.PipelineConfig(out=str(tmp_path), sweep_scales=(0.0, 1e3, 1e5), sweep_n=16,
                                  sweep_steps=6, sample_batch=16)
    kw = {"unet": model, "schedule": sch, "meta": meta, "clf": clf, "data": data, "device": torch.device("cpu")}
    first = pipeline._sweep_stage(cfg, tmp_path, {"up": 1}, **kw)
    calls = []
    real = pipeline.run_sweep
    monkeypatch.setattr(pipeline, "run_sweep", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = pipeline._sweep_stage(cfg, tmp_path, {"up": 1}, **kw)
    assert calls == [] and again["guidance_sweep"] == json.loads(json.dumps(first["guidance_sweep"]))
    pipeline._sweep_stage(dataclasses.replace(cfg, sweep_scales=(0.0, 1e3)), tmp_path, {"up": 1}, **kw)
    assert calls == [1], "a changed grid must recompute the sweep"
    pipeline._sweep_stage(dataclasses.replace(cfg, sweep_scales=(0.0, 1e3)), tmp_path, {"up": 2}, **kw)
    assert calls == [1, 1], "a changed upstream stage must recompute the sweep"
    with pytest.raises(ValueError, match=">= 0"):
        pipeline._sweep_stage(dataclasses.replace(cfg, sweep_scales=(-1.0,)), tmp_path, {"up": 1}, **kw)


def test_issue_repro_default_generate_in_every_digits_space(checkpoints, tmp_path):
    """train-diffusion --class-conditional, then generate --guidance X with the default scale: in
    pixel space (the default), on the classifier's features, and through the online head."""
    from cdp_fast.cli import main as cli_main
    from cdp_fast.data import load_synthetic

    ckpt = tmp_path / "d"
    assert cli_main(["train-diffusion", "--data", "digits", "--class-conditional", "--real-limit", "100",
                     "--iters", "3", "--batch-size", "16", "--out", str(ckpt), "--device", "cpu"]) == 0
    base = ["generate", "--checkpoint", str(ckpt), "--steps", "20", "--n", "16", "--batch-size", "16",
            "--device", "cpu"]
    assert cli_main([*base, "--out", str(tmp_path / "none")]) == 0
    ref = load_synthetic(tmp_path / "none")[0].float() / 255
    clf = str(checkpoints / "classifier")
    for loss in ("hnm", "hnm-easy", "infonce"):
        for space in ([], ["--features", clf, "--no-head"], ["--features", clf, "--head"]):
            out = tmp_path / f"{loss}{len(space)}{space[-1] if space else ''}"
            assert cli_main([*base, "--guidance", loss, *space, "--out", str(out)]) == 0, (loss, space)
            change = float((load_synthetic(out)[0].float() / 255 - ref).abs().mean())
            # tiny models (3 diffusion iterations, a 2-epoch classifier): the visible size of the change
            # is measured by the sweep on trained ones; here the guidance must not vanish
            assert change > (0.001 if not space else 0.0002), f"{loss} {space}: the default scale leaves the images unchanged ({change:.4f})"
