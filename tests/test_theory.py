"""Gaussian theory lab (METHOD.md §11): closed forms vs integration / Monte Carlo, Lemma 3, the bound."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import norm

from cdp_fast import theory as T


def _mu(d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 1.5, size=d)


# ---------------------------------------------------------------- closed forms
@pytest.mark.parametrize("d", [1, 3, 7])
def test_standard_error_matches_integration_1d_projection(d):
    # theta.x given y=+1 is N(mu.theta, sigma^2 ||theta||^2): integrate its density below 0.
    rng = np.random.default_rng(d)
    mu, theta, sigma = _mu(d, d), rng.standard_normal(d) + 0.5, 1.3
    m, s = mu @ theta, sigma * np.linalg.norm(theta)
    direct, _ = integrate.quad(lambda z: norm.pdf(z, loc=m, scale=s), -np.inf, 0.0)
    got = T.standard_error(theta, mu, sigma)
    assert abs(got - direct) < 1e-8, (got, direct)


def test_standard_error_2d_numerical_integration():
    # Full 2-D integral of the class +1 density over the half-plane theta.x < 0.
    mu, theta, sigma = np.array([0.8, -0.3]), np.array([1.0, 0.4]), 0.9
    def dens(x2, x1):  # plain math: scipy.stats' per-call overhead would make this slow
        return math.exp(-((x1 - mu[0]) ** 2 + (x2 - mu[1]) ** 2) / (2 * sigma**2)) / (2 * math.pi * sigma**2)

    # theta.x < 0  <=>  x2 < -theta0 x1 / theta1 (theta1 > 0)
    val, _ = integrate.dblquad(dens, -7, 7, lambda x1: -7.0, lambda x1: -theta[0] * x1 / theta[1],
                              epsabs=1e-9, epsrel=1e-9)
    got = T.standard_error(theta, mu, sigma)
    assert abs(got - val) < 1e-7, (got, val)


@pytest.mark.parametrize("d,eps", [(2, 0.3), (5, 0.1), (9, 0.45)])
def test_errors_match_monte_carlo_with_adversarial_shift(d, eps):
    g = torch.Generator().manual_seed(d)
    mu = torch.as_tensor(_mu(d, d + 1))
    theta = torch.randn(d, generator=g, dtype=torch.float64) + mu  # a decent but imperfect classifier
    sigma, n = 1.7, 400_000
    y = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    x = y[:, None] * mu + sigma * torch.randn(n, d, generator=g, dtype=torch.float64)
    # worst Linf perturbation of a linear classifier: delta = -eps * y * sign(theta)
    x_adv = x - eps * y[:, None] * torch.sign(theta)
    mc_std = (torch.sign(x @ theta) != y).double().mean().item()
    mc_rob = (torch.sign(x_adv @ theta) != y).double().mean().item()
    cf_std = float(T.standard_error(theta, mu, sigma))
    cf_rob = float(T.robust_error(theta, mu, sigma, eps))
    tol = lambda p: 5 * math.sqrt(p * (1 - p) / n) + 1e-4  # noqa: E731
    assert abs(mc_std - cf_std) < tol(cf_std), f"standard: MC {mc_std} vs closed form {cf_std}"
    assert abs(mc_rob - cf_rob) < tol(cf_rob), f"robust: MC {mc_rob} vs closed form {cf_rob}"
    assert cf_rob > cf_std


def test_adversarial_shift_is_the_worst_case():
    # Random Linf perturbations never beat the closed-form worst case on any point.
    g = torch.Generator().manual_seed(3)
    d, eps = 6, 0.2
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(500, d, generator=g, dtype=torch.float64)
    worst = x @ theta - eps * theta.abs().sum()
    for _ in range(20):
        delta = eps * (2 * torch.rand(500, d, generator=g, dtype=torch.float64) - 1)
        assert bool(((x + delta) @ theta >= worst - 1e-12).all())


def test_batched_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    mu, sigma, eps = _mu(4), 1.1, 0.25
    thetas = rng.standard_normal((7, 4))
    a = T.standard_error(thetas, mu, sigma)
    b = T.robust_error(torch.tensor(thetas, dtype=torch.float32), torch.tensor(mu), sigma, eps)
    assert isinstance(a, np.ndarray) and a.shape == (7,)
    assert isinstance(b, torch.Tensor) and b.shape == (7,) and b.dtype == torch.float32
    for i in range(7):
        assert abs(a[i] - T.standard_error(thetas[i], mu, sigma)) < 1e-12
        assert abs(float(b[i]) - float(T.robust_error(thetas[i], mu, sigma, eps))) < 1e-6
    # known values: theta = mu
    assert abs(T.standard_error(mu, mu, sigma) - norm.cdf(-np.linalg.norm(mu) / sigma)) < 1e-12
    assert T.robust_error(mu, mu, sigma, 0.0) == pytest.approx(T.standard_error(mu, mu, sigma), abs=1e-15)
    # scale invariance and the theta = 0 convention
    assert T.standard_error(3.0 * thetas[0], mu, sigma) == pytest.approx(T.standard_error(thetas[0], mu, sigma))
    assert T.standard_error(np.zeros(4), mu, sigma) == 0.5


def test_bad_inputs_raise():
    mu = np.ones(3)
    with pytest.raises(ValueError, match="sigma"):
        T.standard_error(mu, mu, 0.0)
    with pytest.raises(ValueError, match="eps"):
        T.robust_error(mu, mu, 1.0, -0.1)
    with pytest.raises(ValueError, match="theta"):
        T.standard_error(np.ones(4), mu, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        T.standard_error(np.array([1.0, np.nan, 0.0]), mu, 1.0)
    with pytest.raises(TypeError):
        T.standard_error("abc", mu, 1.0)
    with pytest.raises(ValueError, match="labels"):
        T.theta_intermediate(np.ones((3, 2)), np.array([1, 0, 1]))


# ---------------------------------------------------------------- estimators
def test_estimators_literal():
    x = np.array([[1.0, 2.0], [-3.0, 1.0], [0.5, -0.5]])
    y = np.array([1, -1, 1])
    th = T.theta_intermediate(x, y)
    np.testing.assert_allclose(th, np.array([4.5, 0.5]) / 3)
    yl = T.pseudo_label(np.array([1.0, 0.0]), x)
    np.testing.assert_array_equal(yl, [1, -1, 1])
    np.testing.assert_allclose(T.theta_final(x, np.array([1.0, 0.0])), th)
    assert T.pseudo_label(np.array([0.0, 0.0]), x).tolist() == [1, 1, 1]  # sign(0) = +1


def test_fast_lemma3_sampler_matches_direct():
    # The sufficient-statistic sampler must give the same distribution as the literal procedure.
    d, n, n_syn, eps = 6, 3, 40, 0.3
    mu = _mu(d, 5)
    mu *= math.sqrt(d) / np.linalg.norm(mu)
    sigma = (n * d) ** 0.25
    means = {"mu": mu, "half": 0.5 * mu, "orth": T.lemma3_means(mu, eps, cs=())["orthogonal to mu"]}
    kw = dict(d=d, n=n, n_syn=n_syn, mu=mu, sigma=sigma, eps=eps, synthetic_means=means,
              synthetic_stds=[0.5 * sigma], trials=3000)
    fast = T.lemma3_experiment(**kw, seed=1, method="fast")
    direct = T.lemma3_experiment(**kw, seed=2, method="direct")
    for rf, rd in zip(fast["rows"], direct["rows"]):
        for key in ("standard_error", "robust_error"):
            se = math.hypot(rf[key + "_se"], rd[key + "_se"])
            assert abs(rf[key] - rd[key]) < 4 * se + 1e-3, f"{rf['name']} {key}: fast {rf[key]} direct {rd[key]} (se {se})"
        assert abs(rf["pseudo_label_acc"] - rd["pseudo_label_acc"]) < 0.02, rf["name"]


def test_lemma3_directions():
    # Lemma 3 at a small size: c*mu beats orthogonal (standard error), larger c is better,
    # smaller synthetic variance is better (Lemma 2); the errors are in [0, 1/2].
    d, n, n_syn, eps = 30, 6, 300, 0.3
    mu = _mu(d, 7)
    mu *= math.sqrt(d) / np.linalg.norm(mu)
    sigma = (n * d) ** 0.25
    means = T.lemma3_means(mu, eps, cs=(0.5, 1.0, 2.0))
    res = T.lemma3_experiment(d, n, n_syn, mu, sigma, eps, means, [0.5 * sigma, 1.5 * sigma],
                              trials=400, seed=0)
    row = {(r["name"], r["std"]): r for r in res["rows"]}
    s_lo, s_hi = 0.5 * sigma, 1.5 * sigma
    for s in (s_lo, s_hi):
        orth = row[("orthogonal to mu", s)]["standard_error"]
        errs = [row[(f"c*mu (c={c:g})", s)]["standard_error"] for c in (0.5, 1.0, 2.0)]
        assert all(e < orth for e in errs), (errs, orth)
        assert errs[0] > errs[1] > errs[2], errs
        rob = [row[(f"c*mu (c={c:g})", s)]["robust_error"] for c in (0.5, 1.0, 2.0)]
        assert rob[0] > rob[1] > rob[2], rob
        assert row[("orthogonal to mu-eps", s)]["robust_error"] > rob[0]
    for c in (0.5, 1.0):
        assert row[(f"c*mu (c={c:g})", s_lo)]["standard_error"] < row[(f"c*mu (c={c:g})", s_hi)]["standard_error"]
    for r in res["rows"]:
        assert 0.0 <= r["standard_error"] <= 0.5 and r["standard_error"] <= r["robust_error"] <= 1.0
    # nothing beats the optimal direction
    assert min(r["standard_error"] for r in res["rows"]) >= res["optimal"]["standard_error_theta_mu"] - 1e-12


def test_lemma3_bad_inputs():
    mu = np.ones(4)
    with pytest.raises(ValueError, match="n_syn"):
        T.lemma3_experiment(4, 2, 0, mu, 1.0, 0.1, {"a": mu}, [1.0])
    with pytest.raises(ValueError, match="shape"):
        T.lemma3_experiment(4, 2, 5, mu, 1.0, 0.1, {"a": np.ones(3)}, [1.0])
    with pytest.raises(ValueError, match="method"):
        T.lemma3_experiment(4, 2, 5, mu, 1.0, 0.1, {"a": mu}, [1.0], method="nope")


# ---------------------------------------------------------------- the Theorem
def test_theorem_bound_formula_and_preconditions():
    assert T.theorem_sample_bound(4, 400, 0.25, 2.0) == pytest.approx(288 * 4 / (2.0 * 0.0625) * 10.0)
    assert T.theorem_sample_bound(1, 1, 0.5) == pytest.approx(288 / 0.25)
    with pytest.raises(ValueError):
        T.theorem_sample_bound(0, 10, 0.1)
    with pytest.raises(ValueError):
        T.theorem_sample_bound(1, 10, 0.0)
    n, d, eps = 4, 400, 0.25
    pre = T.theorem_preconditions(n, d, eps, T.theorem_sigma(n, d), T.theorem_mu(d))
    assert pre["eps_lt_half"] and pre["sigma_eq_(nd)^(1/4)"] and pre["norm_mu_sq_eq_d"]
    assert pre["eps2_sqrt_d_over_n"] == pytest.approx(0.0625 * 10.0)
    bad = T.theorem_preconditions(n, d, 0.6, 1.0, np.ones(d) * 2)
    assert not (bad["eps_lt_half"] or bad["sigma_eq_(nd)^(1/4)"] or bad["norm_mu_sq_eq_d"])
