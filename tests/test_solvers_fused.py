"""The continuous-sigma samplers' fast path (cdp_fast.solvers, METHOD.md §16, issue 20 §2):
pixel-space HNM guidance with the gradient fused into each solver's update
(``GuidanceRun.fused_affine`` -> ``kernels.hnm_guided_affine_update``) equals the unfused
gradient() path for Euler / Heun / edm-stochastic / DPM-Solver++(2M), with labels, groups and a
real-image bank; lambda = 0 stays unguided. Kernels run under TRITON_INTERPRET=1 (fp32) or on
CUDA. The CUDA-graph bookkeeping (one graph per step kind) with stand-ins for the CUDA API on
the CPU; GPU only: real CUDA-graph replay equals eager."""
from __future__ import annotations

import pytest
import torch

from cdp_fast.gmm import GaussianMixtureEps
from cdp_fast.guidance import ContrastiveGuidance
from cdp_fast.kernels._backend import interpreting, triton_available
from cdp_fast.schedules import NoiseSchedule
from cdp_fast.solvers import SAMPLERS, EDMSampler

needs_kernels = pytest.mark.skipif(
    not (triton_available() and (torch.cuda.is_available() or interpreting())),
    reason="needs triton with CUDA or TRITON_INTERPRET=1")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (1, 4, 4)
N = 8


class GaussDenoiser(torch.nn.Module):
    """Exact D(x; sigma) for y ~ N(mu, s^2 I) (an EDM-type denoiser, no eps-model)."""

    sigma_min, sigma_max, label_dim, img_resolution, img_channels = 0.002, 80.0, 0, 4, 1

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.linspace(-0.5, 0.5, 16).reshape(SHAPE))
        self.s2 = 0.09

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        return self.mu + self.s2 / (self.s2 + sig * sig) * (x - self.mu)


def _model(kind):
    if kind == "edm":
        return (GaussDenoiser().to(DEV),)
    sch = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, 16, generator=g, dtype=torch.float64) * 0.5
    return GaussianMixtureEps(means, [0.1, 0.2, 0.3], [0.5, 0.3, 0.2], sch).to(DEV), sch


def _guidance(scale, pair="previous", loss="hnm", **kw):
    real = {}
    if pair == "real-negative":
        g = torch.Generator().manual_seed(3)
        real = dict(real_images=torch.randn(6, *SHAPE, generator=g).to(DEV),
                    real_labels=(torch.arange(6) % 2).to(DEV))
    # pixel space, no normalisation: fused_ok (the fused path applies when the sampler asks)
    return ContrastiveGuidance(loss, None, scale=scale, t_min=0, pair=pair, **dict(dict(backend="triton"), **kw), **real)


def _sample(args, name, guide, fused, labels=None, **kw):
    if name == "edm-stochastic":
        kw.setdefault("S_churn", 20.0)
    smp = EDMSampler(*args, sampler=name, steps=5, guidance=guide, fused_kernels=fused, cuda_graphs=False,
                     bf16=False, **kw)
    return smp.sample(N, SHAPE, seed=7, labels=labels, device=DEV, dtype=torch.float32)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


VARIANTS = [
    ("plain", dict(group_size=None), False),
    ("labels-groups", dict(group_size=4), True),
    ("bank-labels-easy", dict(pair="real-negative", group_size=4, loss="hnm-easy"), True),
]


