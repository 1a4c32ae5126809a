"""DDPM UNet shapes / size, diffusion training on digits, checkpoint round trip and load errors."""
import json

import pytest
import torch

from cdp_fast.diffusion_train import (
    TrainDiffusionConfig,
    load_diffusion,
    resolve_settings,
    save_diffusion,
    train_diffusion,
)
from cdp_fast.models.unet import UNet, build_unet, unet_kwargs

SCHED = {"name": "cosine", "num_train_timesteps": 1000, "params": {}}


def _unet(C, H, ch_mult, num_classes=None, base_ch=16, attn=()):
    torch.manual_seed(0)
    return UNet(C, C, base_ch=base_ch, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn,
                image_size=H, dropout=0.0, num_classes=num_classes).eval()


@pytest.mark.parametrize("C,H,ch_mult,attn,B", [
    (1, 8, (1, 2), (4,), 3),          # digits
    (1, 28, (1, 2, 2), (7,), 2),      # MNIST: 28 -> 14 -> 7, no padding
    (3, 32, (1, 2, 2, 2), (16,), 2),  # CIFAR-10 layout
])
def test_unet_output_shape_and_channels_last(C, H, ch_mult, attn, B):
    m = _unet(C, H, ch_mult, base_ch=8, attn=attn)
    x = torch.randn(B, C, H, H)
    t = torch.tensor([0, 999, 500][:B])
    with torch.no_grad():
        out = m(x, t)
        assert out.shape == x.shape and torch.isfinite(out).all()
        out_scalar_t = m(x, torch.tensor(500))
        assert torch.allclose(out_scalar_t, m(x, torch.full((B,), 500)))
        m_cl = m.to(memory_format=torch.channels_last)
        out_cl = m_cl(x.contiguous(memory_format=torch.channels_last), t)
    err = (out_cl - out).abs().max().item()
    assert err < 1e-4, f"channels_last differs by {err}"


def test_unet_time_dependence():
    m = _unet(1, 8, (1, 2))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        d = (m(x, torch.tensor(10)) - m(x, torch.tensor(900))).abs().max().item()
    assert d > 1e-4, "output does not depend on t"


