"""ContrastiveGuidance: fast path == a literal re-implementation of the authors' loop, scale 0 ==
plain DDIM, feature caching, frozen f, groups, pairs, conditional losses, windows, bad input."""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from cdp_fast import ContrastiveGuidance, DDIMSampler, NoiseSchedule
from cdp_fast.benchmarks.authors_loop import authors_loop
from cdp_fast.gmm import GaussianMixtureEps
from cdp_fast.guidance import EmbeddingHead, GuidanceStart, default_group_size
from cdp_fast.kernels.hnm_ref import hnm_loss_reference
from cdp_fast.kernels.infonce_ref import infonce_loss_reference

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(num_train_timesteps=1000)


@pytest.fixture(scope="module")
def gmm(sched):
    return GaussianMixtureEps([[1.0, 0.5], [-1.0, -0.5]], [0.3, 0.3], [0.5, 0.5], sched)


class CountingFeatures(nn.Module):
    """A small frozen-able feature net that counts the rows it sees."""

    def __init__(self, d_in=2, d_out=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(d_in, 16)
        self.l2 = nn.Linear(16, d_out)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.8)
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.l2(torch.tanh(self.l1(x.flatten(1))))


def _head(d_in=8, seed=1):
    return EmbeddingHead(d_in, 16, 16, generator=torch.Generator().manual_seed(seed))


def _authors(model, sched, steps, f, head, x_T, *, scale, t_min, loss="hnm", labels=None):
    """benchmarks.authors_loop on copies of f (weights requiring grad, as theirs) and of the head."""
    f, head = copy.deepcopy(f), copy.deepcopy(head)
    for p in f.parameters():
        p.requires_grad_(True)
    if loss == "hnm":
        def loss_fn(za, zp):
            return hnm_loss_reference(za, zp, temperature=10.0, labels=labels)
    else:
        def loss_fn(za, zp):
            return infonce_loss_reference(za, zp, temperature=0.1)
    return authors_loop(model, sched.alphas_cumprod, x_T.clone(), steps=steps, features=f, head=head,
                        loss_fn=loss_fn, scale=scale, guided=lambda t, i: t >= t_min)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss,conditional", [("hnm", False), ("hnm", True), ("infonce", False)])
def test_fast_path_equals_authors_loop(sched, gmm, loss, conditional):
    n, steps, t_min = 12, 20, 400
    scale = 3.0 if loss == "hnm" else 0.3
    f, head = CountingFeatures(), _head()
    head0 = copy.deepcopy(head.state_dict())
    labels = torch.arange(n) % 3 if conditional else None
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(7))
    ref = _authors(gmm, sched, steps, f, head, x_T, scale=scale, t_min=t_min, loss=loss, labels=labels)
    plain = DDIMSampler(gmm, sched, steps=steps).sample(n, (2,), x_T=x_T)

    g = ContrastiveGuidance(loss, f, head=head, scale=scale, t_min=t_min)
    f.rows = 0
    # labels steer the guidance only: the eps model stays unconditional (class_conditional=False)
    out = DDIMSampler(gmm, sched, steps=steps, guidance=g, class_conditional=False).sample(
        n, (2,), x_T=x_T, labels=labels)

    assert (out - plain).abs().max() > 1e-2, "guidance had no visible effect: the test would be vacuous"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # caching: f saw each guided state once (+ the primed state + a 2-row shape probe);
    # the authors' loop runs f twice per guided step
    guided = sum(DDIMSampler(gmm, sched, steps=steps, guidance=g).guided_steps())
    assert f.rows == n * (guided + 1) + 2, (f.rows, guided)
    # f frozen during the run, restored after; the caller's head was not trained
    assert all(p.requires_grad for p in f.parameters())
    assert all(p.grad is None for p in f.parameters())
    assert all(torch.equal(v, head0[k]) for k, v in head.state_dict().items())


@pytest.mark.parametrize("kw", [dict(loss="hnm", features="module", head=True),
                                dict(loss="hnm", features=None),
                                dict(loss="infonce", features="module"),
                                dict(loss="hnm-easy", features=None, fused=False)])
