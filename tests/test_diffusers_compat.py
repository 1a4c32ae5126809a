"""cdp_fast.DDIMScheduler: drop-in equality with diffusers.DDIMScheduler (when diffusers is installed)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from cdp_fast import DDIMScheduler
from cdp_fast.diffusers_compat import DDIMSchedulerOutput


def _close(a, b, tol, what):
    if b.numel() == 0:
        return
    err = ((a.double() - b.double()).abs() / (1 + b.double().abs())).max().item()
    assert err <= tol, f"{what}: max rel err {err:.3g} > {tol}"


# ------------------------------------------------------------------ no diffusers needed
@pytest.mark.parametrize("kw,n,want", [
    (dict(), 10, list(range(900, -1, -100))),
    (dict(steps_offset=1), 10, list(range(901, 0, -100))),
    (dict(timestep_spacing="trailing"), 10, list(range(999, 0, -100))),
    (dict(timestep_spacing="linspace"), 10, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    (dict(num_train_timesteps=10), 3, [6, 3, 0]),
    (dict(num_train_timesteps=10, timestep_spacing="trailing"), 3, [9, 6, 2]),
])
def test_timesteps_known(kw, n, want):
    s = DDIMScheduler(**kw)
    assert s.timesteps.tolist() == list(range(s.config.num_train_timesteps - 1, -1, -1))
    s.set_timesteps(n)
    assert s.timesteps.dtype == torch.int64 and s.timesteps.tolist() == want


def test_step_is_spec_ddim_without_diffusers():
    s = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    s.set_timesteps(4)  # 750, 500, 250, 0
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    g = torch.Generator().manual_seed(0)
    x, e, z = (torch.randn(2, 3, 5, generator=g) for _ in range(3))
    for t, t_prev in ((750, 500), (0, None)):
        a_t, a_p = ab[t].item(), (ab[t_prev].item() if t_prev is not None else 1.0)
        x0 = (x.double() - math.sqrt(1 - a_t) * e.double()) / math.sqrt(a_t)
        sig = 0.5 * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        want = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sig ** 2) * e.double() + sig * z.double()
        out = s.step(e, t, x, eta=0.5, variance_noise=z)
        assert isinstance(out, DDIMSchedulerOutput)
        _close(out.prev_sample, want, 1e-5, f"prev_sample t={t}")
        _close(out.pred_original_sample, x0, 1e-5, f"x0 t={t}")
        prev, x0b = s.step(e, t, x, eta=0.5, variance_noise=z, return_dict=False)
        torch.testing.assert_close(prev, out.prev_sample)
    assert s.init_noise_sigma == 1.0 and s.scale_model_input(x, 3) is x


def test_config_and_errors_without_diffusers():
    s = DDIMScheduler(beta_schedule="squaredcos_cap_v2", steps_offset=1, clip_sample=False)
    assert s.config.beta_schedule == "squaredcos_cap_v2" and s.config["steps_offset"] == 1
    t = DDIMScheduler.from_config({**s.config, "_class_name": "PNDMScheduler", "skip_prk_steps": True})
    assert dict(t.config) == dict(s.config) and torch.equal(t.alphas_cumprod, s.alphas_cumprod)
    assert DDIMScheduler.from_config(s, clip_sample=True).config.clip_sample is True
    with pytest.raises(TypeError):
        s.config["clip_sample"] = True
    assert s.noise_schedule.num_train_timesteps == 1000
    c = copy.deepcopy(s)
    assert dict(c.config) == dict(s.config) and c.config is not s.config and torch.equal(c.betas, s.betas)
    with pytest.raises(ValueError):
        s.set_timesteps(1001)
    with pytest.raises(ValueError):
        s.set_timesteps(0)
    with pytest.raises(ValueError):
        DDIMScheduler().step(torch.zeros(2), 10, torch.zeros(2))  # set_timesteps not called
    with pytest.raises(NotImplementedError):
        DDIMScheduler(thresholding=True)
    with pytest.raises(NotImplementedError):
        DDIMScheduler(beta_schedule="sigmoid")
    with pytest.raises(ValueError):
        DDIMScheduler(timestep_spacing="sideways")
    with pytest.raises(ValueError):
        s.set_timesteps(5)
        s.step(torch.zeros(2), 800, torch.zeros(2), eta=1.0, variance_noise=torch.zeros(2),
               generator=torch.Generator())
    with pytest.raises(TypeError):
        DDIMScheduler.from_config(s, not_an_arg=1)


# ------------------------------------------------------------------ against diffusers
CONFIGS = [
    dict(),
    dict(clip_sample=False),
    dict(set_alpha_to_one=False, steps_offset=1),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
         timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", clip_sample_range=0.5),
    dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=False, timestep_spacing="trailing"),
    dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist(), clip_sample_range=2.0),
    dict(num_train_timesteps=500, steps_offset=1, beta_end=0.03),
    dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    dict(prediction_type="sample", clip_sample_range=1.5),
]


@pytest.mark.parametrize("cfg_i", range(len(CONFIGS)))
@pytest.mark.parametrize("n", [10, 50, 7])
def test_step_equals_diffusers(cfg_i, n):
    diffusers = pytest.importorskip("diffusers")
    cfg = CONFIGS[cfg_i]
    ours, theirs = DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    g = torch.Generator().manual_seed(cfg_i * 100 + n)
    x = torch.randn(2, 3, 5, 4, generator=g)
    steps = ours.timesteps.tolist()
    steps = steps if n <= 10 else steps[:3] + steps[n // 2: n // 2 + 2] + steps[-3:]  # keep it small
    for eta, use_clipped in ((0.0, False), (1.0, False), (0.5, True)):
        for t in steps:
            out = torch.randn(x.shape, generator=g) * 1.3
            z = torch.randn(x.shape, generator=g)
            a = ours.step(out, t, x, eta=eta, variance_noise=z, use_clipped_model_output=use_clipped)
            b = theirs.step(out, torch.tensor(t), x, eta=eta, variance_noise=z,
                            use_clipped_model_output=use_clipped)
            nan = torch.isnan(b.prev_sample)  # diffusers: sqrt of a rounding-negative at abar_t ~ 0
            assert torch.isfinite(a.prev_sample).all()
            if nan.any():
                assert cfg.get("rescale_betas_zero_snr") and t == ours.config.num_train_timesteps - 1
            _close(a.prev_sample[~nan], b.prev_sample[~nan], 1e-5, f"prev_sample t={t} eta={eta}")
            _close(a.pred_original_sample, b.pred_original_sample, 1e-5, f"x0 t={t} eta={eta}")


def test_generator_noise_and_add_noise_equal_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    x, e = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    a = ours.step(e, 500, x, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    b = theirs.step(e, 500, x, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    _close(a, b, 1e-5, "generator noise")
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    gens2 = [torch.Generator().manual_seed(i) for i in range(3)]
    _close(ours.step(e, 500, x, eta=1.0, generator=gens).prev_sample,
           theirs.step(e, 500, x, eta=1.0, generator=gens2).prev_sample, 1e-5, "generator list")
    t = torch.tensor([0, 499, 999])
    _close(ours.add_noise(x, e, t), theirs.add_noise(x, e, t), 1e-6, "add_noise")
    _close(ours.get_velocity(x, e, t), theirs.get_velocity(x, e, t), 1e-6, "get_velocity")


class _ToyEps(torch.nn.Module):
    """A small deterministic 'model' eps(x, t) with real dependence on both inputs."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(3, 3, generator=g) * 0.3

    def forward(self, x, t):
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000
        return torch.tanh(torch.einsum("oc,bchw->bohw", self.w, x) + tt) * (1 + tt)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_full_loop_equals_diffusers(eta):
    diffusers = pytest.importorskip("diffusers")
    model = _ToyEps()
    x_T = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    results = []
    for sched in (DDIMScheduler(), diffusers.DDIMScheduler()):
        sched.set_timesteps(20)
        gen = torch.Generator().manual_seed(5)
        x = x_T * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = model(sched.scale_model_input(x, t), t)
            x = sched.step(eps, t, x, eta=eta, generator=gen).prev_sample
        results.append(x)
    _close(results[0], results[1], 1e-5, f"20-step loop eta={eta}")
    assert results[0].abs().max() <= 1.0 + 1e-6  # last step returns the clipped x0


def test_from_config_round_trip():
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    for src in (theirs, theirs.config, dict(theirs.config)):
        ours = DDIMScheduler.from_config(src)
        for k, v in ours.config.items():
            assert theirs.config[k] == v, k
        torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)
    back = diffusers.DDIMScheduler.from_config(ours.config)
    torch.testing.assert_close(back.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)
    assert type(ours.to_diffusers()) is diffusers.DDIMScheduler
