"""Pixel-space path of the fused HNM-guided DDIM step (kernels/_hnm_pixel.py, issue 14 item 4):
parity with the pure-PyTorch oracle at odd shapes and every variant, GPU tiles through the
interpreter, group chunking, and that hnm_guided_ddim_update dispatches to it (launch counts).
Runs the kernels under TRITON_INTERPRET=1 (fp32 only: the interpreter's half dots are not the
GPU's); without it (and without CUDA) the tests are skipped.
"""
from __future__ import annotations

import collections

import pytest
import torch

from cdp_fast.kernels import _tiles, hnm_guided_ddim_update
from cdp_fast.kernels._backend import interpreting, triton_available
from cdp_fast.kernels.hnm_ref import hnm_guided_ddim_reference

pytestmark = pytest.mark.skipif(
    not (triton_available() and (torch.cuda.is_available() or interpreting())),
    reason="needs triton with CUDA or TRITON_INTERPRET=1")

if triton_available():
    from cdp_fast.kernels import _hnm_pixel, hnm


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture
def launches(monkeypatch):
    """Counts the launches of the pixel kernels and of the feature-chunked backward kernel."""
    counts = collections.Counter()
    for name, kernel in (("coef", _hnm_pixel._hnm_pixel_coef_kernel), ("gemm", _hnm_pixel._hnm_pixel_gemm_kernel),
                         ("bwd", hnm._hnm_bwd_kernel)):
        def run(*args, _orig=kernel.run, _name=name, **kwargs):
            counts[_name] += 1
            return _orig(*args, **kwargs)
        # setitem on the instance dict: its undo deletes the entry (setattr's undo would pin the bound
        # class method on the instance, and a later count_launches, which patches the class, would miss it)
        monkeypatch.setitem(kernel.__dict__, "run", run)
    return counts


def _inputs(B, shape, *, seed, pos_mix, M=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *shape, generator=g)
    eps = torch.randn(B, *shape, generator=g)
    pos = pos_mix * x + torch.randn(B, *shape, generator=g)
    noise = torch.randn(B, *shape, generator=g)
    d = x[0].numel()
    bank = torch.randn(M, d, generator=g) if M else None
    return x, eps, pos, noise, bank