def test_scale_zero_is_plain_ddim(sched, gmm, kw):
    kw = dict(kw)
    if kw["features"] == "module":
        kw["features"] = CountingFeatures()
    g = ContrastiveGuidance(scale=0.0, t_min=0, **kw)
    x_T = torch.randn(10, 2, generator=torch.Generator().manual_seed(1))
    plain = DDIMSampler(gmm, sched, steps=15, eta=1.0).sample(10, (2,), x_T=x_T, seed=3)
    out = DDIMSampler(gmm, sched, steps=15, eta=1.0, guidance=g).sample(10, (2,), x_T=x_T, seed=3)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-6)


def test_pixel_space_guidance_moves_samples_and_fused_matches_unfused(sched, gmm):
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    plain = DDIMSampler(gmm, sched, steps=20).sample(16, (2,), x_T=x_T)
    outs = []
    for fused in (True, False):
        g = ContrastiveGuidance("hnm", None, scale=2.0, t_min=300, fused=fused)
        outs.append(DDIMSampler(gmm, sched, steps=20, guidance=g).sample(16, (2,), x_T=x_T))
    assert (outs[1] - plain).abs().max() > 1e-2
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_group_gradient_is_sum_of_independent_groups():
    """group_size G: each group's samples get exactly the gradient of a batch of G on its own."""
    torch.manual_seed(0)
    f = CountingFeatures()
    x_prev, x = torch.randn(8, 2), torch.randn(8, 2)

    def grad(n, rows, G=None):
        g = ContrastiveGuidance("hnm", f, scale=1.0, group_size=G)
        run = g.start(GuidanceStart(n, (2,)))
        run.prime(x_prev[rows])
        out = run.gradient(x[rows])
        run.finish()
        return out

    both = grad(8, slice(0, 8), G=4)
    parts = torch.cat([grad(4, slice(0, 4)), grad(4, slice(4, 8))])
    torch.testing.assert_close(both, parts, rtol=1e-5, atol=1e-7)
    assert both.abs().max() > 0


def test_group_size_errors_and_default(sched, gmm):
    assert default_group_size(100) == 100 and default_group_size(1024) == 512
    assert default_group_size(600) == 300
    g = ContrastiveGuidance("hnm", None, scale=1.0, t_min=0, group_size=4)
    with pytest.raises(ValueError, match="group_size=4 does not divide.*n=10"):
        DDIMSampler(gmm, sched, steps=5, guidance=g).sample(10, (2,))
    with pytest.raises(ValueError, match="group_size"):
        ContrastiveGuidance(group_size=1)


def test_conditional_needs_labels(sched, gmm):
    g = ContrastiveGuidance("hnm", None, scale=1.0, t_min=0, conditional=True)
    with pytest.raises(ValueError, match="no labels"):
        DDIMSampler(gmm, sched, steps=5, guidance=g).sample(8, (2,))


def test_guided_windows(sched):
    cifar = ContrastiveGuidance()  # t >= 400, never the first step
    s = DDIMSampler(lambda x, t: x, sched, steps=100, guidance=cifar)
    expect = [t >= 400 and i > 0 for i, t in enumerate(s.timesteps)]
    assert s.guided_steps() == expect and sum(expect) == 59
    mnist = ContrastiveGuidance(t_min=51, t_max=150)  # the authors' 50 < t < 150
    s = DDIMSampler(lambda x, t: x, sched, steps=250, method="ddpm", guidance=mnist)
    got = [t for t, gd in zip(s.timesteps, s.guided_steps()) if gd]
    assert got and min(got) > 50 and max(got) < 150
    assert got == [t for t in s.timesteps if 50 < t < 150]
    custom = ContrastiveGuidance(when=lambda t, i: i % 2 == 1)
    assert custom.guided(500, 3) and not custom.guided(500, 2) and not custom.guided(999, 0)


@pytest.mark.parametrize("pair,loss,with_labels", [
    ("real-positive", "hnm", True), ("real-negative", "hnm", True), ("real-negative", "hnm", False),
    ("real-negative", "infonce", True), ("real-positive", "infonce", False)])
