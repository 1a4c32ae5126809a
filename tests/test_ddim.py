"""DDIM update: Triton kernel (interpreter on CPU) vs the PyTorch reference vs the METHOD.md §3 formula."""
from __future__ import annotations

import math

import pytest
import torch

from cdp_fast.kernels import ddim as ddim_mod
from cdp_fast.kernels import ddim_update
from cdp_fast.kernels._backend import interpreting, triton_available
from cdp_fast.kernels.ddim import advance_rng, make_rng_state, rng_advance
from cdp_fast.kernels.ddim_ref import ddim_coefficients, philox4x32_ref, philox_normal_ref
from cdp_fast.kernels.hnm_ref import ddim_coefficients_per_sample
from cdp_fast.sampler import DDIMSampler
from cdp_fast.schedules import NoiseSchedule

needs_triton = pytest.mark.skipif(
    not (triton_available() and (interpreting() or torch.cuda.is_available())),
    reason="Triton backend needs TRITON_INTERPRET=1 or CUDA")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = [(3, 5, 7), (1, 3, 17, 19), (2, 3, 17, 19)]  # the last one spans two kernel blocks


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x, eps, grad, z = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    return [t.to(device=_dev(), dtype=dtype) for t in (x * 1.5, eps, grad, z)]


def _alphas(mode, B):
    if mode == "float":
        return 0.31, 0.62
    if mode == "0d":
        table = torch.tensor([0.9, 0.62, 0.31], dtype=torch.float64, device=_dev())
        return table[2], table[1]  # device scalars, as the sampler indexes its tables
    a_t = torch.linspace(0.05, 0.7, B, dtype=torch.float32, device=_dev())
    a_n = torch.linspace(0.4, 1.0, B, dtype=torch.float32, device=_dev())  # includes a_next = 1
    return a_t, a_n


def _spec(x, eps, a_t, a_next, *, eta=0.0, z=None, grad=None, scale=0.0, clip=None,
          eps_from_clipped_x0=False):
    """METHOD.md §3 written out independently, in float64, per-sample loop over the batch."""
    B = x.shape[0]
    at = torch.as_tensor(a_t, dtype=torch.float64).expand(B) if not isinstance(a_t, torch.Tensor) or a_t.numel() == 1 \
        else a_t.double()
    an = torch.as_tensor(a_next, dtype=torch.float64).expand(B) if not isinstance(a_next, torch.Tensor) or a_next.numel() == 1 \
        else a_next.double()
    out, x0s = [], []
    for b in range(B):
        A, N = float(at.reshape(-1)[b] if at.numel() > 1 else at.reshape(-1)[0]), \
            float(an.reshape(-1)[b] if an.numel() > 1 else an.reshape(-1)[0])
        e = eps[b].double() + (scale * grad[b].double() if grad is not None else 0.0)
        x0 = (x[b].double() - math.sqrt(1 - A) * e) / math.sqrt(A)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            if eps_from_clipped_x0:
                e = (x[b].double() - math.sqrt(A) * x0) / math.sqrt(1 - A)
        c1 = eta * math.sqrt((1 - A / N) * (1 - N) / (1 - A))
        c2 = math.sqrt(max(1 - N - c1 ** 2, 0.0))
        xn = math.sqrt(N) * x0 + c2 * e
        if eta > 0:
            xn = xn + c1 * z[b].double()
        out.append(xn)
        x0s.append(x0)
    return torch.stack(out), torch.stack(x0s)


def _close(a, b, tol, what):
    a, b = a.double().cpu(), b.double().cpu()
    err = ((a - b).abs() / (1 + b.abs())).max().item()
    assert err <= tol, f"{what}: max rel err {err:.3g} > {tol} (worst at {((a - b).abs()).argmax().item()})"


VARIANTS = {
    "plain": dict(),
    "guided": dict(grad=True, scale=0.37),
    "clip": dict(clip=0.8),
    "clip-eps-from-clipped-x0": dict(clip=0.8, eps_from_clipped_x0=True),
    "eta": dict(eta=0.6, z=True),
    "all": dict(grad=True, scale=-0.2, clip=1.0, eta=1.0, z=True),
}


