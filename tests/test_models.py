"""Classifiers: shapes, features, normalisation, checkpoints (safetensors + config.json)."""
import json

import pytest
import torch

from cdp_fast import models


@pytest.mark.parametrize("name,c,s,fdim", [
    ("small-cnn", 1, 28, 200),
    ("small-cnn", 1, 8, 200),
    ("small-cnn", 3, 13, 200),
    ("preact-resnet18", 3, 32, 512),
    ("preact-resnet18", 1, 8, 512),
    ("wrn-16-2", 3, 32, 128),
    ("wrn-10-1-swish", 1, 7, 64),
    ("wrn-28-10-swish", 3, 12, 640),  # 32x32 works the same (global pooling); 12 keeps CPU CI fast
])
def test_build_shapes_and_features(name, c, s, fdim):
    torch.manual_seed(0)
    m = models.build(name, num_classes=10, in_channels=c, image_size=s).eval()
    x = torch.rand(2 if s < 32 else 1, c, s, s)
    with torch.no_grad():
        logits, feats = m(x), m.features(x)
    assert logits.shape == (len(x), 10) and feats.shape == (len(x), fdim) and m.feature_dim == fdim
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        torch.testing.assert_close(m.head(feats), logits)


def test_wrn_28_10_builds():
    m = models.build("wrn-28-10", num_classes=10, in_channels=3, image_size=32)
    assert m.feature_dim == 640 and isinstance(m.act, torch.nn.ReLU)
    n = sum(p.numel() for p in m.parameters())
    assert 36.0e6 < n < 36.6e6, n  # WRN-28-10 has ~36.5M parameters
    sw = models.build("wrn-10-1-swish", num_classes=10, in_channels=3, image_size=32)
    assert isinstance(sw.act, torch.nn.SiLU)


def test_small_cnn_matches_trades_layout():
    m = models.build("small-cnn", num_classes=10, in_channels=1, image_size=28)
    assert m.flat_dim == 64 * 4 * 4  # unpadded TRADES net
    assert [l.out_channels for l in m.conv if isinstance(l, torch.nn.Conv2d)] == [32, 32, 64, 64]
    assert [l.out_features for l in m.fc if isinstance(l, torch.nn.Linear)] == [200, 200]
    assert models.build("small-cnn", num_classes=10, in_channels=1, image_size=8).flat_dim == 64 * 2 * 2


def test_normalisation_inside_model():
    m = models.build("wrn-10-1", num_classes=3, in_channels=3, image_size=6).eval()
    x = torch.rand(2, 3, 6, 6)
    torch.testing.assert_close(m.normalize(x), (x - m.mean) / m.std)
    assert m.mean.flatten().tolist() == pytest.approx([0.4914, 0.4822, 0.4465])
    custom = models.build("small-cnn", num_classes=3, in_channels=1, image_size=8, mean=[0.5], std=[0.25])
    assert custom.std.item() == 0.25
    with pytest.raises(ValueError, match="one per channel"):
        models.build("small-cnn", num_classes=3, in_channels=3, image_size=8, mean=[0.5])
    with pytest.raises(TypeError, match="float images"):
        m(torch.zeros(1, 3, 6, 6, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.zeros(1, 1, 6, 6))


def test_build_errors():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("resnet50", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        models.build("wrn-27-2", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="num_classes"):
        models.build("small-cnn", num_classes=0, in_channels=1, image_size=8)


def _trained_like(m, seed=0):
    # non-trivial BN statistics and head so a bad load would show
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
    return m.eval()


@pytest.mark.parametrize("name,c,s", [("small-cnn", 1, 8), ("preact-resnet18", 3, 5), ("wrn-10-2-swish", 3, 11)])
def test_save_load_round_trip(tmp_path, name, c, s):
    torch.manual_seed(1)
    m = _trained_like(models.build(name, num_classes=7, in_channels=c, image_size=s, mean=[0.3] * c))
    models.save(m, tmp_path / "ck", name=name, dataset="toy", epoch=3)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["name"] == name and cfg["num_classes"] == 7 and cfg["in_channels"] == c
    assert cfg["image_size"] == s and cfg["dataset"] == "toy" and cfg["epoch"] == 3
    m2 = models.load(tmp_path / "ck")
    assert not m2.training and type(m2) is type(m)
    x = torch.rand(3, c, s, s)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
        torch.testing.assert_close(m2.features(x), m.features(x), rtol=0, atol=0)
    assert m2.mean.flatten().tolist() == pytest.approx([0.3] * c)


def test_load_errors(tmp_path):
    m = models.build("small-cnn", num_classes=10, in_channels=1, image_size=8)
    ck = models.save(m, tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load(tmp_path / "nope")
    # config of another model: same folder, other name -> names the mismatching keys
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "name": "wrn-10-1"}))
    with pytest.raises(ValueError, match="another model.*(missing|unexpected) keys"):
        models.load(ck)
    # shape mismatch: head of 5 classes vs 10 in the weights
    (ck / "config.json").write_text(json.dumps({**cfg, "num_classes": 5}))
    with pytest.raises(ValueError, match=r"head\.weight: file \(10, 200\) vs model \(5, 200\)"):
        models.load(ck)
    # a UNet (or other) config
    (ck / "config.json").write_text(json.dumps({**cfg, "name": "unet"}))
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        models.load(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        models.load(ck)
    (ck / "config.json").write_text(json.dumps(cfg))
    w = ck / "model.safetensors"
    raw = w.read_bytes()
    w.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        models.load(ck)
    w.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        models.load(ck)
    w.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.load(ck)
    (ck / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load(ck)


def test_save_compiled_like_wrapper_and_missing_name(tmp_path):
    m = models.build("small-cnn", num_classes=3, in_channels=1, image_size=8)

    class Wrapped(torch.nn.Module):  # what torch.compile returns: the module under _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    models.save(Wrapped(m), tmp_path / "w")
    assert models.load(tmp_path / "w").name == "small-cnn"
    with pytest.raises(ValueError, match="name="):
        models.save(torch.nn.Linear(2, 2), tmp_path / "x")