def test_real_data_pairs_run_and_guide(sched, gmm, pair, loss, with_labels):
    gen = torch.Generator().manual_seed(0)
    real_labels = torch.arange(20) % 2
    real = torch.randn(20, 2, generator=gen) * 0.3 + torch.tensor([[1.0, 0.5]]) * (1 - 2 * real_labels[:, None])
    labels = torch.arange(8) % 2 if with_labels else None
    g = ContrastiveGuidance(loss, CountingFeatures(), head=True, scale=2.0, t_min=300, pair=pair,
                            real_images=real, real_labels=real_labels)
    x_T = torch.randn(8, 2, generator=gen)
    plain = DDIMSampler(gmm, sched, steps=12).sample(8, (2,), x_T=x_T)
    def model(x, t, y=None):
        return gmm(x, t)

    a = DDIMSampler(model, sched, steps=12, guidance=g).sample(8, (2,), x_T=x_T, labels=labels)
    b = DDIMSampler(model, sched, steps=12, guidance=g).sample(8, (2,), x_T=x_T, labels=labels)
    assert torch.isfinite(a).all()
    assert (a - plain).abs().max() > 1e-3
    assert torch.equal(a, b)  # head init and real-positive pairing come from the seed


def test_real_pairs_need_images():
    with pytest.raises(ValueError, match="real_images"):
        ContrastiveGuidance(pair="real-positive")
    with pytest.raises(ValueError, match="pair"):
        ContrastiveGuidance(pair="mixed")
    with pytest.raises(ValueError, match="loss"):
        ContrastiveGuidance(loss="triplet")


def test_guidance_with_image_features_and_to_features(sched):
    """Images in [-1, 1] reach a conv feature net as (x+1)/2 by default; to_features overrides."""
    inputs = []

    class Feat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.feature_dim = 4

        def forward(self, x):
            inputs.append(x.detach().clone())
            return self.conv(x).mean((2, 3))

    model = lambda x, t: 0.1 * x  # noqa: E731
    x_T = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = DDIMSampler(model, sched, steps=10).sample(6, (1, 5, 5), x_T=x_T)
    g = ContrastiveGuidance("hnm", Feat(), head=True, scale=1.0, t_min=500)
    out = DDIMSampler(model, sched, steps=10, guidance=g).sample(6, (1, 5, 5), x_T=x_T)
    assert out.shape == (6, 1, 5, 5) and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-4
    assert torch.all(inputs[0] == 0.5)  # the shape probe runs on zeros: (0 + 1) / 2
    # step 0 (t=900) is not guided but primes the cache: x_T is step 1's positive, seen as (x+1)/2
    assert torch.equal(inputs[1], (x_T + 1) / 2)
    # a constant transform makes the loss independent of x: zero gradient, plain DDIM
    g = ContrastiveGuidance("hnm", Feat(), head=True, scale=1.0, t_min=500,
                            to_features=lambda x: 0.0 * x + 0.5)
    out = DDIMSampler(model, sched, steps=10, guidance=g).sample(6, (1, 5, 5), x_T=x_T)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
