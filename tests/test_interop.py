"""Real checkpoints in: original DDPM files, diffusers folders, robustness-codebase classifiers;
the DDIMPipeline drop-in; pickles with a payload refused. diffusers is the reference (skipped
without it); models are tiny so the file runs in seconds on a CPU."""
import json
import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from cdp_fast import DDIMPipeline, models
from cdp_fast.cli import main as cli_main
from cdp_fast.data import load_synthetic
from cdp_fast.diffusion_train import load_diffusion
from cdp_fast.models.checkpoint import read_state_dict
from cdp_fast.models.ddpm import DDPM_CONFIGS, DDPMUNet, infer_config

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: intra-op threads only add contention on a shared CI machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# google/ddpm-cifar10-32's block structure (attention at 16x16 = level 1), small channels
DDPM_CIFAR_LIKE = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    mid_block_scale_factor=1, center_input_sample=False)


def _perturbed(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms away from (1, 0), biases non-zero: a wrong mapping shows
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


def _tiny_unet(**kw):
    torch.manual_seed(0)
    cfg = dict(DDPM_CIFAR_LIKE, block_out_channels=(32, 64, 64, 64), norm_num_groups=32)
    cfg.update(kw)
    return _perturbed(diffusers.UNet2DModel(**cfg))


def _eps_close(ours, ref, x, t):
    with torch.no_grad():
        a, b = ours(x, t), ref(x, t).sample
    err = (a - b).abs().max().item()
    rel = err / b.abs().max().item()
    assert rel <= 1e-4, (err, rel)
    return err, rel


def test_diffusers_unet_folder_and_pipeline_folder(tmp_path):
    ref = _tiny_unet()
    ref.save_pretrained(tmp_path / "unet")
    model, sched, meta = load_diffusion(tmp_path / "unet")
    assert isinstance(model, DDPMUNet) and meta["image_shape"] == [3, 32, 32] and meta["source"] == "diffusers"
    assert sched.num_train_timesteps == 1000 and float(sched.betas[0]) == pytest.approx(1e-4)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([999, 3])
    print("diffusers folder eps max abs/rel diff: %.3g %.3g" % _eps_close(model, ref, x, t))

    # a pipeline folder (model_index.json, unet/, scheduler/): the schedule from scheduler_config.json
    pipe = diffusers.DDPMPipeline(unet=ref, scheduler=diffusers.DDPMScheduler(
        num_train_timesteps=500, beta_start=2e-4, beta_end=0.03))
    pipe.save_pretrained(tmp_path / "pipe")
    model2, sched2, _ = load_diffusion(tmp_path / "pipe")
    assert sched2.num_train_timesteps == 500 and float(sched2.betas[-1]) == pytest.approx(0.03)
    with torch.no_grad():
        torch.testing.assert_close(model2(x, t), model(x, t), rtol=0, atol=0)
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)  # .bin weights (torch.load, weights only)
    model3, _, _ = load_diffusion(tmp_path / "bin")
    with torch.no_grad():
        torch.testing.assert_close(model3(x, t), model(x, t), rtol=0, atol=0)


def test_old_attention_spelling_and_multihead(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = _tiny_unet(attention_head_dim=8, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)
    ref.save_pretrained(tmp_path / "u")
    w = tmp_path / "u" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    st = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{old[m.group(1)]}.", k): v
          for k, v in load_file(str(w)).items()}
    assert any(".query." in k for k in st)
    save_file(st, str(w))
    model, _, _ = load_diffusion(tmp_path / "u")
    assert model.mid.attn_1.heads == 8
    _eps_close(model, ref, torch.randn(1, 3, 32, 32), torch.tensor([250]))