@needs_kernels
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("kind", ["edm", "vp"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_fused_equals_unfused(name, kind, variant, monkeypatch):
    _, opts, with_labels = variant
    args = _model(kind)
    labels = (torch.arange(N) % 2).to(DEV) if with_labels else None
    scale = 0.5

    def guide():
        return _guidance(scale, **opts)

    calls = []
    import cdp_fast.guidance as gmod
    real = gmod._GuidanceRun.fused_affine

    def spy(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(gmod._GuidanceRun, "fused_affine", spy)
    fused = _sample(args, name, guide(), True, labels)
    assert len(calls) == 4            # every guided step (steps 1..4) took the fused path
    calls.clear()
    unfused = _sample(args, name, guide(), False, labels)
    assert not calls
    plain = _sample(args, name, None, False, labels)
    err, moved = _rel(fused, unfused), _rel(unfused, plain)
    assert err < 1e-5, (err, moved)
    assert moved > 1e-3, moved        # the guidance changes the samples: the comparison is not vacuous


@needs_kernels
@pytest.mark.parametrize("name", SAMPLERS)
def test_fused_lambda_zero_is_unguided(name):
    args = _model("vp")
    plain = _sample(args, name, None, True)
    guided = _sample(args, name, _guidance(0.0), True)
    assert torch.equal(guided, plain)   # lambda = 0 never takes the fused step (issue 20: bit for bit)


@pytest.mark.parametrize("name", SAMPLERS)
def test_graph_bookkeeping_replays_the_right_step_kind(name, monkeypatch):
    """The CUDA-graph path's logic on the CPU, with stand-ins for the CUDA API: a "captured" step
    records its arguments and a replay runs that step again. One graph per (kind, first, last)
    key: replaying a graph at a step of another variant (e.g. Heun's last Euler step) would change
    the result, so graph mode must equal eager exactly."""
    import contextlib

    from cdp_fast import solvers

    class FakeStream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    cap = {"graph": None}

    class FakeGraph:
        def replay(self):
            orig_step(self.run, *self.args)

    @contextlib.contextmanager
    def fake_capture(graph):
        cap["graph"] = graph
        try:
            yield
        finally:
            cap["graph"] = None

    orig_step, orig_init = solvers._Run.step, solvers._Run.__init__
    runs, captured = [], []

    def step(self, *args):
        if cap["graph"] is not None:          # recorded, not run (as under a real capture)
            cap["graph"].run, cap["graph"].args = self, args
            captured.append(args)
            return
        orig_step(self, *args)

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        self.graphs = True
        runs.append(self)

    args = _model("vp")
    g = ContrastiveGuidance("hnm", None, scale=0.5, t_min=0, group_size=4, normalize=True, backend="reference")
    kw = dict(S_churn=20.0, churn_noise="philox") if name == "edm-stochastic" else {}
    smp = EDMSampler(*args, sampler=name, steps=9, guidance=g, bf16=False, **kw)
    eager = smp.sample(N, SHAPE, seed=2)
    for attr, fake in (("Stream", FakeStream), ("stream", lambda s: contextlib.nullcontext()),
                       ("current_stream", lambda device=None: FakeStream()), ("CUDAGraph", FakeGraph),
                       ("graph", fake_capture)):
        monkeypatch.setattr(torch.cuda, attr, fake)
    monkeypatch.setattr(solvers._Run, "step", step)
    monkeypatch.setattr(solvers._Run, "__init__", init)
    graphed = smp.sample(N, SHAPE, seed=2)
    assert torch.equal(graphed, eager)
    run = runs[-1]
    # step 0 primes, steps 1-7 are the middle guided kind (2 warm-ups, a capture, replays), the
    # last step is its own kind (seen once: eager warm-up only)
    assert captured == [("guided", False, False)] and run.seen == {"prime:1:0": 1, "guided:0:0": 7, "guided:0:1": 1}


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("name", SAMPLERS)
def test_graph_replay_equals_eager(name, guided):
    args = _model("vp")
    out = []
    kw = dict(S_churn=20.0) if name == "edm-stochastic" else {}   # Philox churn noise on CUDA
    for graphs in (True, False):
        g = _guidance(1.0) if guided else None
        smp = EDMSampler(*args, sampler=name, steps=8, guidance=g, cuda_graphs=graphs, bf16=False, **kw)
        out.append(smp.sample(N, SHAPE, seed=3, device="cuda", dtype=torch.float32))
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
