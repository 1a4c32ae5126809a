"""DDIMSampler: timestep plans, exact-epsilon Gaussian-mixture sampling, determinism, DDPM posterior,
bad inputs; GPU-only: CUDA-graph replay == eager, bf16 close to fp32, memory independent of steps."""
import math

import numpy as np
import pytest
import torch

from cdp_fast import DDIMSampler, NoiseSchedule
from cdp_fast.gmm import GaussianMixtureEps
from cdp_fast.sampler import NOISE_SEED_OFFSET, ddim_timesteps, ddpm_timesteps

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MEANS = [[1.5, 1.0], [-1.5, -0.5]]
STDS = [0.4, 0.5]
WEIGHTS = [0.3, 0.7]


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)


@pytest.fixture(scope="module")
def gmm(sched):
    return GaussianMixtureEps(MEANS, STDS, WEIGHTS, sched)


# ------------------------------------------------------------------------------------------------
# timestep plans
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 7, 50, 100, 300, 1000])
def test_uniform_timesteps_are_the_authors(sched, steps):
    s = DDIMSampler(lambda x, t: x, sched, steps=steps)
    asc = list(range(0, 1000, 1000 // steps))
    assert s.timesteps == asc[::-1]
    assert s.next_timesteps == ([-1] + asc[:-1])[::-1]
    assert float(s.a_next[-1]) == 1.0  # set_alpha_to_one
    assert torch.equal(s.a_t, sched.alphas_cumprod[asc[::-1]])


@pytest.mark.parametrize("steps", [10, 37, 100])
def test_quad_timesteps(sched, steps):
    s = DDIMSampler(lambda x, t: x, sched, steps=steps, skip="quad")
    expect = [int(v) for v in (np.linspace(0, np.sqrt(1000 * 0.8), steps) ** 2)]
    assert s.timesteps == expect[::-1]
    assert s.timesteps[0] == 800 and s.timesteps[-1] == 0


def _space_timesteps_literal(num_timesteps, section_counts):
    # improved-diffusion's respace.space_timesteps, literally (single and multiple sections)
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken = 0.0, []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return set(all_steps)


@pytest.mark.parametrize("steps", [1, 33, 250, 1000])
def test_ddpm_respacing_matches_improved_diffusion(sched, steps):
    assert ddpm_timesteps(1000, steps) == sorted(_space_timesteps_literal(1000, [steps]))
    s = DDIMSampler(lambda x, t: x, sched, steps=steps, method="ddpm")
    assert s.num_steps == steps and s.timesteps[0] == (999 if steps > 1 else 0)


@pytest.mark.parametrize("kw", [dict(steps=0), dict(steps=1001), dict(steps=-3)])
def test_bad_steps(sched, kw):
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(lambda x, t: x, sched, **kw)


def test_bad_options(sched):
    f = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="skip"):
        DDIMSampler(f, sched, skip="cubic")
    with pytest.raises(ValueError, match="method"):
        DDIMSampler(f, sched, method="ode")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(f, sched, eta=-1.0)
    with pytest.raises(ValueError, match="clip_x0"):
        DDIMSampler(f, sched, clip_x0=-2.0)
    with pytest.raises(TypeError, match="steps"):
        DDIMSampler(f, sched, steps=2.5)
    with pytest.raises(TypeError):
        ddim_timesteps(1000, "10")


# ------------------------------------------------------------------------------------------------
# the exact epsilon of a 2-D Gaussian mixture: samples reproduce weights, means, variances
# ------------------------------------------------------------------------------------------------
# (method, eta, steps, variance rel. tolerance): stochastic samplers carry a larger discretisation
# bias at few steps (measured: ~-20% at 50 steps, shrinking with steps), so they get 100 steps.
@pytest.mark.parametrize("method,eta,steps,var_tol", [
    ("ddim", 0.0, 50, 0.2), ("ddim", 1.0, 100, 0.25), ("ddpm", 1.0, 100, 0.25)])
def test_gaussian_mixture_moments(sched, gmm, method, eta, steps, var_tol):
    n = 2000
    s = DDIMSampler(gmm, sched, steps=steps, eta=eta, method=method, clip_x0=False)
    x = s.sample(n, (2,), seed=1)
    assert x.shape == (n, 2) and x.dtype == torch.float32
    comp = (x[:, 0] < 0).long()  # components sit at x = +1.5 / -1.5
    for k in range(2):
        xs = x[comp == k].double()
        w, mu, var = xs.shape[0] / n, xs.mean(0), xs.var(0)
        msg = f"component {k}: weight {w:.3f} mean {mu.tolist()} var {var.tolist()}"
        assert abs(w - WEIGHTS[k]) < 0.04, msg                       # binomial sd ~0.01
        assert torch.allclose(mu, torch.tensor(MEANS[k], dtype=torch.float64), atol=0.08), msg
        assert torch.allclose(var, torch.full((2,), STDS[k] ** 2, dtype=torch.float64),
                              rtol=var_tol), msg


def test_conditional_model_gets_labels(sched, gmm):
    labels = torch.tensor([0, 1] * 50)
    x = DDIMSampler(gmm, sched, steps=20).sample(100, (2,), seed=0, labels=labels)
    assert torch.all(x[labels == 0, 0] > 0.0) and torch.all(x[labels == 1, 0] < 0.0)
    with pytest.raises(ValueError, match="labels"):
        DDIMSampler(gmm, sched, steps=5).sample(10, (2,), labels=torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# exact step math, determinism, x_T
# ------------------------------------------------------------------------------------------------
def _manual_ddim(model, sched, x, timesteps, eta=0.0, noises=None, clip=None):
    ab = sched.alphas_cumprod
    seq_next = [-1] + timesteps[:-1]
    k = 0
    for i, j in zip(reversed(timesteps), reversed(seq_next)):
        at = float(ab[i])
        an = 1.0 if j < 0 else float(ab[j])
        e = model(x, torch.full((x.shape[0],), i, dtype=torch.long)).double()
        x0 = (x - math.sqrt(1 - at) * e) / math.sqrt(at)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        c1 = eta * math.sqrt((1 - at / an) * (1 - an) / (1 - at))
        c2 = math.sqrt(max(1 - an - c1 ** 2, 0.0))
        x = math.sqrt(an) * x0 + c2 * e
        if c1 > 0:
            x = x + c1 * noises[k]
            k += 1
    return x


@pytest.mark.parametrize("skip,fused,shape", [("uniform", True, (2,)), ("quad", False, (2,)),
                                              ("uniform", False, (1, 1, 2))])
def test_ddim_eta0_equals_manual_loop(sched, gmm, skip, fused, shape):
    x_T = torch.randn((13,) + shape, generator=torch.Generator().manual_seed(3))
    s = DDIMSampler(gmm, sched, steps=9, skip=skip, fused_kernels=fused)
    out = s.sample(13, shape, x_T=x_T)
    ref = _manual_ddim(gmm, sched, x_T.double(), s.timesteps[::-1]).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_single_step_returns_x0(sched, gmm):
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    out = DDIMSampler(gmm, sched, steps=1).sample(5, (2,), x_T=x_T)
    a = float(sched.alphas_cumprod[0])
    e = gmm(x_T, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(out, (x_T - math.sqrt(1 - a) * e) / math.sqrt(a))


def test_ddpm_equals_improved_diffusion_posterior(sched, gmm):
    """Respaced betas, posterior mean/variance, x0 clipped to [-1, 1], no noise at the last step."""
    n, steps, seed = 11, 6, 4
    s = DDIMSampler(gmm, sched, steps=steps, method="ddpm", fused_kernels=False)
    out = s.sample(n, (2,), seed=seed)
    use = ddpm_timesteps(1000, steps)
    ab = sched.alphas_cumprod
    new_ab = ab[use]
    new_betas = 1 - new_ab / torch.cat([torch.ones(1, dtype=torch.float64), new_ab[:-1]])
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), new_ab[:-1]])
    coef1 = new_betas * ab_prev.sqrt() / (1 - new_ab)
    coef2 = (1 - ab_prev) * (1 - new_betas).sqrt() / (1 - new_ab)
    var = new_betas * (1 - ab_prev) / (1 - new_ab)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)).double()
    gen = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)
    for i in reversed(range(len(use))):
        e = gmm(x, torch.full((n,), use[i], dtype=torch.long))
        x0 = (torch.sqrt(1 / new_ab[i]) * x - torch.sqrt(1 / new_ab[i] - 1) * e).clamp(-1, 1)
        mean = coef1[i] * x0 + coef2[i] * x
        if i > 0:
            z = torch.randn(n, 2, generator=gen).double()
            x = mean + var[i].sqrt() * z
        else:
            x = mean
    torch.testing.assert_close(out, x.float(), rtol=1e-5, atol=1e-5)
    assert out.abs().max() <= 1.0 + 1e-6  # last step returns the clipped x0