def _to_original(state: dict, levels: int) -> dict:
    """diffusers UNet2DModel names -> the DDPM release's names (written independently of the
    package's mapping, from the DDPM conversion script's correspondence)."""
    out = {}
    for k, v in state.items():
        k2 = k.replace("time_embedding.linear_1", "temb.dense.0").replace("time_embedding.linear_2", "temb.dense.1")
        k2 = k2.replace("conv_norm_out", "norm_out").replace("time_emb_proj", "temb_proj")
        k2 = k2.replace("conv_shortcut", "nin_shortcut").replace("group_norm", "norm")
        for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k2 = k2.replace(f".{a}.", f".{b}.")
        k2 = re.sub(r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k2)
        k2 = re.sub(r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn.", k2)
        k2 = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k2)
        m = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.(.*)$", k2)
        if m:
            part = {"resnets": "block", "attentions": "attn", "upsamplers.0": "upsample"}[m.group(2)]
            k2 = f"up.{levels - 1 - int(m.group(1))}.{part}.{m.group(3)}"
        k2 = re.sub(r"^mid_block\.resnets\.0\.", "mid.block_1.", k2)
        k2 = re.sub(r"^mid_block\.resnets\.1\.", "mid.block_2.", k2)
        k2 = re.sub(r"^mid_block\.attentions\.0\.", "mid.attn_1.", k2)
        if re.search(r"\.(q|k|v|proj_out)\.weight$", k2):
            v = v[:, :, None, None]  # the release's 1x1 convs
        out[k2] = v.clone()
    return out


def test_original_ddpm_checkpoint_file(tmp_path):
    ref = _tiny_unet()
    orig = _to_original(ref.state_dict(), 4)
    assert "mid.attn_1.q.weight" in orig and "down.0.block.0.norm1.weight" in orig
    torch.save(orig, tmp_path / "model-790000.ckpt")
    model, sched, meta = load_diffusion(tmp_path / "model-790000.ckpt")
    assert meta["source"] == "ddpm-original" and meta["image_shape"] == [3, 32, 32]
    assert model.config["ch_mult"] == [1, 2, 2, 2] and model.config["attn_resolutions"] == [16]
    assert sched.num_train_timesteps == 1000 and float(sched.betas[-1]) == pytest.approx(0.02)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 640])
    print("original .ckpt eps max abs/rel diff vs diffusers: %.3g %.3g" % _eps_close(model, ref, x, t))

    # wrapped as training scripts save it, and a broken one: the ValueError lists the keys
    torch.save({"state_dict": {f"module.{k}": v for k, v in orig.items()}, "step": 790000}, tmp_path / "w.pt")
    m2, _, _ = load_diffusion(tmp_path / "w.pt")
    with torch.no_grad():
        torch.testing.assert_close(m2(x, t), model(x, t), rtol=0, atol=0)
    bad = dict(orig)
    bad.pop("mid.attn_1.k.bias")
    bad["extra.weight"] = torch.zeros(1)
    bad["conv_out.bias"] = torch.zeros(5)
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"missing keys: mid\.attn_1\.k\.bias.*unexpected keys: extra\.weight"
                                         r".*shape mismatches: conv_out\.bias: file \(5,\) vs model \(3,\)"):
        load_diffusion(tmp_path / "bad.ckpt")

    pipe = DDIMPipeline.from_pretrained(tmp_path / "model-790000.ckpt")  # DDPM's schedule as a DDIMScheduler
    assert pipe.scheduler.config.beta_end == 0.02 and pipe.scheduler.config.num_train_timesteps == 1000
    # convert: a cdp-fast folder that loads to the same model
    assert cli_main(["convert", str(tmp_path / "model-790000.ckpt"), "--out", str(tmp_path / "conv")]) == 0
    m3, s3, meta3 = load_diffusion(tmp_path / "conv")
    assert meta3["arch"] == "ddpm" and meta3["format"] == "cdp-fast-diffusion"
    assert torch.equal(s3.betas, sched.betas)
    with torch.no_grad():
        torch.testing.assert_close(m3(x, t), model(x, t), rtol=0, atol=0)


