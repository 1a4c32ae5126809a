"""Issue 14 item 6: device launches and host syncs of one fused HNM call at the sampler's size.

Counted with ``cdp_fast.kernels._launches.count_launches`` (Triton launches + device ATen ops +
host syncs) under TRITON_INTERPRET=1. Before this change (main e823699, same counter) one
``hnm_loss`` forward + backward at N = 2B = 1024, d = 128, fp32 made 63 launches (2 Triton + 61
ATen) and 1 sync without labels, 66 launches and 2 syncs with labels; the fused
``hnm_guided_ddim_update`` 85 launches (tensor alphas) and 1 sync. At N = 1024 the interpreter
would take many minutes to run the kernels, so the budgets are checked with the kernels
recorded, not run (``execute=False``); ``test_recorded_counts_equal_executed_counts`` shows that
this counts exactly what a real run at a small N counts (the host side never branches on N or on
kernel outputs with ``check=False``).
"""
import pytest
import torch
import torch.nn.functional as F

from cdp_fast.kernels import hnm_guided_ddim_update, hnm_loss
from cdp_fast.kernels._backend import interpreting, triton_available
from cdp_fast.kernels._launches import count_launches

interpreter_only = pytest.mark.skipif(not (interpreting() and triton_available()),
                                      reason="needs TRITON_INTERPRET=1")

# what the hot path (check=False) reaches; a change that adds a launch or a sync must say so here
BUDGET = {  # case: (forward launches, backward launches, syncs)
    "plain": (3, 3, 0),     # cat(A, P), forward, epilogue | ones_like (autograd), coef * grad_out, backward
    "labels": (4, 3, 0),    # + cat(labels, labels)
}
GUIDED_BUDGET = 4           # cat(x, positive), forward, epilogue, backward with the DDIM update fused


def _pair(B, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(B, d, generator=g), dim=1).requires_grad_(True)
    p = F.normalize(torch.randn(B, d, generator=g), dim=1).requires_grad_(True)
    return a, p


def _loss_counts(B, d, case, *, execute, check=False):
    a, p = _pair(B, d)
    kw = dict(labels=torch.arange(B) % 10) if case == "labels" else {}
    with count_launches(execute) as fwd:
        loss = hnm_loss(a, p, backend="triton", check=check, **kw)
    with count_launches(execute) as bwd:
        loss.backward()
    return fwd, bwd


def _guided_counts(B, d, *, execute, check=False):
    g = torch.Generator().manual_seed(1)
    x, e, pos = (torch.randn(B, d, generator=g) for _ in range(3))
    with count_launches(execute) as c:
        hnm_guided_ddim_update(x, e, torch.tensor(0.5), torch.tensor(0.6), pos, scale=2.0, backend="triton",
                               check=check)
    return c


@interpreter_only
@pytest.mark.parametrize("case", sorted(BUDGET))
def test_hnm_loss_launch_budget_at_sampler_size(case):
    fwd, bwd = _loss_counts(512, 128, case, execute=False)
    nf, nb, ns = BUDGET[case]
    assert fwd.triton == ["_hnm_fwd_kernel", "_hnm_epilogue_kernel"] and bwd.triton == ["_hnm_bwd_kernel"]
    assert fwd.launches <= nf, fwd.summary()
    assert bwd.launches <= nb, bwd.summary()
    assert len(fwd.syncs) + len(bwd.syncs) <= ns, (fwd.summary(), bwd.summary())


@interpreter_only
def test_guided_step_launch_budget_at_sampler_size():
    c = _guided_counts(512, 128, execute=False)
    assert c.launches <= GUIDED_BUDGET and not c.syncs, c.summary()


@interpreter_only
def test_guided_affine_step_launch_budget_at_sampler_size():
    """The fused affine solver step costs what the DDIM one does (coefficients as device tensors
    or floats are read in the kernel: no launch, no sync), also with h and write_eps."""
    from cdp_fast.kernels import hnm_guided_affine_update

    B, d = 512, 128
    g = torch.Generator().manual_seed(2)
    x, e, pos, h = (torch.randn(B, d, generator=g) for _ in range(4))
    c_x, c_e = torch.tensor(0.9), torch.full((B,), -0.3)
    with count_launches(False) as c:
        hnm_guided_affine_update(x, e, pos, c_x=c_x, c_e=c_e, h=h, c_h=0.2,
                                 scale=2.0, write_eps=True, backend="triton", check=False)
    assert c.triton == ["_hnm_fwd_kernel", "_hnm_epilogue_kernel", "_hnm_bwd_kernel"], c.summary()
    assert c.launches <= GUIDED_BUDGET and not c.syncs, c.summary()


