"""Continuous-sigma samplers (cdp_fast.solvers): EDM's published Algorithms 1 / 2 restated here,
DPM-Solver++(2M) against diffusers' scheduler, the eps-model adapter, and contrastive guidance
(lambda = 0 bit for bit, guided runs against a literal autograd loop)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdp_fast.denoiser import Denoiser
from cdp_fast.gmm import GaussianMixtureEps
from cdp_fast.guidance import ContrastiveGuidance
from cdp_fast.schedules import NoiseSchedule
from cdp_fast.solvers import (
    NOISE_SEED_OFFSET,
    SAMPLERS,
    EDMSampler,
    EpsDenoiser,
    edm_sigmas,
    nfe,
    timestep_sigmas,
    vp_sigmas,
)

D_FEAT = 16  # a 1 x 4 x 4 "image"
SHAPE = (1, 4, 4)


class GMMDenoiser(torch.nn.Module):
    """Exact D(x; sigma) = E[y | y + sigma n = x] for y ~ sum_k w_k N(mu_k, s_k^2 I) (EDM variables)."""

    sigma_min, sigma_max, img_resolution, img_channels = 0.002, 80.0, 4, 1

    def __init__(self, K=3, label_dim=0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(K, D_FEAT, generator=g, dtype=torch.float64) * 0.5
        self.s = torch.tensor([0.1, 0.2, 0.3][:K], dtype=torch.float64)
        self.w = torch.tensor([0.5, 0.3, 0.2][:K], dtype=torch.float64)
        self.label_dim = label_dim

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        xf = x.reshape(x.shape[0], -1).double()
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        var = self.s.view(1, -1) ** 2 + sig ** 2                                  # [n|1, K]
        diff = xf.unsqueeze(1) - self.mu.unsqueeze(0)                              # [n, K, d]
        logp = -0.5 * (diff ** 2).sum(-1) / var - 0.5 * D_FEAT * var.log() + self.w.log()
        if class_labels is not None:
            logp = logp.masked_fill(class_labels[:, :logp.shape[1]] == 0, float("-inf"))
        r = torch.softmax(logp, 1).unsqueeze(-1)
        post = self.mu.unsqueeze(0) + (self.s.view(1, -1, 1) ** 2 / var.unsqueeze(-1)) * diff
        return (r * post).sum(1).to(x.dtype).reshape(x.shape)


def _eps_model(schedule=None):
    sch = schedule or NoiseSchedule.linear()
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, D_FEAT, generator=g, dtype=torch.float64) * 0.5
    return GaussianMixtureEps(means, [0.1, 0.2, 0.3], [0.5, 0.3, 0.2], sch), sch


# ------------------------------------------------------------------------------------------------
# EDM's generate.py edm_sampler (Algorithms 1 and 2), restated literally
# ------------------------------------------------------------------------------------------------
def edm_sampler_literal(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                        sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float("inf"),
                        S_noise=1, init_scale=None, guide=None):
    """EDM (Karras et al. 2022) generate.py's edm_sampler, float64; ``guide(x_vp) -> (lambda, g)``
    optionally adds D' = D - sigma lambda g at both evaluations of a step (METHOD.md §16)."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * (t_steps[0] if init_scale is None else init_scale(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        lam, g = guide(i, x_hat / (1 + t_hat ** 2).sqrt()) if guide else (0.0, None)
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        if g is not None:
            denoised = denoised - t_hat * lam * g
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            if g is not None:
                denoised = denoised - t_next * lam * g
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def euler_literal(net, latents, num_steps, init_scale=None):
    t_steps = edm_sigmas(num_steps, denoiser=net)
    x = latents.double() * (t_steps[0] if init_scale is None else init_scale(t_steps[0]))
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = x + (t_next - t_cur) * (x - net(x, t_cur).double()) / t_cur
    return x