def test_eta1_noise_path_equals_manual_loop(sched, gmm):
    n, seed = 7, 2
    s = DDIMSampler(gmm, sched, steps=5, eta=1.0, fused_kernels=False, clip_x0=1.0)
    out = s.sample(n, (2,), seed=seed)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)).double()
    gen = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)
    noises = [torch.randn(n, 2, generator=gen).double() for _ in range(4)]
    ref = _manual_ddim(gmm, sched, x, s.timesteps[::-1], eta=1.0, noises=noises, clip=1.0)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_same_seed_same_images(sched, gmm, fused):
    s = DDIMSampler(gmm, sched, steps=10, eta=1.0, fused_kernels=fused)
    a, b = s.sample(16, (2,), seed=5), s.sample(16, (2,), seed=5)
    c = s.sample(16, (2,), seed=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_x_T_is_respected(sched, gmm):
    s = DDIMSampler(gmm, sched, steps=10)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    a = s.sample(8, (2,), seed=0)                   # default noise is randn(Generator(seed))
    b = s.sample(8, (2,), seed=123, x_T=x_T)        # x_T wins over the seed
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = s.sample(8, (2,), x_T=x_T + 0.5)
    assert not torch.allclose(b, c)
    assert torch.equal(x_T, torch.randn(8, 2, generator=torch.Generator().manual_seed(0)))  # not mutated
    with pytest.raises(ValueError, match="x_T"):
        s.sample(8, (2,), x_T=torch.zeros(8, 3))


def test_no_autograd_history_with_a_trainable_model(sched):
    """A model whose weights require grad must not chain autograd graphs across steps."""
    lin = torch.nn.Linear(2, 2)
    model = lambda x, t: lin(x)  # noqa: E731
    s = DDIMSampler(model, sched, steps=5, eta=1.0)
    out = s.sample(4, (2,), seed=0)
    assert not out.requires_grad and out.grad_fn is None


def test_class_conditional_false_keeps_labels_from_the_model(sched, gmm):
    calls = []

    def model(x, t, *rest):
        calls.append(len(rest))
        return gmm(x, t)

    labels = torch.tensor([0, 1, 0, 1])
    DDIMSampler(model, sched, steps=4, class_conditional=False).sample(4, (2,), labels=labels)
    DDIMSampler(model, sched, steps=4).sample(4, (2,), labels=labels)
    assert calls == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="needs labels"):
        DDIMSampler(model, sched, steps=3, class_conditional=True).sample(4, (2,))


