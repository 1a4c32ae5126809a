"""The built-in AutoAttack subset (APGD-CE + APGD-T, Croce & Hein 2020) on a small trained model."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

from cdp_fast import attacks
from cdp_fast import autoattack as aa
from cdp_fast.data import load_dataset, to_float


@pytest.fixture(scope="module")
def trained():
    """An MLP trained on digits for a second: accurate, not robust, not saturated."""
    data = load_dataset("digits")
    x, y = to_float(data.x_train), data.y_train
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xt, yt = to_float(data.x_test[:200]), data.y_test[:200]
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() > 0.85
    return model, xt, yt


def _fooled(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def test_apgd_ce_beats_pgd_at_equal_budget(trained):
    model, x, y = trained
    eps = 0.06
    g = torch.Generator().manual_seed(0)
    x_pgd = attacks.pgd(model, x, y, eps=eps, steps=20, generator=g)
    _, x_apgd = aa.apgd(model, x, y, attacks.ce_loss, eps=eps, n_iter=20,
                        generator=torch.Generator().manual_seed(0))
    n_pgd, n_apgd = int(_fooled(model, x_pgd, y).sum()), int(_fooled(model, x_apgd, y).sum())
    assert 0 < n_pgd < len(y), "eps should make PGD-20 partly successful for a meaningful comparison"
    assert n_apgd >= n_pgd, f"APGD-CE (20 iterations) fooled {n_apgd}, PGD-20 {n_pgd}"
    # the full subset (APGD-CE, then APGD-T on what is left) breaks at least as many
    x_aa = aa.autoattack(model, x, y, eps=eps, n_iter=20, n_targets=3,
                         generator=torch.Generator().manual_seed(0), show_progress=False)
    assert int(_fooled(model, x_aa, y).sum()) >= n_apgd


def test_stays_in_the_ball_and_is_deterministic(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    eps = 0.05

    def attack(seed):
        return aa.autoattack(model, x, y, eps=eps, n_iter=10, n_targets=2,
                             generator=torch.Generator().manual_seed(seed), show_progress=False)

    a, b = attack(3), attack(3)
    assert torch.equal(a, b), "same seed, different adversarial examples"
    assert float((a - x).abs().max()) <= eps + 1e-6
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # only misclassified points are moved; the rest are returned unchanged
    moved = (a != x).flatten(1).any(1)
    assert bool((~moved | _fooled(model, a, y)).all())


def test_dlr_losses_match_their_formulas():
    z = torch.tensor([[3.0, 1.0, 0.5, -1.0, 2.0], [0.0, 4.0, 1.0, 2.0, -3.0]])
    y = torch.tensor([0, 2])
    # sorted: row 0: 3, 2, 1, 0.5, -1 ; row 1: 4, 2, 1, 0, -3
    want = torch.tensor([-(3.0 - 2.0) / (3.0 - 1.0), -(1.0 - 4.0) / (4.0 - 1.0)])
    torch.testing.assert_close(aa.dlr_loss(z, y), want)
    t = torch.tensor([4, 1])
    want_t = torch.tensor([-(3.0 - 2.0) / (3.0 - 0.5 * (1.0 + 0.5)), -(1.0 - 4.0) / (4.0 - 0.5 * (1.0 + 0.0))])
    torch.testing.assert_close(aa.dlr_targeted_loss(z, y, t), want_t)


def test_settings_and_errors(trained):
    model, x, y = trained
    s = aa.settings(eps=0.1, n_iter=100, n_targets=9, restarts=1)
    assert s["attack_name"] == aa.NAME and s["components"] == ["apgd-ce", "apgd-t"]
    assert s["not_run"] == ["fab-t", "square"] and s["n_iter"] == 100
    assert aa.target_count(9, 10) == 9 and aa.target_count(9, 4) == 3
    two = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match="4 classes"):
        aa.autoattack(two, x[:4], y[:4] % 3, eps=0.1, n_iter=2, show_progress=False)
    with pytest.raises(ValueError, match="n_iter"):
        aa.apgd(model, x[:4], y[:4], attacks.ce_loss, eps=0.1, n_iter=0)


@pytest.mark.skipif(importlib.util.find_spec("torchattacks") is None, reason="optional cross-check: torchattacks")
def test_cross_check_with_torchattacks(trained):  # pragma: no cover - only where torchattacks is installed
    import torchattacks

    model, x, y = trained
    eps = 0.06
    ours = _fooled(model, aa.autoattack(model, x, y, eps=eps, n_iter=20, n_targets=9,
                                        generator=torch.Generator().manual_seed(0), show_progress=False), y)
    ta = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=20, n_restarts=1, n_classes=10, seed=0)
    theirs = _fooled(model, torchattacks.APGD(model, norm="Linf", eps=eps, steps=20, seed=0)(x, y), y)
    theirs |= _fooled(model, ta(x, y), y)
    assert abs(int(ours.sum()) - int(theirs.sum())) <= max(3, len(y) // 20)


def test_progress_counts_every_iteration(trained, monkeypatch, capsys):
    # the issue: AutoAttack sat 13 min 48 s at "0/1" (one bar step per batch)
    monkeypatch.setenv("CDP_FAST_QUIET", "0")
    model, x, y = trained
    aa.autoattack(model, x[:8], y[:8], eps=0.05, n_iter=3, n_targets=2,
                  generator=torch.Generator().manual_seed(0), show_progress=True)
    err = capsys.readouterr().err
    assert "autoattack" in err and "/9 [" in err  # total: (APGD-CE + 2 APGD-T targets) x 3 iterations
    assert "apgd-t target 2" in err  # it names the attack running
