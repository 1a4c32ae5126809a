"""Data: datasets, IDX/CIFAR/GTSRB readers, synthetic npz shards, device augmentation, mixing."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from cdp_fast import data as D
from cdp_fast.data import datasets as D_datasets


# --------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    return D.load_dataset("digits")


def test_digits_shapes_and_fixed_split(digits):
    d = digits
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.uint8 and d.y_train.dtype == torch.int64
    assert d.num_classes == 10 and d.channels == 1 and d.size == 8
    assert int(d.x_train.max()) == 255 and int(d.x_train.min()) == 0
    # stratified: 35..37 test images per class
    counts = torch.bincount(d.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37, counts
    # fixed split: same every call, and pinned (regression value of this implementation)
    again = D.load_dataset("digits", seed=123)
    assert torch.equal(again.x_test, d.x_test) and torch.equal(again.y_train, d.y_train)
    assert int(d.x_test.sum()) == 1780794
    # train and test are disjoint images (digits has a few exact duplicates; allow them)
    tr = {bytes(r) for r in d.x_train.reshape(len(d.x_train), -1).numpy()}
    overlap = sum(bytes(r) in tr for r in d.x_test.reshape(360, -1).numpy())
    assert overlap < 5, overlap


def test_real_limit_balanced_and_deterministic(digits):
    a = D.load_dataset("digits", real_limit=25, seed=1)
    b = D.load_dataset("digits", real_limit=25, seed=1)
    c = D.load_dataset("digits", real_limit=25, seed=2)
    assert a.x_train.shape == (25, 1, 8, 8)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    counts = torch.bincount(a.y_train, minlength=10)
    assert counts.max() - counts.min() <= 1, counts
    assert torch.equal(a.x_test, digits.x_test)  # test split untouched
    with pytest.raises(ValueError, match="exceeds"):
        D.load_dataset("digits", real_limit=5000)
    with pytest.raises(ValueError, match="positive"):
        D.load_dataset("digits", real_limit=0)


def test_balanced_subset_uneven_classes():
    y = np.array([0] * 10 + [1] * 2 + [2] * 5)
    idx = D.balanced_subset(y, 9, seed=0)
    assert len(set(idx.tolist())) == 9
    c = np.bincount(y[idx], minlength=3)
    assert c[1] == 2 and sorted([c[0], c[2]]) == [3, 4], c  # class 1 runs out; others share the rest


def test_dataset_defaults():
    for name in D.DATASETS:
        d = D.dataset_defaults(name)
        assert {"eps", "step_size", "attack_steps", "beta", "model"} <= set(d)
    assert D.dataset_defaults("mnist")["eps"] == 0.3
    assert D.dataset_defaults("digits")["eps"] == 0.1  # not MNIST's 0.3: an 8x8 small-cnn ends at chance there
    assert D.dataset_defaults("fashion-mnist")["eps"] == 0.1
    assert D.dataset_defaults("CIFAR-10")["eps"] == pytest.approx(8 / 255)
    assert D.dataset_defaults("gtsrb")["eps"] == pytest.approx(8 / 255)
    assert D.dataset_defaults("cifar10")["augment"] == "crop-flip"
    assert "flip" not in D.dataset_defaults("digits")["augment"]
    with pytest.raises(ValueError, match="unknown dataset"):
        D.dataset_defaults("imagenet")


# ------------------------------------------------------------------------------------------ IDX
def _write_mnist(folder, rng, n_train=7, n_test=5, size=5, gz=False):
    sfx = ".gz" if gz else ""
    xtr = rng.integers(0, 256, (n_train, size, size), dtype=np.uint8)
    xte = rng.integers(0, 256, (n_test, size, size), dtype=np.uint8)
    ytr = rng.integers(0, 10, n_train).astype(np.uint8)
    yte = rng.integers(0, 10, n_test).astype(np.uint8)
    D.write_idx(folder / f"train-images-idx3-ubyte{sfx}", xtr)
    D.write_idx(folder / f"train-labels-idx1-ubyte{sfx}", ytr)
    D.write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", xte)
    D.write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", yte)
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    xtr, ytr, xte, yte = _write_mnist(tmp_path, np.random.default_rng(0), gz=gz)
    d = D.load_dataset("mnist", tmp_path, download=False)
    assert d.x_train.shape == (7, 1, 5, 5) and d.x_test.shape == (5, 1, 5, 5)
    np.testing.assert_array_equal(d.x_train[:, 0].numpy(), xtr)
    np.testing.assert_array_equal(d.y_test.numpy(), yte.astype(np.int64))
    assert d.y_train.dtype == torch.int64
    sub = D.load_dataset("mnist", tmp_path, download=False, real_limit=3)
    assert len(sub.x_train) == 3


def test_idx_torchvision_layout_fashion(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    xtr, *_ = _write_mnist(raw, np.random.default_rng(1), gz=True)
    d = D.load_dataset("fashion-mnist", tmp_path, download=False)
    assert d.name == "fashion-mnist"
    np.testing.assert_array_equal(d.x_train[:, 0].numpy(), xtr)


def test_idx_other_dtypes_round_trip(tmp_path):
    a = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    D.write_idx(tmp_path / "a.idx", a)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a.idx"), a)


def test_idx_corrupt_and_missing(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(2))
    f = tmp_path / "train-images-idx3-ubyte"
    raw = f.read_bytes()
    f.write_bytes(raw[:-3])  # truncated
    with pytest.raises(ValueError, match="size mismatch"):
        D.load_dataset("mnist", tmp_path, download=False)
    f.write_bytes(b"\x12\x34" + raw[2:])  # bad magic
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(f)
    g = tmp_path / "x.gz"
    g.write_bytes(gzip.compress(raw)[:20])  # truncated gzip
    with pytest.raises(ValueError, match="corrupt or truncated"):
        D.read_idx(g)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        D.load_dataset("mnist", tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        D.load_dataset("cifar10", tmp_path / "nothing", download=False)


# ---------------------------------------------------------------------------------------- CIFAR
def _write_cifar(folder, rng, n=4, protocol=2, bytes_keys=True):
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
        with open(folder / name, "wb") as fh:
            pickle.dump({k("batch_label"): k("x"), k("data"): x, k("labels"): y, k("filenames"): [k("a")] * n},
                        fh, protocol=protocol)
        out[name] = (x, y)
    return out


@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (4, False)])
def test_cifar_batches(tmp_path, protocol, bytes_keys):
    ref = _write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(3), protocol=protocol,
                       bytes_keys=bytes_keys)
    d = D.load_dataset("cifar10", tmp_path, download=False)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    x, y = ref["data_batch_2"]
    np.testing.assert_array_equal(d.x_train[4:8].numpy(), x.reshape(4, 3, 32, 32))
    assert d.y_train[4:8].tolist() == y
    # channel-major layout: the first 1024 bytes are the red plane
    np.testing.assert_array_equal(d.x_test[0, 0].numpy().ravel(), ref["test_batch"][0][0, :1024])


def _py2_cifar_pickle(x, labels):
    """A CIFAR batch as Python 2's cPickle writes it (protocol 2, str = SHORT_BINSTRING/BINSTRING,
    numpy.core.multiarray._reconstruct), assembled opcode by opcode."""
    def s(b):
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def i(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
           + b"(" + i(1) + i(x.shape[0]) + i(x.shape[1]) + b"\x86"
           + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
           + b"(" + i(3) + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + i(0) + b"tb"
           + b"\x89" + s(x.tobytes()) + b"tb")
    labs = b"](" + b"".join(i(v) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + arr + s(b"labels") + labs + b"u."


def test_cifar_python2_batch(tmp_path):
    x = np.random.default_rng(6).integers(0, 256, (3, 3072), dtype=np.uint8)
    (tmp_path / "b").write_bytes(_py2_cifar_pickle(x, [3, 7, 9]))
    xs, ys = D.read_cifar_batch(tmp_path / "b")
    np.testing.assert_array_equal(xs, x.reshape(3, 3, 32, 32))
    assert ys.tolist() == [3, 7, 9] and ys.dtype == np.int64


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "data_batch_1"
    with open(f, "wb") as fh:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(ValueError, match="refusing to load global"):
        D.read_cifar_batch(f)
    assert not marker.exists()
    f.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2)[:-10])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        D.read_cifar_batch(f)


# ---------------------------------------------------------------------------------------- GTSRB
def _png(path, rng, hw):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)


def test_gtsrb_folders_and_csv(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(4)
    for c in ("00000", "00001", "00002"):
        for i in range(2):
            _png(tmp_path / "train" / c / f"{i}.png", rng, (5 + i, 7))
    _png(tmp_path / "test" / "a.png", rng, (9, 9))
    _png(tmp_path / "test" / "b.png", rng, (6, 6))
    (tmp_path / "Test.csv").write_text("Width,Height,ClassId,Path\n9,9,2,Test/a.png\n6,6,0,Test/b.png\n")
    (tmp_path / "test" / "GT-final_test.test.csv").write_text("Filename;Width\na.png;9\n")  # no labels
    d = D.load_dataset("gtsrb", tmp_path, download=False)
    assert d.x_train.shape == (6, 3, 32, 32) and d.x_test.shape == (2, 3, 32, 32)
    assert d.y_train.tolist() == [0, 0, 1, 1, 2, 2] and d.y_test.tolist() == [2, 0]
    assert d.num_classes == 3
    again = D.load_dataset("gtsrb", tmp_path, download=False)  # from the npz cache
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)


def test_gtsrb_torchvision_layout_and_missing(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(5)
    root = tmp_path / "gtsrb"
    for c in ("00000", "00003"):
        _png(root / "GTSRB" / "Training" / c / "x.ppm", rng, (8, 8))
    _png(root / "GTSRB" / "Final_Test" / "Images" / "00000.ppm", rng, (8, 8))
    (root / "GT-final_test.csv").write_text("Filename;Width;Height;ClassId\n00000.ppm;8;8;3\n")
    d = D.load_dataset("gtsrb", tmp_path, download=False)
    assert d.y_train.tolist() == [0, 3] and d.y_test.tolist() == [3] and d.num_classes == 4
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        D.load_dataset("gtsrb", tmp_path / "empty", download=False)


# ------------------------------------------------------------------------------------ synthetic
def _like(n=6, c=3, s=5, k=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % k
    return D.ImageData("toy", x, y, x.clone(), y.clone(), k)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "float"])
def test_npz_round_trip(tmp_path, layout):
    like = _like()
    x, y = like.x_train, like.y_train
    arr = {"NCHW": x, "NHWC": x.permute(0, 2, 3, 1).numpy(), "float": D.to_float(x)}[layout]
    conf = torch.linspace(0.1, 0.9, len(x))
    p = D.save_synthetic(tmp_path / "s", arr, y, confidence=conf)
    assert p.name == "s.npz"
    with np.load(p, allow_pickle=False) as z:
        assert z["image"].shape == (6, 5, 5, 3) and z["image"].dtype == np.uint8 and z["label"].dtype == np.int64
    xs, ys, ex = D.load_synthetic(p, like=like, with_extra=True)
    assert torch.equal(xs, x) and torch.equal(ys, y)
    torch.testing.assert_close(ex["confidence"], conf)


def test_npz_shards_and_authors_format(tmp_path):
    like = _like(n=7, c=1, s=4, k=3)
    x, y = like.x_train, like.y_train
    D.save_synthetic(tmp_path / "shards" / "b.npz", x[3:], y[3:])
    D.save_synthetic(tmp_path / "shards" / "a.npz", x[:3], y[:3])
    xs, ys = D.load_synthetic(tmp_path / "shards", like=like)
    assert torch.equal(xs, x) and torch.equal(ys, y)  # sorted by name: a then b
    # authors' MNIST-style file: arr_0 N x H x W (no channel axis), arr_1 labels
    np.savez(tmp_path / "authors.npz", x[:, 0].numpy(), y.numpy().astype(np.int32))
    xs, ys = D.load_synthetic(tmp_path / "authors.npz", like=like)
    assert torch.equal(xs, x) and ys.dtype == torch.int64 and torch.equal(ys, y)


def test_npz_validation_errors(tmp_path):
    like = _like(k=4)
    x, y = like.x_train, like.y_train
    bad = y.clone()
    bad[2] = 4
    D.save_synthetic(tmp_path / "lab.npz", x, bad)
    with pytest.raises(ValueError, match="label 4 out of range"):
        D.load_synthetic(tmp_path / "lab.npz", like=like)
    D.save_synthetic(tmp_path / "shape.npz", x[:, :, :4, :4], y)
    with pytest.raises(ValueError, match="expected N x 5 x 5 x 3"):
        D.load_synthetic(tmp_path / "shape.npz", like=like)
    np.savez(tmp_path / "float.npz", image=np.zeros((6, 5, 5, 3), np.float32), label=y.numpy())
    with pytest.raises(ValueError, match="uint8"):
        D.load_synthetic(tmp_path / "float.npz", like=like)
    np.savez(tmp_path / "keys.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="'image' \\+ 'label'"):
        D.load_synthetic(tmp_path / "keys.npz")
    np.savez(tmp_path / "obj.npz", image=np.array([{"a": 1}], dtype=object), label=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="pickled"):
        D.load_synthetic(tmp_path / "obj.npz")
    good = D.save_synthetic(tmp_path / "good.npz", x, y)
    (tmp_path / "trunc.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        D.load_synthetic(tmp_path / "trunc.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        D.load_synthetic(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        D.load_synthetic(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="no \\*.npz"):
        (tmp_path / "empty").mkdir()
        D.load_synthetic(tmp_path / "empty")
    # a failing save leaves the existing file untouched
    before = good.read_bytes()
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        D.save_synthetic(tmp_path / "pm1.npz", D.to_float(x) * 2 - 1, y)
    with pytest.raises(ValueError, match="rows"):
        D.save_synthetic(good, x, y, confidence=torch.zeros(2))
    assert good.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_to_float_to_uint8():
    u = torch.arange(256, dtype=torch.uint8)
    f = D.to_float(u)
    assert f.dtype == torch.float32 and f.min() == 0 and f.max() == 1
    assert torch.equal(D.to_uint8(f), u)
    assert D.to_uint8(torch.tensor([-0.5, 0.5 / 255 - 1e-4, 2.0])).tolist() == [0, 0, 255]
    with pytest.raises(ValueError, match="NaN"):
        D.to_uint8(torch.tensor([float("nan")]))
    with pytest.raises(TypeError):
        D.to_float(torch.zeros(2))


# ------------------------------------------------------------------------- augmentation, mixing
@pytest.mark.parametrize("hw,pad", [((8, 8), 1), ((7, 5), 2)])
def test_random_crop_is_a_window_of_the_padded_image(hw, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (6, 2, *hw), generator=g, dtype=torch.uint8)
    out = D.random_crop(x, pad, torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == torch.uint8
    again = D.random_crop(x, pad, torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    xp = torch.nn.functional.pad(x, (pad,) * 4)
    h, w = hw
    moved = 0
    for i in range(len(x)):
        hits = [(a, b) for a in range(2 * pad + 1) for b in range(2 * pad + 1)
                if torch.equal(xp[i, :, a:a + h, b:b + w], out[i])]
        assert hits, f"image {i} is not a crop of its padded version"
        moved += (pad, pad) not in hits
    assert moved > 0


def test_random_flip():
    x = torch.arange(16 * 3 * 4, dtype=torch.float32).reshape(16, 1, 3, 4)
    out = D.random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(16)]
    kept = [torch.equal(out[i], x[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_loader_augmentation_deterministic(digits):
    a = D.DeviceLoader.from_data(digits, 32, seed=3)
    b = D.DeviceLoader.from_data(digits, 32, seed=3)
    c = D.DeviceLoader.from_data(digits, 32, seed=4)
    assert a.augment == "crop" and a.padding == 1
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    xc, _ = next(iter(c))
    assert xa.shape == (32, 1, 8, 8) and xa.dtype == torch.float32 and 0 <= xa.min() and xa.max() <= 1
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    test = D.DeviceLoader.from_data(digits, 100, train=False)
    batches = list(test)
    assert [len(b[0]) for b in batches] == [100, 100, 100, 60]
    assert torch.equal(torch.cat([b[1] for b in batches]), digits.y_test)
    assert torch.equal(D.to_uint8(batches[0][0]), digits.x_test[:100])


@pytest.mark.parametrize("batch,frac", [(10, 0.7), (7, 0.5), (9, 0.25), (6, 1.0), (5, 0.0)])
def test_mixing_fraction_exact(batch, frac):
    n_real = 23
    # real image i has every pixel = i (< 100); synthetic pixels are 200 + j
    xr = torch.arange(n_real, dtype=torch.uint8)[:, None, None, None].expand(n_real, 1, 3, 3).contiguous()
    yr = torch.zeros(n_real, dtype=torch.int64)
    xs = (200 + torch.arange(4, dtype=torch.uint8))[:, None, None, None].expand(4, 1, 3, 3).contiguous()
    ys = torch.ones(4, dtype=torch.int64)
    loader = D.DeviceLoader(xr, yr, batch, synthetic=(xs, ys) if frac > 0 else None,
                            synthetic_fraction=frac, seed=0)
    n_syn = round(batch * frac)
    assert loader.n_synthetic == n_syn and loader.n_real == batch - n_syn
    per = (batch - n_syn) or batch
    assert len(loader) == n_real // per
    for epoch in range(2):
        seen = []
        count = 0
        for x, y in loader:
            count += 1
            v = D.to_uint8(x)[:, 0, 0, 0]
            is_syn = v >= 200
            assert x.shape == (batch, 1, 3, 3)
            assert int(is_syn.sum()) == n_syn, (epoch, v.tolist())
            assert not is_syn[: batch - n_syn].any()  # real first
            assert torch.equal(y, is_syn.long())
            seen += v[~is_syn].tolist()
        assert count == len(loader)
        assert len(seen) == len(set(seen))  # real drawn without replacement within an epoch
        assert len(seen) == (n_real // per) * (batch - n_syn)


def test_mixing_synthetic_with_replacement_and_errors():
    xr = torch.zeros(20, 1, 2, 2, dtype=torch.uint8)
    yr = torch.zeros(20, dtype=torch.int64)
    xs = torch.arange(3, dtype=torch.uint8)[:, None, None, None].expand(3, 1, 2, 2).contiguous()
    loader = D.DeviceLoader(xr, yr, 10, synthetic=(xs, torch.arange(3)), seed=1)
    assert loader.n_synthetic == 7  # default fraction 0.7
    ys = torch.cat([y[3:] for _, y in loader])
    assert len(loader) == 6 and len(ys) == 42  # 20 // 3 real per batch; 42 draws from 3 images
    assert set(ys.tolist()) == {0, 1, 2}
    tail = list(D.DeviceLoader(xr, yr, 10, synthetic=(xs, torch.arange(3)), drop_last=False))
    assert len(tail) == 7 and [len(y) for _, y in tail] == [10] * 6 + [7]  # 2 real + round(2 * 7 / 3)
    with pytest.raises(ValueError, match="no synthetic data"):
        D.DeviceLoader(xr, yr, 10, synthetic_fraction=0.5)
    with pytest.raises(ValueError, match="only 20"):
        D.DeviceLoader(xr, yr, 64)
    with pytest.raises(ValueError, match="synthetic images must be uint8"):
        D.DeviceLoader(xr, yr, 10, synthetic=(torch.zeros(3, 1, 3, 3, dtype=torch.uint8), torch.arange(3)))
    with pytest.raises(ValueError, match="augment"):
        D.DeviceLoader(xr, yr, 10, augment="rotate")


def test_download_path_through_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:  # stands in for torchvision.datasets.MNIST(root, train, download=True)
        def __init__(self, root, train, download):
            calls.append(train)
            if not (tmp_path / "ok" / "MNIST" / "raw").exists():
                _write_mnist(tmp_path / "ok" / "MNIST" / "raw", np.random.default_rng(7))

    class Offline:
        def __init__(self, root, train, download):
            raise OSError("no network")

    fake = type("tvd", (), {"MNIST": FakeMNIST, "FashionMNIST": Offline})
    monkeypatch.setattr(D_datasets, "_torchvision", lambda: fake)
    d = D.load_dataset("mnist", tmp_path / "ok", download=True)
    assert d.x_train.shape == (7, 1, 5, 5) and calls == [True, False]
    with pytest.raises(FileNotFoundError, match="download of fashion-mnist via torchvision failed.*no network"):
        D.load_dataset("fashion-mnist", tmp_path / "off", download=True)
    calls.clear()
    with pytest.raises(FileNotFoundError):
        D.load_dataset("mnist", tmp_path / "no", download=False)
    assert calls == []


# ------------------------------------------------------------------------- lazy synthetic store
def _shard_folder(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    for i, n in enumerate(sizes):
        D.save_synthetic(folder / f"shard-{i:03d}.npz", rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
                         rng.integers(0, 10, n), layout="NHWC")
    return folder


def test_lazy_store_draws_the_batches_of_the_in_memory_set_and_ranks_split_them(tmp_path):
    folder = _shard_folder(tmp_path / "syn", [70, 50, 60])
    store = D.SyntheticStore.open(folder)
    xs, ys = D.load_synthetic(folder)
    assert len(store) == 180 and store.shape == (1, 8, 8)
    xt, yt = store.take(np.array([5, 179, 0, 5]))
    assert torch.equal(xt, xs[[5, 179, 0, 5]]) and torch.equal(yt, ys[[5, 179, 0, 5]])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (50,), generator=g)

    def epoch(syn, rank=0, world=1, **kw):
        return list(D.DeviceLoader(x, y, 12, synthetic=syn, synthetic_fraction=0.5, augment="crop-flip",
                                   padding=1, seed=3, rank=rank, world_size=world, **kw))

    ref = epoch((xs, ys))
    lazy = epoch(store, prefetch=3)
    assert len(ref) == len(lazy) == 50 // 6
    for (a, b), (c, d) in zip(ref, lazy, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    for world in (2, 3, 4):  # rows rank::world of every global batch, augmented as one process would
        parts = [epoch(store if r % 2 else (xs, ys), r, world) for r in range(world)]
        for i, (a, b) in enumerate(ref):
            assert all(p[i][0].shape[0] == 12 // world for p in parts)
            got_x, got_y = torch.empty_like(a), torch.empty_like(b)
            for r in range(world):
                got_x[r::world], got_y[r::world] = parts[r][i]
            assert torch.equal(got_x, a) and torch.equal(got_y, b)
            n_syn = sum(int((torch.arange(r, 12, world) >= 6).sum()) for r in range(world))
            assert n_syn == 6  # still exactly the synthetic fraction of the global batch
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        D.DeviceLoader(x, y, 10, rank=0, world_size=3)


def test_consolidated_copy_is_reused_rebuilt_and_checked(tmp_path):
    folder = _shard_folder(tmp_path / "syn", [30, 20])
    cache = D.consolidate_synthetic(folder)
    assert cache == folder / D.CONSOLIDATED_DIR and sorted(p.name for p in cache.iterdir()) == [
        "images.npy", "labels.npy", "meta.json"]
    stamp = (cache / "images.npy").stat().st_mtime_ns
    assert D.consolidate_synthetic(folder) == cache and (cache / "images.npy").stat().st_mtime_ns == stamp
    assert len(D.load_synthetic(folder)[0]) == 50  # the npz reader does not see the consolidated copy
    _shard_folder(folder, [30, 20, 25], seed=1)  # shards rewritten and one added: rebuilt
    store = D.SyntheticStore.open(folder)
    assert len(store) == 75 and torch.equal(store.take(np.arange(75))[0], D.load_synthetic(folder)[0])
    digits = D.load_dataset("digits")
    D.SyntheticStore.open(folder, like=digits)
    with pytest.raises(ValueError, match="shape"):
        D.SyntheticStore.open(folder, like=D.ImageData("x", torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                                                       torch.zeros(1, dtype=torch.int64),
                                                       torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                                                       torch.zeros(1, dtype=torch.int64), 10))
    # a corrupt shard: a clear error naming it, no partial file left
    (folder / "shard-001.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="shard-001.npz"):
        D.consolidate_synthetic(folder)
    with pytest.raises(ValueError, match="shard-001.npz"):  # the stale copy is never used instead
        D.SyntheticStore.open(folder)
    assert not list((folder / D.CONSOLIDATED_DIR).glob(".*tmp*"))
    # an unwritable cache folder (here: below a regular file)
    (tmp_path / "file").write_text("x")
    good = _shard_folder(tmp_path / "good", [10])
    with pytest.raises(ValueError, match="--synthetic-cache"):
        D.consolidate_synthetic(good, cache_dir=tmp_path / "file" / "cache")