def test_float64_state_and_progress(sched, gmm):
    s = DDIMSampler(gmm, sched, steps=5)
    out = s.sample(4, (2,), dtype=torch.float64, progress=True)
    assert out.dtype == torch.float64


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_model_rejecting_shape_is_reported(sched, gmm):
    s = DDIMSampler(gmm, sched, steps=5)
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        s.sample(3, (5,))


def test_model_returning_wrong_shape(sched):
    s = DDIMSampler(lambda x, t: x[:, :1], sched, steps=5)
    with pytest.raises(ValueError, match="eps of shape"):
        s.sample(3, (4,))


def test_nan_stops_with_step_and_timestep(sched, gmm):
    def model(x, t):
        e = gmm(x, t)
        return e * float("nan") if int(t[0]) == 500 else e

    s = DDIMSampler(model, sched, steps=10)  # t = 900, 800, ..., 500 is step 4
    with pytest.raises(ValueError, match=r"step 4 .*t=500"):
        s.sample(4, (2,))


def test_bad_n_and_shape(sched, gmm):
    s = DDIMSampler(gmm, sched, steps=5)
    with pytest.raises(ValueError, match="n must"):
        s.sample(0, (2,))
    with pytest.raises(ValueError, match="shape"):
        s.sample(2, (0,))


