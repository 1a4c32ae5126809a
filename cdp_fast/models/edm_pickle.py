"""Read NVlabs EDM ``.pkl`` network files without running any of their code
(docs/METHOD.md §14, "EDM networks and preconditioning").

An EDM snapshot (``network-snapshot-*.pkl``, ``edm-cifar10-32x32-cond-vp.pkl``, ...) is a plain
``pickle`` of ``{'ema': net, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': ...}``. Its
networks are ``torch_utils.persistence`` objects: each one pickles as a call
``_reconstruct_persistent_obj(meta)`` whose ``meta`` carries the source code of the module that
defined the class, the class name and the object's ``__dict__`` (``_init_args`` /
``_init_kwargs``, and for an ``nn.Module`` its ``_parameters`` / ``_buffers`` / ``_modules``).
``pickle.load`` would ``exec`` that source code. Here the unpickler resolves only this short list
of globals, each to a function of ours that builds data and nothing else:

* ``torch_utils.persistence._reconstruct_persistent_obj`` -> a ``PersistentRecord`` (class name +
  state); the embedded source is dropped unread, never executed;
* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter(_with_state)`` -> a tensor, and
  ``torch.storage._load_from_bytes`` -> a storage read with ``torch.load(weights_only=True)``;
* ``collections.OrderedDict``, the torch containers ``ModuleDict`` / ``ModuleList`` /
  ``Sequential`` (as records), numpy numeric scalars / dtypes (EDM keeps ``np.sqrt(0.5)`` and the
  like in its init arguments), ``dnnlib.util.EasyDict`` (as a dict), ``builtins.set``.

Any other global (``os.system``, ``builtins.eval``, another class) or a persistent class name
outside EDM's ``training.networks`` / ``training.loss`` / ``training.augment`` stops the read
with a ValueError before anything else is built. The network is then rebuilt from its
preconditioner's init kwargs into ``cdp_fast.models.edm`` and its parameters and buffers are
copied in after checking, module by module, the class names, the scalar attributes and every
tensor key and shape. ``loss_fn``, ``augment_pipe`` and ``dataset_kwargs`` are parsed (they are in
the same pickle stream) but not used.
"""
from __future__ import annotations

import io
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from . import edm

__all__ = ["read_edm_pickle", "load_edm_pickle", "PersistentRecord", "NETWORK_CLASSES", "SKIPPED_CLASSES"]

# the persistent classes of NVlabs' training/networks.py that cdp-fast implements ...
NETWORK_CLASSES = frozenset({"EDMPrecond", "VPPrecond", "VEPrecond", "SongUNet", "DhariwalUNet", "UNetBlock",
                             "Linear", "Conv2d", "GroupNorm", "PositionalEmbedding", "FourierEmbedding"})
# ... and those it reads past (training/loss.py, training/augment.py; iDDPMPrecond is refused later
# with its own message)
SKIPPED_CLASSES = frozenset({"EDMLoss", "VPLoss", "VELoss", "AugmentPipe", "iDDPMPrecond"})
_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential")


class _Refused(pickle.UnpicklingError):
    """Something the reader does not accept (as opposed to a truncated / malformed stream)."""


