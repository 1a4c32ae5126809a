"""The main job end to end at a tiny size: schema, figures, caching, and `generate` resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdp_fast import pipeline
from cdp_fast.cli import main as cli_main

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--classifier-epochs", "2", "--diffusion-iters", "30", "--n-synthetic", "40",
        "--sample-batch", "20", "--sample-steps", "6", "--robust-epochs", "1", "--attack-steps", "2",
        "--eval-attack-steps", "2", "--batch-size", "64", "--scale", "100"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert cli_main(["pipeline", "--out", str(out), *TINY]) == 0
    return out


def _is_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG, f"{path} is not a PNG file"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_pipeline_outputs_schema(tiny_run):
    r = json.loads((tiny_run / "results.json").read_text())
    assert set(r["arms"]) == {"real", "ddim", "contrastive-dp"}
    for arm, a in r["arms"].items():
        for k in ("clean_acc", "robust_acc"):
            assert 0.0 <= a[k] <= 1.0, (arm, k, a[k])
        assert a["robust_acc"] <= a["clean_acc"] + 1e-9, (arm, a)
    assert r["arms"]["real"]["n_synthetic"] == 0
    assert r["arms"]["ddim"]["n_synthetic"] == 40 and r["arms"]["contrastive-dp"]["n_synthetic"] == 40
    assert r["arms"]["real"]["eps"] == pytest.approx(0.1)  # the pipeline's digits default
    for k in ("classifier", "diffusion", "total"):
        assert r["timings_s"][k] >= 0
    for name in ("samples.png", "accuracy.png", "embedding.png"):
        _is_png(tiny_run / name)
    report = (tiny_run / "report.md").read_text()
    assert "| real |" in report and "| contrastive-dp |" in report
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["n_synthetic"] == 40 and cfg["data"] == "digits"


def test_same_noise_and_guidance_changes_images(tiny_run):
    from cdp_fast.data import load_synthetic

    ddim, _ = load_synthetic(tiny_run / "synthetic" / "ddim")
    cdp, _ = load_synthetic(tiny_run / "synthetic" / "contrastive-dp")
    assert ddim.shape == cdp.shape == (40, 1, 8, 8)
    diff = (ddim.float() - cdp.float()).abs().mean(dim=(1, 2, 3))
    # guidance moves the samples, but they start from the same noise: correlated, not unrelated
    assert diff.max() > 0, "Contrastive-DP produced exactly the DDIM images"
    corr = np.corrcoef(ddim.flatten().numpy(), cdp.flatten().numpy())[0, 1]
    assert corr > 0.5, f"DDIM and Contrastive-DP sets should start from the same noise (corr {corr:.2f})"


def test_rerun_reuses_finished_stages(tiny_run, monkeypatch):
    import cdp_fast.diffusion_train as dt
    import cdp_fast.pseudolabel as pl
    import cdp_fast.trades as tr

    def boom(*a, **k):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(dt, "train_diffusion", boom)
    monkeypatch.setattr(pl, "train_classifier", boom)
    monkeypatch.setattr(tr, "train_robust", boom)
    before = json.loads((tiny_run / "results.json").read_text())["arms"]
    assert cli_main(["pipeline", "--out", str(tiny_run), *TINY]) == 0
    after = json.loads((tiny_run / "results.json").read_text())["arms"]
    assert before == after


def test_changed_setting_recomputes_only_downstream(tiny_run, monkeypatch):
    import cdp_fast.diffusion_train as dt
    import cdp_fast.pseudolabel as pl

    def boom(*a, **k):
        raise AssertionError("an upstream stage was recomputed")

    monkeypatch.setattr(dt, "train_diffusion", boom)
    monkeypatch.setattr(pl, "train_classifier", boom)
    calls = []
    import cdp_fast.trades as tr

    real = tr.train_robust
    monkeypatch.setattr(tr, "train_robust", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = list(TINY)
    args[args.index("--eval-attack-steps") + 1] = "3"
    assert cli_main(["pipeline", "--out", str(tiny_run), *args]) == 0
    assert len(calls) == 3  # all three arms re-trained, nothing upstream


def test_synthetic_records_name_the_classifier_used(tiny_run):
    # the pipeline passes its classifier objects to generate(): the record must say so
    for arm in ("ddim", "contrastive-dp"):
        used = json.loads((tiny_run / "synthetic" / arm / "generate.json").read_text())["used"]
        assert used["labeler"]["class"] == "SmallCNN" and len(used["labeler"]["weights_sha256"]) == 16
        if arm == "ddim":
            assert used["features"] is None  # no guidance: no features used
        else:
            assert used["features"]["class"] == "SmallCNN.features"
            assert used["features"]["weights_sha256"] == used["labeler"]["weights_sha256"]


def test_generate_resumes_from_written_shards(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "gen"
    args = ["generate", "--checkpoint", str(tiny_run / "diffusion"), "--labeler",
            str(tiny_run / "classifier"), "--n", "30", "--batch-size", "20", "--steps", "4",
            "--out", str(out)]
    assert cli_main(args) == 0
    shards = sorted(out.glob("shard-*.npz"))
    assert [p.name for p in shards] == ["shard-00000.npz", "shard-00001.npz"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 30 and sum(summary["label_counts"]) == 30
    _is_png(out / "grid.png")
    first = shards[0].read_bytes()
    shards[1].unlink()  # as if the run had been killed after the first shard

    import cdp_fast.sampler as sm

    calls = []
    real = sm.DDIMSampler.sample
    monkeypatch.setattr(sm.DDIMSampler, "sample", lambda self, n, *a, **k: calls.append(n) or real(self, n, *a, **k))
    assert cli_main(args) == 0
    # only the missing shard is sampled again (as a full batch, trimmed to its 10 images)
    assert calls == [20], f"only the missing shard should be sampled again, sampled {calls}"
    assert shards[0].read_bytes() == first
    assert len(np.load(shards[1])["label"]) == 10


def test_generate_refuses_a_folder_made_with_other_settings(tiny_run, tmp_path, capsys):
    out = tmp_path / "gen"
    base = ["generate", "--checkpoint", str(tiny_run / "diffusion"), "--labeler", str(tiny_run / "classifier"),
            "--batch-size", "20", "--steps", "3", "--out", str(out)]
    assert cli_main([*base, "--n", "40"]) == 0
    # fewer images with the same settings: the extra shard is dropped, the folder holds 20
    assert cli_main([*base, "--n", "20"]) == 0
    from cdp_fast.data import load_synthetic

    assert len(load_synthetic(out)[0]) == 20
    assert cli_main([*base, "--n", "20", "--guidance", "hnm", "--scale", "10"]) == 2
    assert "guidance" in capsys.readouterr().err


def test_guided_generate_with_a_short_last_shard(tiny_run, tmp_path):
    # 21 = 20 + 1: the last shard still samples a full batch, so its contrastive group is whole
    out = tmp_path / "gen"
    assert cli_main(["generate", "--checkpoint", str(tiny_run / "diffusion"), "--labeler",
                     str(tiny_run / "classifier"), "--features", str(tiny_run / "classifier"),
                     "--guidance", "hnm", "--scale", "10", "--t-min", "0", "--n", "21", "--batch-size", "20",
                     "--steps", "3", "--out", str(out)]) == 0
    from cdp_fast.data import load_synthetic

    assert len(load_synthetic(out)[0]) == 21


def test_pipeline_rejects_bad_settings(tmp_path):
    cfg = pipeline.PipelineConfig(out=str(tmp_path / "x"), seeds=0)
    with pytest.raises(ValueError, match="seeds"):
        pipeline.run(cfg)
