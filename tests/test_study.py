"""`cdp-fast study` (issue 19) at a tiny size: the protocol's invariants, checked by index on
what every stage was handed (monkeypatched recorders), the selection rule, caching, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdp_fast import data as data_mod
from cdp_fast import study
from cdp_fast.cli import main as cli_main
from cdp_fast.sampler import DDIMSampler

TOTAL = 40
TINY = dict(total=TOTAL, real_counts=(20, 40), seeds=1, classifier_epochs=1, classifier_steps=0, diffusion_iters=2,
            sample_steps=2, sample_batch=20, robust_steps=1, select_steps=1, batch_size=16,
            attack_steps=1, eval_attack_steps=1, grid=("none", "hnm@1", "hnm-conditional@1"),
            device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny study with every stage recorded in call order."""
    from cdp_fast import diffusion_train, pseudolabel, trades

    out = tmp_path_factory.mktemp("study") / "run"
    calls: list[tuple] = []
    orig = {"clf": pseudolabel.train_classifier, "diff": diffusion_train.train_diffusion,
            "trades": trades.train_robust, "sample": DDIMSampler.sample}

    def clf(data, *a, **k):
        calls.append(("classifier", data.x_train.clone(), data.x_test.clone()))
        return orig["clf"](data, *a, **k)

    def diff(cfg, data=None):
        calls.append(("diffusion", data.x_train.clone(), data.x_test.clone()))
        return orig["diff"](cfg, data=data)

    def tr(cfg, data=None, synthetic=None, **k):
        calls.append(("trades", data.x_train.clone(), data.x_test.clone(), cfg.out))
        return orig["trades"](cfg, data=data, synthetic=synthetic, **k)

    def sample(self, n, shape, seed=0, labels=None, x_T=None, **k):
        calls.append(("sample", self.guidance is not None, int(seed), int(n)))
        return orig["sample"](self, n, shape, seed=seed, labels=labels, x_T=x_T, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(pseudolabel, "train_classifier", clf)
    mp.setattr(diffusion_train, "train_diffusion", diff)
    mp.setattr(trades, "train_robust", tr)
    mp.setattr(DDIMSampler, "sample", sample)
    try:
        res = study.run(study.StudyConfig(out=str(out), **TINY))
    finally:
        mp.undo()
    return out, res, calls


def _rows(x: torch.Tensor) -> set:
    return {bytes(r.numpy().tobytes()) for r in x}


def test_subsets_nested_balanced_and_stages_see_only_their_k(tiny):
    out, res, calls = tiny
    full = data_mod.load_dataset("digits")
    subs = {int(k): {a: np.array(v, np.int64) for a, v in s.items()}
            for k, s in json.loads((out / "subsets.json").read_text()).items()}
    assert set(subs[20]["real"]) <= set(subs[40]["real"])  # nested
    for k, s in subs.items():
        assert len(s["real"]) == k and len(set(s["real"])) == k
        counts = np.bincount(full.y_train[s["real"]].numpy(), minlength=10)
        assert counts.max() - counts.min() <= 1  # class-balanced
        assert set(s["val"]) <= set(s["real"]) and not set(s["val"]) & set(s["fit"])
        assert set(s["val"]) | set(s["fit"]) == set(s["real"])
    # the classifier and the diffusion model of count k get exactly the k real images, by index
    models = [c for c in calls if c[0] in ("classifier", "diffusion") and len(c[1]) != len(full.x_train)]
    assert len(models) == 4
    for (kind, x, xv), k in zip(models, (20, 20, 40, 40)):
        assert torch.equal(x, full.x_train[torch.from_numpy(subs[k]["real"])]), kind
        assert torch.equal(xv, full.x_train[torch.from_numpy(subs[k]["val"])]), kind
    # the selection runs train on (k real minus V) + synthetic and validate on V
    sel = [c for c in calls if c[0] == "trades" and "/select/" in c[3]]
    assert len(sel) == 2 * 3
    for c in sel:
        k = int(Path(c[3]).parent.parent.name[1:])
        fit, val = (torch.from_numpy(subs[k][a]) for a in ("fit", "val"))
        if k < TOTAL:
            assert torch.equal(c[1][:len(fit)], full.x_train[fit])
        assert torch.equal(c[2], full.x_train[val])


def test_test_split_read_only_after_every_selection_run(tiny):
    out, res, calls = tiny
    x_test = data_mod.load_dataset("digits").x_test
    staged = [c for c in calls if c[0] in ("classifier", "diffusion", "trades")]
    is_test = [c[2].shape == x_test.shape and torch.equal(c[2], x_test) for c in staged]
    first = is_test.index(True)
    assert all(is_test[first:]) and not any(is_test[:first])
    assert all("/final/" in c[3] for c in staged[first:])
    assert not any("/select/" in c[3] for c in staged[first:] if c[0] == "trades")


def test_totals_and_steps_exact_and_footnote_2(tiny):
    out, res, calls = tiny
    full = data_mod.load_dataset("digits")
    for t in res["table"].values():
        steps = {r["steps"] for a in t["arms"].values() for r in a["per_seed"]}  # from metrics.json
        assert len(steps) == 1  # the same optimiser steps for every arm
        assert all(a["n_train"] == TOTAL for a in t["arms"].values())
    final = [c for c in calls if c[0] == "trades" and "/final/" in c[3]]
    assert all(len(c[1]) == TOTAL for c in final)
    subs = json.loads((out / "subsets.json").read_text())
    real_rows = _rows(full.x_train[torch.tensor(subs["20"]["real"])])
    for c in final:
        if "k20/final/real" in c[3]:  # k real alone, tiled to the total: only the k images
            assert _rows(c[1]) == real_rows
    # footnote 2: at k = total the synthetic arms are `total` synthetic images, no real ones
    assert res["diagnostics"]["40"]["none"]["n"] == TOTAL
    assert res["diagnostics"]["20"]["none"]["n"] == TOTAL - 20
    assert res["all_real_baseline"]["n_train"] == TOTAL


def test_ddim_and_guided_sets_start_from_the_same_noise(tiny):
    out, res, calls = tiny
    samples = [c for c in calls if c[0] == "sample"]
    unguided = [c[2:] for c in samples if not c[1]]
    guided = [c[2:] for c in samples if c[1]]
    assert unguided and guided
    # every guided batch (seed, size) is one of the unguided batches: the same x_T
    assert set(guided) <= set(unguided)
    assert len(guided) == 2 * len(unguided)  # two guided candidates


def test_results_schema_choice_and_diagnostics(tiny):
    out, res, calls = tiny
    r = json.loads((out / "results.json").read_text())
    for k in ("20", "40"):
        ch = r["choices"][k]
        assert ch["candidate"] == study.choose(ch["selection"])["candidate"]
        assert {s["name"] for s in ch["selection"]} == {"none", "hnm@1", "hnm-conditional@1"}
        d = r["diagnostics"][k]
        assert d["none"]["label_changed_vs_ddim"] == 0.0 and d["none"]["pixel_change_vs_ddim"] == 0.0
        for v in d.values():
            assert 0 <= v["oracle_agreement"] <= 1 and sum(v["label_counts"]) == v["n"]
    assert "control" in r["table"]["20"]["arms"]  # the controlled run at the smallest k
    assert any(c["a"] == "control" for c in r["table"]["20"]["comparisons"])
    assert set(r["proxy_rank_correlation"]) >= {"fidelity", "diversity", "oracle_agreement"}
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = study.summarize(out)
    assert "| 20 | contrastive-dp |" in md and ("within noise" in md or "beyond noise" in md)


def test_rerun_is_cached(tiny, monkeypatch):
    out, res, _ = tiny
    from cdp_fast import diffusion_train, pseudolabel, trades

    def boom(*a, **k):
        raise AssertionError("a stage ran")

    for mod, name in ((pseudolabel, "train_classifier"), (diffusion_train, "train_diffusion"),
                      (trades, "train_robust")):
        monkeypatch.setattr(mod, name, boom)
    monkeypatch.setattr(study, "sample_set", boom)
    again = study.run(study.StudyConfig(out=str(out), **TINY))
    assert again["table"] == json.loads(json.dumps(res["table"]))


def test_selection_rule_known_answer():
    rows = [{"name": "none", "scale": 0.0, "val_robust_acc": 0.5, "val_clean_acc": 0.9},
            {"name": "hnm@1", "scale": 1e5, "val_robust_acc": 0.6, "val_clean_acc": 0.8},
            {"name": "infonce@1", "scale": 3e2, "val_robust_acc": 0.6, "val_clean_acc": 0.85},
            {"name": "hnm@0.3", "scale": 3e4, "val_robust_acc": 0.55, "val_clean_acc": 0.99}]
    assert study.choose(rows)["candidate"] == "infonce@1"  # best robust, tie broken by clean
    tie = [dict(r, val_robust_acc=0.5, val_clean_acc=0.9) for r in rows]
    assert study.choose(tie)["candidate"] == "none"  # a full tie: the smaller scale (plain DDIM)


def test_candidates_parse():
    c = study.parse_candidate("hnm-conditional-real-negative@0.5")
    assert (c["loss"], c["conditional"], c["pair"], c["factor"]) == ("hnm", True, "real-negative", 0.5)
    assert study.parse_candidate("infonce@1")["pair"] == "previous"
    for bad in ("hnm", "hnm@0", "hnm@-1", "foo@1", "hnm-real-positive-conditional@1"):
        with pytest.raises(ValueError, match="--grid"):
            study.parse_candidate(bad)


@pytest.mark.parametrize("flags, msg", [
    (["--total", "100", "--real-counts", "150"], "exceeds --total"),
    (["--total", "2000", "--real-counts", "1500"], "exceeds the 1437 training images"),
    (["--fractions"], "--fractions is empty|--fractions: expected at least one"),
    (["--fractions", "0.5", "1.5"], "outside \\(0, 1\\]"),
    (["--fractions", "0"], "outside \\(0, 1\\]"),
    (["--grid"], "--grid is empty|--grid: expected at least one"),
    (["--grid", "none"], "no guided candidate"),
])
def test_bad_input_fails_before_any_work(tmp_path, capsys, flags, msg):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        cli_main(["study", "--out", str(out), *flags])
    assert e.value.code == 2
    import re
    assert re.search(msg, capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(ValueError):
        study.resolve(study.StudyConfig(out=str(out), **_flags_to_kw(flags)))


def _flags_to_kw(flags):
    kw, key = {}, None
    for f in flags:
        if f.startswith("--"):
            key = f[2:].replace("-", "_")
            kw[key] = []
        else:
            kw[key].append(f)
    conv = {"total": lambda v: int(v[0]), "real_counts": lambda v: tuple(int(x) for x in v),
            "fractions": lambda v: tuple(float(x) for x in v), "grid": tuple}
    return {k: conv[k](v) for k, v in kw.items()}


def test_classifiers_get_a_fixed_step_budget_at_every_real_count():
    """15 epochs of 100 images are 30 optimiser steps: the k = 100 classifier labelled every image one
    class. Every classifier gets at least --classifier-steps steps (batch 64), whatever k."""
    cfg = study.StudyConfig()
    assert study._clf_epochs(cfg, 100) == 150          # 2 batches per epoch
    assert study._clf_epochs(cfg, 1437) == 15          # 23 batches x 15 epochs = 345 >= 300
    assert study._clf_epochs(study.StudyConfig(classifier_steps=0), 100) == cfg.classifier_epochs
