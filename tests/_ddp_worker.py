"""Run by tests/test_distributed_train.py under torchrun (2 processes, gloo): the DDP trainer against
one process with the same global batch. Not a test module itself (pytest does not collect it).

argv: OUT SHARDS. Writes OUT/worker.json on rank 0 with what it compared.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cdp_fast import data as D
from cdp_fast import models, trades


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main(out: Path, shards: Path) -> None:
    dist.init_process_group("gloo")  # the trainer joins an existing group and leaves it open
    rank, world = dist.get_rank(), dist.get_world_size()
    data = D.load_dataset("digits", real_limit=200)
    report = {"world_size": world}

    # 1. The batches: every rank's rows interleave into exactly the one-process global batch, with
    #    the synthetic images read lazily (rank 0 consolidates first) or held in memory.
    if rank == 0:
        D.SyntheticStore.open(shards, like=data)
    dist.barrier()
    store = D.SyntheticStore.open(shards, like=data)
    kw = dict(synthetic_fraction=0.5, augment="crop-flip", padding=1, seed=5)
    local = [(x.clone(), y.clone()) for x, y in D.DeviceLoader(data.x_train, data.y_train, 32, synthetic=store,
                                                             rank=rank, world_size=world, **kw)]
    parts = _gather(local)
    if rank == 0:
        ref = list(D.DeviceLoader(data.x_train, data.y_train, 32, synthetic=D.load_synthetic(shards), **kw))
        assert len(ref) == len(local) and all(len(p) == len(ref) for p in parts)
        for i, (x, y) in enumerate(ref):
            xs, ys = torch.empty_like(x), torch.empty_like(y)
            for r in range(world):
                assert parts[r][i][0].shape[0] == x.shape[0] // world
                xs[r::world], ys[r::world] = parts[r][i]
            assert torch.equal(xs, x) and torch.equal(ys, y), f"batch {i} differs from one process"
        report["batches_equal"] = len(ref)

    # 2. Training: 2 processes (interrupted after epoch 1, then --resume) vs 1 process uninterrupted.
    #    eps = 0 and no dropout remove the per-rank randomness (attack starts, dropout masks), so the
    #    two runs see the same examples and must end with close weights.
    models.build = functools.partial(models.build, dropout=0.0)
    cfg = dict(data="digits", real_limit=200, synthetic=str(shards), synthetic_fraction=0.5, epochs=2,
               batch_size=32, eps=0.0, step_size=0.01, attack_steps=1, eval_attack_steps=1, val_size=0,
               limit_test=32, device="cpu", seed=3,
               # the former digits defaults (issue 21 made digits AdamW + constant): SGD's update is
               # linear in the all-reduced gradient, so the 1e-4 weight tolerance below stays meaningful
               optimizer="sgd", lr=0.3, schedule="cosine")
    ddp = out / "ddp"
    r1 = trades.train_robust(trades.TrainRobustConfig(**cfg, out=str(ddp), stop_after=1, synthetic_store="lazy"),
                             show_progress=False)
    assert r1["stopped_early"] and r1["world_size"] == world
    r2 = trades.train_robust(trades.TrainRobustConfig(**cfg, out=str(ddp), resume=True, synthetic_store="lazy"),
                             show_progress=False)
    assert all(r == r2 for r in _gather(r2)), "ranks returned different results"
    if rank == 0:
        os.environ["WORLD_SIZE"] = "1"  # the reference: a plain one-process run
        one = out / "one"
        r_one = trades.train_robust(trades.TrainRobustConfig(**cfg, out=str(one), synthetic_store="memory"),
                                    show_progress=False)
        a, b = models.load(ddp / "last"), models.load(one / "last")
        diffs = {k: float((v - b.state_dict()[k]).abs().max()) for k, v in a.state_dict().items()}
        scale = max(float(v.abs().max()) for v in b.state_dict().values())
        dmetrics = json.loads((ddp / "metrics.json").read_text())
        ometrics = json.loads((one / "metrics.json").read_text())
        report.update(max_weight_diff=max(diffs.values()), weight_scale=scale,
                      ddp_results=r2, one_results=r_one,
                      ddp_loss=[m["train_loss"] for m in dmetrics], one_loss=[m["train_loss"] for m in ometrics],
                      ddp_steps=[m["step"] for m in dmetrics], one_steps=[m["step"] for m in ometrics],
                      ddp_lr=[m["lr"] for m in dmetrics], one_lr=[m["lr"] for m in ometrics])
        (out / "worker.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