def test_full_ddpm_configs_key_set():
    with torch.device("meta"):
        m = DDPMUNet(**DDPM_CONFIGS["cifar10"])
        big = DDPMUNet(**DDPM_CONFIGS["lsun-celebahq-256"])
    assert sum(p.numel() for p in m.parameters()) == 35_746_307  # Ho et al.'s CIFAR-10 model
    keys = set(m.state_dict())
    for k in ("temb.dense.0.weight", "temb.dense.1.bias", "conv_in.weight", "down.0.block.0.norm1.weight",
              "down.1.attn.1.q.weight", "down.2.downsample.conv.weight", "down.1.block.0.nin_shortcut.weight",
              "mid.block_1.temb_proj.weight", "mid.attn_1.proj_out.weight", "mid.block_2.conv2.bias",
              "up.3.block.2.nin_shortcut.weight", "up.1.attn.2.k.weight", "up.1.upsample.conv.weight",
              "norm_out.weight", "conv_out.bias"):
        assert k in keys, k
    assert not any(k.startswith("down.3.downsample") or k.startswith("up.0.upsample") for k in keys)
    assert m.state_dict()["down.1.attn.0.q.weight"].shape == (256, 256, 1, 1)
    # the architecture comes back from the tensors (image size from the 16x16 attention level)
    for cfg, mod in ((DDPM_CONFIGS["cifar10"], m), (DDPM_CONFIGS["lsun-celebahq-256"], big)):
        inf = infer_config(mod.state_dict())
        assert inf["ch_mult"] == list(cfg["ch_mult"]) and inf["image_size"] == cfg["image_size"]
        assert inf["attn_resolutions"] == [16] and inf["num_res_blocks"] == 2


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickle_payload_refused(tmp_path, how):
    marker = tmp_path / "ran.txt"
    obj = {"state_dict": {"conv_in.weight": torch.zeros(1)}, "hook": _Payload(marker)}
    f = tmp_path / "evil.ckpt"
    if how == "torch.save":
        torch.save(obj, f)
    else:
        f.write_bytes(pickle.dumps(obj))
    with pytest.raises(ValueError, match="refused.*arbitrary unpickling"):
        load_diffusion(f)
    with pytest.raises(ValueError, match="refused"):
        models.load(f, arch="wrn-16-1-swish")
    assert not marker.exists()  # nothing in the file ran


# ---------------------------------------------------------------------------------------------
# classifiers of the robustness codebases
def _ref_wrn(state, x, depth, act=F.silu, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616)):
    """Gowal et al.'s WideResNet forward, stated functionally on the reference key names."""
    def bn(h, p):
        return F.batch_norm(h, state[p + ".running_mean"], state[p + ".running_var"], state[p + ".weight"],
                            state[p + ".bias"], False, 0.0, 1e-5)
    h = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    h = F.conv2d(h, state["init_conv.weight"], padding=1)
    for g in range(3):
        for i in range((depth - 4) // 6):
            p = f"layer.{g}.block.{i}"
            stride = 2 if (g > 0 and i == 0) else 1
            a = act(bn(h, p + ".batchnorm_0"))
            sc = F.conv2d(a, state[p + ".shortcut.weight"], stride=stride) if p + ".shortcut.weight" in state else h
            a = F.pad(a, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))
            a = F.conv2d(a, state[p + ".conv_0.weight"], stride=stride)
            h = sc + F.conv2d(act(bn(a, p + ".batchnorm_1")), state[p + ".conv_1.weight"], padding=1)
    h = act(bn(h, "batchnorm"))
    feats = F.avg_pool2d(h, 8).flatten(1)
    return feats @ state["logits.weight"].T + state["logits.bias"], feats


def test_wrn_swish_is_gowal_layout_and_loads_every_wrapper(tmp_path):
    torch.manual_seed(0)
    src = models.build("wrn-16-2-swish", num_classes=10, in_channels=3, image_size=32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for mod in src.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                assert mod.momentum == 0.01
                mod.running_mean.uniform_(-0.1, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
    src.eval()
    # the reference codebases keep mean/std outside the state dict
    state = {k: v.clone() for k, v in src.state_dict().items() if k not in ("mean", "std")}
    assert "layer.0.block.0.batchnorm_0.running_var" in state and "logits.weight" in state
    x = torch.rand(2, 3, 32, 32)
    ref_logits, ref_feats = _ref_wrn(state, x, 16)
    norm = {"0.mean": torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), "0.std": torch.tensor([0.25] * 3).view(1, 3, 1, 1)}
    wrappers = {
        "raw": state,
        "model_state_dict": {"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
        "state_dict": {"state_dict": state, "best_acc": 0.5},
        "pre-0.4.1": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
        "sequential": {"state_dict": {**{f"module.1.{k}": v for k, v in state.items()},
                                      **{f"module.{k}": v for k, v in norm.items()}}},
    }
    for name, obj in wrappers.items():
        f = tmp_path / f"{name}.pt"
        torch.save(obj, f)
        m = models.load(f, arch="wrn-16-2-swish")
        assert m.num_classes == 10 and m.feature_dim == 128
        with torch.no_grad():
            logits, feats = m(x), m.features(x)
        if name == "sequential":  # the wrapper's Normalization replaces the default statistics
            ref_logits_n, _ = _ref_wrn(state, x, 16, mean=(0.5,) * 3, std=(0.25,) * 3)
            torch.testing.assert_close(logits, ref_logits_n, rtol=1e-5, atol=1e-5)
            continue
        err = (logits - ref_logits).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref_logits.abs().max().item()), (name, err)
        torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)
    st = dict(state)
    st["logits.weight"] = st["logits.weight"][:, :5]
    torch.save(st, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"logits\.weight: file \(10, 5\) vs model \(10, 128\)"):
        models.load(tmp_path / "bad.pt", arch="wrn-16-2-swish")
    with pytest.raises(ValueError, match="architecture"):
        models.load(tmp_path / "raw.pt")


