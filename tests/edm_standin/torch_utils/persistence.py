"""Stand-in for NVlabs/edm torch_utils/persistence.py (same pickle format, test use only).

A persistent class pickles as ``_reconstruct_persistent_obj(meta)`` with
``meta = dict(type='class', version=6, module_src=<source of the defining module>,
class_name=<name>, state=<the object's __dict__>)``; its constructor records ``_init_args`` /
``_init_kwargs``. Unpickling with plain ``pickle`` exec's ``module_src`` (what the published
module does, and what cdp-fast's reader never does)."""
import copy
import inspect
import sys
import types
import uuid

_VERSION = 6
_src_cache = {}     # source -> module made from it
_module_src = {}    # module name -> its source (also for modules made from a pickle)


def persistent_class(cls):
    module = sys.modules[cls.__module__]
    src = _module_src.get(module.__name__)
    if src is None:
        src = _module_src[module.__name__] = inspect.getsource(module)

    class Persistent(cls):
        _orig_module_src = src
        _orig_class_name = cls.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type="class", version=_VERSION, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0], fields[1], fields[2] = _reconstruct_persistent_obj, (meta,), None
            return tuple(fields)

    Persistent.__name__ = cls.__name__
    Persistent.__qualname__ = cls.__qualname__
    Persistent.__module__ = cls.__module__
    return Persistent


def _reconstruct_persistent_obj(meta):
    src = meta["module_src"]
    module = _src_cache.get(src)
    if module is None:
        module = types.ModuleType("_imported_module_" + uuid.uuid4().hex)
        sys.modules[module.__name__] = module
        _module_src[module.__name__] = src
        exec(src, module.__dict__)  # the published behaviour: run the pickled source
        _src_cache[src] = module
    obj_cls = module.__dict__[meta["class_name"]]
    obj = obj_cls.__new__(obj_cls)
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(meta["state"])
    else:
        obj.__dict__.update(meta["state"])
    return obj