def test_diffusers_unet_works_directly(sched):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    with torch.no_grad():
        out = DDIMSampler(unet, sched, steps=2).sample(2, (1, 8, 8), seed=0)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------
class _TinyEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 3, 3, padding=1)
        self.emb = torch.nn.Embedding(1000, 16)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.conv1(x) + self.emb(t)[:, :, None, None])
        return self.conv2(h)


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_graph_replay_equals_eager(sched, eta):
    torch.manual_seed(0)
    model = _TinyEps().cuda()
    kw = dict(steps=20, eta=eta, bf16=False, channels_last=False)
    a = DDIMSampler(model, sched, cuda_graphs=True, **kw).sample(8, (3, 16, 16), seed=0)
    b = DDIMSampler(model, sched, cuda_graphs=False, **kw).sample(8, (3, 16, 16), seed=0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@cuda_only
@pytest.mark.gpu
def test_bf16_close_to_fp32(sched):
    torch.manual_seed(0)
    model = _TinyEps().cuda()
    a = DDIMSampler(model, sched, steps=20, bf16=True).sample(8, (3, 16, 16), seed=0)
    b = DDIMSampler(model, sched, steps=20, bf16=False, channels_last=False).sample(8, (3, 16, 16), seed=0)
    assert (a - b).abs().max() < 0.1 * b.abs().max()


@cuda_only
@pytest.mark.gpu
def test_peak_memory_independent_of_steps(sched):
    model = _TinyEps().cuda()
    peaks = []
    for steps in (10, 100):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        DDIMSampler(model, sched, steps=steps).sample(32, (3, 16, 16), seed=0)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] <= peaks[0] * 1.1 + (1 << 20), peaks


def _triton_runs_here():
    from cdp_fast.kernels._backend import interpreting, triton_available
    return triton_available() and (interpreting() or torch.cuda.is_available())