def _latents(n=8, seed=0):
    return torch.randn((n,) + SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _vp_init(t0):  # eps-models start from x_vp = x_T exactly (solvers module doc)
    return t0 * (1 + 1 / t0 ** 2).sqrt()


def _rel(a, b):
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


# ------------------------------------------------------------------------------------------------
def test_edm_sigmas_match_karras_formula_and_rounding():
    s = edm_sigmas(18)
    assert s.shape == (19,) and s[0].item() == pytest.approx(80.0) and s[17].item() == pytest.approx(0.002)
    assert s[-1] == 0 and bool((s[:-1][1:] < s[:-1][:-1]).all())
    m, _ = _eps_model()
    den = EpsDenoiser(m, NoiseSchedule.linear())
    r = edm_sigmas(10, denoiser=den)
    table = vp_sigmas(NoiseSchedule.linear().alphas_cumprod)
    for v in r[:-1]:  # every sigma is one of the network's, the nearest to the Karras value
        assert bool((table == v).any())
    # sigma_max 80 < the network's 157: rounded to the nearest; sigma_min clipped up to sigma(t=0)
    assert table[-1] > 80 and r[0] == table[(table - 80).abs().argmin()]
    assert r[-2] == table[0] and table[0] > 0.002


def test_eps_adapter_is_x_minus_sigma_eps_at_the_nearest_timestep():
    m, sch = _eps_model()
    den = EpsDenoiser(m, sch)
    assert isinstance(den, Denoiser)
    table = vp_sigmas(sch.alphas_cumprod)
    sigma = torch.tensor(1.2345, dtype=torch.float64)
    t = int((table - sigma).abs().argmin())
    assert int(den.t_index(sigma)) == t and den.round_sigma(sigma) == table[t]
    x = _latents(4)
    got = den(x, sigma)
    want = x - sigma * m(x / (1 + sigma ** 2).sqrt(), torch.full((4,), t))
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["edm", "vp"])
def test_heun_equals_edm_algorithm_1(kind):
    if kind == "edm":
        den, scale = GMMDenoiser(), None
        smp = EDMSampler(den, sampler="heun", steps=12)
    else:
        m, sch = _eps_model()
        den, scale = EpsDenoiser(m, sch), _vp_init
        smp = EDMSampler(m, sch, sampler="heun", steps=12)
    z = _latents()
    want = edm_sampler_literal(den, z, num_steps=12, init_scale=scale)
    got = smp.sample(8, SHAPE, x_T=z, dtype=torch.float64)
    assert _rel(got, want) < 1e-12
    assert smp.nfe == 23 == nfe("heun", 12)


def test_euler_equals_first_order_edm():
    den = GMMDenoiser()
    z = _latents()
    got = EDMSampler(den, sampler="euler", steps=10).sample(8, SHAPE, x_T=z, dtype=torch.float64)
    assert _rel(got, euler_literal(den, z, 10)) < 1e-12


@pytest.mark.parametrize("churn,smin,smax", [(40.0, 0.05, 50.0), (80.0, 0.0, float("inf"))])
def test_stochastic_equals_edm_algorithm_2(churn, smin, smax):
    den = GMMDenoiser()
    z = _latents()
    gen = torch.Generator().manual_seed(3 + NOISE_SEED_OFFSET)
    want = edm_sampler_literal(den, z, num_steps=10, S_churn=churn, S_min=smin, S_max=smax, S_noise=1.003,
                               randn_like=lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype))
    smp = EDMSampler(den, sampler="edm-stochastic", steps=10, S_churn=churn, S_min=smin, S_max=smax,
                     S_noise=1.003)
    got = smp.sample(8, SHAPE, seed=3, x_T=z, dtype=torch.float64)
    assert _rel(got, want) < 1e-12
    # no churn: Algorithm 2 is Algorithm 1
    a = EDMSampler(den, sampler="edm-stochastic", steps=6).sample(8, SHAPE, x_T=z, dtype=torch.float64)
    b = EDMSampler(den, sampler="heun", steps=6).sample(8, SHAPE, x_T=z, dtype=torch.float64)
    assert torch.equal(a, b)