class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have built, as data: ``class_name`` and
    ``state`` (the object's ``__dict__``). Nothing of the embedded module source is kept."""

    __slots__ = ("class_name", "state")

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __repr__(self):
        return f"PersistentRecord({self.class_name})"


class _ContainerRecord:
    """A pickled ``torch.nn`` container (NEWOBJ + BUILD): keeps the state, runs nothing."""

    class_name = "?"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Refused(f"{self.class_name}: unexpected state of type {type(state).__name__}")
        self.state = state


_CONTAINER_TYPES = {n: type(f"{n}Record", (_ContainerRecord,), {"class_name": n}) for n in _CONTAINERS}


class _EasyDict(dict):
    """``dnnlib.util.EasyDict`` read as a plain dict (no attribute magic needed)."""


def _reconstruct(meta):
    if not isinstance(meta, dict):
        raise _Refused(f"persistent object: meta of type {type(meta).__name__}")
    name, state = meta.get("class_name"), meta.get("state")
    if meta.get("type") != "class" or not isinstance(name, str):
        raise _Refused(f"persistent object of unsupported type {meta.get('type')!r}")
    if name not in NETWORK_CLASSES and name not in SKIPPED_CLASSES:
        raise _Refused(f"persistent class {name!r} is not one of EDM's published classes "
                                     f"(known: {sorted(NETWORK_CLASSES | SKIPPED_CLASSES)})")
    if not isinstance(state, dict):
        raise _Refused(f"persistent {name}: state of type {type(state).__name__}")
    return PersistentRecord(name, dict(state))  # meta["module_src"] is dropped here, unread


def _load_from_bytes(b):
    if not isinstance(b, (bytes, bytearray)):
        raise _Refused("storage bytes expected")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        s = torch.load(io.BytesIO(bytes(b)), map_location="cpu", weights_only=True)
    if not isinstance(s, (torch.TypedStorage, torch.UntypedStorage)):
        raise _Refused(f"storage expected, got {type(s).__name__}")
    return s


def _ints(v, what):
    if not isinstance(v, (tuple, list)) or not all(isinstance(i, int) for i in v):
        raise _Refused(f"tensor {what} must be a tuple of ints")
    return tuple(v)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)) or not isinstance(offset, int):
        raise _Refused("tensor: storage and offset expected")
    if hooks:
        raise _Refused("tensor with backward hooks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._utils._rebuild_tensor(storage, offset, _ints(size, "size"), _ints(stride, "stride"))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor) or hooks:
        raise _Refused("parameter: a tensor without hooks expected")
    return data


def _dtype(name, align=False, copy=True):
    dt = np.dtype(name)
    if dt.kind not in "biuf":
        raise _Refused(f"numpy dtype {dt} is not numeric")
    return dt


def _scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise _Refused("numpy scalar: a numeric dtype and its bytes expected")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


def _set(items=()):
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, (str, int)) for i in items):
        raise _Refused("set of strings expected")
    return set(items)