@pytest.mark.skipif(not _triton_runs_here(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
def test_triton_backend_in_the_loop(sched, gmm):
    """The sampler drives the Triton DDIM kernel (0-d device alphas, in-kernel Philox noise)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(2)).to(dev)
    kw = dict(steps=6, bf16=False, cuda_graphs=False)
    a = DDIMSampler(gmm.to(dev), sched, backend="triton", **kw).sample(6, (2,), x_T=x_T)
    b = DDIMSampler(gmm.to(dev), sched, backend="reference", **kw).sample(6, (2,), x_T=x_T)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    s = DDIMSampler(gmm.to(dev), sched, eta=1.0, backend="triton", **kw)
    c, d = s.sample(6, (2,), seed=3), s.sample(6, (2,), seed=3)
    assert torch.equal(c, d) and not torch.allclose(c, a)


def test_eager_warmups_share_one_side_stream_and_silence_capturable_adam(monkeypatch):
    """Issue 9: a new CUDA stream per eager warm-up kept one allocator pool per stream (the caching
    allocator does not share blocks across streams); capturable Adam warned on every warm-up.
    CPU test with stand-ins for the CUDA stream API (the logic under test is the sampler's)."""
    import contextlib
    import warnings

    from cdp_fast import sampler as sm

    made = []

    class FakeStream:
        def __init__(self, device=None):
            made.append(self)

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream.__new__(FakeStream))
    run = sm._Run.__new__(sm._Run)
    run.device, run.seen, run.graph, run.side = torch.device("cpu"), {}, {}, None
    steps = []

    def step(kind, draw):
        steps.append(kind)
        warnings.warn("This instance was constructed with capturable=True or some of all the param_groups "
                      "came with capturable=True, but step() is running without CUDA graph capture.", UserWarning, stacklevel=1)
        warnings.warn("another warning", UserWarning, stacklevel=1)

    run.step = step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind in ("guided", "plain"):
            for _ in range(sm._WARMUP):
                run._graph_step(kind, False)
    assert steps == ["guided"] * sm._WARMUP + ["plain"] * sm._WARMUP
    assert len(made) == 1, f"{len(made)} side streams for one run"
    msgs = [str(w.message) for w in caught]
    assert not any("capturable=True" in m for m in msgs)
    assert msgs.count("another warning") == 2 * sm._WARMUP   # only that one warning is silenced


# ------------------------------------------------------------------------------------------------
# reuse_runs: one run (static buffers, graphs) restarted in place per sample() call (issue 12)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta,fused,conditional", [(0.0, True, False), (1.0, True, True), (0.5, False, True)])
def test_reused_run_equals_fresh_runs(sched, gmm, eta, fused, conditional):
    kw = dict(steps=8, eta=eta, fused_kernels=fused)
    s = DDIMSampler(gmm, sched, reuse_runs=True, **kw)
    runs, outs = [], []
    for seed in (0, 1, 2):
        labels = (torch.arange(10) + seed) % 2 if conditional else None  # differ per call
        x = s.sample(10, (2,), seed=seed, labels=labels)
        runs.append(s._kept)
        fresh = DDIMSampler(gmm, sched, **kw).sample(10, (2,), seed=seed, labels=labels)
        assert torch.equal(x, fresh), f"seed {seed}"
        outs.append(x)
    assert runs[0] is runs[1] is runs[2]          # built once, restarted in place
    assert runs[0].graph == {}                    # no CUDA here: nothing captured
    assert not torch.equal(outs[0], outs[1])
    # the result is a copy: the next call reuses the state buffer without touching it
    assert outs[0].data_ptr() != runs[0].x.data_ptr()
    s.close()
    assert s._kept is None


def test_reused_run_is_rebuilt_when_shapes_change(sched, gmm):
    s = DDIMSampler(gmm, sched, steps=5, reuse_runs=True)
    s.sample(6, (2,), seed=0)
    first = s._kept
    s.sample(6, (2,), seed=1)
    assert s._kept is first
    for kw in (dict(n=4, shape=(2,)), dict(n=4, shape=(2,), labels=torch.zeros(4, dtype=torch.long)),
               dict(n=4, shape=(2,), dtype=torch.float64)):
        before = s._kept
        x = s.sample(kw.pop("n"), kw.pop("shape"), seed=3, **kw)
        assert s._kept is not before
        fresh = DDIMSampler(gmm, sched, steps=5).sample(4, (2,), seed=3, **kw)
        assert torch.equal(x, fresh)
    # x_T: restarted in place from the given state, exactly as a fresh run
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a = s.sample(4, (2,), x_T=x_T)
    run = s._kept
    b = s.sample(4, (2,), x_T=x_T * 0.5)
    assert s._kept is run
    assert torch.equal(a, DDIMSampler(gmm, sched, steps=5).sample(4, (2,), x_T=x_T))
    assert torch.equal(b, DDIMSampler(gmm, sched, steps=5).sample(4, (2,), x_T=x_T * 0.5))


def test_reused_run_after_an_error_and_default_off(sched):
    calls = []

    def model(x, t):
        calls.append(1)
        return torch.full_like(x, float("nan")) if len(calls) == 3 else 0.1 * x

    s = DDIMSampler(model, sched, steps=4, reuse_runs=True)
    with pytest.raises(ValueError, match="NaN"):
        s.sample(3, (2,), seed=0)
    assert s._kept is None                        # a failed run is not kept
    a = s.sample(3, (2,), seed=0)
    assert torch.equal(a, DDIMSampler(model, sched, steps=4).sample(3, (2,), seed=0))
    plain = DDIMSampler(model, sched, steps=4)
    plain.sample(3, (2,), seed=0)
    assert plain._kept is None                    # reuse is opt-in
