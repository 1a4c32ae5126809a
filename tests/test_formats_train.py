"""Every real-data format and synthetic npz shards go all the way through `train-robust` and `eval`.

The files are tiny fakes in the real formats (IDX for MNIST/Fashion-MNIST, the CIFAR-10 python
batches), so this checks the plumbing: shapes, channels, defaults, checkpoints. Accuracy is not
the point here (random pixels).
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from cdp_fast import data as D
from cdp_fast.cli import main as cli_main

FAST = ["--epochs", "1", "--batch-size", "16", "--attack-steps", "1", "--eval-attack-steps", "1",
        "--val-size", "0", "--no-ema"]


def _mnist(folder, rng, n_train=48, n_test=16):
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        D.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        D.write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))


def _cifar(folder, rng, n=8):
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize("name,model", [("mnist", "small-cnn"), ("fashion-mnist", "small-cnn"),
                                        ("cifar10", "wrn-10-1")])
def test_real_formats_train_and_eval(tmp_path, name, model):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        _cifar(tmp_path / "data" / "cifar-10-batches-py", rng)
    else:
        _mnist(tmp_path / "data", rng)
    out = tmp_path / "run"
    rc = cli_main(["train-robust", "--data", name, "--data-dir", str(tmp_path / "data"), "--model", model,
                   "--out", str(out), *FAST])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["epochs_done"] == 1 and 0 <= res["robust_acc"] <= res["clean_acc"] <= 1
    assert res["eps"] == pytest.approx(D.dataset_defaults(name)["eps"])
    ev = tmp_path / "eval.json"
    rc = cli_main(["eval", "--checkpoint", str(out / "best"), "--data", name, "--data-dir",
                   str(tmp_path / "data"), "--eps", "0.05", "--attack", "pgd", "--steps", "2",
                   "--json", str(ev)])
    assert rc == 0
    e = json.loads(ev.read_text())
    assert e["n"] == (16 if name != "cifar10" else 8) and 0 <= e["robust_acc"] <= e["clean_acc"] <= 1


@pytest.mark.parametrize("store", ["auto", "lazy"])  # auto: in memory at this size
def test_npz_shards_train_with_real_data(tmp_path, store):
    rng = np.random.default_rng(1)
    shards = tmp_path / "syn"
    for i in range(3):  # a folder of shards, NHWC uint8 as the field writes them
        D.save_synthetic(shards / f"shard-{i:05d}.npz", rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8),
                         rng.integers(0, 10, 20), layout="NHWC")
    out = tmp_path / "run"
    rc = cli_main(["train-robust", "--data", "digits", "--real-limit", "64", "--synthetic", str(shards),
                   "--synthetic-fraction", "0.5", "--synthetic-store", store, "--out", str(out),
                   "--limit-test", "32", *FAST])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_synthetic"] == 60 and res["n_train"] == 64
    assert (shards / D.CONSOLIDATED_DIR / "meta.json").exists() == (store == "lazy")


def test_mismatched_npz_is_a_clear_error(tmp_path, capsys):
    D.save_synthetic(tmp_path / "bad.npz", np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64),
                     layout="NHWC")
    rc = cli_main(["train-robust", "--data", "digits", "--synthetic", str(tmp_path / "bad.npz"),
                   "--out", str(tmp_path / "run"), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err or "shape" in err
