"""`cdp-fast simulate` end to end at a tiny size, and the Figure-1 sampler (METHOD.md §11)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cdp_fast import simulate as S
from cdp_fast.gmm import GaussianMixtureEps
from cdp_fast.kernels import ddim_update, hnm_guided_ddim_update
from cdp_fast.sampler import ddim_timesteps
from cdp_fast.schedules import NoiseSchedule

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50, img.shape


def test_simulate_cli_end_to_end_tiny(tmp_path, capsys):
    from cdp_fast.cli import main

    out = tmp_path / "sim"
    rc = main(["simulate", "--out", str(out), "--quick", "--device", "cpu", "--trials", "12",
               "--n-samples", "32", "--steps", "10", "--n-syn", "60", "--theorem-trials", "4",
               "--theorem-max-syn", "4000", "--cs", "0.5", "2", "--std-factors", "0.5", "1"])
    assert rc == 0
    assert (out / "config.json").is_file()
    summary = json.loads(capsys.readouterr().out)
    assert "figure1_c_ddim" in summary and "theorem_n_syn_bound" in summary

    res = json.loads((out / "results.json").read_text())
    for key in ("closed_form", "lemma3", "theorem", "figure1", "figures", "config", "wall_s"):
        assert key in res, f"results.json lacks {key!r}"
    assert res["config"]["n_samples"] == 32 and res["config"]["trials"] == 12  # explicit beats quick
    # closed forms next to their Monte Carlo estimates
    for row in res["closed_form"]:
        for k in ("standard_error", "robust_error"):
            p, n = row[k], row["mc_samples"]
            assert abs(row[k + "_mc"] - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3, row
    # Lemma 3 table: every (mean, std) cell present with sane values
    lem = res["lemma3"]
    assert len(lem["rows"]) == (2 * 2 + 2) * 2
    for r in lem["rows"]:
        assert {"name", "family", "c", "std", "std_factor", "standard_error", "robust_error",
                "standard_error_se", "robust_error_se", "pseudo_label_acc"} <= set(r)
        assert 0 <= r["standard_error"] <= r["robust_error"] <= 1
    assert {"c*mu_beats_orthogonal_standard", "larger_c_better_standard_c*mu"} <= set(lem["checks"])
    # the no-overwrite rule (issue 21): a second run into the same folder is refused, files untouched
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc = main(["simulate", "--out", str(out), "--quick", "--device", "cpu"])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # Theorem: bound, preconditions, simulated errors
    thm = res["theorem"]
    assert thm["n_syn_bound"] == pytest.approx(288 * thm["n"] / (thm["c"] * thm["eps"] ** 2)
                                               * math.sqrt(thm["d"] / thm["n"]))
    assert thm["preconditions"]["eps_lt_half"] and thm["preconditions"]["norm_mu_sq_eq_d"]
    assert thm["simulated"] and all(s["n_syn"] <= 4000 for s in thm["simulated"])
    # Figure 1: three arms with per-class stats and downstream errors
    f1 = res["figure1"]
    assert set(f1["arms"]) == {"true", "ddim", "contrastive-dp"}
    assert f1["guided_timesteps"] and max(ddim_timesteps(1000, 10)) not in f1["guided_timesteps"]
    for arm in f1["arms"].values():
        assert len(arm["per_class"]) == 2 and sum(p["count"] for p in arm["per_class"]) == 32
        for kind in ("pseudo_label", "true_label"):
            assert set(arm["downstream"][kind]) == {"m=4", "all"}
            for v in arm["downstream"][kind].values():
                assert 0 <= v["standard_error"] <= v["robust_error"] <= 1
    for name in ("figure1.png", "lemma3_errors.png"):
        _check_png(out / name)
    assert set(res["figures"]) == {"figure1", "lemma3_errors"}


def test_ddim_recovers_mixture_and_guidance_separates():
    # Plain DDIM with the exact score reproduces the class-conditional Gaussians (c ~ 1, var ~ s^2);
    # conditional HNM guidance at the default strength gives larger c and smaller variance.
    mu, sig, n, steps = np.array([2.0, 1.0]), 1.0, 160, 30
    cfg = S.SimulateConfig()
    kw = dict(steps=steps, guide_t_min=cfg.guide_t_min, temperature=cfg.temperature, seed=3,
              show_progress=False)
    x0, lab, g0 = S.sample_figure1(mu, sig, n, scale=0.0, **kw)
    x1, lab1, g1 = S.sample_figure1(mu, sig, n, scale=cfg.scale * n, **kw)
    assert g0 == [] and g1 and torch.equal(lab, lab1)
    assert max(ddim_timesteps(1000, steps)) not in g1  # the first step is never guided: no previous state
    th = torch.tensor(mu) + 0.5 * torch.randn(20, 2, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(0))
    s0 = S.figure1_stats(x0, lab, mu, sig, 0.5, theta_ints=th, subsets=(4,))
    s1 = S.figure1_stats(x1, lab, mu, sig, 0.5, theta_ints=th, subsets=(4,))
    for p in s0["per_class"]:
        assert abs(p["c"] - 1) < 0.12, s0["per_class"]
        assert 0.7 < p["var"] < 1.35, s0["per_class"]
    assert s1["c"] > s0["c"] + 0.01, (s0["c"], s1["c"])
    assert s1["var"] < 0.95 * s0["var"], (s0["var"], s1["var"])


def test_figure1_stats_on_exact_samples():
    g = torch.Generator().manual_seed(1)
    mu, sig, n = np.array([1.0, -0.5]), 0.8, 4000
    lab = torch.arange(n) % 2
    sgn = torch.where(lab == 0, 1.0, -1.0).double()
    x = sgn[:, None] * torch.tensor(mu) + sig * torch.randn(n, 2, generator=g, dtype=torch.float64)
    th = torch.tensor(mu)[None].repeat(5, 1)  # a perfect intermediate classifier
    st = S.figure1_stats(x, lab, mu, sig, 0.1, theta_ints=th, subsets=(16,))
    for p in st["per_class"]:
        assert abs(p["c"] - 1) < 0.05 and abs(p["var"] - sig ** 2) < 0.06
        assert abs(p["var_parallel"] - sig ** 2) < 0.08 and abs(p["var_orth"] - sig ** 2) < 0.08
    from cdp_fast.theory import standard_error
    opt = float(standard_error(mu, mu, sig))
    assert st["downstream"]["true_label"]["all"]["standard_error"] == pytest.approx(opt, abs=2e-3)
    assert st["downstream"]["pseudo_label"]["m=16"]["standard_error"] >= opt - 1e-12


@pytest.mark.parametrize("field,value", [("n_samples", 5), ("steps", 0), ("fig_mu", (1.0,)),
                                         ("mu_spread", 1.0), ("cs", ())])
def test_bad_config_raises(tmp_path, field, value):
    cfg = S.SimulateConfig(out=str(tmp_path / "x"), **{field: value})
    with pytest.raises(ValueError, match=field.split("_")[0]):
        S.run(cfg)


def _figure1_loop(mu, sigma, n, steps, scale, t_lo, t_hi, temperature, seed):
    """simulate's own DDIM loop before it went through DDIMSampler (kept here as the oracle)."""
    mu_t = torch.as_tensor(mu, dtype=torch.float64)
    sched = NoiseSchedule.linear(1000)
    model = GaussianMixtureEps(torch.stack([mu_t, -mu_t]), [sigma, sigma], [0.5, 0.5], sched)
    abar = sched.alphas_cumprod
    labels = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    ts = ddim_timesteps(1000, steps)[::-1]
    x_prev, guided = None, []
    for i, t in enumerate(ts):
        a_t, a_next = float(abar[t]), (float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0)
        e = model(x, torch.full((n,), t), labels)
        if scale and x_prev is not None and t_lo <= t <= t_hi:
            x_new = hnm_guided_ddim_update(x, e, a_t, a_next, x_prev, scale=scale, temperature=temperature,
                                           labels=labels)
            guided.append(t)
        else:
            x_new = ddim_update(x, e, a_t, a_next)
        x_prev, x = x, x_new
    return x, guided


@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_sample_figure1_through_sampler_matches_the_direct_loop(scale):
    """sample_figure1 now runs DDIMSampler + ContrastiveGuidance: same x0 as the direct loop
    (bit-equal unguided; guided, the sampler hands fp32 alphas to the fused step: ~1e-6)."""
    mu, n, steps, kw = [2.0, 1.0], 16, 12, dict(t_lo=300, t_hi=900, temperature=1.0, seed=5)
    x, lab, guided = S.sample_figure1(mu, 1.0, n, steps=steps, scale=scale, guide_t_min=kw["t_lo"],
                                      guide_t_max=kw["t_hi"], temperature=1.0, seed=5, show_progress=False)
    ref, ref_guided = _figure1_loop(mu, 1.0, n, steps, scale, **kw)
    assert guided == ref_guided and (not scale or guided)
    if scale:
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(x, ref)