@interpreter_only
def test_recorded_counts_equal_executed_counts():
    """Recording at N = 1024 counts what running the kernels counts (here at N = 16)."""
    for case in BUDGET:
        rec = _loss_counts(512, 128, case, execute=False)
        run = _loss_counts(8, 16, case, execute=True)
        for r, x in zip(rec, run, strict=True):
            assert r.as_dict() == x.as_dict(), (case, r.summary(), x.summary())
    assert _guided_counts(512, 128, execute=False).as_dict() == _guided_counts(8, 16, execute=True).as_dict()


@interpreter_only
def test_check_costs_one_sync_and_still_names_the_problem():
    """check=True (the default) reads one status word the kernels wrote: one sync and one extra
    launch (the status word's zero fill); bad input still gets the clear errors (NaN embeddings or
    bank, a row without negatives)."""
    fwd, bwd = _loss_counts(8, 16, "labels", execute=True, check=True)
    assert fwd.syncs == ["aten._local_scalar_dense"] and not bwd.syncs
    assert fwd.launches == BUDGET["labels"][0] + 1
    assert len(_guided_counts(8, 16, execute=True, check=True).syncs) == 1

    a, p = _pair(6, 4)
    bad = a.detach().clone().index_fill_(0, torch.tensor([2]), float("nan"))
    with pytest.raises(ValueError, match="anchor contains NaN or inf"):
        hnm_loss(bad, p, backend="triton")
    with pytest.raises(ValueError, match="positive contains NaN or inf"):
        hnm_loss(a, bad, backend="triton")
    with pytest.raises(ValueError, match="bank contains NaN or inf"):
        hnm_loss(a, p, bank=torch.full((3, 4), float("inf")), backend="triton")
    with pytest.raises(ValueError, match="row 0 has no negatives"):
        hnm_loss(a, p, labels=torch.zeros(6, dtype=torch.long), backend="triton")
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="anchor contains NaN or inf"):
        hnm_guided_ddim_update(bad, x, 0.5, 0.6, x, scale=1.0, backend="triton")


@interpreter_only
def test_unchecked_nan_reaches_the_gradient():
    """check=False skips the checks; a NaN embedding must then show up in its own gradient rows (so the
    sampler's once-per-run state check catches it), not vanish in the clamp max(s, ln 1e-4)."""
    a, p = _pair(6, 4)
    a_bad = a.detach().clone().index_fill_(0, torch.tensor([2]), float("nan")).requires_grad_(True)
    hnm_loss(a_bad, p, backend="triton", check=False).backward()
    assert not torch.isfinite(a_bad.grad[2]).any() and not torch.isfinite(p.grad[2]).any()


def test_counter_classifies_ops():
    """Views and allocations are not launches; .item()/.tolist()/nonzero are syncs."""
    x = torch.randn(4, 3)
    with count_launches() as c:
        y = x.t()[:, :2].unsqueeze(0).reshape(-1)  # views, then a reshape that must copy (clone)
        z = torch.empty(3)
        z.copy_(x[0])                       # one copy_
        w = (x * 2).sum()                   # mul, sum
        w.item()                            # sync
        x.tolist()                          # sync
        torch.nonzero(x > 0)                # gt, nonzero (launch + sync)
    assert dict(c.aten) == {"clone": 1, "copy_": 1, "mul": 1, "sum": 1, "gt": 1, "nonzero": 1}, c.summary()
    assert c.syncs == ["aten._local_scalar_dense", "Tensor.tolist", "aten.nonzero"]
    assert y.shape == (6,)


@interpreter_only
def test_counter_counts_triton_launches_and_not_their_internals():
    from cdp_fast.kernels import ddim_update

    x = torch.randn(4, 8)
    with count_launches() as c:
        ddim_update(x, x, 0.5, 0.6, backend="triton")
    assert c.triton == ["_ddim_fwd_kernel"], c.summary()
    with count_launches(execute=False) as rec:
        out = ddim_update(x, x, 0.5, 0.6, backend="triton")
    assert rec.triton == c.triton and out.shape == x.shape


# ------------------------------------------------------------------------------------------------
# the sampler's guidance: checks once per run, none per step
# ------------------------------------------------------------------------------------------------
def _gmm_sampler(guidance, backend):
    from cdp_fast import DDIMSampler, NoiseSchedule
    from cdp_fast.gmm import GaussianMixtureEps

    sched = NoiseSchedule.linear(num_train_timesteps=1000)
    gmm = GaussianMixtureEps([[1.0, 0.5], [-1.0, -0.5]], [0.3, 0.3], [0.5, 0.5], sched)
    return DDIMSampler(gmm, sched, steps=4, guidance=guidance, backend=backend, bf16=False, cuda_graphs=False)


@interpreter_only
def test_fused_guided_sampler_step_makes_no_host_sync():
    from cdp_fast import ContrastiveGuidance
    from cdp_fast.sampler import _Run

    s = _gmm_sampler(ContrastiveGuidance("hnm", None, scale=2.0, t_min=0), "triton")
    run = _Run(s, 8, (2,), 0, torch.arange(8) % 2, None, torch.device("cpu"), torch.float32)
    try:
        assert run.kinds[:2] == ["prime", "guided"] and run.grun.fused_ok
        with torch.no_grad():
            run.step("prime", False)
            with count_launches() as c:
                run.step("guided", False)
    finally:
        run.close()
    assert c.triton == ["_hnm_fwd_kernel", "_hnm_epilogue_kernel", "_hnm_bwd_kernel"], c.summary()
    assert not c.syncs, c.summary()


