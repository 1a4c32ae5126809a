"""Count what a call costs the host: Triton launches, device ATen ops and host syncs.

    from cdp_fast.kernels._launches import count_launches
    with count_launches() as c:
        hnm_loss(a, p, backend="triton").backward()
    print(c.summary())      # "6 launches (3 Triton + 3 ATen: ...), 0 syncs"

Meant for CPU tensors under ``TRITON_INTERPRET=1`` standing in for GPU tensors: every counted
item is something that, on a GPU, costs a launch (a few microseconds of host time each) or a
host-device synchronisation. What is counted:

(a) Triton launches: ``JITFunction.run`` / ``InterpretedFunction.run`` (what ``kernel[grid](...)``
    calls) are wrapped. With ``execute=False`` the kernels are recorded but not run (fast, outputs
    are garbage: only for code whose host side does not branch on kernel outputs).
(b) Device ATen ops, seen by a ``TorchDispatchMode`` (so also those run by the autograd engine,
    e.g. the ones-like ``grad_out`` that ``loss.backward()`` makes). Excluded, because on a GPU
    they launch no kernel: views and aliases (``OpOverload.is_view``: view, slice, select, t,
    expand, as_strided, detach, ...), allocations without a fill (empty*, new_empty*, resize_,
    set_), metadata queries (sym_size, sym_stride, ...), and ``_local_scalar_dense`` (a sync, (c)).
    ``.to()`` / ``.contiguous()`` / ``.float()`` that change nothing never reach the dispatcher.
(c) Host syncs: ``_local_scalar_dense`` (``.item()``, ``int()``/``float()``/``bool()`` of a
    tensor), ops whose output size depends on values (nonzero, masked_select, unique*, ...), and,
    through a ``TorchFunctionMode``, ``.tolist()``, ``.cpu()``, ``.numpy()`` (which bypass the
    dispatcher on CPU tensors; counted on any tensor, so host-side tensors are over-counted,
    never missed).

CLI: ``python -m cdp_fast.kernels._launches [--n 1024] [--d 128] [--labels] [--check] [--json F]``
counts one ``hnm_loss`` forward + backward and one ``hnm_guided_ddim_update`` (kernels run on a
GPU, recorded under the interpreter).

Ops that run inside a Triton launch (the interpreter's own tensor handling) are not counted.
No side effects at import: the hooks exist only inside ``count_launches``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .hnm import hnm_guided_ddim_update, hnm_loss

__all__ = ["LaunchCount", "count_launches", "NO_KERNEL_OPS", "SYNC_OPS"]

aten = torch.ops.aten

# packets (all overloads) that allocate or read metadata only: no kernel on a GPU
NO_KERNEL_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "size", "stride",
    "_has_compatible_shallow_copy_type", "lift_fresh", "_unsafe_view",  # a view without the alias mark
})
# ops that make the host wait for the device (a value, or an output size that depends on values)
SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
    "unique_consecutive", "unique_dim", "equal", "_assert_async",
})
# repeat_interleave syncs only without output_size; counted as a sync (conservative)
_SYNC_IF_NO_SIZE = frozenset({"repeat_interleave"})
_SYNC_METHODS = ("tolist", "cpu", "numpy")


@dataclasses.dataclass
class LaunchCount:
    """What was counted: Triton kernel names in launch order, device ATen ops (name -> count) and
    the host syncs in order (what caused each)."""

    triton: list = dataclasses.field(default_factory=list)
    aten: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    syncs: list = dataclasses.field(default_factory=list)

    @property
    def n_aten(self) -> int:
        return sum(self.aten.values())

    @property
    def launches(self) -> int:
        """Device launches: Triton kernels + ATen ops that launch a kernel."""
        return len(self.triton) + self.n_aten

    def summary(self) -> str:
        ops = ", ".join(f"{n} {k}" for k, n in self.aten.most_common())
        kern = ", ".join(f"{n} {k}" for k, n in collections.Counter(self.triton).most_common())
        sy = ", ".join(f"{n} {k}" for k, n in collections.Counter(self.syncs).most_common())
        return (f"{self.launches} launches ({len(self.triton)} Triton: [{kern}] + {self.n_aten} ATen: [{ops}]), "
                f"{len(self.syncs)} syncs [{sy}]")

    def as_dict(self) -> dict:
        return dict(launches=self.launches, triton=len(self.triton), aten=self.n_aten,
                    syncs=len(self.syncs), triton_kernels=list(self.triton), aten_ops=dict(self.aten),
                    sync_ops=list(self.syncs))


class _State:
    def __init__(self, count: LaunchCount):
        self.count = count
        self.paused = 0          # > 0 inside a Triton launch

    def counting(self) -> bool:
        return self.paused == 0


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state.counting():
            name = func.overloadpacket.__name__
            if name in SYNC_OPS or (name in _SYNC_IF_NO_SIZE and kwargs.get("output_size") is None):
                self.state.count.syncs.append(f"aten.{name}")
                if name not in ("_local_scalar_dense", "_assert_async"):
                    self.state.count.aten[name] += 1
            elif not func.is_view and name not in NO_KERNEL_OPS:
                self.state.count.aten[name] += 1
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.state.counting() and getattr(func, "__name__", None) in _SYNC_METHODS \
                and args and isinstance(args[0], torch.Tensor):
            self.state.count.syncs.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def _kernel_classes():
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover - without triton only ATen ops are counted
        return ()
    return (JITFunction, InterpretedFunction)


def _kernel_name(fn) -> str:
    inner = getattr(fn, "fn", None)
    return getattr(inner, "__name__", None) or getattr(fn, "__name__", type(fn).__name__)


@contextlib.contextmanager
def count_launches(execute: bool = True):
    """Count Triton launches, device ATen ops and host syncs made inside the block; yields a
    :class:`LaunchCount` filled as the block runs. ``execute=False``: Triton kernels are recorded
    but not run. Triton launches are counted from any thread (on a GPU the autograd engine runs
    the backward on its device thread); the dispatch modes reach that thread through autograd's
    thread-local state (as PyTorch documents it; not yet checked on a GPU here)."""
    count = LaunchCount()
    state = _State(count)
    originals = [(cls, cls.__dict__["run"]) for cls in _kernel_classes()]

    def wrap(orig):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
            if state.counting():
                count.triton.append(_kernel_name(self))
            if not execute:
                return None
            state.paused += 1       # the interpreter's own tensor copies are not device ops
            try:
                return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                state.paused -= 1
        return run

    for cls, orig in originals:
        cls.run = wrap(orig)
    try:
        with _FunctionCounter(state), _DispatchCounter(state):
            yield count
    finally:
        for cls, orig in originals:
            cls.run = orig


def _hnm_counts(n: int, d: int, *, labels: bool, check: bool, device: str, execute: bool) -> dict:
    """Counts of one hnm_loss forward, its backward and one hnm_guided_ddim_update at N = n = 2B."""
    B = n // 2
    g = torch.Generator().manual_seed(0)
    a, p, x, e, pos = (torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1).to(device)
                       for _ in range(5))
    a.requires_grad_(True)
    p.requires_grad_(True)
    kw = dict(backend="triton", check=check, labels=(torch.arange(B) % 10).to(device) if labels else None)
    with count_launches(execute) as fwd:
        loss = hnm_loss(a, p, **kw)
    with count_launches(execute) as bwd:
        loss.backward()
    at, an = torch.tensor(0.5, device=device), torch.tensor(0.6, device=device)
    with count_launches(execute) as guided:
        hnm_guided_ddim_update(x, e, at, an, pos, scale=2.0, **kw)
    return {"forward": fwd, "backward": bwd, "guided": guided}


def main(argv=None) -> int:
    """``python -m cdp_fast.kernels._launches [--n 1024] [--d 128] [--labels] [--check] [--json F]``:
    launches and syncs of the fused HNM ops. On a GPU the kernels run; on the CPU (TRITON_INTERPRET=1)
    they are recorded, not run (the host side does not depend on their outputs with check=False)."""
    ap = argparse.ArgumentParser(prog="python -m cdp_fast.kernels._launches", description=main.__doc__)
    ap.add_argument("--n", type=int, default=1024, help="rows of Z = [A; P] (2B)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--labels", action="store_true", help="conditional negatives")
    ap.add_argument("--check", action="store_true", help="check=True (one status read per call)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        ap.error("without a GPU set TRITON_INTERPRET=1 (the Triton ops then run on CPU tensors)")
    if args.check and not cuda:
        ap.error("--check reads kernel outputs: it needs a GPU (or a small --n with the kernels run)")
    counts = _hnm_counts(args.n, args.d, labels=args.labels, check=args.check,
                         device="cuda" if cuda else "cpu", execute=cuda)
    for k, c in counts.items():
        print(f"{k:9s} {c.summary()}")
    f, b = counts["forward"], counts["backward"]
    print(f"fwd+bwd   {f.launches + b.launches} launches, {len(f.syncs) + len(b.syncs)} syncs")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: c.as_dict() for k, c in counts.items()} | {"n": args.n, "d": args.d,
                      "labels": args.labels, "check": args.check, "device": "cuda" if cuda else "cpu"}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
