"""The fused guided affine solver step (kernels/hnm.py ``hnm_guided_affine_update``, issue 20 §2):
out = c_x x + c_e (eps + scale grad_x L) + c_h h, the form of every continuous-sigma solver's
update (Euler, Heun's 2nd stage, DPM-Solver++(2M)). Parity with the pure-PyTorch reference
(``hnm_ref.hnm_guided_affine_reference``) at odd shapes and every variant, on both backward paths
(feature-chunked kernel, pixel-space GEMM), coefficients as floats / 0-d / per-sample tensors,
and that DDIM's coefficients reproduce ``hnm_guided_ddim_update``. Kernels run under
TRITON_INTERPRET=1 (fp32) or on CUDA; the reference-backend tests run anywhere.
"""
from __future__ import annotations

import math

import pytest
import torch

from cdp_fast.kernels import hnm_guided_affine_update, hnm_guided_ddim_update
from cdp_fast.kernels._backend import interpreting, triton_available
from cdp_fast.kernels.hnm_ref import hnm_guided_affine_reference

needs_kernels = pytest.mark.skipif(
    not (triton_available() and (torch.cuda.is_available() or interpreting())),
    reason="needs triton with CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _inputs(B, shape, *, seed, M=0):
    g = torch.Generator().manual_seed(seed)
    x, eps, h = (torch.randn(B, *shape, generator=g) for _ in range(3))
    pos = 0.3 * x + torch.randn(B, *shape, generator=g)
    bank = torch.randn(M, x[0].numel(), generator=g) if M else None
    return [t.to(DEV) if t is not None else None for t in (x, eps, pos, h, bank)]


def _coef(form, v, B):
    if form == "float":
        return v
    if form == "tensor0d":
        return torch.tensor(v, device=DEV)
    return torch.linspace(v, 2 * v, B, device=DEV)   # per sample, distinct values


# (id, B, sample shape, options): odd B and d; the pixel path cases lower its threshold
CASES = [
    ("plain-floats", 6, (5, 7), dict(coefs=("float",) * 3)),
    ("labels-groups-per-sample-h", 9, (37,), dict(labels=True, group_size=3, coefs=("per_sample",) * 3)),
    ("bank-banklabels-mixed-h-write", 8, (3, 13), dict(labels=True, M=5, bank_labels=True,
                                                       coefs=("per_sample", "tensor0d", "float"), write_eps=True)),
    ("easy-bank-0d-no-h", 7, (41,), dict(estimator="easy", M=4, coefs=("tensor0d",) * 2, no_h=True)),
    ("beta0.5-groups-write-no-h", 10, (29,), dict(beta=0.5, group_size=5, coefs=("float", "per_sample"),
                                                  write_eps=True, no_h=True)),
]


@needs_kernels
@pytest.mark.parametrize("pixel", [False, True], ids=["chunked", "pixel"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_affine_matches_reference(case, pixel, monkeypatch):
    from cdp_fast.kernels import _hnm_pixel

    _, B, shape, o = case
    d = math.prod(shape)
    # both backward paths at a cheap d: the pixel-space GEMM path from d on, or never
    monkeypatch.setattr(_hnm_pixel, "PIXEL_MIN_D", d if pixel else 10 ** 9)
    x, eps, pos, h, bank = _inputs(B, shape, seed=B + d, M=o.get("M", 0))
    kw = dict(temperature=3.0, estimator=o.get("estimator", "hard"), beta=o.get("beta", 1.0),
              group_size=o.get("group_size"), bank=bank,
              labels=(torch.arange(B, device=DEV) % 3) if o.get("labels") else None,
              bank_labels=(torch.arange(o["M"], device=DEV) % 2 + 1) if o.get("bank_labels") else None,
              scale=40.0, write_eps=o.get("write_eps", False))
    forms = o["coefs"]
    cx, ce = _coef(forms[0], 0.9, B), _coef(forms[1], -0.4, B)
    if not o.get("no_h"):
        kw.update(h=h, c_h=_coef(forms[2], 0.3, B))
    ref = hnm_guided_affine_reference(x, eps, pos, c_x=cx, c_e=ce, **kw)
    out = hnm_guided_affine_update(x, eps, pos, c_x=cx, c_e=ce, backend="triton", **kw)
    if kw["write_eps"]:
        (ref, ref_e), (out, out_e) = ref, out
        assert out_e.shape == x.shape and out_e.dtype == x.dtype
        assert _rel(out_e, ref_e) < 1e-5
        # e is the guided eps: guidance changed it
        assert _rel(ref_e, eps) > 1e-2
    assert out.shape == x.shape and out.dtype == x.dtype
    assert _rel(out, ref) < 1e-5
    # the case exercises what it names: guidance changes the step
    assert _rel(ref, hnm_guided_affine_reference(x, eps, pos, c_x=cx, c_e=ce, **dict(kw, scale=0.0, write_eps=False))) > 1e-2


@needs_kernels
@pytest.mark.parametrize("per_sample", [False, True])
def test_ddim_coefficients_reproduce_the_guided_ddim_step(per_sample):
    # x_next = sqrt(a_n) x0 + c1 z + c2 e, x0 = (x - sqrt(1 - a_t) e) / sqrt(a_t)
    #        = sqrt(a_n / a_t) x + (c2 - sqrt(a_n (1 - a_t) / a_t)) e + c1 z   (METHOD.md §3, no clip)
    B, shape, eta = 6, (3, 11), 0.6
    x, eps, pos, z, _ = _inputs(B, shape, seed=1)
    if per_sample:
        a_t, a_n = torch.linspace(0.3, 0.7, B, device=DEV), torch.linspace(0.4, 0.9, B, device=DEV)
    else:
        a_t, a_n = torch.tensor(0.5, device=DEV), torch.tensor(0.6, device=DEV)
    c1 = eta * torch.sqrt((1 - a_t / a_n) * (1 - a_n) / (1 - a_t))
    c2 = torch.sqrt(1 - a_n - c1 ** 2)
    kw = dict(scale=40.0, temperature=3.0, labels=torch.arange(B, device=DEV) % 2, group_size=3)
    want = hnm_guided_ddim_update(x, eps, a_t, a_n, pos, eta=eta, noise=z, backend="triton", **kw)
    got = hnm_guided_affine_update(x, eps, pos, c_x=torch.sqrt(a_n / a_t), c_e=c2 - torch.sqrt(a_n * (1 - a_t) / a_t),
                                   h=z, c_h=c1, backend="triton", **kw)
    assert _rel(got, want) < 1e-5
    assert _rel(want, hnm_guided_ddim_update(x, eps, a_t, a_n, pos, eta=eta, noise=z, backend="triton",
                                             **dict(kw, scale=0.0))) > 1e-2   # guided


def test_reference_backend_and_fp64():
    # the reference path (any device, fp64 included) equals the reference itself
    B = 5
    x, eps, pos, h, _ = (t.double() if t is not None else None for t in _inputs(B, (9,), seed=2))
    kw = dict(c_x=0.5, c_e=torch.full((B,), -0.2, dtype=torch.float64, device=DEV), h=h, c_h=0.1, scale=5.0,
              temperature=2.0)
    out, e = hnm_guided_affine_update(x, eps, pos, write_eps=True, backend="reference", **kw)
    ref, ref_e = hnm_guided_affine_reference(x, eps, pos, write_eps=True, **kw)
    assert out.dtype == torch.float64 and torch.equal(out, ref) and torch.equal(e, ref_e)
    # scale = 0: the plain affine step, out = c_x x + c_e eps + c_h h
    plain = hnm_guided_affine_update(x, eps, pos, backend="reference", **dict(kw, scale=0.0))
    assert _rel(plain, 0.5 * x - 0.2 * eps + 0.1 * h) < 1e-6


@pytest.mark.parametrize("bad,err,match", [
    (dict(c_h=0.5), ValueError, "c_h is given but h is None"),
    (dict(c_x=float("nan")), ValueError, "c_x must be a finite number"),
    (dict(c_e=torch.ones(3)), ValueError, r"c_e must be a number, a 0-d tensor or a per-sample tensor \[B\]=\[5\]"),
    (dict(c_x=torch.ones(5, dtype=torch.int64)), TypeError, "c_x must be a floating-point tensor"),
    (dict(h="h"), TypeError, "h must be a torch.Tensor"),
    (dict(h=torch.zeros(5, 4)), ValueError, "h shape"),
    (dict(scale=float("inf")), ValueError, "scale must be a finite number"),
])
def test_bad_arguments_are_refused(bad, err, match):
    x, eps, pos, _, _ = _inputs(5, (3,), seed=4)
    kw = dict(dict(c_x=1.0, c_e=0.5, scale=1.0), **bad)
    with pytest.raises(err, match=match):
        hnm_guided_affine_update(x, eps, pos, backend="reference", **kw)


@pytest.mark.skipif(not (interpreting() and triton_available()), reason="GPU tiles through the interpreter")
def test_gpu_tiles_affine_numerics():
    # the GPU's fp32 tiles (32 rows, 128-wide output chunks) with partial row / feature / bank
    # tiles: G = 12 anchors per group, d = 100, M = 37; per-sample coefficients, h, write_eps
    from cdp_fast.kernels import _tiles

    B, G, M = 36, 12, 37
    x, eps, pos, h, bank = _inputs(B, (100,), seed=6, M=M)
    kw = dict(c_x=_coef("per_sample", 0.9, B), c_e=_coef("tensor0d", -0.4, B), h=h, c_h=0.3, scale=40.0,
              temperature=3.0, group_size=G, bank=bank, labels=torch.arange(B, device=DEV) % 3,
              bank_labels=torch.arange(M, device=DEV) % 2 + 1, write_eps=True)
    with _tiles.gpu_tiles_in_interpreter():
        assert _tiles.hnm_tile_config(100, torch.float32)["BLOCK_R"] == 32
        out, e = hnm_guided_affine_update(x, eps, pos, backend="triton", **kw)
    ref, ref_e = hnm_guided_affine_reference(x, eps, pos, **kw)
    assert _rel(out, ref) < 1e-5 and _rel(e, ref_e) < 1e-5