def test_wrn_28_10_swish_layout():
    with torch.device("meta"):
        m = models.build("wrn-28-10-swish", num_classes=10, in_channels=3, image_size=32)
    assert m.feature_dim == 640 and isinstance(m.act, torch.nn.SiLU)
    assert 36.4e6 < sum(p.numel() for p in m.parameters()) < 36.6e6
    keys = set(m.state_dict())
    assert {"init_conv.weight", "layer.2.block.3.conv_1.weight", "layer.0.block.0.shortcut.weight",
            "batchnorm.running_mean", "logits.bias"} <= keys
    assert "layer.0.block.1.shortcut.weight" not in keys


# ---------------------------------------------------------------------------------------------
# DDIMPipeline
def _small_unet():
    torch.manual_seed(0)
    return _perturbed(diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
        norm_num_groups=4))


def test_ddim_pipeline_matches_diffusers(tmp_path):
    unet = _small_unet()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    ref = diffusers.DDIMPipeline(unet=unet, scheduler=sched)
    ref.set_progress_bar_config(disable=True)
    ours = DDIMPipeline(unet=unet, scheduler=sched)
    for kw in (dict(eta=0.0), dict(eta=0.7, use_clipped_model_output=True)):
        a = ref(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=4,
                output_type="np", **kw).images
        b = ours(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=4,
                 output_type="np", **kw).images
        assert a.shape == b.shape == (2, 8, 8, 3)
        assert abs(a - b).max() <= 1e-4, (kw, abs(a - b).max())
    # the cdp-fast engine walks the same steps from the same x_T (eta = 0)
    c = ours(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="pt",
             return_dict=False, engine="fast")[0]
    a = ref(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="pt").images
    assert c.shape == (2, 3, 8, 8) and (a - c).abs().max() <= 1e-4
    pil = ours(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=2).images
    assert pil[0].size == (8, 8)
    # from_pretrained: a saved diffusers pipeline folder, its model through load_diffusion
    ref.save_pretrained(tmp_path / "p")
    loaded = DDIMPipeline.from_pretrained(tmp_path / "p")
    d = loaded(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="np",
               eta=0.0).images
    assert abs(a.permute(0, 2, 3, 1).numpy() - d).max() <= 1e-4
    with pytest.raises(ValueError, match="fast engine cannot"):
        ours(batch_size=1, num_inference_steps=3, engine="fast")  # 1000 // 3 spacing is not the engine's


def test_ddim_pipeline_with_contrastive_guidance():
    from cdp_fast import ContrastiveGuidance

    unet = _small_unet()
    pipe = DDIMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000))
    g = ContrastiveGuidance("hnm", None, head=False, scale=1e3, t_min=0)
    out = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="pt",
               guidance=g).images
    plain = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                 output_type="pt").images
    assert out.shape == (4, 3, 8, 8) and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-4  # the guidance changed the images