@pytest.mark.parametrize("fused", [True, False])
def test_guidance_rejects_labels_without_negatives_at_start(fused):
    """Conditional HNM guidance whose labels leave a row without negatives fails when the run starts
    (the per-step loss calls no longer check), with the message the loss itself gives."""
    from cdp_fast import ContrastiveGuidance

    g = ContrastiveGuidance("hnm", None if fused else torch.nn.Linear(2, 4), scale=1.0, t_min=0, fused=fused,
                            group_size=4)
    labels = torch.tensor([0, 0, 0, 0, 1, 0, 1, 1])     # the first group of 4 has one class only
    with pytest.raises(ValueError, match="row 0 has no negatives"):
        _gmm_sampler(g, "reference").sample(8, (2,), labels=labels)
    out = _gmm_sampler(g, "reference").sample(8, (2,), labels=torch.arange(8) % 2)
    assert torch.isfinite(out).all()


@interpreter_only
def test_epilogue_split_over_programs(monkeypatch, assert_close):
    """Above ROWS_PER_PROG pairs the epilogue runs several programs (partial loss sums added on the
    host, status words max-reduced): same values and the same clear errors as the reference."""
    from cdp_fast.kernels import _hnm_epilogue

    monkeypatch.setattr(_hnm_epilogue, "ROWS_PER_PROG", 4)
    g = torch.Generator().manual_seed(3)
    a, p = (torch.randn(10, 8, generator=g).requires_grad_(True) for _ in range(2))
    bank = torch.randn(13, 8, generator=g).requires_grad_(True)
    kw = dict(labels=torch.arange(10) % 3, bank=bank, bank_labels=torch.arange(13) % 2, temperature=0.5)
    with count_launches() as c:
        got = hnm_loss(a, p, backend="triton", **kw)
    assert c.aten["sum"] == 1 and c.aten["max"] == 1, c.summary()   # 4 programs: partials, statuses
    grads = torch.autograd.grad(got, (a, p, bank))
    want = hnm_loss(a, p, backend="reference", **kw)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    for x, y in zip(grads, torch.autograd.grad(want, (a, p, bank)), strict=True):
        assert_close(x, y, rtol=1e-4, atol=1e-6)
    bad = bank.detach().clone()
    bad[11, 3] = float("nan")                      # a bank row checked by the third program
    with pytest.raises(ValueError, match="bank contains NaN or inf"):
        hnm_loss(a, p, backend="triton", **{**kw, "bank": bad})
    lab = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 8])  # group 4 (pairs 8, 9: third program) is one class
    with pytest.raises(ValueError, match="row 8 has no negatives"):
        hnm_loss(a, p, labels=lab, group_size=2, backend="triton")


@interpreter_only
def test_adjacent_anchor_and_positive_are_not_copied(assert_close):
    """A and P as the two halves of one buffer: Z = [A; P] is a view, the forward is 2 launches."""
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    with count_launches() as c:
        loss = hnm_loss(z[:8], z[8:], backend="triton", check=False)
    assert c.launches == 2 and "cat" not in c.aten, c.summary()
    (got,) = torch.autograd.grad(loss, z)
    want = hnm_loss(z[:8], z[8:], backend="reference")
    assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert_close(got, torch.autograd.grad(want, z)[0], rtol=1e-4, atol=1e-6)


@interpreter_only
def test_epilogue_beta_one_coefficient():
    """With the kernels' beta = 1 flag (BETA_ONE in _Prepared.flags()) the epilogue hands them
    CA' = CA exp(2 LSE0 - LSE1); everything else is unchanged."""
    from cdp_fast.kernels import hnm

    a, p = _pair(6, 4)
    prep = hnm._Prepared(a.detach(), p.detach(), None, None, None, 6, 0.5, 1.0, "hard")
    lse1, lse0, cnt = hnm._forward_stats(prep)
    args = (prep, lse1, lse0, cnt, 0.1, 0.5)
    base = prep.flags
    assert base()["BETA_ONE"]   # hard, beta = 1: the kernels' one-exp path
    prep.flags = lambda: {**base(), "BETA_ONE": False}
    loss, coef, _, _ = hnm._row_epilogue(*args, check=False)
    prep.flags = base
    loss1, coef1, _, _ = hnm._row_epilogue(*args, check=False)
    torch.testing.assert_close(loss1, loss)
    torch.testing.assert_close(coef1[1:], coef[1:])
    torch.testing.assert_close(coef1[0], coef[0] * torch.exp(2 * lse0 - lse1))
    assert bool((coef[0] != 0).any())
