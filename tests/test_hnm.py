"""HNM contrastive loss: reference vs the authors' literal criterion, Triton vs reference
(forward and gradients, every variant, clamps binding), gradcheck, the fused guided DDIM step,
bad inputs, determinism. CPU tests run the Triton kernels under TRITON_INTERPRET=1; without it
the Triton cases are skipped. bf16/fp16 and large-N tests need CUDA.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdp_fast.kernels import hnm_guided_ddim_update, hnm_loss
from cdp_fast.kernels._backend import interpreting, triton_available

triton_ok = pytest.mark.skipif(
    not (triton_available() and (torch.cuda.is_available() or interpreting())),
    reason="needs triton with CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ------------------------------------------------------------------------------------------
# Independent implementations written from the authors' code (not from hnm_ref.py)
# ------------------------------------------------------------------------------------------
def get_negative_mask(batch_size):
    negative_mask = torch.ones((batch_size, 2 * batch_size), dtype=bool)
    for i in range(batch_size):
        negative_mask[i, i] = 0
        negative_mask[i, i + batch_size] = 0
    return torch.cat((negative_mask, negative_mask), 0)


def authors_criterion(out_1, out_2, tau_plus, batch_size, beta, estimator, temperature):
    """The authors' dense criterion (Robinson et al. code as used by Contrastive-DP, with the
    1e-4 clamps of METHOD.md §6), literally: 2B x 2B matrix, masked_select, powers of neg."""
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    mask = get_negative_mask(batch_size)
    neg = neg.masked_select(mask).view(2 * batch_size, -1)
    neg = torch.clamp(neg, min=1e-4)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    if estimator == "hard":
        N = batch_size * 2 - 2
        imp = (beta * neg.log()).exp()
        reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
        Ng = (-tau_plus * N * pos + reweight_neg) / (1 - tau_plus)
        Ng = torch.clamp(Ng, min=N * np.e ** (-1 / temperature))
    elif estimator == "easy":
        Ng = neg.sum(dim=-1)
    else:
        raise Exception("Invalid estimator selected")
    return (-torch.log(torch.clamp(pos / (pos + Ng), min=1e-4))).mean()


def literal_rows(anchor, positive, *, temperature, tau_plus, beta, estimator, labels=None,
                 bank=None, bank_labels=None, group_size=None, neg_clamp=True):
    """Row by row, every negative listed explicitly (handles labels, bank, groups).

    Returns (mean loss, dict of how often each clamp binds). ``neg_clamp=False`` drops the 1e-4
    clamp on the negatives (to show a test is sensitive to it)."""
    B = anchor.shape[0]
    G = group_size or B
    Z = torch.cat([anchor, positive])
    losses = []
    bound = dict(neg=0, ng=0, ratio=0, negatives=0)
    for r in range(2 * B):
        j = r % B
        partner = (r + B) % (2 * B)
        sims = []
        for c in range(2 * B):
            if c in (r, partner) or (c % B) // G != j // G:
                continue
            if labels is not None and int(labels[c % B]) == int(labels[j]):
                continue
            sims.append(Z[r] @ Z[c] / temperature)
        if bank is not None:
            for m in range(bank.shape[0]):
                if bank_labels is not None and int(bank_labels[m]) == int(labels[j]):
                    continue
                sims.append(Z[r] @ bank[m] / temperature)
        sims = torch.stack(sims)
        N = len(sims)
        raw = torch.exp(sims)
        neg = torch.clamp(raw, min=1e-4) if neg_clamp else raw
        bound["neg"] += int((raw < 1e-4).sum())
        bound["negatives"] += N
        pos = torch.exp(Z[r] @ Z[partner] / temperature)
        if estimator == "hard":
            reweight = N * (neg ** (1 + beta)).sum() / (neg ** beta).sum()
            ng_raw = (-tau_plus * N * pos + reweight) / (1 - tau_plus)
            floor = N * math.exp(-1 / temperature)
            bound["ng"] += int(ng_raw < floor)
            Ng = torch.clamp(ng_raw, min=floor)
        else:
            Ng = neg.sum()
        ratio = pos / (pos + Ng)
        bound["ratio"] += int(ratio < 1e-4)
        losses.append(-torch.log(torch.clamp(ratio, min=1e-4)))
    return torch.stack(losses).mean(), bound


def clamp_binding(anchor, positive, *, temperature, tau_plus, beta, estimator, labels=None,
                  bank=None, bank_labels=None, group_size=None):
    """How many negatives / rows each clamp binds on (vectorised; for the larger test shapes)."""
    from cdp_fast.kernels.hnm_ref import negative_mask
    a, p = anchor.double(), positive.double()
    B = a.shape[0]
    Z = torch.cat([a, p])
    cols = Z if bank is None else torch.cat([Z, bank.double()])
    valid = negative_mask(B, cols.shape[0] - 2 * B, labels=labels, bank_labels=bank_labels, group_size=group_size)
    raw = torch.exp(Z @ cols.t() / temperature)
    neg = torch.where(valid, raw.clamp(min=1e-4), torch.zeros_like(raw))
    N = valid.sum(1).double()
    pos = torch.exp((a * p).sum(-1) / temperature).repeat(2)
    if estimator == "hard":
        ng_raw = (-tau_plus * N * pos + N * (neg ** (1 + beta)).sum(1) / torch.where(valid, neg ** beta, torch.zeros_like(neg)).sum(1)) / (1 - tau_plus)
        floor = N * math.exp(-1 / temperature)
        ng_bound = int((ng_raw < floor).sum())
        Ng = torch.maximum(ng_raw, floor)
    else:
        ng_bound = 0
        Ng = neg.sum(1)
    return dict(neg=int((valid & (raw < 1e-4)).sum()), ng=ng_bound, ratio=int((pos / (pos + Ng) < 1e-4).sum()))


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def make_embeddings(B, d, kind, seed=0, dtype=torch.float32):
    """L2-normalised anchors/positives. kind "random": independent; "close": positives near
    their anchors; "mixed": every other positive near its anchor (the Ng clamp binds on those
    rows for large tau_plus, not on the others); "clamps": anchors in adjacent +-pairs
    (cos ~ -1: the neg clamp binds at small T) and a third of the positives opposite to their
    anchors (the ratio clamp binds at small T)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, d, generator=g, dtype=torch.float64)
    noise = torch.randn(B, d, generator=g, dtype=torch.float64)
    if kind == "random":
        p = noise
    elif kind == "close":
        p = a + 0.3 * noise
    elif kind == "mixed":
        p = a + 0.3 * noise
        p[::2] = noise[::2]
    elif kind == "clamps":
        half = B // 2  # rows 2i+1 = -(row 2i): same group whenever the group size is even
        a[1: 2 * half: 2] = -a[0: 2 * half: 2] + 0.05 * noise[:half]
        p = a + 0.3 * noise
        p[::3] = -a[::3] + 0.5 * noise[::3]
    else:
        raise ValueError(kind)
    return F.normalize(a, dim=-1).to(dtype), F.normalize(p, dim=-1).to(dtype)