def test_class_conditional_path():
    m = _unet(1, 8, (1, 2), num_classes=3)
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 300)
    with torch.no_grad():
        a = m(x, t, torch.tensor([0, 1, 2, 0]))
        b = m(x, t, torch.tensor([1, 1, 0, 0]))
    assert a.shape == x.shape
    diff = (a - b).abs().amax(dim=(1, 2, 3))
    # rows with the same label agree, rows with different labels differ
    assert diff[1] == 0 and diff[3] == 0 and diff[0] > 1e-5 and diff[2] > 1e-5, diff
    with pytest.raises(ValueError, match="class-conditional"):
        m(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        _unet(1, 8, (1, 2))(x, t, torch.zeros(4, dtype=torch.long))


def test_bad_unet_arguments():
    with pytest.raises(ValueError, match="divisible"):
        UNet(1, 1, base_ch=8, ch_mult=(1, 2, 2, 2), image_size=28)
    with pytest.raises(ValueError, match="preset"):
        build_unet("huge", in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="shape"):
        _unet(1, 8, (1, 2))(torch.randn(2, 3, 8, 8), torch.tensor(1))


def test_ddpm_cifar10_parameter_count():
    with torch.device("meta"):  # no memory, no init cost
        m = build_unet("ddpm-cifar10", in_channels=3, image_size=32)
    n = sum(p.numel() for p in m.parameters())
    print("ddpm-cifar10 parameters:", n)
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n
    kw = unet_kwargs("ddpm-cifar10", in_channels=3, image_size=32)
    assert kw["base_ch"] == 128 and kw["ch_mult"] == [1, 2, 2, 2] and kw["attn_resolutions"] == [16]
    assert kw["num_res_blocks"] == 2 and kw["dropout"] == 0.1


def test_presets_build_for_their_data():
    for preset, C, H in (("tiny", 1, 8), ("small", 1, 28), ("ddpm-cifar10", 3, 32)):
        with torch.device("meta"):
            build_unet(preset, in_channels=C, image_size=H, num_classes=10)


def test_bf16_autocast_cpu_forward():
    m = _unet(1, 8, (1, 2), attn=(4,))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = m(x, torch.tensor([3, 700]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, torch.tensor([3, 700]))
    err = (out.float() - ref).abs().max().item()
    assert torch.isfinite(out).all() and err < 0.1 * ref.abs().max().item() + 0.05, err


@pytest.mark.parametrize("dataset,preset,schedule", [
    ("digits", "tiny", "cosine"), ("mnist", "small", "cosine"), ("fashion-mnist", "small", "cosine"),
    ("cifar10", "ddpm-cifar10", "linear"), ("gtsrb", "ddpm-cifar10", "cosine")])
def test_auto_settings(dataset, preset, schedule):
    s = resolve_settings(TrainDiffusionConfig(data=dataset))
    assert (s["preset"], s["schedule"]) == (preset, schedule)
    assert s["batch_size"] == (64 if dataset == "digits" else 128)
    assert s["lr"] == (2e-3 if preset == "tiny" else 2e-4)
    s = resolve_settings(TrainDiffusionConfig(data=dataset, preset="tiny", schedule="linear", iters=7))
    assert (s["preset"], s["schedule"], s["iters"]) == ("tiny", "linear", 7)


@pytest.mark.parametrize("bad", [dict(iters=0), dict(batch_size=0), dict(lr=-1.0),
                                 dict(ema_decay=1.0), dict(real_limit=0), dict(data="svhn")])
def test_bad_settings(bad):
    with pytest.raises(ValueError):
        resolve_settings(TrainDiffusionConfig(**bad))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A few seconds of tiny-UNet training on 200 real digits."""
    out = tmp_path_factory.mktemp("diff") / "ckpt"
    cfg = TrainDiffusionConfig(data="digits", real_limit=200, iters=40, batch_size=32, lr=3e-3,
                               log_every=10, out=str(out), seed=0, device="cpu")
    return cfg, train_diffusion(cfg)


def test_training_reduces_loss(digits_run):
    _, folder = digits_run
    log = json.loads((folder / "metrics.json").read_text())["loss_log"]
    first, last = log[0][1], log[-1][1]
    print("loss log", log)
    assert len(log) == 4 and log[-1][0] == 40
    assert last < 0.7 * first, f"loss did not drop: first window {first}, last window {last}"


def test_checkpoint_contents(digits_run):
    cfg, folder = digits_run
    model, sched, meta = load_diffusion(folder)
    assert not model.training
    assert meta["dataset"] == "digits" and meta["image_shape"] == [1, 8, 8]
    assert meta["real_images"] == 200 and meta["real_limit"] == 200  # only the allowed images
    assert meta["schedule"]["name"] == "cosine" and sched.num_train_timesteps == 1000
    assert meta["iters"] == 40 and meta["final_loss"] > 0 and meta["num_classes"] == 10
    assert meta["class_conditional"] is False and meta["preset"] == "tiny"
    assert json.loads((folder / "train_config.json").read_text())["iters"] == 40
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8), torch.tensor([5, 500]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_real_limit_enforced_with_given_data(tmp_path):
    from cdp_fast.data import load_dataset

    data = load_dataset("digits", real_limit=40)
    cfg = TrainDiffusionConfig(real_limit=20, iters=1, batch_size=4, out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="real_limit"):
        train_diffusion(cfg, data=data)


def test_class_conditional_training_and_round_trip(tmp_path):
    cfg = TrainDiffusionConfig(data="digits", real_limit=30, iters=3, batch_size=8, log_every=1,
                               class_conditional=True, schedule="linear", out=str(tmp_path / "c"))
    folder = train_diffusion(cfg)
    model, sched, meta = load_diffusion(folder)
    assert meta["class_conditional"] and model.num_classes == 10 and meta["schedule"]["name"] == "linear"
    assert torch.allclose(sched.betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    with torch.no_grad():
        out = model(torch.randn(3, 1, 8, 8), torch.tensor(9), torch.tensor([0, 4, 9]))
    assert out.shape == (3, 1, 8, 8)


@pytest.mark.parametrize("num_classes", [None, 5])
def test_save_load_identical_eps(tmp_path, num_classes):
    torch.manual_seed(1)
    m = build_unet("tiny", in_channels=1, image_size=8, num_classes=num_classes).eval()
    for p in m.parameters():  # non-trivial weights everywhere (zero-init-free check)
        p.data.add_(0.01 * torch.randn_like(p))
    save_diffusion(tmp_path, m, {"schedule": SCHED, "dataset": "digits"})
    m2, sched, meta = load_diffusion(tmp_path)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    y = None if num_classes is None else torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        a, b = m(x, t, y), m2(x, t, y)
    assert torch.equal(a, b), (a - b).abs().max()
    assert meta["unet"] == m.config and meta["class_conditional"] == (num_classes is not None)


def _saved(tmp_path):
    m = build_unet("tiny", in_channels=1, image_size=8).eval()
    return save_diffusion(tmp_path / "ck", m, {"schedule": SCHED})


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_diffusion(tmp_path / "nope")
    folder = _saved(tmp_path)
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    good_cfg, good_w = cfg_path.read_text(), w_path.read_bytes()

    w_path.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_diffusion(folder)
    w_path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        load_diffusion(folder)
    w_path.write_bytes(good_w[: len(good_w) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        load_diffusion(folder)
    w_path.write_bytes(good_w)

    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_diffusion(folder)
    cfg_path.write_text(json.dumps({"data": "digits", "iters": 5}))  # a command config, not a checkpoint
    with pytest.raises(ValueError, match="not a cdp-fast diffusion checkpoint"):
        load_diffusion(folder)
    wrong = json.loads(good_cfg)
    wrong["unet"]["base_ch"] = 16  # weights of a different model
    cfg_path.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="does not match"):
        load_diffusion(folder)
    wrong = json.loads(good_cfg)
    wrong["image_shape"] = [3, 8, 8]
    cfg_path.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="image_shape"):
        load_diffusion(folder)
    wrong = json.loads(good_cfg)
    wrong["schedule"]["name"] = "quadratic"
    cfg_path.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="schedule"):
        load_diffusion(folder)
    cfg_path.unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusion(folder)


def test_cli_train_diffusion(tmp_path, capsys):
    from cdp_fast.cli import main

    out = tmp_path / "cli"
    rc = main(["train-diffusion", "--data", "digits", "--real-limit", "20", "--iters", "2",
               "--batch-size", "4", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iters"] == 2 and summary["preset"] == "tiny" and summary["schedule"] == "cosine"
    load_diffusion(out)  # the checkpoint's config.json replaced the CLI's command config
    assert json.loads((out / "train_config.json").read_text())["real_limit"] == 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_channels_last_training_on_cuda(tmp_path):
    cfg = TrainDiffusionConfig(data="digits", real_limit=64, iters=20, batch_size=32, log_every=5,
                               preset="small", precision="auto", device="cuda", out=str(tmp_path / "g"))
    folder = train_diffusion(cfg)
    model, _, meta = load_diffusion(folder, device="cuda")
    assert meta["precision"] == "bf16" and meta["final_loss"] < 2.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(torch.randn(4, 1, 8, 8, device="cuda"), torch.tensor(10, device="cuda"))
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()