_ALLOWED = {
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.storage._load_from_bytes": _load_from_bytes,
    "collections.OrderedDict": OrderedDict,
    "numpy.dtype": _dtype,
    "numpy.core.multiarray.scalar": _scalar,
    "numpy._core.multiarray.scalar": _scalar,
    "dnnlib.util.EasyDict": _EasyDict,
    "builtins.set": _set,
    **{f"torch.nn.modules.container.{n}": t for n, t in _CONTAINER_TYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        fn = _ALLOWED.get(f"{module}.{name}")
        if fn is None:
            raise _Refused(f"global {module}.{name} is not allowed")
        return fn

    def persistent_load(self, pid):
        raise _Refused("persistent ids are not used by EDM network pickles")


def read_edm_pickle(path) -> dict:
    """The top-level dict of an EDM ``.pkl``, persistent objects as ``PersistentRecord``s.

    ValueError (nothing executed) when the file needs anything outside the allowed globals."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EDM network pickle {path} does not exist")
    try:
        with open(path, "rb") as f:
            obj = _Unpickler(f).load()
    except _Refused as e:
        raise ValueError(f"{path} was refused: {e}. Only EDM network pickles (NVlabs/edm "
                         f"torch_utils.persistence format: tensors, plain containers and EDM's own classes) "
                         f"are read, and nothing in them is executed.") from None
    except Exception as e:  # truncated / malformed streams raise many types; none ran code
        raise ValueError(f"{path} is corrupt or not an EDM network pickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: an EDM pickle holds a dict ({{'ema': net, ...}}), got {type(obj).__name__}")
    return obj


def _tensors(rec, prefix: str, state: dict, classes: dict, where: str) -> None:
    """Flatten a record tree into state-dict entries and {module path: class name}."""
    st = rec.state
    classes[prefix.rstrip(".")] = rec.class_name
    skip = st.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for k, v in (st.get(group) or {}).items():
            if v is None or (group == "_buffers" and k in skip):
                continue
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{where}: {prefix}{k} is a {type(v).__name__}, not a tensor")
            state[prefix + k] = v
    for k, m in (st.get("_modules") or {}).items():
        if m is None:
            continue
        if not isinstance(m, (PersistentRecord, _ContainerRecord)):
            raise ValueError(f"{where}: submodule {prefix}{k} is a {type(m).__name__}")
        if isinstance(m, PersistentRecord) and m.class_name not in NETWORK_CLASSES:
            raise ValueError(f"{where}: submodule {prefix}{k} is a {m.class_name}, not a network layer")
        _tensors(m, f"{prefix}{k}.", state, classes, where)


_SCALARS = (bool, int, float, str)


def _check_structure(net, classes: dict, records: dict, where: str) -> None:
    ours = {name: type(m).__name__ for name, m in net.named_modules()}
    if ours != classes:
        diff = sorted(set(ours.items()) ^ set(classes.items()))[:8]
        raise ValueError(f"{where}: the file's module tree differs from the network its init kwargs describe "
                         f"(modified EDM source?): {diff}")
    for name, m in net.named_modules():  # every plain attribute the file holds must equal ours
        for k, v in records[name].items():
            if k.startswith("_") or k == "training" or not isinstance(v, _SCALARS):
                continue
            mine = getattr(m, k, None)
            if isinstance(mine, _SCALARS) or isinstance(mine, np.generic):
                if mine != v and not (isinstance(v, float) and v != v and mine != mine):
                    raise ValueError(f"{where}: {name or '<top>'}.{k} is {v!r} in the file but {mine!r} in the "
                                     f"network rebuilt from its init kwargs (modified EDM source?)")


def _records(rec, prefix="", out=None) -> dict:
    out = {} if out is None else out
    out[prefix.rstrip(".")] = rec.state
    for k, m in (rec.state.get("_modules") or {}).items():
        if m is not None:
            _records(m, f"{prefix}{k}.", out)
    return out


def load_edm_pickle(path, device="cpu", *, key: str = "ema"):
    """An EDM ``.pkl`` -> (denoiser in eval mode, None, meta) with cdp-fast's own modules.

    ``meta`` is ``cdp_fast.models.edm.describe(net)`` (``kind == "edm"``, ``image_shape``,
    ``label_dim``, ``precond``, sigma range, ...) plus ``source`` and the file's
    ``dataset_kwargs`` when they are plain values."""
    from .checkpoint import load_into

    path = Path(path)
    obj = read_edm_pickle(path)
    where = f"{path}[{key!r}]"
    rec = obj.get(key)
    if not isinstance(rec, PersistentRecord):
        raise ValueError(f"{path}: no network under {key!r} (keys: {sorted(map(str, obj))[:12]})")
    if rec.class_name not in edm.PRECONDS:
        raise ValueError(f"{where} is a {rec.class_name}; cdp-fast reads {sorted(edm.PRECONDS)} networks "
                         f"(iDDPMPrecond is not supported)")
    args, kwargs = rec.state.get("_init_args"), rec.state.get("_init_kwargs")
    if args:
        raise ValueError(f"{where}: positional init arguments {args!r} (EDM passes keywords only)")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: no init kwargs recorded (_init_kwargs), cannot rebuild the network")
    net = edm.build(rec.class_name, dict(kwargs), init=False)
    state, classes = {}, {}
    _tensors(rec, "", state, classes, where)
    _check_structure(net, classes, _records(rec), where)
    load_into(net, state, where, what=f"the {rec.class_name} its init kwargs describe")
    net = net.to(device).eval().requires_grad_(False)
    meta = dict(edm.describe(net), num_classes=net.label_dim or None, source=str(path), format="edm-pkl")
    ds = obj.get("dataset_kwargs")
    if isinstance(ds, dict):
        meta["dataset_kwargs"] = {str(k): v for k, v in ds.items() if isinstance(v, _SCALARS) or v is None}
    return net, None, meta