def make_bank(M, d, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(M, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def make_labels(n, classes, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g)


# ------------------------------------------------------------------------------------------
# Reference vs the authors' code
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["hard", "easy"])
@pytest.mark.parametrize("B,d,T,tau,beta,kind", [
    (37, 24, 10.0, 0.1, 1.0, "random"),     # the authors' defaults
    (13, 5, 0.1, 0.1, 1.0, "clamps"),       # both 1e-4 clamps bind
    (9, 7, 0.5, 0.9, 0.5, "mixed"),         # the Ng clamp binds on some rows
])
def test_reference_matches_authors_criterion(estimator, B, d, T, tau, beta, kind, assert_close):
    a, p = make_embeddings(B, d, kind, dtype=torch.float64)
    a.requires_grad_(True)
    p.requires_grad_(True)
    kw = dict(temperature=T, tau_plus=tau, beta=beta, estimator=estimator)
    got = hnm_loss(a, p, backend="reference", **kw)
    want = authors_criterion(a, p, tau, B, beta, estimator, T)
    assert_close(got, want, rtol=1e-10, name="loss")
    ga = torch.autograd.grad(got, (a, p))
    wa = torch.autograd.grad(want, (a, p))
    for x, y, n in zip(ga, wa, ("d anchor", "d positive")):
        assert_close(x, y, rtol=1e-9, name=n)
    if kind == "clamps":
        _, bound = literal_rows(a.detach(), p.detach(), **kw)
        assert bound["neg"] > 0 and bound["ratio"] > 0, bound
    if kind == "mixed" and estimator == "hard":
        _, bound = literal_rows(a.detach(), p.detach(), **kw)
        assert 0 < bound["ng"] < 2 * B, bound      # binds on some rows, not all


VARIANTS = {
    "labels": dict(labels=True),
    "bank": dict(bank=True),
    "bank+bank_labels": dict(labels=True, bank=True, bank_labels=True),
    "labels+bank": dict(labels=True, bank=True),
    "groups": dict(group_size=True),
    "groups+labels+bank": dict(group_size=True, labels=True, bank=True, bank_labels=True),
}


def variant_kwargs(name, B, d, M=11, classes=3, dtype=torch.float32, G=None):
    v = VARIANTS[name]
    kw = {}
    if v.get("labels"):
        kw["labels"] = make_labels(B, classes)
    if v.get("bank"):
        kw["bank"] = make_bank(M, d, dtype=dtype)
    if v.get("bank_labels"):
        kw["bank_labels"] = make_labels(M, classes, seed=3)
    if v.get("group_size"):
        kw["group_size"] = G
    return kw


@pytest.mark.parametrize("estimator", ["hard", "easy"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_variants_match_literal(variant, estimator, assert_close):
    B, d, G = 12, 6, 4
    a, p = make_embeddings(B, d, "close", dtype=torch.float64)
    kw = variant_kwargs(variant, B, d, M=5, dtype=torch.float64, G=G)
    bank = kw.get("bank")
    leaves = [a.requires_grad_(True), p.requires_grad_(True)] + ([bank.requires_grad_(True)] if bank is not None else [])
    common = dict(temperature=0.5, tau_plus=0.3, beta=1.0, estimator=estimator)
    got = hnm_loss(a, p, backend="reference", **common, **kw)
    want, _ = literal_rows(a, p, **common, **kw)
    assert_close(got, want, rtol=1e-10, name=f"{variant} loss")
    for x, y in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert_close(x, y, rtol=1e-9, name=f"{variant} grad")


def test_variants_change_the_loss():
    """Guards against variant flags being silently ignored."""
    B, d = 12, 6
    a, p = make_embeddings(B, d, "random")
    base = hnm_loss(a, p, backend="reference", temperature=0.5)
    for name in VARIANTS:
        kw = variant_kwargs(name, B, d, M=5, G=4)
        assert abs(float(hnm_loss(a, p, backend="reference", temperature=0.5, **kw)) - float(base)) > 1e-4, name


@pytest.mark.parametrize("estimator", ["hard", "easy"])
@pytest.mark.parametrize("variant", [None, "labels", "bank+bank_labels", "groups+labels+bank"])
def test_reference_gradcheck(variant, estimator):
    B, d = 4, 3
    a, p = make_embeddings(B, d, "close", dtype=torch.float64, seed=5)
    kw = variant_kwargs(variant, B, d, M=3, classes=2, dtype=torch.float64, G=2) if variant else {}
    if "labels" in kw:
        kw["labels"] = torch.tensor([0, 1, 1, 0])
    if "bank_labels" in kw:
        kw["bank_labels"] = torch.tensor([0, 1, 0])
    bank = kw.pop("bank", None)
    inputs = (a.requires_grad_(True), p.requires_grad_(True)) + ((bank.requires_grad_(True),) if bank is not None else ())

    def f(a_, p_, *b):
        return hnm_loss(a_, p_, temperature=0.7, tau_plus=0.2, estimator=estimator,
                        bank=b[0] if b else None, backend="reference", **kw)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Triton vs reference
# ------------------------------------------------------------------------------------------
TRITON_CASES = [
    # id, B, d, T, tau, beta, estimator, kind, variant
    ("defaults", 37, 24, 10.0, 0.1, 1.0, "hard", "random", None),
    ("easy", 37, 24, 10.0, 0.1, 1.0, "easy", "random", None),
    ("T0.1-clamps", 37, 24, 0.1, 0.1, 1.0, "hard", "clamps", None),
    ("T0.1-clamps-easy", 37, 24, 0.1, 0.1, 1.0, "easy", "clamps", None),
    ("ng-clamp", 37, 24, 0.5, 0.9, 0.5, "hard", "mixed", None),
    ("beta0", 21, 3, 1.0, 0.2, 0.0, "hard", "random", None),
    ("labels", 37, 24, 0.5, 0.1, 1.0, "hard", "close", "labels"),
    ("labels-easy", 37, 24, 0.5, 0.1, 1.0, "easy", "close", "labels"),
    ("bank", 37, 24, 0.5, 0.1, 1.0, "hard", "random", "bank"),
    ("bank+bank_labels", 37, 24, 0.1, 0.1, 1.0, "hard", "clamps", "bank+bank_labels"),
    ("labels+bank-easy", 37, 24, 0.5, 0.1, 1.0, "easy", "random", "labels+bank"),
    ("groups", 36, 24, 0.5, 0.1, 1.0, "hard", "close", "groups"),
    ("groups+labels+bank", 36, 24, 0.1, 0.5, 1.0, "hard", "clamps", "groups+labels+bank"),
]


@triton_ok
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_reference(case, assert_close):
    name, B, d, T, tau, beta, estimator, kind, variant = case
    a, p = make_embeddings(B, d, kind)
    kw = variant_kwargs(variant, B, d, M=19, G=12) if variant else {}
    common = dict(temperature=T, tau_plus=tau, beta=beta, estimator=estimator)
    bound = clamp_binding(a, p, **common, **kw)
    if kind == "clamps":  # the 1e-4 clamps really bind in these cases
        assert bound["neg"] > 0 and bound["ratio"] > 0, bound
    if name == "ng-clamp":
        assert 0 < bound["ng"] < 2 * B, bound
    results = {}
    for backend in ("reference", "triton"):
        leaves = [a.clone().requires_grad_(True), p.clone().requires_grad_(True)]
        kwb = dict(kw)
        if "bank" in kwb:
            kwb["bank"] = kwb["bank"].clone().requires_grad_(True)
            leaves.append(kwb["bank"])
        loss = hnm_loss(leaves[0], leaves[1], backend=backend, **common, **kwb)
        (3.7 * loss).backward()  # grad_output != 1
        results[backend] = (loss.detach(), [x.grad for x in leaves])
    (lr, gr), (lt, gt) = results["reference"], results["triton"]
    assert lt.shape == () and lt.dtype == torch.float32
    assert_close(lt, lr, rtol=1e-4, scale="elem", name=f"{name} loss")
    for x, y, n in zip(gt, gr, ("anchor", "positive", "bank")):
        assert_close(x, y, rtol=1e-4, atol=1e-7, name=f"{name} d{n}")
        assert float(y.abs().max()) > 0, f"{name} d{n}: degenerate test (zero gradient)"


@triton_ok
def test_triton_only_some_inputs_need_grad(assert_close):
    a, p = make_embeddings(20, 17, "random")
    bank = make_bank(7, 17)
    pr = p.clone().requires_grad_(True)
    hnm_loss(a, pr, bank=bank, temperature=0.5, backend="triton").backward()
    pr2 = p.clone().requires_grad_(True)
    hnm_loss(a, pr2, bank=bank, temperature=0.5, backend="reference").backward()
    assert_close(pr.grad, pr2.grad, rtol=1e-4, name="d positive")


@triton_ok
def test_triton_deterministic():
    a, p = make_embeddings(21, 20, "clamps")
    kw = variant_kwargs("bank+bank_labels", 21, 20, M=9)
    outs = []
    for _ in range(2):
        leaves = [a.clone().requires_grad_(True), p.clone().requires_grad_(True), kw["bank"].clone().requires_grad_(True)]
        loss = hnm_loss(leaves[0], leaves[1], temperature=0.1, backend="triton",
                        **{**kw, "bank": leaves[2]})
        loss.backward()
        outs.append([loss.detach()] + [x.grad for x in leaves])
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def near_clamp_groups(n_groups, d, dtype=torch.float32, seed=0):
    """Groups of 2 anchors (use group_size=2) in which every negative similarity sits near the
    1e-4 clamp at T = 0.1 (cos ~ -0.92), some just below, some just above: every row's Ng is
    ~1e-4, so the clamp's zero gradient changes the result by percents, not by 1e-8."""
    g = torch.Generator().manual_seed(seed)
    A, P = [], []
    for k in range(n_groups):
        q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))

        def at(deg, q=q):
            r = math.radians(deg)
            return math.cos(r) * q[:, 0] + math.sin(r) * q[:, 1]
        A += [at(0), at(200 + k)]           # cos(a0, a1) = -cos(20+k deg): clamped
        P += [at(10 + 2 * k), at(155 - k)]  # cos(a0, p1) = -cos(25+k deg): not clamped
    return torch.stack(A).to(dtype), torch.stack(P).to(dtype)


@pytest.mark.parametrize("estimator", ["hard", "easy"])
def test_neg_clamp_gradient_is_exact(estimator, assert_close):
    B, d = 8, 20
    a, p = near_clamp_groups(B // 2, d)
    kw = dict(temperature=0.1, tau_plus=0.0, beta=1.0, estimator=estimator, group_size=2)
    bound = clamp_binding(a, p, **kw)
    assert 0 < bound["neg"] < 2 * B * 2 and bound["ng"] == 0 and bound["ratio"] == 0, bound
    a64 = a.double().requires_grad_(True)
    p64 = p.double().requires_grad_(True)
    want = torch.autograd.grad(literal_rows(a64, p64, **kw)[0], (a64, p64))
    unclamped = torch.autograd.grad(literal_rows(a64, p64, neg_clamp=False, **kw)[0], (a64, p64))
    assert float((want[0] - unclamped[0]).abs().max()) > 1e-2 * float(want[0].abs().max())
    backends = ["reference"] + (["triton"] if triton_available() and interpreting() else [])
    for backend in backends:
        ac, pc = a.clone().requires_grad_(True), p.clone().requires_grad_(True)
        got = torch.autograd.grad(hnm_loss(ac, pc, backend=backend, **kw), (ac, pc))
        for x, y in zip(got, want):
            assert_close(x, y, rtol=1e-4, name=f"{backend} {estimator}")


@triton_ok
@pytest.mark.parametrize("estimator", ["hard", "easy"])
def test_clamped_bank_rows_get_exactly_zero_gradient(estimator, assert_close):
    """Bank rows clamped for every row of Z: their gradient, and their contribution to dZ, are
    exactly 0. Feature 0 is non-zero only in those bank rows, so dZ[:, 0] must be exactly 0."""
    B, d = 20, 16
    a, p = make_embeddings(B, d, "random")
    u = torch.randn(d, generator=torch.Generator().manual_seed(4))
    u[0] = 0.0
    u = F.normalize(u, dim=0)
    a, p = u + 0.15 * a, u + 0.15 * p       # every row near u ...
    a[:, 0] = 0.0
    p[:, 0] = 0.0
    a, p = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    far = F.normalize(-u + 0.05 * make_bank(3, d), dim=-1)   # ... 3 bank rows near -u
    near = make_bank(4, d)
    near[:, 0] = 0.0
    bank = torch.cat([far, F.normalize(near, dim=-1)])
    kw = dict(temperature=0.1, estimator=estimator)
    s = torch.cat([a, p]) @ bank[:3].t() / 0.1
    assert bool((s < math.log(1e-4)).all()) and bool((far[:, 0] != 0).all())
    grads = {}
    for backend in ("reference", "triton"):
        leaves = [a.clone().requires_grad_(True), p.clone().requires_grad_(True), bank.clone().requires_grad_(True)]
        hnm_loss(leaves[0], leaves[1], bank=leaves[2], backend=backend, **kw).backward()
        grads[backend] = [x.grad for x in leaves]
    for b in ("reference", "triton"):
        da, dp, dbank = grads[b]
        assert torch.all(dbank[:3] == 0), b
        assert torch.all(da[:, 0] == 0) and torch.all(dp[:, 0] == 0), b
    assert float(grads["reference"][2][3:].abs().max()) > 0
    for x, y in zip(grads["triton"], grads["reference"]):
        assert_close(x, y, rtol=1e-4, name="grad")


# ------------------------------------------------------------------------------------------
# Fused HNM gradient + DDIM update
# ------------------------------------------------------------------------------------------
def composed_guided_step(x, eps, a_t, a_next, positive, *, scale, eta, noise, clip_x0, **kw):
    """Autograd on the literal criterion + the DDIM formula written out (float64)."""
    B = x.shape[0]
    anchor = x.double().flatten(1).requires_grad_(True)
    loss, _ = literal_rows(anchor, positive.double().flatten(1), **kw)
    (g,) = torch.autograd.grad(loss, anchor)
    at = torch.as_tensor(a_t, dtype=torch.float64).expand(B).reshape(-1, *[1] * (x.dim() - 1))
    an = torch.as_tensor(a_next, dtype=torch.float64).expand(B).reshape(-1, *[1] * (x.dim() - 1))
    e = eps.double() + scale * g.view(x.shape)
    x0 = (x.double() - torch.sqrt(1 - at) * e) / torch.sqrt(at)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    c1 = eta * torch.sqrt((1 - at / an) * (1 - an) / (1 - at))
    c2 = torch.sqrt(1 - an - c1 ** 2)
    out = torch.sqrt(an) * x0 + c2 * e
    if noise is not None:
        out = out + c1 * noise.double()
    return out


GUIDED_CASES = [
    ("float-alphas", dict(), 0.0, False, None, 0.6, 0.7),
    ("per-sample+eta+clip", dict(estimator="easy"), 0.8, True, 1.5, None, None),
    ("labels+groups+bank", dict(labels=True, group_size=True, bank=True), 0.0, False, None, None, None),
]


@pytest.mark.parametrize("case", GUIDED_CASES, ids=[c[0] for c in GUIDED_CASES])
def test_guided_ddim_update(case, assert_close):
    name, extra, eta, with_noise, clip, a_t, a_next = case
    B, shape = 18, (2, 3, 3)   # d = 18 features: two feature chunks of 16 under the interpreter
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, *shape, generator=g)
    eps = torch.randn(B, *shape, generator=g)
    positive = x + 0.3 * torch.randn(B, *shape, generator=g)
    noise = torch.randn(B, *shape, generator=g) if with_noise else None
    if a_t is None:
        a_t = torch.linspace(0.3, 0.8, B)
        a_next = a_t + 0.15
    kw = dict(temperature=4.0, tau_plus=0.1, beta=1.0, estimator=extra.get("estimator", "hard"))
    if extra.get("labels"):
        kw["labels"] = make_labels(B, 3)
    if extra.get("group_size"):
        kw["group_size"] = 6
    if extra.get("bank"):
        kw["bank"] = torch.randn(5, 18, generator=g)
    scale = 40.0
    want = composed_guided_step(x, eps, a_t, a_next, positive, scale=scale, eta=eta, noise=noise,
                                clip_x0=clip, **{k: (v.double() if k == "bank" else v) for k, v in kw.items()})
    unguided = composed_guided_step(x, eps, a_t, a_next, positive, scale=0.0, eta=eta, noise=noise,
                                    clip_x0=clip, **{k: (v.double() if k == "bank" else v) for k, v in kw.items()})
    assert float((want - unguided).abs().max()) > 1e-2, "guidance has no visible effect: weak test"
    if clip is not None:
        unclipped = composed_guided_step(x, eps, a_t, a_next, positive, scale=scale, eta=eta, noise=noise,
                                         clip_x0=None, **{k: (v.double() if k == "bank" else v) for k, v in kw.items()})
        assert float((want - unclipped).abs().max()) > 1e-2, "clip_x0 never binds: weak test"
    ref = hnm_guided_ddim_update(x, eps, a_t, a_next, positive, scale=scale, eta=eta, noise=noise,
                                 clip_x0=clip, backend="reference", **kw)
    assert ref.shape == x.shape and ref.dtype == x.dtype
    assert_close(ref, want, rtol=1e-5, name=f"{name} reference vs composed")
    if triton_available() and interpreting():
        tri = hnm_guided_ddim_update(x, eps, a_t, a_next, positive, scale=scale, eta=eta, noise=noise,
                                     clip_x0=clip, backend="triton", **kw)
        assert_close(tri, ref, rtol=1e-5, name=f"{name} triton vs reference")
        tri2 = hnm_guided_ddim_update(x, eps, a_t, a_next, positive, scale=scale, eta=eta, noise=noise,
                                      clip_x0=clip, backend="triton", **kw)
        assert torch.equal(tri, tri2)


def test_guided_ddim_draws_noise_when_eta_positive(assert_close):
    B = 6
    g = torch.Generator().manual_seed(3)
    x, eps, pos = (torch.randn(B, 20, generator=g) for _ in range(3))
    backends = ["reference"] + (["triton"] if triton_available() and interpreting() else [])
    outs = {}
    for backend in backends:
        torch.manual_seed(123)
        outs[backend] = hnm_guided_ddim_update(x, eps, 0.5, 0.7, pos, scale=5.0, eta=1.0, backend=backend)
    torch.manual_seed(123)
    z = torch.randn_like(x)
    want = hnm_guided_ddim_update(x, eps, 0.5, 0.7, pos, scale=5.0, eta=1.0, noise=z, backend="reference")
    no_noise = hnm_guided_ddim_update(x, eps, 0.5, 0.7, pos, scale=5.0, eta=0.0, backend="reference")
    assert float((want - no_noise).abs().max()) > 1e-2
    for backend, out in outs.items():
        assert_close(out, want, rtol=1e-5, name=backend)


def test_guided_ddim_last_step_returns_x0(assert_close):
    B = 6
    x, eps, pos = torch.randn(B, 4), torch.randn(B, 4), torch.randn(B, 4)
    out = hnm_guided_ddim_update(x, eps, 0.5, 1.0, pos, scale=0.0, backend="reference")
    assert_close(out, (x - math.sqrt(0.5) * eps) / math.sqrt(0.5), rtol=1e-6, name="x0")


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------
def _bad_cases():
    a, p = make_embeddings(6, 4, "random")
    lab = torch.tensor([0, 1, 0, 1, 0, 1])
    return [
        ("at least 2 anchors", (a[:1], p[:1]), {}, ValueError),
        ("shapes differ", (a, p[:5]), {}, ValueError),
        ("dtypes differ", (a, p.double()), {}, TypeError),
        ("2-D", (a[None], p[None]), {}, ValueError),
        ("temperature", (a, p), dict(temperature=0.0), ValueError),
        ("temperature", (a, p), dict(temperature=-1.0), ValueError),
        ("tau_plus", (a, p), dict(tau_plus=1.0), ValueError),
        ("tau_plus", (a, p), dict(tau_plus=-0.1), ValueError),
        ("estimator", (a, p), dict(estimator="medium"), ValueError),
        ("does not divide", (a, p), dict(group_size=4), ValueError),
        ("group_size must be >= 2", (a, p), dict(group_size=1), ValueError),
        ("labels must have shape", (a, p), dict(labels=lab[:5]), ValueError),
        ("labels must be an integer", (a, p), dict(labels=lab.float()), TypeError),
        ("no negatives", (a, p), dict(labels=torch.zeros(6, dtype=torch.long)), ValueError),
        ("no negatives", (a, p), dict(labels=torch.tensor([0, 0, 0, 1, 1, 1]), group_size=3), ValueError),
        ("no negatives", (a, p), dict(labels=torch.zeros(6, dtype=torch.long), bank=a,
                                      bank_labels=torch.zeros(6, dtype=torch.long)), ValueError),
        ("bank must be 2-D", (a, p), dict(bank=a[:, :3]), ValueError),
        ("at least one row", (a, p), dict(bank=a[:0]), ValueError),
        ("bank dtype", (a, p), dict(bank=a.double()), TypeError),
        ("bank_labels must have shape", (a, p), dict(labels=lab, bank=a, bank_labels=lab[:2]), ValueError),
        ("without a bank", (a, p), dict(labels=lab, bank_labels=lab), ValueError),
        ("NaN or inf", (a.clone().index_fill_(0, torch.tensor([2]), float("nan")), p), {}, ValueError),
        ("NaN or inf", (a, p), dict(bank=torch.full((2, 4), float("inf"))), ValueError),
        ("floating-point", (a.long(), p.long()), {}, TypeError),
        ("backend", (a, p), dict(backend="cuda"), ValueError),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_bad_inputs(case):
    match, args, kw, exc = case
    with pytest.raises(exc, match=match):
        hnm_loss(*args, **kw)


@triton_ok
def test_triton_backend_rejects_fp64():
    a, p = make_embeddings(6, 4, "random", dtype=torch.float64)
    with pytest.raises(TypeError, match="fp64"):
        hnm_loss(a, p, backend="triton")


def test_labels_with_bank_negatives_are_fine():
    """A row whose own batch has only its class is fine when the bank offers negatives."""
    a, p = make_embeddings(4, 3, "random")
    lab = torch.zeros(4, dtype=torch.long)
    loss = hnm_loss(a, p, labels=lab, bank=make_bank(3, 3), backend="reference")
    assert torch.isfinite(loss)


def test_guided_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="share a shape"):
        hnm_guided_ddim_update(x, torch.randn(4, 2), 0.5, 0.6, x, scale=1.0)
    with pytest.raises(ValueError, match="a_t"):
        hnm_guided_ddim_update(x, x, torch.rand(3), 0.6, x, scale=1.0, backend="reference")
    with pytest.raises(ValueError, match="temperature"):
        hnm_guided_ddim_update(x, x, 0.5, 0.6, x, scale=1.0, temperature=0)


# ------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,ftol,gtol", [(torch.bfloat16, 2e-3, 3e-2), (torch.float16, 1e-3, 5e-3)])
@pytest.mark.parametrize("variant", [None, "groups+labels+bank"])
@pytest.mark.parametrize("T", [10.0, 0.1])
def test_half_precision_vs_fp32_reference_gpu(dtype, ftol, gtol, variant, T, assert_close):
    B, d = 300, 128
    a, p = make_embeddings(B, d, "clamps" if T < 1 else "random")
    kw = variant_kwargs(variant, B, d, M=77, G=100) if variant else {}
    dev = "cuda"
    a16, p16 = a.to(dev, dtype), p.to(dev, dtype)
    kw16 = {k: v.to(dev, dtype) if k == "bank" else v.to(dev) for k, v in kw.items()}
    kw32 = {k: v.float() if k == "bank" else v for k, v in kw16.items()}
    leaves16 = [a16.clone().requires_grad_(True), p16.clone().requires_grad_(True)]
    leaves32 = [a16.float().requires_grad_(True), p16.float().requires_grad_(True)]
    l16 = hnm_loss(*leaves16, temperature=T, backend="triton", **kw16)
    l32 = hnm_loss(*leaves32, temperature=T, backend="reference", **kw32)
    assert l16.dtype == torch.float32
    assert_close(l16, l32, rtol=ftol, scale="elem", name=f"{dtype} loss")
    g16 = torch.autograd.grad(l16, leaves16)
    g32 = torch.autograd.grad(l32, leaves32)
    for x, y in zip(g16, g32):
        assert x.dtype == dtype
        assert_close(x, y, rtol=gtol, name=f"{dtype} grad")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["ieee", "tf32x3"])
