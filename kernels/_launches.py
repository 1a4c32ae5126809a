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

Ops that run inside a Triton launch (the interpreter's own tensor handling) are not counted.
No side effects at import: the hooks exist only inside ``count_launches``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

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
        self.thread = threading.get_ident()

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
    """Count Triton launches, device ATen ops and host syncs made inside the block (on this
    thread); yields a :class:`LaunchCount` filled as the block runs. ``execute=False``: Triton
    kernels are recorded but not run."""
    count = LaunchCount()
    state = _State(count)
    originals = [(cls, cls.__dict__["run"]) for cls in _kernel_classes()]

    def wrap(orig):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup or threading.get_ident() != state.thread:
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
