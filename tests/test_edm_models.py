"""EDM networks read from NVlabs-format .pkl files without running their code (issue 20 section 3).

The .pkl files are written here in EDM's real format: ``tests/edm_standin`` holds a stand-in for
``torch_utils.persistence`` (module source + class name + state through
``_reconstruct_persistent_obj``) and ``training/networks.py``, a restatement of the published
architecture written independently of ``cdp_fast/models/edm.py``: it is the oracle the loaded
networks must match.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cdp_fast.denoiser import Denoiser
from cdp_fast.models import edm
from cdp_fast.models.edm_pickle import load_edm_pickle, read_edm_pickle

STANDIN = Path(__file__).parent / "edm_standin"
_MODS = ("torch_utils", "training")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The stand-in EDM modules, importable from a temporary folder for this module's tests."""
    root = tmp_path_factory.mktemp("edm_src")
    for pkg in _MODS:
        shutil.copytree(STANDIN / pkg, root / pkg)
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in _MODS}
    sys.path.insert(0, str(root))
    try:
        import training.augment
        import training.loss
        import training.networks
        yield training
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k.split(".")[0] in _MODS or k.startswith("_imported_module_")]:
            del sys.modules[k]
        sys.modules.update(saved)


SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1)
DDPMPP = dict(SONG, model_type="SongUNet", embedding_type="positional", encoder_type="standard",
              decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])