@pytest.mark.parametrize("d", [128, 300])     # resident row tile / pixel-space feature chunks
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_fp32_dot_modes_parity_gpu(mode, d, beta, monkeypatch, assert_close):
    """fp32 Triton vs the fp64 reference with CDP_FAST_FP32_DOT = ieee (the default) and tf32x3.
    tf32x3 may become the default only once this passes on a GPU (benchmarks/device.sh runs it)."""
    monkeypatch.setenv("CDP_FAST_FP32_DOT", mode)
    B = 300
    a, p = make_embeddings(B, d, "random")
    kw = variant_kwargs("groups+labels+bank", B, d, M=77, G=100)
    leaves = [t.to("cuda").requires_grad_(True) for t in (a, p, kw.pop("bank"))]
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    kw = {k: v.to("cuda") for k, v in kw.items()}
    common = dict(temperature=0.5, tau_plus=0.1, beta=beta, **kw)
    lt = hnm_loss(leaves[0], leaves[1], bank=leaves[2], backend="triton", **common)
    lr = hnm_loss(ref[0], ref[1], bank=ref[2], backend="reference", **common)
    assert_close(lt, lr, rtol=2e-6, scale="elem", name=f"{mode} loss")
    for x, y, n in zip(torch.autograd.grad(lt, leaves), torch.autograd.grad(lr, ref), ("anchor", "positive", "bank"),
                       strict=True):
        assert_close(x, y, rtol=1e-5, name=f"{mode} d{n}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_n_memory_gpu(dtype, assert_close):
    B, d = 8192, 128                      # N = 2B = 16384 rows
    a, p = make_embeddings(B, d, "random")
    a = a.cuda().to(dtype).requires_grad_(True)
    p = p.cuda().to(dtype).requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = hnm_loss(a, p, temperature=0.5, backend="triton")
    ga, gp = torch.autograd.grad(loss, (a, p))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    n_bytes = 2 * B * d * a.element_size()
    # O(N d): Z, dZ and a few fp32 row vectors; a single 2B x 2B fp32 matrix would be 1 GiB
    assert extra < 8 * n_bytes + 64 * 2 * B * 4 + (8 << 20), f"peak extra memory {extra / 2**20:.1f} MiB"
    if dtype == torch.float32:
        ar, pr = a.detach().clone().requires_grad_(True), p.detach().clone().requires_grad_(True)
        lr = hnm_loss(ar, pr, temperature=0.5, backend="reference")
        gar, gpr = torch.autograd.grad(lr, (ar, pr))
        assert_close(loss, lr, rtol=1e-4, scale="elem", name="large loss")
        assert_close(ga, gar, rtol=1e-4, name="large d anchor")
        assert_close(gp, gpr, rtol=1e-4, name="large d positive")


def test_reference_backend_works_without_triton():
    """The ops import and run on the reference backend when triton cannot be imported."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from cdp_fast.kernels import hnm_loss, infonce_loss, hnm_guided_ddim_update\n"
        "a, p = torch.randn(5, 4), torch.randn(5, 4)\n"
        "assert torch.isfinite(hnm_loss(a, p)) and torch.isfinite(infonce_loss(a, p))\n"
        "assert hnm_guided_ddim_update(a, p, 0.5, 0.6, p, scale=1.0).shape == a.shape\n"
        "try:\n"
        "    hnm_loss(a, p, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('backend=triton without triton did not raise')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# Issue 9: fp16 backward (emulated on the CPU) and the empty-negative-set check
# ------------------------------------------------------------------------------------------
interpreter_only = pytest.mark.skipif(not (interpreting() and triton_available()),
                                      reason="needs TRITON_INTERPRET=1")


def _max_rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@interpreter_only
def test_fp16_backward_g_is_not_subnormal():
    """G is cast to fp16 before the second dot. It used to carry the mean's 1/n: at T = 0.5 all of
    it subnormal from N = 1024, flushed to zero at N = 16384. B = 64 with the loss scaled by
    1/256 puts the old G where N = 32768 puts it (1.5e-7: 3.7e-3 / 2.8e-2 gradient error in this
    case); with the coefficients scaled by n (1/n folded into the fp32 accumulator) the kernel
    is within 1e-3 of the fp16 rounding of the exact gradient."""
    from cdp_fast.kernels._tiles import gpu_tiles_in_interpreter

    g = torch.Generator().manual_seed(0)
    B, d, T = 64, 32, 0.5
    a = F.normalize(torch.randn(B, d, generator=g), dim=1)
    p = F.normalize(a + 0.3 * torch.randn(B, d, generator=g), dim=1)
    bank = F.normalize(torch.randn(40, d, generator=g), dim=1)
    x16 = [t.half().requires_grad_(True) for t in (a, p, bank)]
    x64 = [t.detach().double().requires_grad_(True) for t in x16]
    with gpu_tiles_in_interpreter():
        l16 = hnm_loss(x16[0], x16[1], bank=x16[2], temperature=T, backend="triton") / 256
        g16 = torch.autograd.grad(l16, x16)
    l64 = hnm_loss(x64[0], x64[1], bank=x64[2], temperature=T, backend="reference") / 256
    g64 = torch.autograd.grad(l64, x64)
    for name, x, e in zip(("anchor", "positive", "bank"), g16, g64, strict=True):
        assert x.dtype == torch.float16
        floor = _max_rel(e.half(), e)
        assert _max_rel(x, e) < floor + 1e-3, (name, _max_rel(x, e), floor)


def test_validation_builds_no_dense_mask(monkeypatch):
    """validate_hnm_inputs no longer builds the 2B x (2B + M) masks (4.3 GB per temporary at
    N = 65536); an empty negative set is caught from the counts the forward computes anyway."""
    from cdp_fast.kernels import hnm_ref

    def boom(*a, **k):
        raise AssertionError("validate_hnm_inputs built a dense negative mask")

    a, p = make_embeddings(6, 4, "random")
    monkeypatch.setattr(hnm_ref, "negative_mask", boom)
    G = hnm_ref.validate_hnm_inputs(a, p, temperature=1.0, tau_plus=0.1, beta=1.0, estimator="hard",
                                    labels=torch.zeros(6, dtype=torch.long), bank=None, bank_labels=None,
                                    group_size=None)
    assert G == 6


@interpreter_only
@pytest.mark.parametrize("kw", [dict(labels=torch.zeros(6, dtype=torch.long)),
                                dict(labels=torch.tensor([0, 0, 0, 1, 1, 1]), group_size=3)])
def test_triton_path_reports_empty_negative_sets_from_kernel_counts(kw):
    a, p = make_embeddings(6, 4, "random")
    with pytest.raises(ValueError, match="row 0 has no negatives"):
        hnm_loss(a, p, backend="triton", **kw)
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="no negatives"):
        hnm_guided_ddim_update(x, x, 0.5, 0.6, x, scale=1.0, backend="triton", **kw)


# ------------------------------------------------------------------------------------------
# Issue 14: the beta = 1 path (one exp per element) and the two loop structures (row tile
# resident, BLOCK_K = BLOCK_DO >= d; or features streamed in chunks), at odd sizes
# ------------------------------------------------------------------------------------------
def _prepared_flags(beta, estimator, d=8, dtype=torch.float32):
    from cdp_fast.kernels import hnm as hnm_mod

    a, p = make_embeddings(4, d, "random", dtype=dtype)
    return hnm_mod._Prepared(a, p, None, None, None, 4, 0.5, beta, estimator).flags()


def test_beta_one_path_is_chosen_exactly_at_beta_one():
    assert _prepared_flags(1.0, "hard")["BETA_ONE"] is True
    assert _prepared_flags(1, "hard")["BETA_ONE"] is True
    assert _prepared_flags(0.999, "hard")["BETA_ONE"] is False
    assert _prepared_flags(1.0, "easy")["BETA_ONE"] is False   # easy has one exp per element anyway


def test_hnm_tile_structure():
    from cdp_fast.kernels import _tiles

    with _tiles.gpu_tiles_in_interpreter():
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for d in (64, 100, 128, 3072):
                t = _tiles.hnm_tile_config(d, dt)
                if t["RESIDENT"]:   # one feature chunk: BLOCK_K covers d, the backward reuses the column tile
                    assert t["BLOCK_K"] >= d and t["BLOCK_DO"] == t["BLOCK_K"], (d, dt, t)
                else:
                    assert t["BLOCK_K"] < d, (d, dt, t)
                assert t["RESIDENT"] == (dt != torch.float32 and d % 16 == 0 and d <= _tiles.HNM_RESIDENT_MAX_D)
            assert _tiles.hnm_tile_config(128, dt)["RESIDENT"] == (dt != torch.float32)
    if interpreting():   # the CPU tests cover both structures
        assert _tiles.hnm_tile_config(29, torch.float32)["RESIDENT"]
        assert not _tiles.hnm_tile_config(37, torch.float32)["RESIDENT"]


def test_fp32_dot_precision_switch(monkeypatch):
    from cdp_fast.kernels._tiles import fp32_dot_precision

    monkeypatch.delenv("CDP_FAST_FP32_DOT", raising=False)
    assert fp32_dot_precision() == "ieee"          # the default stays exact fp32
    monkeypatch.setenv("CDP_FAST_FP32_DOT", "TF32x3")
    assert fp32_dot_precision() == "tf32x3"
    # under the interpreter (and for half inputs) the kernels get tl.dot's default
    assert _prepared_flags(1.0, "hard")["FP32_DOT"] == ("" if interpreting() else "tf32x3")
    assert _prepared_flags(1.0, "hard", dtype=torch.bfloat16)["FP32_DOT"] == ""
    monkeypatch.setenv("CDP_FAST_FP32_DOT", "tf32")
    with pytest.raises(ValueError, match="CDP_FAST_FP32_DOT"):
        fp32_dot_precision()


# d = 29: resident row tile under the interpreter (BLOCK_K = BLOCK_DO = 32); d = 37: chunked
# (3 feature chunks of 16 in both the similarity and the output). B, G, M: not tile multiples.
FA2_CASES = [(beta, est, d) for d in (29, 37) for beta, est in ((1.0, "hard"), (0.7, "hard"), (1.0, "easy"))]


@interpreter_only
@pytest.mark.parametrize("beta,estimator,d", FA2_CASES, ids=[f"b{c[0]}-{c[1]}-d{c[2]}" for c in FA2_CASES])
def test_triton_odd_shapes_beta_paths(beta, estimator, d, assert_close):
    B, G, M = 22, 11, 13
    a, p = make_embeddings(B, d, "random")
    kw = dict(variant_kwargs("groups+labels+bank", B, d, M=M, G=G), temperature=0.5, tau_plus=0.1,
              beta=beta, estimator=estimator)
    results = {}
    for backend in ("reference", "triton"):
        leaves = [a.clone().requires_grad_(True), p.clone().requires_grad_(True),
                  kw["bank"].clone().requires_grad_(True)]
        loss = hnm_loss(leaves[0], leaves[1], backend=backend, **{**kw, "bank": leaves[2]})
        results[backend] = [loss.detach()] + list(torch.autograd.grad(1.3 * loss, leaves))
    for x, y, n in zip(results["triton"], results["reference"], ("loss", "anchor", "positive", "bank"), strict=True):
        assert_close(x, y, rtol=1e-4, atol=1e-7, name=n)
        assert float(y.abs().max()) > 0, n


@interpreter_only
@pytest.mark.parametrize("beta,estimator,d", FA2_CASES, ids=[f"b{c[0]}-{c[1]}-d{c[2]}" for c in FA2_CASES])
def test_guided_odd_shapes_beta_paths(beta, estimator, d, assert_close):
    B = 14
    g = torch.Generator().manual_seed(d)
    x, eps, noise = (torch.randn(B, d, generator=g) for _ in range(3))
    positive = x + 0.3 * torch.randn(B, d, generator=g)
    kw = dict(temperature=4.0, tau_plus=0.1, beta=beta, estimator=estimator, labels=make_labels(B, 3),
              group_size=7, bank=torch.randn(5, d, generator=g), scale=40.0, eta=0.6, noise=noise, clip_x0=1.5)
    a_t = torch.linspace(0.3, 0.8, B)
    ref = hnm_guided_ddim_update(x, eps, a_t, a_t + 0.15, positive, backend="reference", **kw)
    tri = hnm_guided_ddim_update(x, eps, a_t, a_t + 0.15, positive, backend="triton", **kw)
    assert_close(tri, ref, rtol=1e-5, name="guided")


@interpreter_only
@pytest.mark.parametrize("d", [96, 300])   # half-dtype GPU tiles: resident 128 x 64 (96 of 128 features) / chunked
def test_half_gpu_tiles_in_fp32_numerics(d, monkeypatch):
    """The bf16/fp16 GPU tiles (BLOCK_R = 128) at odd sizes, run in fp32 (the interpreter's only
    trustworthy dtype): rows, columns, features and bank all partial tiles."""
    from cdp_fast.kernels import _tiles
    from cdp_fast.kernels import hnm as hnm_mod
    from cdp_fast.kernels.hnm_ref import hnm_loss_reference

    monkeypatch.setattr(hnm_mod, "hnm_tile_config", lambda D, dt: _tiles.hnm_tile_config(D, torch.bfloat16))
    g = torch.Generator().manual_seed(d)
    B, G, M = (70, 35, 67) if d <= 128 else (40, 20, 37)   # every row, column and bank tile partial
    a = F.normalize(torch.randn(B, d, generator=g), dim=1)
    p = F.normalize(a + 0.3 * torch.randn(B, d, generator=g), dim=1)
    bank = F.normalize(torch.randn(M, d, generator=g), dim=1)
    kw = dict(group_size=G, labels=torch.arange(B) % 3, bank_labels=torch.arange(M) % 2 + 1, temperature=0.5)
    with _tiles.gpu_tiles_in_interpreter():
        assert hnm_mod.hnm_tile_config(d, torch.float32)["BLOCK_R"] == (128 if d <= 128 else 64), d
        for beta in (1.0, 0.7) if d <= 128 else (1.0,):   # (beta != 1 chunked: the d = 37 tests)
            lt = [t.clone().requires_grad_(True) for t in (a, p, bank)]
            lr = [t.clone().requires_grad_(True) for t in (a, p, bank)]
            yt = hnm_loss(lt[0], lt[1], bank=lt[2], beta=beta, backend="triton", **kw)
            yr = hnm_loss_reference(lr[0], lr[1], bank=lr[2], beta=beta, **kw)
            assert _max_rel(yt, yr) < 1e-5, beta
            for x, y in zip(torch.autograd.grad(yt, lt), torch.autograd.grad(yr, lr), strict=True):
                assert _max_rel(x, y) < 1e-4, beta