class _ConvEps(nn.Module):
    """A tiny 3-channel noise predictor and feature net for the GPU graph tests."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


class _ConvFeat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


# ------------------------------------------------------------------------------------------------
@cuda_only
@pytest.mark.gpu
def test_guided_graph_replay_equals_eager_gpu(sched):
    torch.manual_seed(0)

    model, feat = _ConvEps().cuda(), _ConvFeat().cuda()
    outs = []
    for graphs in (True, False):
        g = ContrastiveGuidance("hnm", feat, head=True, scale=10.0, t_min=300)
        s = DDIMSampler(model, sched, steps=20, guidance=g, cuda_graphs=graphs, bf16=False,
                        channels_last=False)
        outs.append(s.sample(16, (3, 8, 8), seed=0))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_feature_net_restored_after_an_error(sched, gmm):
    f = CountingFeatures().train()
    g = ContrastiveGuidance("hnm", f, scale=1.0, t_min=0, pair="real-negative",
                            real_images=torch.zeros(4, 3))  # wrong sample shape
    with pytest.raises(ValueError, match="real_images have sample shape"):
        DDIMSampler(gmm, sched, steps=5, guidance=g).sample(4, (2,))
    assert f.training and all(p.requires_grad for p in f.parameters())


def _triton_runs_here():
    from cdp_fast.kernels._backend import interpreting, triton_available
    return triton_available() and (interpreting() or torch.cuda.is_available())


@pytest.mark.skipif(not _triton_runs_here(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
def test_pixel_guidance_triton_fused_kernel_matches_reference(sched, gmm):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(2)).to(dev)
    outs = []
    for backend in ("triton", "reference"):
        g = ContrastiveGuidance("hnm", None, scale=2.0, t_min=300)
        s = DDIMSampler(gmm.to(dev), sched, steps=8, guidance=g, backend=backend, bf16=False,
                        cuda_graphs=False)
        outs.append(s.sample(8, (2,), x_T=x_T))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_authors_defaults():
    g = ContrastiveGuidance()
    assert (g.loss, g.temperature, g.tau_plus, g.beta, g.scale) == ("hnm", 10.0, 0.1, 1.0, 1e5)
    assert (g.t_min, g.t_max, g.skip_first, g.pair, g.head) == (400, None, True, "previous", None)
    g = ContrastiveGuidance("infonce")
    assert (g.temperature, g.scale) == (0.1, 1e3)
    run = ContrastiveGuidance("hnm", CountingFeatures(d_out=640), head=True).start(GuidanceStart(4, (2,)))
    dims = [(m.in_features, m.out_features) for m in run.head.modules() if isinstance(m, nn.Linear)]
    assert dims == [(640, 128), (128, 128)]
    assert isinstance(run.opt, torch.optim.Adam) and run.opt.defaults["lr"] == 1e-2
    run.finish()


def test_bound_method_features_freeze_their_module(sched, gmm):
    """``classifier.features`` (a bound method) is frozen for the run and restored afterwards."""
    flags = []

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(2, 6)
            self.fc = nn.Linear(6, 3)

        def features(self, x):
            flags.append(self.body.weight.requires_grad or self.training)
            return torch.tanh(self.body(x))

    clf = Classifier().train()
    g = ContrastiveGuidance("hnm", clf.features, head=True, scale=1.0, t_min=300)
    out = DDIMSampler(gmm, sched, steps=10, guidance=g).sample(6, (2,), seed=0)
    assert torch.isfinite(out).all() and flags and not any(flags)
    assert clf.training and all(p.requires_grad for p in clf.parameters())
    assert all(p.grad is None for p in clf.parameters())


@pytest.mark.parametrize("eta,dtype", [(1.0, torch.float32), (0.0, torch.float64)])
def test_pixel_guidance_on_image_shapes(sched, eta, dtype):
    """Pixel space on [n, C, H, W]: fused (deterministic steps) and unfused paths agree."""
    model = GaussianMixtureEps(torch.zeros(1, 9), [1.0], [1.0], sched)  # data N(0, I): bounded states
    outs = []
    for fused in (True, False):
        g = ContrastiveGuidance("hnm", None, scale=0.5, t_min=200, fused=fused, pair="real-negative",
                                real_images=torch.zeros(3, 1, 3, 3, dtype=torch.float64) + 0.1)
        s = DDIMSampler(model, sched, steps=8, eta=eta, guidance=g)
        outs.append(s.sample(6, (1, 3, 3), seed=1, dtype=dtype))
    plain = DDIMSampler(model, sched, steps=8, eta=eta).sample(6, (1, 3, 3), seed=1, dtype=dtype)
    assert outs[0].dtype == dtype and torch.isfinite(outs[0]).all()
    assert (outs[1] - plain).abs().max() > 1e-4
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


class _RecordingGuidance:
    """Not a ContrastiveGuidance: only what the Guidance protocol declares, recording the calls."""

    scale = 0.5
    needs_previous = True

    def __init__(self):
        self.calls, self.options = [], None

    def guided(self, t, index):
        return index > 0 and t >= 500

    def start(self, options):
        self.options = options
        rec = self

        class Run:
            fused_ok = False

            def prime(self, x):
                rec.calls.append("prime")

            def gradient(self, x):
                rec.calls.append("gradient")
                return torch.ones_like(x)

            def fused_update(self, *a, **k):  # pragma: no cover - fused_ok is False
                raise AssertionError("fused_update called although fused_ok is False")

            def finish(self):
                rec.calls.append("finish")

        return Run()


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sampler_drives_any_guidance_through_the_declared_contract(sched, gmm, method):
    g = _RecordingGuidance()
    s = DDIMSampler(gmm, sched, steps=10, method=method, guidance=g)
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    out = s.sample(4, (2,), x_T=x_T)
    plain = DDIMSampler(gmm, sched, steps=10, method=method).sample(4, (2,), x_T=x_T)
    o = g.options
    assert isinstance(o, GuidanceStart) and (o.n, o.shape, o.seed) == (4, (2,), 0)
    assert o.eps_from_clipped_x0 == (method == "ddpm") and o.clip_x0 == (1.0 if method == "ddpm" else None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.n = 5
    guided = s.guided_steps()
    assert g.calls == ["prime"] + ["gradient"] * sum(guided) + ["finish"]
    assert not torch.equal(out, plain)


# ------------------------------------------------------------------------------------------------
# reuse_runs: the guidance run (head, Adam state, feature cache, labels) restarted in place
# ------------------------------------------------------------------------------------------------
def _cond_model(gmm):
    def model(x, t, y=None):
        return gmm(x, t)
    return model


@pytest.mark.parametrize("kw,eta,conditional", [
    (dict(loss="hnm", features="f", head=True), 0.0, False),      # online head + HNM
    (dict(loss="hnm", features="f", head=True), 0.7, True),       # noisy steps, labels differ per call
    (dict(loss="infonce", features="f", head="module"), 0.0, True),
    (dict(loss="hnm", features=None, head=None, normalize=False), 0.0, True),   # fused pixel step
    (dict(loss="hnm", features="f", head=True, pair="real-positive"), 0.0, True),
    (dict(loss="hnm", features="f", head=True, pair="real-negative"), 0.5, False)])
def test_reused_guided_run_equals_fresh_runs(sched, gmm, kw, eta, conditional):
    real_labels = torch.arange(20) % 2
    real = torch.randn(20, 2, generator=torch.Generator().manual_seed(5)) * 0.3
    f = CountingFeatures().train()

    def guidance():
        k = dict(kw)
        k["features"] = f if k["features"] == "f" else None
        if k["head"] == "module":
            k["head"] = _head()
        if k.get("pair", "previous") != "previous":
            k.update(real_images=real, real_labels=real_labels)
        return ContrastiveGuidance(scale=3.0, t_min=300, **k)

    model = _cond_model(gmm)
    s = DDIMSampler(model, sched, steps=10, eta=eta, guidance=guidance(), class_conditional=False,
                    reuse_runs=True)
    grun = None
    for seed in (0, 1, 2):
        labels = (torch.arange(8) + seed // 2) % 2 if conditional else None
        x = s.sample(8, (2,), seed=seed, labels=labels)
        # between calls the feature net is the caller's again (restart freezes it anew)
        assert f.training and all(p.requires_grad for p in f.parameters())
        fresh = DDIMSampler(model, sched, steps=10, eta=eta, guidance=guidance(),
                            class_conditional=False).sample(8, (2,), seed=seed, labels=labels)
        assert torch.equal(x, fresh), f"seed {seed}"
        grun = grun or s._kept.grun
        assert s._kept.grun is grun and s._kept.graph == {}
    plain = DDIMSampler(model, sched, steps=10, eta=eta).sample(8, (2,), seed=2)
    assert (x - plain).abs().max() > 1e-4  # the guidance acts


def test_reused_guided_run_keeps_its_tensors_and_restarts_them(sched, gmm):
    """Head weights, Adam moments and step, the feature cache and labels are the same tensor
    objects after a restart (CUDA graphs captured them), holding a fresh run's values."""
    g = ContrastiveGuidance("hnm", CountingFeatures(), head=True, scale=3.0, t_min=300)
    s = DDIMSampler(_cond_model(gmm), sched, steps=10, guidance=g, class_conditional=False, reuse_runs=True)
    s.sample(8, (2,), seed=0, labels=torch.arange(8) % 2)
    run = s._kept
    gr = run.grun
    before = [t for st in gr.opt.state.values() for t in st.values()] + list(gr.head.parameters()) \
        + [gr.cache, gr.labels, run.x, run.labels, run.rng_state]
    assert all(float(st["step"]) > 0 for st in gr.opt.state.values())
    assert gr.labels is run.labels
    labels = 1 - torch.arange(8) % 2
    assert run.restart(5, labels, None)
    after = [t for st in gr.opt.state.values() for t in st.values()] + list(gr.head.parameters()) \
        + [gr.cache, gr.labels, run.x, run.labels, run.rng_state]
    assert all(a is b for a, b in zip(before, after)) and len(before) == len(after)
    assert all(float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
               for st in gr.opt.state.values())
    fresh_head = _head_like(gr, 5)
    assert all(torch.equal(a, b) for a, b in zip(gr.head.parameters(), fresh_head.parameters()))
    assert not gr.cache.any() and torch.equal(run.labels, labels) and int(run.counter) == 0
    gr.finish()