NCSNPP = dict(SONG, model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
              decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
SKIP = dict(DDPMPP, encoder_type="skip", decoder_type="skip")
ADM = dict(model_type="DhariwalUNet", model_channels=32, channel_mult=[1, 2], num_blocks=1,
           attn_resolutions=[4], dropout=0.1)

CASES = {  # every network / preconditioner pair (labels and augmentation inputs in some)
    "edm-ddpmpp": ("EDMPrecond", dict(DDPMPP, label_dim=3, augment_dim=9)),
    "vp-ddpmpp": ("VPPrecond", dict(DDPMPP, label_dim=3, augment_dim=9)),
    "ve-ddpmpp": ("VEPrecond", dict(DDPMPP)),
    "edm-ncsnpp": ("EDMPrecond", dict(NCSNPP)),
    "vp-ncsnpp": ("VPPrecond", dict(NCSNPP, label_dim=3)),
    "ve-ncsnpp": ("VEPrecond", dict(NCSNPP, label_dim=3, augment_dim=9)),
    "vp-ddpmpp-skip": ("VPPrecond", dict(SKIP, res=16, channel_mult=[1, 2, 2], attn_resolutions=[8])),
    "edm-adm": ("EDMPrecond", dict(ADM, label_dim=3, augment_dim=9)),
    "edm-adm-uncond": ("EDMPrecond", dict(ADM)),
}


def _write_pkl(ref, path, precond, kwargs, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(kwargs)
    kw = dict(img_resolution=kwargs.pop("res", 8), img_channels=3, **kwargs)
    net = getattr(ref.networks, precond)(**kw).eval().requires_grad_(False)
    data = dict(ema=net, loss_fn=ref.loss.EDMLoss(), augment_pipe=ref.augment.AugmentPipe(p=0.12, xflip=1e8),
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip",
                                    use_labels=True, xflip=False, resolution=kw["img_resolution"]))
    path.write_bytes(pickle.dumps(data))  # what EDM's training loop does (pickle.dump of the dict)
    return net


def _inputs(net, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    R = net.img_resolution
    sigma = torch.tensor([0.02, 0.4, 3.0, 60.0])[:n]
    x = torch.randn(n, net.img_channels, R, R, generator=g) * (1 + sigma[:, None, None, None])
    labels = None
    if net.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(n) % net.label_dim, net.label_dim).float()
    return x, sigma, labels


@pytest.mark.parametrize("case", list(CASES))
def test_pickle_matches_published_architecture(ref, tmp_path, case, assert_close):
    precond, kwargs = CASES[case]
    path = tmp_path / "net.pkl"
    oracle = _write_pkl(ref, path, precond, kwargs)
    net, schedule, meta = load_edm_pickle(path)
    assert schedule is None and isinstance(net, edm.PRECONDS[precond]) and isinstance(net, Denoiser)
    assert meta["kind"] == "edm" and meta["precond"] == precond and meta["arch"] == kwargs["model_type"]
    assert meta["image_shape"] == [3, oracle.img_resolution, oracle.img_resolution]
    assert meta["label_dim"] == kwargs.get("label_dim", 0)
    assert net.sigma_min == pytest.approx(oracle.sigma_min) and net.sigma_max == pytest.approx(oracle.sigma_max)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x, sigma, labels = _inputs(net)
    with torch.no_grad():
        want = oracle(x, sigma, labels)
        got = net(x, sigma, labels)
        assert_close(got, want, rtol=2e-5, atol=1e-6, name=case)
        # scalar sigma broadcasts over the batch (EDM's samplers pass a 0-d tensor)
        assert_close(net(x, sigma[1]), oracle(x, sigma[1:2].expand(4)), rtol=2e-5, atol=1e-6, name="scalar")
    assert float((want - x).abs().max()) > 1e-3  # the network part is not negligible


def test_plain_pickle_of_the_standin_runs_its_code(ref, tmp_path):
    """The test files are in the real format: plain pickle rebuilds them by exec-ing the embedded
    source (what cdp-fast never does) and gets the oracle's outputs."""
    path = tmp_path / "net.pkl"
    oracle = _write_pkl(ref, path, "VPPrecond", CASES["vp-ddpmpp"][1])
    data = pickle.loads(path.read_bytes())
    assert type(data["ema"]).__module__.startswith("_imported_module_")
    x, sigma, labels = _inputs(oracle)
    with torch.no_grad():
        assert torch.equal(data["ema"](x, sigma, labels), oracle(x, sigma, labels))
    obj = read_edm_pickle(path)
    assert obj["ema"].class_name == "VPPrecond" and obj["loss_fn"].class_name == "EDMLoss"
    assert "module_src" not in obj["ema"].state and obj["dataset_kwargs"]["resolution"] == 8
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_edm_pickle(cut)


class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _persistent(meta):
    class P:
        def __reduce__(self):
            return ref_reconstruct, (meta,)
    return P()


def ref_reconstruct(meta):  # pickled by reference as torch_utils.persistence._reconstruct_persistent_obj
    raise AssertionError("never called while pickling")


ref_reconstruct.__module__, ref_reconstruct.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"


def _dump(obj) -> bytes:
    import torch_utils.persistence as tp
    saved = tp._reconstruct_persistent_obj
    tp._reconstruct_persistent_obj = ref_reconstruct  # pickle's identity check on the global
    try:
        return pickle.dumps(obj)
    finally:
        tp._reconstruct_persistent_obj = saved


def test_payloads_are_refused_and_nothing_runs(ref, tmp_path):
    marker = tmp_path / "ran"
    cmd = f"touch {marker}"
    cases = {
        "os.system": {"ema": _Payload(os.system, cmd)},
        "builtins.eval": {"ema": _Payload(eval, f"open({str(marker)!r}, 'w')")},
        # a payload hidden inside a persistent object's state
        "nested": {"ema": _persistent(dict(type="class", version=6, module_src="", class_name="EDMPrecond",
                                           state={"_init_kwargs": _Payload(os.system, cmd)}))},
        # a class name EDM never published
        "unknown-class": {"ema": _persistent(dict(type="class", version=6, module_src="", class_name="Evil",
                                                  state={}))},
    }
    for name, obj in cases.items():
        p = tmp_path / f"{name}.pkl"
        p.write_bytes(_dump(obj))
        with pytest.raises(ValueError, match="refused"):
            load_edm_pickle(p)
        assert not marker.exists(), name
    # the embedded module source is never executed: here it would write the marker
    src = f"open({str(marker)!r}, 'w').close()"
    p = tmp_path / "src.pkl"
    p.write_bytes(_dump({"ema": _persistent(dict(type="class", version=6, module_src=src, class_name="EDMPrecond",
                                                 state={"_init_kwargs": {"img_resolution": 8}}))}))
    with pytest.raises(ValueError):
        load_edm_pickle(p)
    assert not marker.exists()


def test_tampered_architecture_is_refused(ref, tmp_path):
    """A file whose layers differ from what its init kwargs describe (edited source) is refused."""
    path = tmp_path / "net.pkl"
    torch.manual_seed(0)
    net = ref.networks.EDMPrecond(img_resolution=8, img_channels=3, **ADM).eval()
    net.model.out_norm.eps = 1e-3  # an attribute the rebuilt network would not have
    path.write_bytes(pickle.dumps({"ema": net}))
    with pytest.raises(ValueError, match="eps"):
        load_edm_pickle(path)
    not_a_net = tmp_path / "loss.pkl"
    not_a_net.write_bytes(pickle.dumps({"ema": ref.loss.EDMLoss()}))
    with pytest.raises(ValueError, match="EDMLoss"):
        load_edm_pickle(not_a_net)


def test_load_diffusion_and_convert_roundtrip(ref, tmp_path):
    from cdp_fast.diffusion_train import ConvertConfig, convert, load_diffusion

    path = tmp_path / "edm-8x8-cond-vp.pkl"
    _write_pkl(ref, path, "VPPrecond", CASES["vp-ddpmpp"][1])
    net, schedule, meta = load_diffusion(str(path))
    assert schedule is None and meta["kind"] == "edm" and meta["precond"] == "VPPrecond"
    assert meta["image_shape"] == [3, 8, 8] and meta["label_dim"] == 3 and meta["source"] == str(path)
    out = convert(ConvertConfig(path=str(path), out=str(tmp_path / "conv")))
    assert out["precond"] == "VPPrecond" and out["image_shape"] == [3, 8, 8]
    net2, schedule2, meta2 = load_diffusion(tmp_path / "conv")
    assert schedule2 is None and meta2["kind"] == "edm" and meta2["label_dim"] == 3
    assert sorted(p.name for p in (tmp_path / "conv").iterdir()) == ["config.json", "model.safetensors"]
    x, sigma, labels = _inputs(net)
    with torch.no_grad():
        assert torch.equal(net(x, sigma, labels), net2(x, sigma, labels))
        # unconditional call of a conditional model: EDM feeds zero labels
        assert torch.equal(net(x, sigma), net2(x, sigma, torch.zeros(1, 3)))
    # a folder converted again (folder -> folder) is unchanged
    convert(ConvertConfig(path=str(tmp_path / "conv"), out=str(tmp_path / "conv2")))
    assert (tmp_path / "conv" / "model.safetensors").read_bytes() == (tmp_path / "conv2" / "model.safetensors").read_bytes()


def test_edm_loss_formula():
    torch.manual_seed(0)
    net = edm.build("EDMPrecond", dict(img_resolution=8, img_channels=1, model_type="SongUNet",
                                       **edm_tiny())).eval()
    y = torch.rand(3, 1, 8, 8) * 2 - 1
    got = edm.edm_loss(net, y, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma = (torch.randn(3, 1, 1, 1, generator=g) * 1.2 - 1.2).exp()
    n = torch.randn(y.shape, generator=g) * sigma
    w = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    with torch.no_grad():
        assert torch.allclose(got, w * (net(y + n, sigma) - y) ** 2)


def edm_tiny():
    from cdp_fast.edm_train import EDM_PRESETS
    return EDM_PRESETS["tiny"]


def test_train_diffusion_edm_objective(tmp_path):
    from cdp_fast.diffusion_train import TrainDiffusionConfig, load_diffusion, run

    out = run(TrainDiffusionConfig(objective="edm", iters=2, batch_size=4, log_every=1, class_conditional=True,
                                   out=str(tmp_path / "edm")))
    assert out["schedule"] is None and out["class_conditional"] and out["iters"] == 2
    import json
    cfg = json.loads((tmp_path / "edm" / "config.json").read_text())
    losses = [v for _, v in json.loads((tmp_path / "edm" / "metrics.json").read_text())["loss_log"]]
    assert cfg["objective"] == "edm" and len(losses) == 2 and all(0 < v < float("inf") for v in losses)
    net, schedule, meta = load_diffusion(tmp_path / "edm")
    assert schedule is None and isinstance(net, Denoiser) and meta["precond"] == "EDMPrecond"
    assert meta["image_shape"] == [1, 8, 8] and meta["label_dim"] == 10 and meta["sigma_max"] == float("inf")
    x = torch.randn(2, 1, 8, 8)
    labels = torch.eye(10)[:2]
    with torch.no_grad():
        d = net(x, torch.tensor(1.5), labels)
        net2, _, _ = load_diffusion(tmp_path / "edm")
        assert d.shape == x.shape and torch.isfinite(d).all() and torch.equal(d, net2(x, torch.tensor(1.5), labels))
    with pytest.raises(ValueError, match="objective"):
        from cdp_fast.diffusion_train import resolve_settings
        resolve_settings(TrainDiffusionConfig(objective="ve"))
    with pytest.raises(ValueError, match="--schedule"):
        resolve_settings(TrainDiffusionConfig(objective="edm", schedule="cosine"))


def test_protocol_kwargs_and_folder_io(tmp_path):
    torch.manual_seed(0)
    net = edm.build("VEPrecond", dict(img_resolution=8, img_channels=1, label_dim=2, **DDPMPP)).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = net(x, torch.tensor([0.5, 2.0]), torch.eye(2), force_fp32=True, augment_labels=None)
        assert torch.equal(a, net(x, torch.tensor([0.5, 2.0]), torch.eye(2)))
    assert torch.equal(net.round_sigma(torch.tensor([0.3])), torch.tensor([0.3]))
    with pytest.raises(ValueError, match="iDDPMPrecond|supported"):
        edm.build("iDDPMPrecond", {})
    with pytest.raises(ValueError, match="model_type"):
        edm.build("EDMPrecond", dict(img_resolution=8, img_channels=1, model_type="Nope"))
    buf = io.BytesIO()
    torch.save({"x": 1}, buf)  # an ordinary torch file named .pkl is not an EDM pickle
    (tmp_path / "t.pkl").write_bytes(buf.getvalue())
    with pytest.raises(ValueError):
        load_edm_pickle(tmp_path / "t.pkl")