# (id, B, image shape (d = its product), options); d >= 640 and odd, B small, G dividing B
CASES = [
    ("plain-hard-beta1", 8, (7, 10, 10), dict(estimator="hard", beta=1.0)),
    ("labels-groups-bank-banklabels-beta0.5-noise-clip-per-sample",
     12, (701,), dict(estimator="hard", beta=0.5, labels=True, group_size=6, M=5, bank_labels=True,
                      eta=0.7, clip_x0=1.5, per_sample=True)),
    ("easy-groups-bank-clip", 8, (3, 15, 15), dict(estimator="easy", group_size=4, M=7, clip_x0=1.5)),
    ("hard-beta2-labels-noise", 10, (643,), dict(estimator="hard", beta=2.0, labels=True, eta=1.0)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pixel_path_matches_reference(case, launches):
    _, B, shape, o = case
    x, eps, pos, noise, bank = _inputs(B, shape, seed=B, pos_mix=0.3, M=o.get("M", 0))
    kw = dict(temperature=30.0, tau_plus=0.1, beta=o.get("beta", 1.0), estimator=o["estimator"],
              group_size=o.get("group_size"), bank=bank)
    if o.get("labels"):
        kw["labels"] = torch.arange(B) % 3
    if o.get("bank_labels"):
        kw["bank_labels"] = torch.arange(o["M"]) % 2 + 1
    eta = o.get("eta", 0.0)
    kw.update(eta=eta, noise=noise if eta > 0 else None, clip_x0=o.get("clip_x0"))
    a_t, a_next = (torch.linspace(0.3, 0.8, B), torch.linspace(0.45, 0.95, B)) if o.get("per_sample") else (0.5, 0.6)
    scale = 3000.0
    ref = hnm_guided_ddim_reference(x, eps, a_t, a_next, pos, scale=scale, **kw)
    # the case exercises what it names: guidance, clip and noise change the result
    assert _rel(ref, hnm_guided_ddim_reference(x, eps, a_t, a_next, pos, scale=0.0, **kw)) > 1e-2
    if kw["clip_x0"] is not None:
        assert _rel(ref, hnm_guided_ddim_reference(x, eps, a_t, a_next, pos, scale=scale, **dict(kw, clip_x0=None))) > 1e-2
    out = hnm_guided_ddim_update(x, eps, a_t, a_next, pos, scale=scale, backend="triton", **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert _rel(out, ref) < 1e-5
    assert dict(launches) == {"coef": 1, "gemm": 1}, "hnm_guided_ddim_update did not take the pixel path"


def test_dispatch_threshold(launches, monkeypatch):
    # d >= PIXEL_MIN_D takes the pixel path, below it the feature-chunked backward (threshold
    # lowered so that the old path runs at a cheap d)
    monkeypatch.setattr(_hnm_pixel, "PIXEL_MIN_D", 24)
    kw = dict(temperature=3.0, scale=300.0)
    for d, want in ((23, {"bwd": 1}), (24, {"coef": 1, "gemm": 1})):
        launches.clear()
        x, eps, pos, _, _ = _inputs(6, (d,), seed=d, pos_mix=0.3)
        out = hnm_guided_ddim_update(x, eps, 0.5, 0.6, pos, backend="triton", **kw)
        assert dict(launches) == want, d
        assert _rel(out, hnm_guided_ddim_reference(x, eps, 0.5, 0.6, pos, **kw)) < 1e-5


def test_group_chunks_give_the_same_result(launches, monkeypatch):
    # 3 groups of 2 anchors; a budget of 2.5 groups' buffer -> chunks of 2 groups and 1 group
    # (chunking does not depend on d: threshold lowered, cheap d)
    monkeypatch.setattr(_hnm_pixel, "PIXEL_MIN_D", 32)
    B, G, d, M = 6, 2, 40, 3
    x, eps, pos, _, bank = _inputs(B, (d,), seed=5, pos_mix=0.3, M=M)
    kw = dict(temperature=30.0, scale=3000.0, group_size=G, bank=bank)
    whole = hnm_guided_ddim_update(x, eps, 0.5, 0.6, pos, backend="triton", **kw)
    assert dict(launches) == {"coef": 1, "gemm": 1}
    monkeypatch.setattr(_hnm_pixel, "_H_BUDGET_BYTES", 5 * 4 * G * (2 * G + M) // 2)
    chunked = hnm_guided_ddim_update(x, eps, 0.5, 0.6, pos, backend="triton", **kw)
    assert dict(launches) == {"coef": 3, "gemm": 3}
    assert torch.equal(whole, chunked)
    assert _rel(whole, hnm_guided_ddim_reference(x, eps, 0.5, 0.6, pos, **kw)) < 1e-5


@pytest.mark.skipif(not interpreting(), reason="GPU tiles through the interpreter")
def test_gpu_tiles_pixel_numerics(launches):
    # the GPU tiles (32-wide fp32, 64-wide half) with partial row, column, feature and bank tiles:
    # G = 12 anchors (24 group columns) per group, M = 37, d = 700
    B, G, M, d = 24, 12, 37, 700
    x, eps, pos, noise, bank = _inputs(B, (d,), seed=3, pos_mix=0.3, M=M)
    kw = dict(temperature=30.0, scale=3000.0, group_size=G, bank=bank, labels=torch.arange(B) % 3,
              bank_labels=torch.arange(M) % 2 + 1, beta=0.5, eta=0.5, noise=noise, clip_x0=1.5)
    with _tiles.gpu_tiles_in_interpreter():
        tiles = _hnm_pixel.pixel_tiles(torch.float32)
        assert tiles["coef"]["BLOCK_R"] > 16 and tiles["gemm"]["BLOCK_DO"] < d, tiles
        out = hnm_guided_ddim_update(x, eps, 0.5, 0.6, pos, backend="triton", **kw)
    assert dict(launches) == {"coef": 1, "gemm": 1}
    assert _rel(out, hnm_guided_ddim_reference(x, eps, 0.5, 0.6, pos, **kw)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,gtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_pixel_path_gpu_sampler_size(dtype, gtol, launches, monkeypatch):
    # CIFAR pixel space at the authors' batch: 2 groups of 512, d = 3072
    B, G = 1024, 512
    x, eps, pos, _, _ = _inputs(B, (3, 32, 32), seed=11, pos_mix=0.1)
    dev = dict(device="cuda", dtype=dtype)
    x, eps, pos = x.to(**dev), eps.to(**dev), pos.to(**dev)
    kw = dict(temperature=30.0, group_size=G)
    ref = hnm_guided_ddim_reference(x.float(), eps.float(), 0.5, 0.6, pos.float(), scale=1e4, **kw)
    ref0 = hnm_guided_ddim_reference(x.float(), eps.float(), 0.5, 0.6, pos.float(), scale=0.0, **kw)
    delta = float((ref - ref0).abs().max())
    assert delta > 1e-2 * float(ref.abs().max()), "guidance has no visible effect: weak test"

    def run():   # x_next and the op's peak extra memory
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = hnm_guided_ddim_update(x, eps, 0.5, 0.6, pos, scale=1e4, backend="triton", **kw)
        torch.cuda.synchronize()
        return y, torch.cuda.max_memory_allocated() - base

    out, extra = run()
    assert dict(launches) == {"coef": 1, "gemm": 1}
    monkeypatch.setattr(_hnm_pixel, "PIXEL_MIN_D", 10 ** 9)   # the feature-chunked kernel, same inputs
    old, extra_old = run()
    assert launches["bwd"] == 1
    # the pixel path adds H (4 B 2G bytes: 4 MiB here) to what the chunked path needs
    assert extra <= extra_old + 4 * B * 2 * G + (1 << 20), f"{extra / 2**20:.1f} vs {extra_old / 2**20:.1f} MiB"
    rounding = 2 * torch.finfo(dtype).eps * float(ref.abs().max())   # of x_next in the output dtype
    for name, y in (("pixel", out), ("chunked", old)):
        err = float((y.float() - ref).abs().max())
        assert err <= gtol * delta + rounding, f"{name} {dtype}: |x_next - ref| {err:.3g}, guidance {delta:.3g}"