def test_stochastic_philox_churn_noise_equals_algorithm_2():
    """churn_noise="philox" (the CUDA default, graph-safe): Algorithm 2 with z from kernels/ddim.py's
    Philox stream, element e of step k's draw = philox_normal_ref([seed', offset k * 4 ceil(n/4)])."""
    from cdp_fast.kernels.ddim_ref import philox_normal_ref
    from cdp_fast.solvers import philox_seed

    den = GMMDenoiser()
    z = _latents()
    state = torch.tensor([philox_seed(3), 0], dtype=torch.int64)

    def randn_like(x):
        out = philox_normal_ref(state, x.numel(), x.dtype).view(x.shape)
        state[1] += 4 * ((x.numel() + 3) // 4)
        return out

    want = edm_sampler_literal(den, z, num_steps=8, S_churn=40.0, randn_like=randn_like)
    got = EDMSampler(den, sampler="edm-stochastic", steps=8, S_churn=40.0, churn_noise="philox").sample(
        8, SHAPE, seed=3, x_T=z, dtype=torch.float64)
    assert _rel(got, want) < 1e-12
    gen = EDMSampler(den, sampler="edm-stochastic", steps=8, S_churn=40.0, churn_noise="generator").sample(
        8, SHAPE, seed=3, x_T=z, dtype=torch.float64)
    assert _rel(gen, want) > 1e-3   # another stream
    assert philox_seed(3) != philox_seed(4)
    with pytest.raises(ValueError, match="churn_noise"):
        EDMSampler(den, sampler="edm-stochastic", churn_noise="cuda")


def test_samplers_reach_the_mixture():
    """End to end on the exact GMM: sample means land on the components (a coarse sanity check)."""
    den = GMMDenoiser()
    for name in SAMPLERS:
        x = EDMSampler(den, sampler=name, steps=12).sample(256, SHAPE, seed=0).reshape(256, -1).double()
        dist = torch.cdist(x, den.mu).min(1).values
        assert dist.median() < 1.0, name


def test_dpm_solver_timesteps_grid():
    m, sch = _eps_model()
    ts, sig = timestep_sigmas(sch.alphas_cumprod, 10)
    assert ts == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert sig[-1] == 0 and sig[0] == vp_sigmas(sch.alphas_cumprod)[999]


def _diffusers_dpm_loop(model, sch_cls, steps, z, **kw):
    s = sch_cls(beta_schedule="linear", **kw)
    s.set_timesteps(steps)
    x = z.clone()
    for t in s.timesteps:
        e = model(x, torch.full((x.shape[0],), int(t)))
        x = s.step(e, t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpm_solver_pp_equals_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    m, sch = _eps_model()
    z = _latents().float()
    want = _diffusers_dpm_loop(m, diffusers.DPMSolverMultistepScheduler, steps, z)
    got = EDMSampler(m, sch, sampler="dpm-solver++", steps=steps).sample(8, SHAPE, x_T=z, dtype=torch.float32)
    assert _rel(got.double(), want.double()) < 2e-5
    from cdp_fast.diffusers_compat import DPMSolverMultistepScheduler
    ours = _diffusers_dpm_loop(m, DPMSolverMultistepScheduler, steps, z)
    assert torch.equal(ours, want)


def test_dpm_solver_pp_scheduler_without_diffusers():
    """Our drop-in scheduler's loop is the sampler's DPM-Solver++(2M) (fp64 sampler, fp32 scheduler)."""
    from cdp_fast.diffusers_compat import DPMSolverMultistepScheduler
    m, sch = _eps_model()
    z = _latents().float()
    a = _diffusers_dpm_loop(m, DPMSolverMultistepScheduler, 8, z)
    b = EDMSampler(m, sch, sampler="dpm-solver++", steps=8).sample(8, SHAPE, x_T=z.double(), dtype=torch.float64)
    assert _rel(a.double(), b) < 2e-5


# ------------------------------------------------------------------------------------------------
# guidance
# ------------------------------------------------------------------------------------------------
def _pixel_guidance(scale, t_min=0):
    return ContrastiveGuidance("hnm", None, scale=scale, t_min=t_min, group_size=4, normalize=True, fused=False)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("kind", ["edm", "vp"])
def test_lambda_zero_is_unguided_bit_for_bit(name, kind):
    kw = dict(S_churn=30.0) if name == "edm-stochastic" else {}
    if kind == "edm":
        args = (GMMDenoiser(),)
    else:
        args = _eps_model()
    plain = EDMSampler(*args, sampler=name, steps=7, **kw).sample(8, SHAPE, seed=5)
    smp = EDMSampler(*args, sampler=name, steps=7, guidance=_pixel_guidance(0.0), **kw)
    assert sum(smp.guided_steps()) == 6  # never the first step (the positive is the previous state)
    guided = smp.sample(8, SHAPE, seed=5)
    assert torch.equal(plain, guided)
    moved = EDMSampler(*args, sampler=name, steps=7, guidance=_pixel_guidance(50.0), **kw).sample(8, SHAPE, seed=5)
    assert not torch.equal(plain, moved)


def _hnm_reference_guide(scale, G=4):
    """A literal Algorithm 1 gradient: autograd of the HNM loss (sum of group means) of the
    L2-normalised x_vp against the previous step's x_vp (pixel space, no head)."""
    from cdp_fast.kernels.hnm_ref import hnm_loss_reference
    prev = {}

    def guide(i, x_vp):
        x_vp = x_vp.detach()
        if i == 0:
            prev["x"] = x_vp
            return 0.0, None
        xa = x_vp.clone().requires_grad_(True)
        za = F.normalize(xa.flatten(1).float(), dim=1)
        zp = F.normalize(prev["x"].flatten(1).float(), dim=1)
        n = za.shape[0]
        loss = sum(hnm_loss_reference(za[k:k + G], zp[k:k + G]) for k in range(0, n, G))
        (g,) = torch.autograd.grad(loss, [xa])
        prev["x"] = x_vp
        return scale, g.double()
    return guide


def test_guided_heun_equals_literal_autograd_loop():
    den = GMMDenoiser()
    z = _latents()
    want = edm_sampler_literal(den, z, num_steps=8, guide=_hnm_reference_guide(30.0))
    got = EDMSampler(den, sampler="heun", steps=8, guidance=_pixel_guidance(30.0)).sample(
        8, SHAPE, x_T=z, dtype=torch.float64)
    plain = edm_sampler_literal(den, z, num_steps=8)
    assert _rel(got, want) < 1e-5 < _rel(plain, want)
    # the corrector's derivative is guided: dropping the guidance there gives another result
    only_first = EDMSampler(den, sampler="euler", steps=8, guidance=_pixel_guidance(30.0)).sample(
        8, SHAPE, x_T=z, dtype=torch.float64)
    assert _rel(only_first, want) > 1e-3


def test_guided_dpm_solver_equals_literal_loop():
    m, sch = _eps_model()
    den = EpsDenoiser(m, sch)
    z = _latents()
    guide = _hnm_reference_guide(30.0)
    ts, sig = timestep_sigmas(sch.alphas_cumprod, 8)
    x = z * _vp_init(sig[0])
    prev = None
    for i in range(8):
        s, t = sig[i], sig[i + 1]
        lam, g = guide(i, x / (1 + s ** 2).sqrt())
        d = den(x, s)
        if g is not None:
            d = d - s * lam * g
        r = t / s
        if i in (0, 7):
            x = r * x + (1 - r) * d
        else:
            h, h0 = math.log(s / t), math.log(sig[i - 1] / s)
            x = r * x + (1 - r) * (d + 0.5 * h / h0 * (d - prev))
        prev = d
    got = EDMSampler(m, sch, sampler="dpm-solver++", steps=8, guidance=_pixel_guidance(30.0)).sample(
        8, SHAPE, x_T=z, dtype=torch.float64)
    assert _rel(got, x) < 1e-5


def test_guidance_window_maps_sigma_to_timestep():
    m, sch = _eps_model()
    smp = EDMSampler(m, sch, sampler="heun", steps=10, guidance=_pixel_guidance(1.0, t_min=400))
    table = vp_sigmas(sch.alphas_cumprod)
    want = [i > 0 and float(s) >= float(table[400]) for i, s in enumerate(smp.t_hat)]
    assert smp.guided_steps() == want and 0 < sum(want) < 9


def test_class_labels_reach_the_denoiser():
    den = GMMDenoiser(label_dim=3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    x = EDMSampler(den, sampler="heun", steps=10).sample(8, SHAPE, seed=0, labels=y).reshape(8, -1).double()
    nearest = torch.cdist(x, den.mu).argmin(1)
    assert torch.equal(nearest, y)
    with pytest.raises(ValueError, match="pass labels"):
        EDMSampler(den, sampler="heun", steps=4).sample(8, SHAPE)


def test_bad_settings_are_refused():
    den = GMMDenoiser()
    with pytest.raises(ValueError, match="sampler"):
        EDMSampler(den, sampler="ddim")
    with pytest.raises(ValueError, match="S_churn"):
        EDMSampler(den, sampler="heun", S_churn=1.0)
    with pytest.raises(ValueError, match="timesteps"):
        EDMSampler(den, sampler="dpm-solver++", sigma_schedule="timesteps")
    with pytest.raises(ValueError, match="steps"):
        EDMSampler(den, steps=0)
    with pytest.raises(TypeError, match="Denoiser"):
        EDMSampler(lambda x, t: x)


# ------------------------------------------------------------------------------------------------
# generate --sampler / --class-labels
# ------------------------------------------------------------------------------------------------
def _cond_ckpt(tmp_path):
    from cdp_fast.diffusion_train import save_diffusion
    from cdp_fast.models.unet import UNet
    torch.manual_seed(0)
    m = UNet(in_channels=1, base_ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), image_size=8,
             dropout=0.0, num_classes=3).eval()
    return save_diffusion(tmp_path / "dm", m, {"schedule": {"name": "cosine", "num_train_timesteps": 1000,
                                                            "params": {}}})


def test_generate_with_heun_and_per_class_counts(tmp_path):
    from cdp_fast.cli import main as cli_main
    from cdp_fast.data import load_synthetic
    from cdp_fast.diffusion_train import load_diffusion
    ck = _cond_ckpt(tmp_path)
    out = tmp_path / "out"
    args = ["generate", "--checkpoint", str(ck), "--out", str(out), "--device", "cpu", "--n", "6",
            "--batch-size", "4", "--steps", "3", "--sampler", "heun", "--class-labels", "1,2,3",
            "--guidance", "hnm", "--scale", "10", "--t-min", "0"]
    assert cli_main(args) == 0
    imgs, labels = load_synthetic(out / "shard-00000.npz")[:2]
    imgs1, labels1 = load_synthetic(out / "shard-00001.npz")[:2]
    assert list(labels) + list(labels1) == [0, 1, 1, 2, 2, 2]
    # the first shard is the sampler's own output for those labels and that seed
    from cdp_fast.data import to_uint8
    from cdp_fast.generate import GenerateConfig, make_guidance
    model, sch, meta = load_diffusion(ck)
    cfg = GenerateConfig(checkpoint=str(ck), n=6, batch_size=4, steps=3, guidance="hnm", scale=10.0, t_min=0)
    g = make_guidance(cfg, torch.device("cpu"), None, image_shape=meta["image_shape"])
    x = EDMSampler(model, sch, sampler="heun", steps=3, guidance=g, label_dim=3).sample(
        4, (1, 8, 8), seed=0, labels=torch.tensor([0, 1, 1, 2]))
    assert torch.equal(torch.as_tensor(imgs), to_uint8((x.clamp(-1, 1) + 1) / 2))
    summary = json.loads((out / "generate.json").read_text())
    assert summary["settings"]["sampler"] == "heun"


def test_generate_refuses_bad_sampler_settings(tmp_path):
    from cdp_fast.generate import GenerateConfig
    with pytest.raises(ValueError, match="class-labels"):
        GenerateConfig(n=10, class_labels="1,2")
    with pytest.raises(ValueError, match="class-labels"):
        GenerateConfig(class_labels="many")
    with pytest.raises(ValueError, match="s-churn"):
        GenerateConfig(s_churn=5.0, sampler="heun")
    from cdp_fast.cli import main as cli_main
    ck = _cond_ckpt(tmp_path)
    out = tmp_path / "bad"
    assert cli_main(["generate", "--checkpoint", str(ck), "--out", str(out), "--device", "cpu", "--n", "8",
                     "--class-labels", "2"]) != 0   # 2 x 3 classes != 8
    assert not out.exists()


def test_edm_pipeline_runs_the_sampler_from_diffusers_noise(tmp_path):
    from cdp_fast.ddim_pipeline import randn_tensor
    from cdp_fast.edm_pipeline import EDMPipeline
    den = GMMDenoiser()
    pipe = EDMPipeline(den)
    out = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=6,
               sampler="dpm-solver++", output_type="pt").images
    z = randn_tensor((4,) + SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    want = EDMSampler(den, sampler="dpm-solver++", steps=6).sample(4, SHAPE, x_T=z, dtype=torch.float32)
    assert torch.equal(out, (want / 2 + 0.5).clamp(0, 1))
    m, sch = _eps_model()
    pil = EDMPipeline(m, sch, image_shape=SHAPE)(batch_size=2, num_inference_steps=3).images
    assert len(pil) == 2 and pil[0].size == (4, 4)


@pytest.mark.parametrize("kw", [dict(prediction_type="v_prediction", timestep_spacing="trailing"),
                                dict(final_sigmas_type="sigma_min", lower_order_final=False,
                                     beta_schedule="squaredcos_cap_v2"),
                                dict(solver_order=1, timestep_spacing="leading", steps_offset=1)])
def test_dpm_scheduler_options_equal_diffusers(kw):
    diffusers = pytest.importorskip("diffusers")
    from cdp_fast.diffusers_compat import DPMSolverMultistepScheduler
    kw = {"beta_schedule": "linear", **kw}
    ours, theirs = DPMSolverMultistepScheduler(**kw), diffusers.DPMSolverMultistepScheduler(**kw)
    assert DPMSolverMultistepScheduler.from_config(theirs.config).config == ours.config
    m, _ = _eps_model()
    for s in (ours, theirs):
        s.set_timesteps(7)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    x = y = _latents(4).float()
    for t in ours.timesteps:
        out = m(x, torch.full((4,), int(t)))
        x = ours.step(out, t, x).prev_sample
        y = theirs.step(out, t, y).prev_sample
        assert torch.equal(x, y)
    with pytest.raises(NotImplementedError):
        DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")


def test_nfe_table_writes_json_markdown_png(tmp_path):
    from cdp_fast import models
    from cdp_fast.diffusion_train import save_diffusion
    from cdp_fast.models.unet import UNet
    from cdp_fast.nfe_table import run_table
    torch.manual_seed(0)
    unet = UNet(in_channels=1, base_ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), image_size=8,
                dropout=0.0, num_classes=None).eval()
    ck = save_diffusion(tmp_path / "dm", unet, {"schedule": {"name": "cosine", "num_train_timesteps": 1000,
                                                             "params": {}}})
    clf = models.save(models.build("small-cnn", num_classes=10, in_channels=1, image_size=8), tmp_path / "clf")
    res = run_table(str(ck), str(clf), str(tmp_path / "t"), n=8, batch_size=8, scale=1.0,
                    configs=(("ddim", 3), ("heun", 2), ("dpm-solver++/karras", 2)), guided=(False, True))
    assert [(r["sampler"], r["nfe"], r["guided"]) for r in res["rows"]] == [
        ("ddim", 3, False), ("ddim", 3, True), ("heun", 3, False), ("heun", 3, True),
        ("dpm-solver++/karras", 2, False), ("dpm-solver++/karras", 2, True)]
    assert all(math.isfinite(r["fid_features"]) and r["ms_per_image"] > 0 for r in res["rows"])
    assert [r["pixel_change"] is None for r in res["rows"]] == [True, False] * 3
    assert all(r["pixel_change"] >= 0 for r in res["rows"][1::2])
    for f in ("nfe_table.json", "nfe_table.md", "nfe_table.png"):
        assert (tmp_path / "t" / f).is_file()
    assert "| heun | 2 | 3 |" in (tmp_path / "t" / "nfe_table.md").read_text()


def test_generate_dispatches_edm_models(tmp_path):
    """meta["kind"] == "edm" (load_diffusion of an EDM model): the Denoiser runs through EDMSampler,
    heun by default; ddim is refused before anything is written."""
    from cdp_fast import generate as gen
    den = GMMDenoiser(label_dim=3)
    cfg = gen.GenerateConfig(out=str(tmp_path / "e"), n=6, batch_size=3, steps=4, device="cpu")
    summary = gen.generate(cfg, model=den, schedule=None, meta={"kind": "edm"})
    assert summary["images_made"] == 6 and summary["label_counts"][:3] == [2, 2, 2]
    doc = json.loads((tmp_path / "e" / "generate.json").read_text())
    assert "sampler" not in doc["settings"]   # defaults stay out of the fingerprint
    bad = gen.GenerateConfig(out=str(tmp_path / "bad"), n=6, batch_size=3, steps=4, device="cpu", sampler="ddim")
    with pytest.raises(ValueError, match="eps-model"):
        gen.generate(bad, model=den, schedule=None, meta={"kind": "edm"})
    assert not (tmp_path / "bad").exists()


def test_nfe_table_downstream_columns_and_cache(tmp_path, capsys):
    """--downstream: every row gets TRADES clean / robust test accuracy in [0, 1], the real-only
    baseline is there (JSON and markdown); a rerun reads the cached rows instead of sampling."""
    from cdp_fast import models
    from cdp_fast.diffusion_train import save_diffusion
    from cdp_fast.models.unet import UNet
    from cdp_fast.nfe_table import main, run_table
    torch.manual_seed(0)
    unet = UNet(in_channels=1, base_ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), image_size=8,
                dropout=0.0, num_classes=None).eval()
    ck = save_diffusion(tmp_path / "dm", unet, {"schedule": {"name": "cosine", "num_train_timesteps": 1000,
                                                             "params": {}}})
    clf = models.save(models.build("small-cnn", num_classes=10, in_channels=1, image_size=8), tmp_path / "clf")
    kw = dict(n=8, batch_size=8, scale=1.0, configs=(("ddim", 2),), guided=(False, True), downstream=True,
              downstream_epochs=1, real_limit=150, limit_test=20)
    res = run_table(str(ck), str(clf), str(tmp_path / "t"), **kw)
    ro = res["real_only"]
    assert ro["sampler"] == "real only" and ro["trades_epochs"] == 2 and ro["n_test"] == 20
    assert len(res["rows"]) == 2 and res["downstream"]["epochs_synthetic_arms"] == 1
    for r in res["rows"] + [ro]:
        assert 0.0 <= r["robust_acc"] <= r["clean_acc"] <= 1.0
    md = (tmp_path / "t" / "nfe_table.md").read_text()
    assert "robust acc (guided)" in md and "| real only (no synthetic) |" in md
    saved = json.loads((tmp_path / "t" / "nfe_table.json").read_text())
    assert saved["real_only"]["robust_acc"] == ro["robust_acc"] and "robust_acc" in saved["rows"][1]
    capsys.readouterr()
    again = run_table(str(ck), str(clf), str(tmp_path / "t"), **kw)   # everything cached: same numbers
    assert "cached" in capsys.readouterr().out
    assert again["rows"] == res["rows"] and again["real_only"] == ro
    with pytest.raises(SystemExit):
        main(["--configs", "ddim", "--out", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="--downstream-epochs"):
        run_table(str(ck), str(clf), str(tmp_path / "bad"), downstream=True, downstream_epochs=0)
    assert not (tmp_path / "bad").exists()
