"""InfoNCE: reference vs a literal implementation of the authors' variant, Triton vs reference
(forward and gradients, paired and with explicit negatives), gradcheck, bad inputs, determinism.
CPU tests run the Triton kernels under TRITON_INTERPRET=1; bf16/fp16 and large-N need CUDA.
"""
from __future__ import annotations

import math

import pytest
import torch

from cdp_fast.kernels import infonce_loss
from cdp_fast.kernels._backend import interpreting, triton_available

triton_ok = pytest.mark.skipif(
    not (triton_available() and (torch.cuda.is_available() or interpreting())),
    reason="needs triton with CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def literal_infonce(q, k, temperature, negatives=None):
    """Row by row: normalise by hand, -log softmax of the target logit (float64 friendly)."""
    def unit(v):
        return v / torch.sqrt((v * v).sum(-1, keepdim=True))
    q, k = unit(q), unit(k)
    losses = []
    for i in range(q.shape[0]):
        if negatives is None:
            logits = torch.stack([q[i] @ k[j] for j in range(k.shape[0])]) / temperature
            target = i
        else:
            n = unit(negatives)
            logits = torch.stack([q[i] @ k[i]] + [q[i] @ n[m] for m in range(n.shape[0])]) / temperature
            target = 0
        losses.append(torch.logsumexp(logits, 0) - logits[target])
    return torch.stack(losses).mean()


def make(B, d, M=None, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(B, d, generator=g, dtype=torch.float64)   # not normalised: the loss does it
    k = q + 2.0 * torch.randn(B, d, generator=g, dtype=torch.float64)
    n = None if M is None else torch.randn(M, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), None if n is None else n.to(dtype)


@pytest.mark.parametrize("B,d,M,T", [(9, 5, None, 0.1), (7, 4, 6, 0.1), (6, 3, None, 1.0), (5, 8, 1, 0.05)])
def test_reference_matches_literal(B, d, M, T, assert_close):
    q, k, n = make(B, d, M, dtype=torch.float64)
    leaves = [q.requires_grad_(True), k.requires_grad_(True)] + ([n.requires_grad_(True)] if n is not None else [])
    got = infonce_loss(q, k, temperature=T, negatives=n, backend="reference")
    want = literal_infonce(q, k, T, n)
    assert_close(got, want, rtol=1e-10, name="loss")
    for x, y in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert_close(x, y, rtol=1e-9, name="grad")


@pytest.mark.parametrize("M", [None, 3])
def test_reference_gradcheck(M):
    q, k, n = make(4, 3, M, dtype=torch.float64, seed=3)
    inputs = (q.requires_grad_(True), k.requires_grad_(True)) + ((n.requires_grad_(True),) if n is not None else ())

    def f(q_, k_, *n_):
        return infonce_loss(q_, k_, temperature=0.3, negatives=n_[0] if n_ else None, backend="reference")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


TRITON_CASES = [
    # id, B, d, M, T
    ("paired", 37, 24, None, 0.1),
    ("negatives", 37, 24, 21, 0.1),
    ("tiny-d", 19, 3, None, 0.05),
    ("one-negative", 18, 40, 1, 1.0),
    ("odd-more-negatives", 13, 35, 50, 0.2),   # M > B: more column tiles than row tiles
    ("one-feature-chunk-negatives", 17, 16, 11, 0.1),   # d = the interpreter's BLOCK_DO
]
BWD_PATHS = pytest.mark.parametrize("deterministic", [False, True], ids=["one-kernel", "two-kernel"])


@triton_ok
@BWD_PATHS
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_reference(case, deterministic, assert_close):
    name, B, d, M, T = case
    q, k, n = make(B, d, M)
    results = {}
    for backend in ("reference", "triton"):
        leaves = [q.clone().requires_grad_(True), k.clone().requires_grad_(True)]
        if n is not None:
            leaves.append(n.clone().requires_grad_(True))
        kw = dict(deterministic=deterministic) if backend == "triton" else {}
        loss = infonce_loss(leaves[0], leaves[1], temperature=T,
                            negatives=leaves[2] if n is not None else None, backend=backend, **kw)
        (2.5 * loss).backward()  # grad_output != 1
        results[backend] = (loss.detach(), [x.grad for x in leaves])
    (lr, gr), (lt, gt) = results["reference"], results["triton"]
    assert lt.shape == () and lt.dtype == torch.float32
    assert_close(lt, lr, rtol=1e-4, scale="elem", name=f"{name} loss")
    for x, y, nm in zip(gt, gr, ("query", "key", "negatives")):
        assert_close(x, y, rtol=1e-4, atol=1e-7, name=f"{name} d{nm}")
        assert float(y.abs().max()) > 0


@triton_ok
def test_triton_deterministic():
    """deterministic=True: bitwise reproducible (the one-kernel path's atomics are not, on a GPU)."""
    q, k, n = make(20, 24, 17)
    outs = []
    for _ in range(2):
        leaves = [q.clone().requires_grad_(True), k.clone().requires_grad_(True), n.clone().requires_grad_(True)]
        loss = infonce_loss(*leaves[:2], negatives=leaves[2], backend="triton", deterministic=True)
        loss.backward()
        outs.append([loss.detach()] + [x.grad for x in leaves])
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def _launched(monkeypatch) -> list:
    """Names of the InfoNCE kernels launched from now on, in order."""
    from cdp_fast.kernels import infonce as mod

    calls = []
    for name in ("_infonce_fwd_kernel", "_infonce_bwd_kernel", "_infonce_bwd_rows_kernel",
                 "_infonce_bwd_cols_kernel"):
        kern = getattr(mod, name)

        def run(*args, _name=name, _run=kern.run, **kwargs):
            calls.append(_name)
            return _run(*args, **kwargs)

        monkeypatch.setitem(kern.__dict__, "run", run)   # undo deletes it (see test_hnm_pixel's launches)
    return calls


def test_one_kernel_backward_rule():
    from cdp_fast.kernels.infonce import _one_kernel_backward

    assert _one_kernel_backward(deterministic=False, ieee=False)      # half dtypes, the interpreter
    assert not _one_kernel_backward(deterministic=True, ieee=False)
    assert not _one_kernel_backward(deterministic=False, ieee=True)   # fp32 dots on a GPU


@pytest.mark.skipif(not (interpreting() and triton_available()), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("M", [None, 9])
def test_backward_kernel_choice(M, monkeypatch):
    """One backward kernel by default; the two-kernel backward when asked for determinism,
    by argument or by torch.use_deterministic_algorithms; both give the same gradients."""
    q, k, n = make(21, 20, M)
    calls = _launched(monkeypatch)
    grads = {}
    for mode in ("default", "argument", "torch-flag", "argument-false-under-flag"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, n) if t is not None]
        kw = {"argument": dict(deterministic=True), "argument-false-under-flag": dict(deterministic=False)}.get(mode, {})
        old = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(mode in ("torch-flag", "argument-false-under-flag"))
        try:
            calls.clear()
            loss = infonce_loss(leaves[0], leaves[1], negatives=leaves[2] if M else None, backend="triton", **kw)
            grads[mode] = torch.autograd.grad(3.0 * loss, leaves)
        finally:
            torch.use_deterministic_algorithms(old)
        want = (["_infonce_bwd_kernel"] if mode in ("default", "argument-false-under-flag")
                else ["_infonce_bwd_rows_kernel", "_infonce_bwd_cols_kernel"])
        assert calls == ["_infonce_fwd_kernel"] + want, (mode, calls)
    for mode in ("argument", "torch-flag", "argument-false-under-flag"):
        for a, b in zip(grads[mode], grads["default"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@triton_ok
def test_deterministic_argument_checked():
    q, k, _ = make(4, 3)
    with pytest.raises(TypeError, match="deterministic"):
        infonce_loss(q, k, backend="triton", deterministic="yes")


@pytest.mark.skipif(not (interpreting() and triton_available()), reason="needs TRITON_INTERPRET=1")
@BWD_PATHS
@pytest.mark.parametrize("B,d,M", [(45, 100, None), (45, 100, 37), (23, 200, 70)])
def test_gpu_tiles_both_backward_paths(B, d, M, deterministic):
    """The GPU tiles (32-wide fp32 tiles, BLOCK_DO = 128) in the interpreter at sizes that are no
    tile multiples: partial row / column / feature tiles, two output-feature chunks at d = 200
    (each chunk's programs add their own slice of dc), grad_output != 1; fp64 reference."""
    from cdp_fast.kernels._tiles import gpu_tiles_in_interpreter, tile_config

    g = torch.Generator().manual_seed(B + d)
    q = torch.randn(B, d, generator=g)
    k = q + 0.5 * torch.randn(B, d, generator=g)
    n = None if M is None else torch.randn(M, d, generator=g)
    lt = [t.clone().requires_grad_(True) for t in (q, k, n) if t is not None]
    lr = [t.double().requires_grad_(True) for t in lt]
    with gpu_tiles_in_interpreter():
        assert tile_config(d, torch.float32)["BLOCK_C"] > 16     # the GPU tiles are in force
        yt = infonce_loss(lt[0], lt[1], negatives=lt[2] if M else None, temperature=0.2,
                          backend="triton", deterministic=deterministic)
        gt = torch.autograd.grad(-1.5 * yt, lt)
    yr = infonce_loss(lr[0], lr[1], negatives=lr[2] if M else None, temperature=0.2, backend="reference")
    gr = torch.autograd.grad(-1.5 * yr, lr)
    assert _max_rel(yt, yr) < 1e-5
    for name, a, e in zip("qkn", gt, gr, strict=False):
        assert float(e.abs().max()) > 0
        # fp32 kernels vs fp64: the chain through the normalisation cancels (q ~ k)
        assert _max_rel(a, e) < 3e-4, (name, _max_rel(a, e))


def test_scale_invariant_and_value():
    """Normalisation happens inside; identical orthogonal pairs give the closed form."""
    B = 4
    q = torch.eye(B, 6)
    loss = infonce_loss(5.0 * q, q, temperature=0.5, backend="reference")
    want = math.log(math.exp(2.0) + (B - 1)) - 2.0
    assert abs(float(loss) - want) < 1e-6


def _bad_cases():
    q, k, n = make(5, 4, 3)
    return [
        ("2-D", (q[None], k[None]), {}, ValueError),
        ("shapes differ", (q, k[:4]), {}, ValueError),
        ("dtypes differ", (q, k.double()), {}, TypeError),
        ("temperature", (q, k), dict(temperature=0), ValueError),
        ("at least 2 pairs", (q[:1], k[:1]), {}, ValueError),
        ("negatives must be 2-D", (q, k), dict(negatives=n[:, :2]), ValueError),
        ("negatives dtype", (q, k), dict(negatives=n.double()), TypeError),
        ("NaN or inf", (q, k.clone().fill_(float("nan"))), {}, ValueError),
        ("floating-point", (q.long(), k.long()), {}, TypeError),
        ("backend", (q, k), dict(backend="fast"), ValueError),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_bad_inputs(case):
    match, args, kw, exc = case
    with pytest.raises(exc, match=match):
        infonce_loss(*args, **kw)


@triton_ok
def test_triton_backend_rejects_fp64():
    q, k, _ = make(6, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="fp64"):
        infonce_loss(q, k, backend="triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,ftol,gtol", [(torch.bfloat16, 2e-3, 3e-2), (torch.float16, 1e-3, 5e-3)])
@pytest.mark.parametrize("M", [None, 333])
@BWD_PATHS
def test_half_precision_vs_fp32_reference_gpu(dtype, ftol, gtol, M, deterministic, assert_close):
    q, k, n = make(1000, 128, M)
    q, k = q.cuda().to(dtype), k.cuda().to(dtype)
    n = None if n is None else n.cuda().to(dtype)
    l16_in = [q.clone().requires_grad_(True), k.clone().requires_grad_(True)] + ([n.clone().requires_grad_(True)] if n is not None else [])
    l32_in = [x.detach().float().requires_grad_(True) for x in l16_in]
    l16 = infonce_loss(*l16_in[:2], negatives=l16_in[2] if n is not None else None, backend="triton",
                       deterministic=deterministic)
    l32 = infonce_loss(*l32_in[:2], negatives=l32_in[2] if n is not None else None, backend="reference")
    assert_close(l16, l32, rtol=ftol, scale="elem", name=f"{dtype} loss")
    for x, y in zip(torch.autograd.grad(l16, l16_in), torch.autograd.grad(l32, l32_in)):
        assert x.dtype == dtype
        # plus the output dtype's own rounding (the negatives' small gradients sit near fp16's
        # subnormal range: rounding the exact gradient alone costs ~4e-3 of its max)
        floor = float((y.to(dtype).float() - y).abs().max())
        assert_close(x, y, rtol=gtol, atol=floor, name=f"{dtype} grad")


@pytest.mark.gpu
@needs_cuda
def test_large_n_gpu(assert_close):
    B, d = 16384, 128
    q, k, _ = make(B, d)
    q = q.cuda().requires_grad_(True)
    k = k.cuda().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = infonce_loss(q, k, backend="triton")
    gq, gk = torch.autograd.grad(loss, (q, k))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 12 * B * d * 4 + (8 << 20), f"peak extra memory {extra / 2**20:.1f} MiB"
    qr, kr = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    lr = infonce_loss(qr, kr, backend="reference")
    gqr, gkr = torch.autograd.grad(lr, (qr, kr))
    assert_close(loss, lr, rtol=1e-4, scale="elem", name="loss")
    assert_close(gq, gqr, rtol=1e-4, name="dq")
    assert_close(gk, gkr, rtol=1e-4, name="dk")


# ------------------------------------------------------------------------------------------
# fp16 backward, emulated on the CPU (issue 9): the interpreter runs the fp16 casts exactly as
# the GPU kernels do (fp16 operands, fp32 accumulation), with the GPU tiles.
# ------------------------------------------------------------------------------------------
def _max_rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.skipif(not (interpreting() and triton_available()), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("M", [None, 150])
def test_fp16_backward_near_the_rounding_floor(M):
    """fp16 normalisation outside the Function and an fp16 dq cost 3-5e-3 (paired, from the
    p_ii ~ 1 cancellation) and 3e-3 (with negatives); now every gradient is within 1e-3 of the
    error of merely rounding the exact gradient to fp16."""
    from cdp_fast.kernels._tiles import gpu_tiles_in_interpreter

    g = torch.Generator().manual_seed(0)
    B, d = 96, 64
    q = torch.randn(B, d, generator=g)
    k = q + 0.5 * torch.randn(B, d, generator=g)
    n = None if M is None else torch.randn(M, d, generator=g)
    x16 = [t.half().requires_grad_(True) for t in ([q, k] if n is None else [q, k, n])]
    x64 = [t.detach().double().requires_grad_(True) for t in x16]
    with gpu_tiles_in_interpreter():
        l16 = infonce_loss(x16[0], x16[1], negatives=x16[2] if M else None, backend="triton")
        g16 = torch.autograd.grad(l16, x16)
    l64 = infonce_loss(x64[0], x64[1], negatives=x64[2] if M else None, backend="reference")
    g64 = torch.autograd.grad(l64, x64)
    for name, a, e in zip("qkn"[:len(g16)], g16, g64, strict=True):
        assert a.dtype == torch.float16
        floor = _max_rel(e.half(), e)   # the output dtype's own rounding
        assert _max_rel(a, e) < floor + 1e-3, (name, _max_rel(a, e), floor)
