"""Data sets out: `cdp-fast export` (one npz, streamed) and `cdp-fast select` (per-class top-k)."""
import json
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

from cdp_fast import models, selection
from cdp_fast.cli import main as cli_main
from cdp_fast.data import load_synthetic, save_synthetic
from cdp_fast.export import export_npz, select_shards


def _shards(folder, sizes=(5, 3, 4), hw=6, c=3, seed=0):  # 6: no NCHW/NHWC ambiguity
    g = np.random.default_rng(seed)
    imgs, labs, confs = [], [], []
    for i, n in enumerate(sizes):
        x = g.integers(0, 256, (n, hw, hw, c), dtype=np.uint8)
        y = g.integers(0, 3, n)
        conf = g.random(n).astype(np.float32)
        save_synthetic(folder / f"shard-{i:05d}.npz", x, y, layout="NHWC", confidence=conf)
        imgs.append(x), labs.append(y), confs.append(conf)
    return np.concatenate(imgs), np.concatenate(labs), np.concatenate(confs)


@pytest.mark.parametrize("fmt,keys", [("cdp-fast", ("image", "label")), ("authors", ("arr_0", "arr_1"))])
def test_export_npz(tmp_path, fmt, keys):
    x, y, _ = _shards(tmp_path / "s")
    args = ["export", str(tmp_path / "s"), "--out", str(tmp_path / "all.npz")] + (["--format", fmt])
    assert cli_main(args) == 0
    with np.load(tmp_path / "all.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(keys)
        img, lab = z[keys[0]], z[keys[1]]
    assert img.dtype == np.uint8 and img.shape == (12, 6, 6, 3) and np.array_equal(img, x)
    assert lab.dtype == np.int64 and np.array_equal(lab, y)
    xs, ys = load_synthetic(tmp_path / "all.npz")  # and it reads back as a synthetic set
    assert xs.shape == (12, 3, 6, 6) and torch.equal(ys, torch.from_numpy(y))


def test_export_memory_does_not_grow_with_n(tmp_path):
    def peak(sizes, name):
        _shards(tmp_path / name, sizes=sizes, hw=32)
        tracemalloc.start()
        export_npz(tmp_path / name, tmp_path / f"{name}.npz", show_progress=False)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p
    small, large = peak((64,) * 2, "a"), peak((64,) * 16, "b")
    shard_bytes = 64 * 32 * 32 * 3
    assert large < small + 2 * shard_bytes, (small, large)  # 8x the data, about the same peak
    assert large < 8 * shard_bytes  # well below the 16 shards (3 MB) it wrote
    with zipfile.ZipFile(tmp_path / "b.npz") as zf:
        assert sorted(zf.namelist()) == ["image.npy", "label.npy"]


def test_export_errors_leave_nothing(tmp_path):
    _shards(tmp_path / "s")
    save_synthetic(tmp_path / "s" / "shard-00009.npz", np.zeros((2, 5, 5, 3), np.uint8), np.zeros(2, np.int64),
                   layout="NHWC")
    with pytest.raises(ValueError, match="differs"):
        export_npz(tmp_path / "s", tmp_path / "o.npz", show_progress=False)
    assert not list(tmp_path.glob("*o.npz*"))
    with pytest.raises(FileNotFoundError):
        export_npz(tmp_path / "none", tmp_path / "o.npz")


def test_top_k_per_class():
    score = torch.tensor([0.9, 0.1, 0.5, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4, 0.05])
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 2])
    idx = selection.top_k_per_class(score, labels, 0.4)
    assert idx.tolist() == [0, 3, 5, 7, 9]  # 2 of 5, 2 of 4 (round 1.6), at least 1 of 1
    assert selection.top_k_per_class(score, labels, 0.4, "low").tolist() == [1, 4, 6, 8, 9]
    with pytest.raises(ValueError, match="fraction"):
        selection.top_k_per_class(score, labels, 0.0)


def test_select_stored_confidence_and_classifier(tmp_path):
    x, y, conf = _shards(tmp_path / "s", sizes=(20, 20))
    assert cli_main(["select", str(tmp_path / "s"), "--criterion", "confidence", "--keep", "0.25",
                     "--per-class", "--out", str(tmp_path / "sel")]) == 0
    want = selection.top_k_per_class(torch.from_numpy(conf), torch.from_numpy(y), 0.25).numpy()
    xs, ys, ex = load_synthetic(tmp_path / "sel", with_extra=True)
    assert np.array_equal(xs.numpy().transpose(0, 2, 3, 1), x[want]) and np.array_equal(ys.numpy(), y[want])
    assert np.allclose(ex["score"].numpy(), conf[want])
    summary = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert summary["n_in"] == 40 and summary["n_kept"] == len(want)

    # a classifier's entropy, global top-k (no per-class)
    torch.manual_seed(0)
    clf = models.build("small-cnn", num_classes=3, in_channels=3, image_size=6).eval()
    s = select_shards(tmp_path / "s", tmp_path / "sel2", criterion="entropy", fraction=0.1, per_class=False,
                      model=clf)
    ent = selection.scores(clf, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), None, "entropy")
    assert s["n_kept"] == 4
    _, _, ex2 = load_synthetic(tmp_path / "sel2", with_extra=True)
    assert torch.allclose(ex2["score"].sort().values, ent.topk(4).values.sort().values)
    with pytest.raises(ValueError, match="needs a classifier"):
        select_shards(tmp_path / "s", tmp_path / "sel3", criterion="grad-norm")