def test_meta_json_of_unet_folder_roundtrip(tmp_path):
    ref = _small_unet()
    ref.save_pretrained(tmp_path / "u")
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    cfg["resnet_time_scale_shift"] = "scale_shift"
    (tmp_path / "u" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        load_diffusion(tmp_path / "u")
    with pytest.raises(ValueError, match="state dict"):
        torch.save({"step": 3}, tmp_path / "x.ckpt")
        load_diffusion(tmp_path / "x.ckpt")
    for bad in ("nope", "nope.ckpt"):
        with pytest.raises(FileNotFoundError):
            load_diffusion(tmp_path / bad)
    st, norm = read_state_dict(tmp_path / "u" / "diffusion_pytorch_model.safetensors")
    assert norm == {} and "conv_in.weight" in st


# ---------------------------------------------------------------------------------------------
# done when: generate from an external diffusion checkpoint, guided by an external WRN
@pytest.mark.parametrize("kind", ["diffusers", "ckpt"])
def test_generate_end_to_end_external_checkpoints(tmp_path, kind):
    import numpy as np

    if kind == "diffusers":
        _small_unet().save_pretrained(tmp_path / "ddpm")
        ck = tmp_path / "ddpm"
    else:  # the release's 32 GroupNorm groups: 32 channels
        torch.manual_seed(0)
        unet = _perturbed(diffusers.UNet2DModel(
            sample_size=32, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6))
        ck = tmp_path / "model.ckpt"
        torch.save(_to_original(unet.state_dict(), 2), ck)
    torch.manual_seed(0)
    # stand-ins of the robustness codebases' WRN-28-10-swish files: the same layout, depth 10, width 1
    wrn = models.build("wrn-10-1-swish", num_classes=10, in_channels=3, image_size=8)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in wrn.state_dict().items()
                                     if k not in ("mean", "std")}}, tmp_path / "wrn.pt")
    torch.save({"state_dict": {k: v for k, v in wrn.state_dict().items() if k not in ("mean", "std")}},
               tmp_path / "labeler.pth")
    args = ["generate", "--checkpoint", str(ck), "--features", str(tmp_path / "wrn.pt"),
            "--features-arch", "wrn-10-1-swish", "--labeler", str(tmp_path / "labeler.pth"),
            "--labeler-arch", "wrn-10-1-swish", "--guidance", "hnm", "--n", "6", "--batch-size", "4",
            "--steps", "4", "--device", "cpu", "--out", str(tmp_path / "gen")]
    assert cli_main(args) == 0
    x, y = load_synthetic(tmp_path / "gen")
    # an original file's image size is not in its tensors: 16 * 2**(attention level 1) = 32
    side = 8 if kind == "diffusers" else 32
    assert x.shape == (6, 3, side, side) and x.dtype == torch.uint8 and y.min() >= 0 and y.max() < 10
    assert len(np.unique(x.numpy().reshape(6, -1), axis=0)) == 6
    summary = json.loads((tmp_path / "gen" / "summary.json").read_text())
    assert summary["n"] == 6 and summary["guidance"] == "hnm"


def test_ddpm_unet_under_the_sampler_fast_path():
    """bf16 autocast + channels_last (the sampler's CUDA settings, here on the CPU): the same call
    signature as the built-in UNets, finite eps close to fp32."""
    from cdp_fast.sampler import DDIMSampler
    from cdp_fast.schedules import NoiseSchedule

    torch.manual_seed(0)
    m = DDPMUNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([900, 10])
    with torch.no_grad():
        ref = m(x, t)
        cl = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x, t)
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(low).all() and (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    sched = NoiseSchedule.linear()
    a = DDIMSampler(m, sched, steps=4, bf16=False).sample(2, (3, 8, 8), seed=0)
    b = DDIMSampler(m, sched, steps=4, bf16=True, channels_last=True).sample(2, (3, 8, 8), seed=0)
    assert torch.isfinite(b).all() and (a - b).abs().max() < 0.02 * a.abs().max()
    with pytest.raises(ValueError, match="unconditional"):
        m(x, t, torch.zeros(2, dtype=torch.long))


@pytest.mark.slow
def test_generate_with_full_wrn_28_10_swish_files(tmp_path):
    """The issue's command with the real WRN-28-10-swish architecture (36.5M parameters)."""
    _small_unet().save_pretrained(tmp_path / "ddpm")
    torch.manual_seed(0)
    wrn = models.build("wrn-28-10-swish", num_classes=10, in_channels=3, image_size=8)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in wrn.state_dict().items()
                                     if k not in ("mean", "std")}}, tmp_path / "wrn.pt")
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "ddpm"), "--features", str(tmp_path / "wrn.pt"),
                     "--features-arch", "wrn-28-10-swish", "--labeler", str(tmp_path / "wrn.pt"),
                     "--labeler-arch", "wrn-28-10-swish", "--guidance", "hnm", "--n", "4", "--batch-size", "4",
                     "--steps", "4", "--device", "cpu", "--out", str(tmp_path / "gen")]) == 0
    x, _ = load_synthetic(tmp_path / "gen")
    assert x.shape == (4, 3, 8, 8)