def _kw(v, grad, z):
    return dict(eta=v.get("eta", 0.0), noise=z if v.get("z") else None, grad=grad if v.get("grad") else None,
                scale=v.get("scale", 0.0), clip_x0=v.get("clip"),
                eps_from_clipped_x0=v.get("eps_from_clipped_x0", False))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("amode", ["float", "0d", "per-sample"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_matches_spec(shape, amode, variant):
    x, eps, grad, z = _inputs(shape)
    a_t, a_n = _alphas(amode, shape[0])
    v = VARIANTS[variant]
    out, x0 = ddim_update(x, eps, a_t, a_n, return_x0=True, backend="reference", **_kw(v, grad, z))
    want, want_x0 = _spec(x, eps, a_t, a_n, eta=v.get("eta", 0.0), z=z, grad=grad if v.get("grad") else None,
                          scale=v.get("scale", 0.0), clip=v.get("clip"),
                          eps_from_clipped_x0=v.get("eps_from_clipped_x0", False))
    _close(out, want, 1e-5, "x_next")
    _close(x0, want_x0, 1e-5, "x0")
    if v.get("clip"):
        assert (x0.abs() == v["clip"]).any(), "test must make the clamp bind"


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("amode", ["float", "0d", "per-sample"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_matches_reference(shape, amode, variant):
    x, eps, grad, z = _inputs(shape, seed=1)
    a_t, a_n = _alphas(amode, shape[0])
    kw = _kw(VARIANTS[variant], grad, z)
    out, x0 = ddim_update(x, eps, a_t, a_n, return_x0=True, backend="triton", **kw)
    ref, ref_x0 = ddim_update(x, eps, a_t, a_n, return_x0=True, backend="reference", **kw)
    assert out.dtype == x.dtype and out.shape == x.shape
    _close(out, ref, 1e-5, "x_next")
    _close(x0, ref_x0, 1e-5, "x0")
    only = ddim_update(x, eps, a_t, a_n, backend="triton", **kw)
    assert isinstance(only, torch.Tensor)
    _close(only, ref, 1e-5, "x_next without x0")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_a_next_one_returns_x0(backend):
    x, eps, grad, z = _inputs((2, 3, 5))
    out, x0 = ddim_update(x, eps, 0.2, 1.0, eta=1.0, noise=z, grad=grad, scale=0.5, clip_x0=1.0,
                          return_x0=True, backend=backend)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    e = eps + 0.5 * grad
    torch.testing.assert_close(x0, ((x - math.sqrt(0.8) * e) / math.sqrt(0.2)).clamp(-1, 1), rtol=1e-5, atol=1e-5)


@needs_triton
def test_layouts_and_mixed_dtypes():
    """channels_last x, non-contiguous eps, and an eps of another dtype than x (bf16 autocast)."""
    x, eps, grad, z = _inputs((2, 3, 6, 5))
    xc = x.to(memory_format=torch.channels_last)
    eps_t = eps.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    out = ddim_update(xc, eps_t, 0.3, 0.5, grad=grad, scale=0.1, backend="triton")
    ref = ddim_update(x, eps, 0.3, 0.5, grad=grad, scale=0.1, backend="reference")
    assert out.is_contiguous(memory_format=torch.channels_last)
    _close(out, ref, 1e-5, "channels_last")
    out2 = ddim_update(x[:, :, 1:], eps[:, :, 1:], torch.tensor([0.3, 0.4]), 0.5, backend="triton")
    _close(out2, ddim_update(x[:, :, 1:], eps[:, :, 1:], torch.tensor([0.3, 0.4]), 0.5, backend="reference"),
           1e-5, "sliced")
    e64 = eps.double()
    _close(ddim_update(x, e64, 0.3, 0.5, backend="triton"), ddim_update(x, eps, 0.3, 0.5, backend="reference"),
           1e-5, "fp64 eps into fp32 x")


# ---------------------------------------------------------------- in-kernel Philox noise
def _noise_of(x, eps, rng_state, backend):
    """Recover z from x_next = mean + c1 z (a_t, a_next chosen so c1 = 1 / 2)."""
    a_t, a_n = 0.2, 0.5
    c1 = math.sqrt((1 - a_t / a_n) * (1 - a_n) / (1 - a_t))
    noisy = ddim_update(x, eps, a_t, a_n, eta=1.0, rng_state=rng_state, backend=backend)
    mean = ddim_update(x, eps, a_t, a_n, eta=1.0, noise=torch.zeros_like(x), backend="reference")
    return (noisy.double() - mean.double()) / c1


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_rng_state_noise(backend):
    x, eps, _, _ = _inputs((2, 3, 17, 19))
    n = x.numel()
    st = make_rng_state(1234, device=x.device)
    z1 = _noise_of(x, eps, st, backend)
    assert st.tolist() == [1234, rng_advance(n)], "ddim_update must advance the offset by x.numel(), rounded up to 4"
    assert rng_advance(n) == n + 2  # n = 1938: whole Philox calls of 4 normals
    assert abs(z1.mean().item()) < 0.1 and abs(z1.std().item() - 1) < 0.1, (z1.mean(), z1.std())
    assert abs(z1.flatten()[:-1].mul(z1.flatten()[1:]).mean().item()) < 0.1  # neighbours uncorrelated
    z2 = _noise_of(x, eps, st, backend)  # advanced state: fresh noise
    assert st.tolist() == [1234, 2 * rng_advance(n)]
    assert (z1 - z2).abs().max() > 0.5 and abs(torch.corrcoef(torch.stack([z1.flatten(), z2.flatten()]))[0, 1]) < 0.1
    again = _noise_of(x, eps, make_rng_state(1234, device=x.device), backend)
    torch.testing.assert_close(again, z1, rtol=0, atol=1e-5)  # same state, same noise
    other = _noise_of(x, eps, make_rng_state(99, device=x.device), backend)
    assert (other - z1).abs().max() > 0.5
    rewound = make_rng_state(1234, device=x.device)
    advance_rng(rewound, n)  # the helper gives the state of the second call
    torch.testing.assert_close(_noise_of(x, eps, rewound, backend), z2, rtol=0, atol=1e-5)


def test_philox_reference_known_answers():
    """The torch Philox4x32-10 is the published one (Random123's kat_vectors), so the stream the
    kernel is checked against is Philox and not a look-alike."""
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, (k0, k1), want in kat:
        c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
        got = philox4x32_ref(k0 | (k1 << 32), *c)
        assert [int(v) for v in got] == list(want)


def test_philox_normals_are_standard_normal():
    """Statistics of the in-kernel stream (its torch twin, 2^20 draws; the Triton kernel is checked
    against the twin below): moments, the CDF (Kolmogorov-Smirnov), and no correlation between the
    4 lanes of one Philox call, the 2 normals of one Box-Muller pair (also of their squares),
    neighbouring counters, or two seeds / two offsets."""
    n = 2 ** 20
    z = philox_normal_ref(torch.tensor([2024, 0]), n, torch.float64)
    assert abs(z.mean().item()) < 5 / n ** 0.5 and abs(z.var().item() - 1) < 0.01
    assert abs(z.pow(4).mean().item() - 3) < 0.05 and abs(z.pow(3).mean().item()) < 0.02
    ks = (torch.special.ndtr(z.sort().values) - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max()
    assert ks.item() < 1.95 / n ** 0.5, f"KS distance {ks.item():.3g}"  # 1.95/sqrt(n): p = 0.001
    assert z.abs().max().item() < 6.7  # u1 >= 2^-32: |z| <= sqrt(-2 ln 2^-32)

    def corr(a, b):
        return abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item())

    lanes = z.reshape(-1, 4)
    for i, j in ((0, 1), (2, 3), (0, 2), (1, 3), (0, 3)):
        assert corr(lanes[:, i], lanes[:, j]) < 0.01, (i, j)
    assert corr(lanes[:, 0] ** 2, lanes[:, 1] ** 2) < 0.01  # the Box-Muller pair, beyond linear
    assert corr(lanes[:-1, 0], lanes[1:, 0]) < 0.01      # consecutive counters
    other_seed = philox_normal_ref(torch.tensor([2025, 0]), n, torch.float64)
    later = philox_normal_ref(torch.tensor([2024, n]), n, torch.float64)
    assert corr(z, other_seed) < 0.01 and corr(z, later) < 0.01
    # the state's offset is in normals: offset n starts exactly where the first n draws end
    torch.testing.assert_close(philox_normal_ref(torch.tensor([2024, 0]), 2 * n, torch.float64)[n:], later,
                               rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("offset", [0, 6, 4 * (2 ** 32 - 100), 2 ** 62 - 4])
def test_triton_noise_is_the_philox_stream(offset):
    """Triton draws exactly the documented stream (philox_normal_ref) for aligned and unaligned
    offsets (an unaligned one starts at the next whole counter), across the 2^32 wrap of the low
    counter word (the carry into the high word: without it the noise past the wrap would repeat
    the draws of offset 0) and near the top of the int64 offset; the reference backend draws the
    same noise from the same state."""
    x, eps, _, _ = _inputs((2, 3, 17, 19))  # 1938 elements: 2 programs, a tail of 2 in the last counter
    n = x.numel()
    st = torch.tensor([77, offset], dtype=torch.int64, device=x.device)
    z = _noise_of(x, eps, st, "triton").flatten()
    assert st.tolist() == [77, offset + rng_advance(n)]
    want = philox_normal_ref(torch.tensor([77, offset]), n).double()
    torch.testing.assert_close(z.cpu(), want, rtol=0, atol=2e-5)
    st_ref = torch.tensor([77, offset], dtype=torch.int64, device=x.device)
    torch.testing.assert_close(_noise_of(x, eps, st_ref, "reference").flatten().cpu(), want, rtol=0, atol=2e-5)
    if offset == 4 * (2 ** 32 - 100):  # counters 2^32 + k: a fresh stream, not counters k again
        past = z[400:].cpu()
        torch.testing.assert_close(past, philox_normal_ref(torch.tensor([77, 2 ** 34]), n - 400).double(),
                                   rtol=0, atol=2e-5)
        assert (past - philox_normal_ref(torch.tensor([77, 0]), n - 400).double()).abs().max() > 1


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_noise_stream_half_precision(dtype):
    """Half-precision x places the Philox work differently in the kernel (RUN = 8: two counters per
    thread, then a permute); the stream must be the same: each element's noise is its own."""
    x, eps, _, _ = _inputs((2, 3, 17, 19), seed=3)
    x, n = x.to(dtype), x.numel()
    z = _noise_of(x, eps, torch.tensor([5, 8], device=x.device), "triton").flatten().cpu()
    want = philox_normal_ref(torch.tensor([5, 8]), n).double()
    tol = 4 * 8 * torch.finfo(dtype).eps  # out is rounded to x's dtype (|out| < 8), then divided by c1 = 1/2
    torch.testing.assert_close(z, want, rtol=0, atol=tol)


@needs_triton
def test_sincos_2pi_kernel_helper():
    """The kernel's polynomial sin/cos of 2 pi u over [0, 1), quadrant edges included."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(u_ptr, c_ptr, s_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        c, s = ddim_mod._sincos_2pi(tl.load(u_ptr + i))
        tl.store(c_ptr + i, c)
        tl.store(s_ptr + i, s)

    u = torch.cat([torch.arange(0, 64) / 64, torch.tensor([0.125 - 2 ** -24, 0.125 + 2 ** -24, 0.375, 0.625,
                                                           0.875, 1 - 2 ** -24])])
    u = torch.cat([u, torch.rand(256 - u.numel(), generator=torch.Generator().manual_seed(0))]).float()
    c, s = torch.empty_like(u), torch.empty_like(u)
    _probe[(1,)](u, c, s, N=256)
    th = 2 * math.pi * u.double()
    assert (c.double() - th.cos()).abs().max() < 3e-7 and (s.double() - th.sin()).abs().max() < 3e-7


@needs_triton
def test_noise_size_limit_is_checked(monkeypatch):
    """More elements than the 32-bit counter index covers: a clear error, and the state untouched."""
    x, eps, _, _ = _inputs((2, 3, 5))
    st = make_rng_state(1, device=x.device)
    monkeypatch.setattr(ddim_mod, "_MAX_PHILOX_ELEMS", 16)
    with pytest.raises(ValueError, match="at most 16 elements"):
        ddim_update(x, eps, 0.2, 0.5, eta=1.0, rng_state=st, backend="triton")
    assert st.tolist() == [1, 0]
    ddim_update(x, eps, 0.2, 0.5, eta=1.0, noise=torch.randn_like(x), backend="triton")  # given noise: no limit


@needs_triton
def test_default_rng_follows_torch_seed():
    x, eps, _, _ = _inputs((3, 5, 7))
    torch.manual_seed(7)
    a = ddim_update(x, eps, 0.2, 0.5, eta=1.0, backend="triton")
    b = ddim_update(x, eps, 0.2, 0.5, eta=1.0, backend="triton")
    torch.manual_seed(7)
    a2 = ddim_update(x, eps, 0.2, 0.5, eta=1.0, backend="triton")
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert (a - b).abs().max() > 0.1


# ---------------------------------------------------------------- autograd
@needs_triton
@pytest.mark.parametrize("variant", ["plain", "guided", "clip", "clip-eps-from-clipped-x0", "all"])
@pytest.mark.parametrize("amode", ["float", "per-sample"])
def test_autograd_matches_reference(variant, amode):
    shape = (3, 4, 5)
    base = _inputs(shape, seed=3)
    a_t, a_n = _alphas(amode, shape[0])
    w_out, w_x0 = (torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (10, 11))
    grads = {}
    for backend in ("reference", "triton"):
        x, eps, grad, z = (t.clone().requires_grad_(True) for t in base)
        kw = _kw(VARIANTS[variant], grad, z)
        out, x0 = ddim_update(x, eps, a_t, a_n, return_x0=True, backend=backend, **kw)
        ((out * w_out).sum() + (x0 * w_x0).sum()).backward()
        grads[backend] = [t.grad if t.grad is not None else torch.zeros(shape) for t in (x, eps, grad, z)]
    for name, a, b in zip(("x", "eps", "grad", "noise"), grads["triton"], grads["reference"]):
        _close(a, b, 1e-5, f"d{name}")
    if VARIANTS[variant].get("clip"):
        assert (grads["reference"][0] == 0).any() or VARIANTS[variant].get("eps_from_clipped_x0")


@needs_triton
def test_autograd_single_output_and_gradcheck():
    x, eps, grad, _ = _inputs((2, 3, 4), seed=5)
    x.requires_grad_(True)
    out = ddim_update(x, eps, 0.4, 0.7, grad=grad, scale=0.3, backend="triton")
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, math.sqrt(0.7) / math.sqrt(0.4)), rtol=1e-5, atol=1e-6)
    # the reference (what the kernel's backward is compared against) passes gradcheck in float64
    xd, ed, gd, zd = (t.double().requires_grad_(True) for t in _inputs((2, 3), seed=6))
    torch.autograd.gradcheck(lambda a, b, c, d: ddim_update(a, b, 0.3, 0.6, eta=0.5, noise=d, grad=c, scale=0.2,
                                                            clip_x0=1.5, backend="reference"), (xd, ed, gd, zd))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", [
    "shape", "a_t_nan", "a_t_zero", "a_t_big", "a_next_inf", "per_sample_len", "eta_neg", "clip_zero",
    "int_x", "rng_dtype", "backend", "str_alpha",
])
def test_bad_inputs(case):
    x, eps, grad, z = _inputs((3, 4))
    kw = dict(a_t=0.3, a_next=0.6)
    err = ValueError
    if case == "shape":
        kw["eps"] = eps[:, :3]
    elif case == "a_t_nan":
        kw["a_t"] = float("nan")
    elif case == "a_t_zero":
        kw["a_t"] = torch.tensor([0.3, 0.0, 0.2])
    elif case == "a_t_big":
        kw["a_t"] = 1.5
    elif case == "a_next_inf":
        kw["a_next"] = torch.tensor(float("inf"))
    elif case == "per_sample_len":
        kw["a_t"] = torch.tensor([0.3, 0.4])
    elif case == "eta_neg":
        kw["eta"] = -0.1
    elif case == "clip_zero":
        kw["clip_x0"] = 0.0
    elif case == "int_x":
        kw["x"] = torch.ones(3, 4, dtype=torch.int64)
        err = TypeError
    elif case == "rng_dtype":
        kw.update(eta=1.0, rng_state=torch.tensor([1.0, 2.0]))
    elif case == "backend":
        kw["backend"] = "cuda"
    elif case == "str_alpha":
        kw["a_t"] = "0.3"
        err = TypeError
    args = dict(x=x, eps=eps)
    args.update(kw)
    with pytest.raises(err):
        ddim_update(args.pop("x"), args.pop("eps"), args.pop("a_t"), args.pop("a_next"), **args)


def test_auto_is_reference_on_cpu():
    x, eps, _, _ = _inputs((2, 3))
    if x.is_cuda:
        pytest.skip("CPU-only check")
    out = ddim_update(x, eps, 0.3, 0.6)
    torch.testing.assert_close(out, ddim_update(x, eps, 0.3, 0.6, backend="reference"), rtol=0, atol=0)


# ---------------------------------------------------------------- GPU only
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_gpu(dtype, tol):
    x, eps, grad, z = _inputs((4, 3, 33, 31), dtype=dtype)
    a_t = torch.linspace(0.1, 0.5, 4, device="cuda")
    kw = dict(eta=0.5, noise=z, grad=grad, scale=0.3, clip_x0=1.0, return_x0=True)
    out, x0 = ddim_update(x, eps, a_t, 0.7, backend="triton", **kw)
    assert out.dtype == dtype
    ref, ref_x0 = ddim_update(x.float(), eps.float(), a_t, 0.7, backend="reference",
                              **{**kw, "noise": z.float(), "grad": grad.float()})
    _close(out, ref, tol, f"{dtype} x_next")
    _close(x0, ref_x0, tol, f"{dtype} x0")


@pytest.mark.gpu
@gpu
def test_cuda_graph_replay_draws_fresh_noise():
    x, eps, _, _ = _inputs((2, 3, 8, 8))
    table = torch.tensor([0.2, 0.5], device="cuda")
    st = make_rng_state(5, device="cuda")
    out = torch.empty_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out.copy_(ddim_update(x, eps, table[0], table[1], eta=1.0, rng_state=st, backend="triton"))  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out.copy_(ddim_update(x, eps, table[0], table[1], eta=1.0, rng_state=st, backend="triton"))
    g.replay()
    first = out.clone()
    g.replay()
    assert (out - first).abs().max() > 0.1
    assert st[1].item() == 3 * rng_advance(x.numel())  # warm-up + two replays (capture does not run)


def test_one_coefficient_formula_for_every_caller():
    """kernels.ddim_ref.ddim_coefficients is the one host-side formula (METHOD.md §3): the fused
    HNM step's per-sample helper (float and tensor alphas) and the sampler's table are it, and it
    is the literal float64 formula."""
    at, an, eta = 0.37, 0.61, 0.8
    c1 = eta * math.sqrt((1 - at / an) * (1 - an) / (1 - at))
    literal = [math.sqrt(at), math.sqrt(1 - at), math.sqrt(an), c1, math.sqrt(1 - an - c1 * c1)]
    # (torch's float64 sqrt and math.sqrt may differ in the last bit)
    assert [float(v) for v in ddim_coefficients(at, an, eta)] == pytest.approx(literal, rel=1e-15)
    from_floats = ddim_coefficients_per_sample(at, an, eta, 3, "cpu")
    from_tensor = ddim_coefficients_per_sample(torch.full((3,), at, dtype=torch.float64), an, eta, 3, "cpu")
    for a, b, want in zip(from_floats, from_tensor, ddim_coefficients(at, an, eta)):
        assert torch.equal(a, b) and torch.equal(a, torch.full((3,), float(want), dtype=torch.float32))
    s = DDIMSampler(lambda x, t: x, NoiseSchedule.linear(), steps=10, eta=0.5)
    table = s.coefficient_table()
    for i in (0, 4, s.num_steps - 1):  # the last step goes to a_next = 1: c1 = c2 = 0
        want = ddim_coefficients(float(s.a_t[i]), float(s.a_next[i]), 0.5)
        assert table[i, 2:].tolist() == [float(v) for v in want]
    assert table[-1, 5:].tolist() == [0.0, 0.0]
