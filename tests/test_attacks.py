"""PGD / CW-PGD / TRADES-KL attacks: they increase their loss, stay in the eps-ball and [0, 1],
and agree with simple independent implementations written here."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cdp_fast import attacks

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_model(c=1, h=7, classes=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(6 * h * h, 16),
                      nn.Tanh(), nn.Linear(16, classes))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.to(dtype).eval()


def batch(n=9, c=1, h=7, classes=5, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, h, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


# ---- independent references (plain loops, per-example losses written out by hand) -------------
def ref_pgd(model, x, y, delta0, eps, alpha, steps, kind):
    xa = (x + delta0).clamp(0, 1)
    xa = torch.max(torch.min(xa, x + eps), x - eps).clamp(0, 1)
    for _ in range(steps):
        xa = xa.clone().requires_grad_(True)
        z = model(xa)
        if kind == "ce":
            loss = -(z.log_softmax(1)[torch.arange(len(y)), y]).sum()
        else:
            zy = z[torch.arange(len(y)), y]
            mask = torch.zeros_like(z, dtype=torch.bool)
            mask[torch.arange(len(y)), y] = True
            loss = (z.masked_fill(mask, -1e30).max(1).values - zy).sum()
        loss.backward()
        with torch.no_grad():
            xa = xa + alpha * xa.grad.sign()
            xa = torch.clamp(torch.min(torch.max(xa, x - eps), x + eps), 0, 1)
    return xa.detach()


def ref_trades(model, x, delta0, eps, alpha, steps):
    p = F.softmax(model(x), 1).detach()
    xa = (x + delta0).clamp(0, 1)
    for _ in range(steps):
        xa = xa.clone().requires_grad_(True)
        loss = nn.KLDivLoss(reduction="sum")(F.log_softmax(model(xa), 1), p)
        (g,) = torch.autograd.grad(loss, [xa])
        xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return xa


def per_example_ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("kind", ["ce", "cw"])
@pytest.mark.parametrize("shape", [(9, 1, 7, 5), (5, 3, 5, 3)])
def test_pgd_matches_reference(kind, shape, assert_close):
    n, c, h, k = shape
    model, (x, y) = tiny_model(c, h, k), batch(n, c, h, k)
    eps, alpha, steps = 0.1, 0.03, 6
    g = torch.Generator().manual_seed(5)
    delta0 = (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1) * eps
    ours = attacks.pgd(model, x, y, eps=eps, step_size=alpha, steps=steps, loss=kind, init=x + delta0)
    ref = ref_pgd(model, x, y, delta0, eps, alpha, steps, kind)
    assert_close(ours, ref, rtol=0, atol=1e-12, name=f"pgd-{kind}")
    # Same generator seed -> same uniform start -> same result.
    a = attacks.pgd(model, x, y, eps=eps, step_size=alpha, steps=steps, loss=kind,
                    generator=torch.Generator().manual_seed(3))
    b = attacks.pgd(model, x, y, eps=eps, step_size=alpha, steps=steps, loss=kind,
                    generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["ce", "cw"])
def test_pgd_increases_loss_and_stays_in_ball(kind):
    model, (x, y) = tiny_model(), batch(n=17)
    eps = 0.08
    xa = attacks.pgd(model, x, y, eps=eps, steps=10, loss=kind, generator=torch.Generator().manual_seed(0))
    assert xa.shape == x.shape and xa.dtype == x.dtype
    assert float((xa - x).abs().max()) <= eps + 1e-12, "left the eps-ball"
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1, "left [0, 1]"
    fn = attacks.LOSSES[kind]
    with torch.no_grad():
        before, after = fn(model(x), y), fn(model(xa), y)
    # Every example's loss goes up (the model is smooth and steps are small).
    assert bool((after > before).all()), f"loss did not increase: {before} -> {after}"


def test_pgd_restarts_keep_worst_case():
    model, (x, y) = tiny_model(seed=2), batch(n=23, seed=4)
    kw = dict(eps=0.05, step_size=0.02, steps=3)
    single = attacks.pgd(model, x, y, restarts=1, generator=torch.Generator().manual_seed(7), **kw)
    multi = attacks.pgd(model, x, y, restarts=4, generator=torch.Generator().manual_seed(7), **kw)
    with torch.no_grad():
        fs, fm = model(single).argmax(1) != y, model(multi).argmax(1) != y
    ls, lm = per_example_ce(model, single, y), per_example_ce(model, multi, y)
    assert bool((fm | ~fs).all()), "a restart lost an adversarial example"
    same = fs == fm
    assert bool((lm[same] >= ls[same] - 1e-12).all()), "restarts kept a weaker example"
    assert float((multi - x).abs().max()) <= 0.05 + 1e-12


@pytest.mark.parametrize("shape", [(9, 1, 7, 5), (6, 2, 5, 4)])
def test_trades_attack_matches_reference_and_increases_kl(shape, assert_close):
    n, c, h, k = shape
    model, (x, _) = tiny_model(c, h, k, seed=3), batch(n, c, h, k, seed=2)
    eps, alpha, steps = 0.1, 0.025, 5
    seed = 11
    ours = attacks.trades_attack(model, x, eps=eps, step_size=alpha, steps=steps,
                                 generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    delta0 = (2 * torch.rand(x.shape, generator=g, dtype=x.dtype) - 1) * eps
    ref = ref_trades(model, x, delta0, eps, alpha, steps)
    assert_close(ours, ref, rtol=0, atol=1e-12, name="trades attack")
    assert float((ours - x).abs().max()) <= eps + 1e-12 and 0 <= float(ours.min()) and float(ours.max()) <= 1
    with torch.no_grad():
        lp = model(x).log_softmax(1)
        start = attacks.uniform_start(x, eps, torch.Generator().manual_seed(seed))
        kl0 = attacks.kl_div(model(start), lp, "none")
        kl1 = attacks.kl_div(model(ours), lp, "none")
    assert bool((kl1 > kl0).all()), f"KL did not increase: {kl0} -> {kl1}"


def test_trades_attack_normal_init_and_bn_mode_restored():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    model.train()
    x = torch.rand(8, 1, 7, 7)
    rm = model[1].running_mean.clone()
    xa = attacks.trades_attack(model, x, eps=0.1, step_size=0.02, steps=3, init="normal",
                               generator=torch.Generator().manual_seed(0))
    assert model.training, "the attack must restore train mode"
    assert torch.equal(model[1].running_mean, rm), "eval-mode attack must not touch BN statistics"
    assert float((xa - x).abs().max()) <= 0.1 + 1e-6
    assert all(p.grad is None for p in model.parameters()), "the attack must not write parameter grads"
    attacks.trades_attack(model, x, eps=0.1, step_size=0.02, steps=1, bn="train")
    assert not torch.equal(model[1].running_mean, rm), "bn='train' should run BN in train mode"


def test_attack_bad_input():
    model, (x, y) = tiny_model(), batch()
    with pytest.raises(TypeError, match="float"):
        attacks.pgd(model, (x * 255).to(torch.uint8), y, eps=0.1)
    with pytest.raises(ValueError, match="loss"):
        attacks.pgd(model, x, y, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="precision"):
        attacks.pgd(model, x, y, eps=0.1, precision="fp8")
    with pytest.raises(ValueError, match="init"):
        attacks.trades_attack(model, x, eps=0.1, step_size=0.1, steps=1, init="zeros")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_attack_moves_on_gpu(precision):
    torch.manual_seed(0)
    model = tiny_model(3, 16, 10, dtype=torch.float32).cuda()
    x = torch.rand(64, 3, 16, 16, device="cuda")
    eps = 8 / 255
    xa = attacks.trades_attack(model, x, eps=eps, step_size=2 / 255, steps=5, precision=precision,
                               generator=torch.Generator("cuda").manual_seed(0))
    ref = attacks.trades_attack(model, x, eps=eps, step_size=2 / 255, steps=5, precision="fp32",
                                generator=torch.Generator("cuda").manual_seed(0))
    lp = model(x).log_softmax(1)
    with torch.no_grad():
        kl, kl_ref = attacks.kl_div(model(xa), lp, "mean"), attacks.kl_div(model(ref), lp, "mean")
    assert float((xa - x).abs().max()) <= eps + 1e-6
    assert float(kl) > 0.5 * float(kl_ref), f"{precision} attack stalled: KL {kl} vs fp32 {kl_ref}"