def _head_like(gr, seed):
    return EmbeddingHead(gr.fdim, *gr.g.head_dims, generator=torch.Generator().manual_seed(seed + 0x4EAD))


def test_reuse_falls_back_to_a_fresh_run(sched, gmm):
    """Changed guidance settings, or a guidance run without restart(): a new run, same results."""
    g = ContrastiveGuidance("hnm", CountingFeatures(), head=True, scale=3.0, t_min=300)
    s = DDIMSampler(gmm, sched, steps=10, guidance=g, reuse_runs=True)
    s.sample(8, (2,), seed=0)
    first = s._kept
    g.temperature = 2.0  # baked into the captured steps: the kept run cannot be restarted
    x = s.sample(8, (2,), seed=1)
    assert s._kept is not first
    assert torch.equal(x, DDIMSampler(gmm, sched, steps=10, guidance=g).sample(8, (2,), seed=1))

    class NoRestart:  # the Guidance protocol without the optional restart
        def __init__(self, inner):
            self.inner, self.scale, self.needs_previous = inner, inner.scale, inner.needs_previous

        def guided(self, t, i):
            return self.inner.guided(t, i)

        def start(self, options):
            run = self.inner.start(options)
            return type("R", (), {"fused_ok": run.fused_ok, "prime": run.prime, "gradient": run.gradient,
                                  "fused_update": run.fused_update, "finish": run.finish})()

    s = DDIMSampler(gmm, sched, steps=10, guidance=NoRestart(g), reuse_runs=True)
    s.sample(8, (2,), seed=0)
    first = s._kept
    y = s.sample(8, (2,), seed=1)
    assert s._kept is not first and torch.equal(y, x)
    s.close()


@cuda_only
@pytest.mark.gpu
def test_reused_guided_graphs_captured_once_gpu(sched):
    """On CUDA a reusing sampler captures its steps once and replays them for every later seed,
    matching fresh (graph-captured) runs."""
    torch.manual_seed(0)

    model, feat = _ConvEps().cuda(), _ConvFeat().cuda()
    kw = dict(steps=20, eta=0.5, bf16=False, channels_last=False, cuda_graphs=True)
    s = DDIMSampler(model, sched, guidance=ContrastiveGuidance("hnm", feat, head=True, scale=10.0, t_min=300),
                    reuse_runs=True, **kw)
    graphs = None
    for seed in (0, 1, 2):
        x = s.sample(16, (3, 8, 8), seed=seed)
        g = ContrastiveGuidance("hnm", feat, head=True, scale=10.0, t_min=300)
        fresh = DDIMSampler(model, sched, guidance=g, **kw).sample(16, (3, 8, 8), seed=seed)
        torch.testing.assert_close(x, fresh, rtol=1e-4, atol=1e-4)
        assert s._kept.graph, "nothing was captured"
        graphs = graphs or dict(s._kept.graph)
        assert all(s._kept.graph[k] is v for k, v in graphs.items())
    s.close()
