"""Ahead-of-time compile gate: every Triton kernel the public ops launch, compiled for real GPU
targets (sm_90 = H100/H200, sm_80 = A100) on a machine without a GPU.

    python -m cdp_fast.kernels._aot              # the CI share (a representative subset, ~2 min)
    python -m cdp_fast.kernels._aot --full       # all dtypes x dims x targets x variant flags
    python -m cdp_fast.kernels._aot --json out.json --table
    python -m cdp_fast.kernels._aot --targets 90 --dims 128 --dtypes bf16 --kernels '^_hnm_'   # a slice
    python -m cdp_fast.kernels._aot --evidence --json after.json   # issue 14's before/after units

Run it with TRITON_INTERPRET unset: ``@triton.jit`` builds compilable kernels only then (the
tests start it in a subprocess).

How: (1) RECORD. The public ops (``hnm_loss`` forward + backward, ``hnm_guided_ddim_update``,
``hnm_guided_affine_update``, ``infonce_loss`` forward + backward, ``ddim_update``) are called on
small CPU tensors with
``backend="triton"`` while ``JITFunction.run`` is replaced by a recorder and
``_backend._LAUNCH_ONLY`` lets CPU tensors through. So the launchers themselves choose the tiles
(``tile_config``), warps and constexpr flags -- the gate has no tile table of its own and follows
the code. Nothing executes; outputs are garbage. ``--full`` calls them with the full product of
their options (estimator, b = 1 or not, labels / bank / bank labels / groups, check, noise, x0
clip, alpha and coefficient forms, history, write_eps, ...): every constexpr flag combination the
launchers can produce, at every dtype x dim (``tests/test_aot.py`` proves the recorded flags are
all of ``reachable_flags``, the product of each kernel's flags less the ``UNREACHABLE`` rules).
(2) COMPILE. For each target, Triton's driver is
replaced by a stand-in that reports ``GPUTarget("cuda", arch, 32)`` and every recorded launch is
replayed through ``JITFunction.run(..., warmup=True)``: Triton's own binder specialises the
arguments exactly as on a GPU (dtypes, 16-byte alignment, divisibility) and calls
``triton.compile(ASTSource(...), target=...)`` with the bundled ptxas; identical specialisations
compile once. (3) CHECK. The bundled ``cuobjdump`` gives registers / local memory (spills) /
static shared memory and the SASS (HGMMA, HMMA, STL/LDL); the TTIR / TTGIR say how many
``tt.dot`` there are and how many were lowered to tensor cores (wgmma or mma). (4) COUNT. From
the same SASS (``sass_stats``): instructions, MUFU per SFU function (EX2 = the exps, LG2), FFMA,
LDG/STG/LDGSTS, the loops (backward branches) and MUFU.EX2 per similarity entry of the column
loop -- static counts, for before/after comparisons (``benchmarks/sass_compare.py``).

Fails (exit 1) on: a compile error, any spill (local memory or STL/LDL), shared memory above the
per-block opt-in limit, registers x threads above 64 Ki, or a bf16/fp16 dot not on tensor cores.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import _backend, _hnm_pixel
from ._backend import interpreting
from .ddim import ddim_update, make_rng_state
from .hnm import hnm_guided_affine_update, hnm_guided_ddim_update, hnm_loss
from .infonce import infonce_loss

try:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver as _triton_driver
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - the gate needs triton; main() says so
    triton = None

__all__ = ["EVIDENCE", "FULL", "QUICK", "UNREACHABLE", "Plan", "launch_flags", "main", "option_flags",
           "reachable_flags", "record", "run_gate", "sass_stats", "summary_table"]

SMEM_LIMIT = {90: 232448, 80: 166912}   # max dynamic + static shared memory per block (opt-in), bytes
REGS_PER_SM = 65536
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HNM_VARIANTS = ("plain", "groups", "labels", "bank", "labels+bank", "labels+bank+bank_labels",
                "groups+labels+bank+bank_labels")


@dataclasses.dataclass(frozen=True)
class Plan:
    """One slice of the gate: these targets x dtypes x dims, with these op variants."""
    targets: tuple[int, ...]
    dtypes: tuple[str, ...]
    dims: tuple[int, ...]
    hnm: tuple[str, ...] = HNM_VARIANTS          # hnm_loss / guided-step variants (negatives)
    estimators: tuple[str, ...] = ("hard", "easy")
    betas: tuple[float, ...] = (1.0,)            # the hard estimator's b (1: the BETA_ONE path)
    checks: tuple[bool, ...] = (True,)           # check= of the HNM ops (the epilogue's status word)
    guided: bool = True                          # hnm_guided_ddim_update (fused DDIM epilogue)
    guided_noise: tuple[str, ...] = ("none", "given", "drawn")
    guided_clip: tuple = (None, 1.0)
    guided_alphas: tuple = (("float", "float"),)  # (a_t, a_next) forms: float | tensor0d | per_sample
    affine: bool = True                          # hnm_guided_affine_update (the solvers' fused step)
    affine_h: tuple[bool, ...] = (True,)         # with a history tensor h
    affine_write_eps: tuple[bool, ...] = (False,)
    affine_coefs: tuple[str, ...] = ("mixed",)   # float | tensor0d | per_sample | mixed (one of each)
    infonce: bool = True
    infonce_modes: tuple = (None,)               # infonce_loss(deterministic=...): None = default path
    ddim: str = "cover"                          # "none" | "one" | "philox" | "cover" | "full"
    odd_sizes: bool = False                      # batch / group / bank sizes not multiples of 16


# The CI share (23 units, ~3 min on 2 loaded cores): every kernel on sm_90 in bf16 at d = 128
# (HGMMA), the HNM kernels at the pixel-space dim in fp16 on sm_80 (HMMA), and fp32 HNM (FMA dots,
# the register-hungry path) at d = 100, where 64-wide fp32 tiles spilled. Both fused guided steps
# (DDIM; the affine solver step with h, and write_eps on sm_90) on both backward paths.
QUICK = (
    Plan(targets=(90,), dtypes=("bf16",), dims=(128,), hnm=("groups+labels+bank+bank_labels",),
         estimators=("hard",), guided_noise=("drawn",), guided_clip=(1.0,), ddim="one",
         affine_write_eps=(True,)),
    Plan(targets=(80,), dtypes=("fp16",), dims=(3072,), hnm=("plain",), estimators=("easy",),
         guided_noise=("none",), guided_clip=(None,), infonce=False, ddim="none"),
    Plan(targets=(90,), dtypes=("fp32",), dims=(100,), hnm=("labels+bank+bank_labels",), estimators=("hard",),
         guided=False, affine=False, infonce=False, ddim="none"),
)
# The before/after evidence of issue 14 (benchmarks/sass_compare.py): the units whose SASS the
# planned kernel changes should move, in the authors' default setting (hard estimator, beta = 1):
# HNM forward / backward / bank backward, the fused-DDIM backward (noise drawn, x0 clipped),
# InfoNCE forward / backward (with and without a negatives bank), the DDIM step with in-kernel
# Philox noise; bf16 and fp32 at d = 128 on sm_90, fp16 at the pixel-space d = 3072 on sm_80.
EVIDENCE = (
    Plan(targets=(90,), dtypes=("bf16", "fp32"), dims=(128,), hnm=("plain", "bank"), estimators=("hard",),
         guided_noise=("drawn",), guided_clip=(1.0,), ddim="philox", affine=False),
    Plan(targets=(80,), dtypes=("fp16",), dims=(3072,), hnm=("plain", "bank"), estimators=("hard",),
         guided_noise=("drawn",), guided_clip=(1.0,), ddim="philox", affine=False),
)
_ALPHA_FORMS = ("float", "tensor0d", "per_sample")
_ALL_OPTIONS = dict(betas=(1.0, 0.5), checks=(True, False), guided_noise=("none", "given"),
                    guided_alphas=tuple(itertools.product(_ALPHA_FORMS, _ALPHA_FORMS)), affine_h=(False, True),
                    affine_write_eps=(False, True), affine_coefs=_ALPHA_FORMS + ("mixed",))
# every option of every op (tests/test_aot.py: the recorded flags are all of reachable_flags)
FULL = (
    Plan(targets=(90, 80), dtypes=("fp32", "bf16", "fp16"), dims=(64, 100, 128, 640, 3072), ddim="full",
         infonce_modes=(None, True), **_ALL_OPTIONS),   # True: the two-kernel deterministic backward
    Plan(targets=(90, 80), dtypes=("fp32", "bf16", "fp16"), dims=(64, 100, 128), ddim="none",
         odd_sizes=True, **_ALL_OPTIONS),
)


# --------------------------------------------------------------------------------------------
# 1. record
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    kernel: object          # the JITFunction
    args: tuple
    kwargs: dict
    grid: object
    case: str


@contextlib.contextmanager
def _recording(launches: list, case: list):
    """Record (not run) every launch; under TRITON_INTERPRET=1 the interpreter's launches too
    (tests/test_aot.py records the full plans' flags that way, without compiling)."""
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - a Triton without the interpreter
        pass
    originals = [(cls, cls.__dict__["run"]) for cls in classes]

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), grid, case[0]))

    for cls, _ in originals:
        cls.run = record
    old, _backend._LAUNCH_ONLY = _backend._LAUNCH_ONLY, True
    try:
        yield
    finally:
        for cls, orig in originals:
            cls.run = orig
        _backend._LAUNCH_ONLY = old


def _cases(plan: Plan):
    """(label, thunk) for every op call of the plan; each thunk makes the op launch its kernels."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, dt, grad=False):
        return torch.randn(*shape, generator=gen).to(dt).requires_grad_(grad)

    sizes = [("pow2", 32, 16, 32)] + ([("odd", 6, 3, 5)] if plan.odd_sizes else [])
    for (sname, B, G, M), d, dn in itertools.product(sizes, plan.dims, plan.dtypes):
        dt = DTYPES[dn]

        def hnm_kw(v, d=d, dt=dt, B=B, G=G, M=M):
            parts = v.split("+")
            kw = {}
            if "groups" in parts:
                kw["group_size"] = G
            if "labels" in parts:
                kw["labels"] = torch.arange(B) % 3
            if "bank" in parts:
                kw["bank"] = rnd(M, d, dt=dt, grad=True)
            if "bank_labels" in parts:
                kw["bank_labels"] = torch.arange(M) % 2 + 1
            return kw

        ests = [(e, b) for e in plan.estimators for b in (plan.betas if e == "hard" else (1.0,))]
        for (est, beta), v, chk in itertools.product(ests, plan.hnm, plan.checks):
            def f(est=est, beta=beta, v=v, chk=chk, B=B, d=d, dt=dt, hnm_kw=hnm_kw):
                a, p = rnd(B, d, dt=dt, grad=True), rnd(B, d, dt=dt, grad=True)
                hnm_loss(a, p, estimator=est, beta=beta, check=chk, backend="triton", **hnm_kw(v)).backward()
            yield f"hnm_loss {dn} d={d} {sname} {est}{_opt(beta, chk)} {v}", f

        def guided_kw(v, hnm_kw=hnm_kw):
            kw = hnm_kw(v)
            if "bank" in kw:
                kw["bank"] = kw["bank"].detach()
            return kw

        if plan.guided:
            for (est, beta), v, noise, clip, (at_m, an_m), chk in itertools.product(
                    ests, plan.hnm, plan.guided_noise, plan.guided_clip, plan.guided_alphas, plan.checks):
                def f(est=est, beta=beta, v=v, noise=noise, clip=clip, at_m=at_m, an_m=an_m, chk=chk, B=B, d=d,
                      dt=dt, guided_kw=guided_kw):
                    hnm_guided_ddim_update(rnd(B, d, dt=dt), rnd(B, d, dt=dt), _alpha(at_m, 0.5, B),
                                           _alpha(an_m, 0.6, B), rnd(B, d, dt=dt),
                                           scale=2.0, estimator=est, beta=beta, eta=0.0 if noise == "none" else 0.5,
                                           noise=rnd(B, d, dt=dt) if noise == "given" else None,
                                           clip_x0=clip, check=chk, backend="triton", **guided_kw(v))
                alphas = "" if (at_m, an_m) == ("float", "float") else f" a_t={at_m} a_next={an_m}"
                yield (f"hnm_guided_ddim_update {dn} d={d} {sname} {est}{_opt(beta, chk)} {v} noise={noise} "
                       f"clip={clip}{alphas}"), f
        if plan.affine:
            for (est, beta), v, hist, we, cf, chk in itertools.product(
                    ests, plan.hnm, plan.affine_h, plan.affine_write_eps, plan.affine_coefs, plan.checks):
                def f(est=est, beta=beta, v=v, hist=hist, we=we, cf=cf, chk=chk, B=B, d=d, dt=dt,
                      guided_kw=guided_kw):
                    forms = (cf,) * 3 if cf != "mixed" else _ALPHA_FORMS
                    cx, ce, ch = (_alpha(form, val, B) for form, val in zip(forms, (0.9, -0.2, 0.3), strict=True))
                    hnm_guided_affine_update(rnd(B, d, dt=dt), rnd(B, d, dt=dt), rnd(B, d, dt=dt), c_x=cx, c_e=ce,
                                             h=rnd(B, d, dt=dt) if hist else None, c_h=ch if hist else 0.0,
                                             scale=2.0, estimator=est, beta=beta, write_eps=we, check=chk,
                                             backend="triton", **guided_kw(v))
                yield (f"hnm_guided_affine_update {dn} d={d} {sname} {est}{_opt(beta, chk)} {v} h={hist} "
                       f"write_eps={we} coefs={cf}"), f
        if plan.infonce:
            for negs, det in itertools.product((None, M), plan.infonce_modes):
                def f(negs=negs, det=det, B=B, d=d, dt=dt):
                    q, k = rnd(B, d, dt=dt, grad=True), rnd(B, d, dt=dt, grad=True)
                    n = None if negs is None else rnd(negs, d, dt=dt, grad=True)
                    infonce_loss(q, k, negatives=n, backend="triton", deterministic=det).backward()
                mode = "" if det is None else f" deterministic={det}"
                yield f"infonce_loss {dn} d={d} {sname} negatives={negs}{mode}", f
    if plan.ddim != "none":
        yield from _ddim_cases(plan, rnd)


def _alpha(form: str, v: float, B: int):
    """A DDIM alpha / affine coefficient in one of the forms the ops take."""
    if form == "float":
        return v
    if form == "tensor0d":
        return torch.tensor(v)
    return torch.full((B,), v)


def _opt(beta: float, check: bool) -> str:
    """The case label's suffix for non-default beta / check (default labels stay as before)."""
    return ("" if beta == 1.0 else f" beta={beta}") + ("" if check else " check=False")


def _ddim_cases(plan: Plan, rnd):
    alphas = ("float", "tensor0d", "per_sample")
    noises = ("none", "given", "philox")
    clips = ("none", "clip", "clip+rederive")
    if plan.ddim == "full":
        combos = list(itertools.product(alphas, alphas, noises, clips, (False, True), (False, True)))
    elif plan.ddim == "cover":
        base = ("float", "float", "none", "none", False, False)
        combos = {(a1, a2) + base[2:] for a1, a2 in itertools.product(alphas, alphas)}
        combos |= {base[:2] + (n, c) + base[4:] for n, c in itertools.product(noises, clips)}
        combos |= {base[:4] + (g, x0) for g, x0 in itertools.product((False, True), (False, True))}
        combos = sorted(combos)
    elif plan.ddim == "philox":   # in-kernel noise: the plain step and the sampler's guided one
        combos = [("float", "float", "philox", "none", False, False),
                  ("per_sample", "tensor0d", "philox", "clip+rederive", True, True)]
    else:   # "one": every optional input present (the sampler's guided step, per-sample alphas)
        combos = [("per_sample", "tensor0d", "philox", "clip+rederive", True, True)]
    shape = (4, 3, 32, 32)
    for dn, (at_m, an_m, nm, cl, has_grad, x0) in itertools.product(plan.dtypes, combos):
        dt = DTYPES[dn]

        def alpha(mode, v):
            if mode == "float":
                return v
            if mode == "tensor0d":
                return torch.tensor(v)
            return torch.full((shape[0],), v)

        def f(dt=dt, at_m=at_m, an_m=an_m, nm=nm, cl=cl, has_grad=has_grad, x0=x0):
            ddim_update(rnd(*shape, dt=dt), rnd(*shape, dt=dt), alpha(at_m, 0.5), alpha(an_m, 0.6),
                        eta=0.0 if nm == "none" else 0.7, noise=rnd(*shape, dt=dt) if nm == "given" else None,
                        rng_state=make_rng_state(3) if nm == "philox" else None,
                        grad=rnd(*shape, dt=torch.float32) if has_grad else None, scale=0.3 if has_grad else 0.0,
                        clip_x0=None if cl == "none" else 1.0, eps_from_clipped_x0=cl == "clip+rederive",
                        return_x0=x0, backend="triton")
        yield f"ddim_update {dn} a_t={at_m} a_next={an_m} noise={nm} clip={cl} grad={has_grad} x0={x0}", f


def record(plan: Plan) -> tuple[list[Launch], list[str]]:
    """The launches the public ops make for this plan, and the op calls that raised."""
    launches: list[Launch] = []
    errors: list[str] = []
    case = [""]
    with _recording(launches, case):
        for label, thunk in _cases(plan):
            case[0] = label
            try:
                thunk()
            except Exception as e:  # noqa: BLE001 - an op that cannot launch is a finding
                errors.append(f"{label}: {type(e).__name__}: {e}")
    return launches, errors


# --------------------------------------------------------------------------------------------
# 1b. which flag combinations exist: what --full must cover
# --------------------------------------------------------------------------------------------
# Constexprs that the ops' options do not choose: tiles (BLOCK*), the numerics / structure the
# dtype and dim select (RESIDENT, ONE_CHUNK, FP32_DOT, IEEE, RUN) and constants. The dims x dtypes
# product of the plans covers those.
STRUCTURE_CONSTEXPRS = frozenset({"LOG_EPS", "FP32_DOT", "IEEE", "RESIDENT", "ONE_CHUNK", "ROWS_PER_PROG", "RUN"})
# the option flags that are not booleans, with every value a launcher can pass
FLAG_DOMAINS = {"AT_MODE": (0, 1, 2), "AN_MODE": (0, 1, 2), "NOISE_MODE": (0, 1, 2), "INIT_L": (0.0, 1.0)}


# Combinations no launcher produces, each with the code that rules it out. A flag a kernel does
# not have reads as absent (the rule then does not apply unless the flag is named with a default).
UNREACHABLE = (
    ("BETA_ONE is the hard estimator's b = 1 path (hnm._Prepared.flags)",
     lambda f, d: f.get("BETA_ONE") is True and f.get("HARD") is False),
    ("BANK_COND needs a bank and labels (validate_hnm_inputs)",
     lambda f, d: f.get("BANK_COND") is True and (f.get("HAS_BANK") is False or f.get("HAS_LABELS") is False)),
    ("the store flags exist only in the fused guided step (hnm._backward_rows)",
     lambda f, d: f.get("FUSED_DDIM") is False and any(f.get(k) for k in ("HAS_NOISE", "CLIP", "AFFINE", "WRITE_EPS"))),
    ("x0 clipping is the DDIM step's; write_eps the affine step's (hnm_guided_*_update)",
     lambda f, d: (f.get("CLIP") is True and f.get("AFFINE") is True)
     or (f.get("WRITE_EPS") is True and f.get("AFFINE") is False)),
    ("the fused guided step takes the pixel-space path from PIXEL_MIN_D on (hnm._guided_step)",
     lambda f, d: f.get("FUSED_DDIM") is True and d >= _hnm_pixel.PIXEL_MIN_D),
    ("the bank's values are checked only with check=True (hnm._row_epilogue)",
     lambda f, d: f.get("CHECK_BANK") is True and f.get("CHECK") is False),
    ("the alphas' forms matter only with the DDIM coefficients (hnm._row_epilogue)",
     lambda f, d: f.get("DDIM_COEF") is False and (f.get("AT_MODE", 0) != 0 or f.get("AN_MODE", 0) != 0)),
    ("eps is re-derived from the clipped x0 only when x0 is clipped (ddim._launch)",
     lambda f, d: f.get("EPS_FROM_CLIPPED_X0") is True and f.get("CLIP") is False),
)


def _python_fn(kernel):
    return getattr(kernel, "fn", kernel)


def option_flags(kernel) -> dict:
    """{name: default} of a kernel's constexprs that the ops' options choose (tiles and the
    STRUCTURE_CONSTEXPRS left out); default is None where the signature has none."""
    import inspect

    out = {}
    for name, prm in inspect.signature(_python_fn(kernel)).parameters.items():
        if "constexpr" not in str(prm.annotation) or name.startswith("BLOCK") or name in STRUCTURE_CONSTEXPRS:
            continue
        out[name] = None if prm.default is inspect.Parameter.empty else prm.default
    return out


def launch_flags(launch: Launch) -> tuple:
    """The option flags of one recorded launch, defaults filled in: ((name, value), ...) sorted."""
    import inspect

    names = list(inspect.signature(_python_fn(launch.kernel)).parameters)
    bound = dict(zip(names, launch.args, strict=False))
    bound.update(launch.kwargs)
    return tuple(sorted((k, bound.get(k, dflt)) for k, dflt in option_flags(launch.kernel).items()))


def reachable_flags(kernel, d: int) -> set:
    """Every option-flag combination of ``kernel`` that a launcher can produce at feature dim d:
    the product of the flags' domains (booleans, FLAG_DOMAINS) less the UNREACHABLE rules."""
    names = sorted(option_flags(kernel))
    out = set()
    for values in itertools.product(*(FLAG_DOMAINS.get(n, (False, True)) for n in names)):
        f = dict(zip(names, values, strict=True))
        if not any(rule(f, d) for _, rule in UNREACHABLE):
            out.add(tuple(sorted(f.items())))
    return out


# --------------------------------------------------------------------------------------------
# 2. compile for a target without a GPU
# --------------------------------------------------------------------------------------------
class _TargetDriver:
    """What JITFunction.run asks of the driver, for a GPU that is not there. The 'device' index is
    the arch, so each target gets its own JIT cache."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


@contextlib.contextmanager
def _target(arch: int):
    prev = _triton_driver._active
    _triton_driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        _triton_driver._active = prev


@contextlib.contextmanager
def _fresh_cache(tmp: str):
    """A private, empty Triton cache (every unit really runs ptxas, so its -v log exists; the
    user's ~/.triton is untouched) and Triton's printing of that log switched on."""
    old_env = os.environ.get("TRITON_CACHE_DIR")
    old_dump = knobs.nvidia.dump_ptxas_log
    os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log = old_dump
        if old_env is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old_env


def _bin(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: this triton wheel does not bundle the CUDA tools")
    return str(path)


_PTXAS = {"ptxas_regs": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads"}


def _compile(launch: Launch):
    """Compile one launch for the current target; returns (kernel, ptxas -v log). The log is
    printed by Triton only when ptxas really runs (run_gate uses a fresh cache)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        k = launch.kernel.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
    return k, buf.getvalue()


# one SASS instruction of `cuobjdump -sass`: "/*0df0*/  @!P2 BRA 0x1230 ;" -> address, opcode, operands
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)([^;]*);", re.M)
_BRANCH_TARGET = re.compile(r"^\s*(0x[0-9a-f]+)")


def sass_stats(sass: str, *, threads: int | None = None, tile_elems: int | None = None) -> dict:
    """Static instruction statistics of one kernel's SASS (``cuobjdump -sass`` text).

    insts: instructions without NOPs; ops: count per base opcode (``FFMA.FTZ`` -> FFMA); MUFU_<op>:
    per SFU function; loops: the backward branches (one loop per branch target; nested loops each
    count), with their address range, nesting depth and the MUFU.EX2 / HGMMA / instruction counts
    inside (inclusive of nested loops). ``EX2_per_elem``: the MUFU.EX2 of the first outermost loop
    that has any (the column loop of the flash-style kernels: one iteration per tile) x threads /
    tile_elems, i.e. exps per similarity entry, comparable across tile sizes; None without a loop,
    threads or tile_elems. These are static counts: what one pass over the code issues, not a
    profile."""
    insts = []
    for m in _SASS_LINE.finditer(sass):
        insts.append((int(m.group(1), 16), m.group(2), m.group(3)))
    ops: dict[str, int] = {}
    mufu: dict[str, int] = {}
    heads: dict[int, int] = {}   # loop head address -> last back-edge address
    for addr, op, rest in insts:
        base = op.split(".")[0]
        if base == "NOP":
            continue
        ops[base] = ops.get(base, 0) + 1
        if base == "MUFU":
            fn = op.split(".")[1] if "." in op else "?"
            mufu[fn] = mufu.get(fn, 0) + 1
        if base in ("BRA", "JMP"):
            t = _BRANCH_TARGET.match(rest)
            if t and int(t.group(1), 16) < addr:
                head = int(t.group(1), 16)
                heads[head] = max(heads.get(head, addr), addr)
    loops = []
    for head, end in sorted(heads.items()):
        body = [(op, a) for a, op, _ in insts if head <= a <= end]
        loops.append(dict(start=hex(head), end=hex(end),
                          depth=sum(1 for h, e in heads.items() if h <= head and end <= e and (h, e) != (head, end)),
                          insts=sum(1 for op, _ in body if not op.startswith("NOP")),
                          MUFU_EX2=sum(1 for op, _ in body if op.startswith("MUFU.EX2")),
                          HGMMA=sum(1 for op, _ in body if op.startswith("HGMMA.")),
                          FFMA=sum(1 for op, _ in body if op.split(".")[0] == "FFMA")))
    out = dict(insts=sum(ops.values()), MUFU=ops.get("MUFU", 0), FFMA=ops.get("FFMA", 0), LDG=ops.get("LDG", 0),
               STG=ops.get("STG", 0), LDGSTS=ops.get("LDGSTS", 0), loops=len(loops), loop_list=loops, ops=ops)
    out.update({f"MUFU_{k}": v for k, v in sorted(mufu.items())})
    out.setdefault("MUFU_EX2", 0)
    out.setdefault("MUFU_LG2", 0)
    first = next((lp for lp in loops if lp["depth"] == 0 and lp["MUFU_EX2"]), None)
    out["EX2_per_elem"] = (round(first["MUFU_EX2"] * threads / tile_elems, 3)
                           if first and threads and tile_elems else None)
    return out


def _analyse(kernel, ptxas_log: str, arch: int, workdir: Path, *, sass_dir: str | None = None,
             stem: str = "kernel", tile_elems: int | None = None) -> dict:
    """Registers, spills, shared memory, dot lowering and SASS statistics of one compiled kernel."""
    cubin = workdir / f"k{id(kernel)}_sm{arch}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    res = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", str(cubin)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump --dump-resource-usage output:\n{res[-2000:]}")
    regs, stack, static_smem, local = map(int, m.groups())
    sass = subprocess.run([_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          timeout=300, check=True).stdout
    if sass_dir:
        Path(sass_dir).mkdir(parents=True, exist_ok=True)
        (Path(sass_dir) / f"{stem}.sass").write_text(sass)
    ptx = {k: max(map(int, re.findall(rx, ptxas_log)), default=None) for k, rx in _PTXAS.items()}
    if ptx["spill_stores"] is None:
        raise RuntimeError("no ptxas -v log captured (was the kernel served from a cache?)")
    ttgir = kernel.asm.get("ttgir", "")
    # how each dot was lowered: wgmma (Hopper), tt.dot with an nvidia_mma layout (mma.sync), or FMA
    mma_aliases = set(re.findall(r"^(#\w+) = #ttg\.nvidia_mma<", ttgir, re.M))
    dot_layouts = re.findall(r"= tt\.dot .*?-> tensor<[^>]*?, (#\w+)>", ttgir)
    wgmma = len(re.findall(r"ttng\.warp_group_dot\b", ttgir))
    return dict(
        regs=regs, stack=stack, local=local, **ptx,
        smem=int(getattr(kernel.metadata, "shared", 0) or 0) + static_smem,
        num_warps=int(kernel.metadata.num_warps), num_stages=int(kernel.metadata.num_stages),
        stl_ldl=len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        dots=len(re.findall(r"= tt\.dot\b", kernel.asm.get("ttir", ""))),
        tc_dots=wgmma + sum(a in mma_aliases for a in dot_layouts),
        fma_dots=sum(a not in mma_aliases for a in dot_layouts),
        HGMMA=len(re.findall(r"\bHGMMA\.", sass)), HMMA=len(re.findall(r"\bHMMA\.", sass)),
        **sass_stats(sass, threads=32 * int(kernel.metadata.num_warps), tile_elems=tile_elems),
    )


def _describe(launch: Launch) -> dict:
    fn = launch.kernel
    names = [p.name for p in fn.params]
    bound = dict(zip(names, launch.args, strict=False))
    bound.update({k: v for k, v in launch.kwargs.items() if k in names})
    first = next(v for v in bound.values() if isinstance(v, torch.Tensor))
    cx = {p.name: bound[p.name] for p in fn.params if p.is_constexpr and p.name in bound}
    tiles = {k: v for k, v in cx.items() if k.startswith("BLOCK")}
    flags = {k: v for k, v in cx.items() if not k.startswith("BLOCK") and k != "LOG_EPS"}
    return dict(kernel=fn.__name__, dtype={v: k for k, v in DTYPES.items()}.get(first.dtype, str(first.dtype)),
                tiles=tiles, flags=flags)


def _tile_elems(tiles: dict) -> int | None:
    """Similarity entries per column-loop iteration: BLOCK_R x BLOCK_C (None for other kernels)."""
    r = tiles.get("BLOCK_R", tiles.get("BLOCK_M"))
    c = tiles.get("BLOCK_C", tiles.get("BLOCK_N"))
    return int(r) * int(c) if r and c else None


def problems_of(u: dict) -> list[str]:
    """What the gate rejects in one unit (an empty list: the unit passes)."""
    if u.get("error"):
        return ["COMPILE ERROR: " + u["error"][:300]]
    out = []
    if u["spill_stores"] or u["spill_loads"] or u["local"]:
        out.append(f"SPILL (ptxas: {u['spill_stores']} B stores, {u['spill_loads']} B loads; local {u['local']} B)")
    if u["smem"] > SMEM_LIMIT[u["arch"]]:
        out.append(f"SMEM {u['smem']} > {SMEM_LIMIT[u['arch']]}")
    if u["regs"] * 32 * u["num_warps"] > REGS_PER_SM:
        out.append(f"REGS {u['regs']} x {32 * u['num_warps']} threads > {REGS_PER_SM}")
    if u["dtype"] in ("bf16", "fp16") and u["dots"]:
        insn = u["HGMMA"] if u["arch"] >= 90 else u["HMMA"]
        if u["fma_dots"] or not u["tc_dots"] or insn == 0:
            out.append(f"TENSOR CORES: {u['fma_dots']} dots on FMA, {u['tc_dots']} on tensor cores, "
                       f"{'HGMMA' if u['arch'] >= 90 else 'HMMA'} = {insn}")
    return out


def run_gate(plans, *, kernels: str | None = None, sass_dir: str | None = None, log=print) -> dict:
    """Record, compile and check every plan; returns {'units': [...], 'record_errors': [...]}.
    ``kernels``: a regular expression; only kernels whose name it matches (re.search) are compiled.
    ``sass_dir``: also write each unit's SASS there (``<kernel>_sm<arch>_<dtype>_<n>.sass``)."""
    want = re.compile(kernels) if kernels else None
    units: dict[tuple, dict] = {}
    recorded: set[str] = set()
    record_errors: list[str] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="cdp_aot_") as tmp, _fresh_cache(tmp):
        for plan in plans:
            launches, errors = record(plan)
            record_errors += errors
            for arch in plan.targets:
                with _target(arch):
                    for launch in launches:
                        recorded.add(launch.kernel.__name__)
                        if want is not None and not want.search(launch.kernel.__name__):
                            continue
                        desc = _describe(launch)
                        try:
                            k, ptxas_log = _compile(launch)
                        except Exception as e:  # noqa: BLE001 - a compile error is the finding
                            key = (desc["kernel"], arch, launch.case)
                            units[key] = dict(desc, arch=arch, cases=[launch.case], error=f"{type(e).__name__}: {e}")
                            continue
                        key = (desc["kernel"], arch, id(k))
                        if key not in units:
                            units[key] = dict(desc, arch=arch, cases=[], _kernel=k)
                            units[key].update(_analyse(k, ptxas_log, arch, Path(tmp), sass_dir=sass_dir,
                                                       stem=f"{desc['kernel']}_sm{arch}_{desc['dtype']}_{len(units)}",
                                                       tile_elems=_tile_elems(desc["tiles"])))
                            log(f"[aot] {len(units):4d} units  {time.time() - t0:6.1f}s  {desc['kernel']} sm_{arch} "
                                f"{desc['dtype']} {_flag_str(desc['flags'])}")
                        units[key]["cases"].append(launch.case)
    rows = []
    for u in units.values():
        u.pop("_kernel", None)
        u["problems"] = problems_of(u)
        rows.append(u)
    rows.sort(key=lambda u: (u["kernel"], -u["arch"], u["dtype"], json.dumps(u["tiles"]), _flag_str(u["flags"])))
    return {"triton": triton.__version__, "torch": torch.__version__,
            "targets": sorted({a for p in plans for a in p.targets}), "kernels": kernels,
            "recorded_kernels": sorted(recorded), "units": rows, "record_errors": record_errors,
            "seconds": round(time.time() - t0, 1)}


# --------------------------------------------------------------------------------------------
# 3. report
# --------------------------------------------------------------------------------------------
def _flag_str(flags: dict) -> str:
    return ",".join([k for k, v in flags.items() if v is True]
                    + [f"{k}={v}" for k, v in flags.items() if not isinstance(v, bool)]) or "-"


def _tiles_str(t: dict) -> str:
    if "BLOCK_R" in t:
        return "/".join(str(t.get(k, "-")) for k in ("BLOCK_R", "BLOCK_C", "BLOCK_K", "BLOCK_DO"))
    return "/".join(f"{v}" for v in t.values())


def _rng(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return str(min(vals)) if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}"


def summary_table(doc: dict) -> str:
    """One line per kernel x target x dtype x tiles: ranges over the flag variants."""
    ok = [u for u in doc["units"] if not u.get("error")]
    hdr = (f"| kernel | sm | dtype | tiles R/C/K/DO | warps | units | regs | smem B | spills | "
           f"dots tc/fma | HGMMA | HMMA | MUFU.EX2 | EX2/elem | MUFU | insts | FFMA | LDG/STG | loops | problems |"
           f"\n|{'---|' * 20}")
    lines = [hdr]
    def key(u):
        return u["kernel"], -u["arch"], u["dtype"], _tiles_str(u["tiles"]), u["num_warps"]

    for (kern, arch, dt, tiles, nw), grp in itertools.groupby(sorted(ok, key=key), key=key):
        grp = list(grp)
        spills = sum(1 for u in grp if u["spill_stores"] or u["spill_loads"] or u["local"])
        nprob = sum(1 for u in grp if u["problems"])
        lines.append(f"| {kern} | {-arch} | {dt} | {tiles} | {nw} | {len(grp)} | {_rng([u['regs'] for u in grp])} | "
                     f"{_rng([u['smem'] for u in grp])} | {spills} | "
                     f"{sum(u['tc_dots'] for u in grp)}/{sum(u['fma_dots'] for u in grp)} | "
                     f"{_rng([u['HGMMA'] for u in grp])} | {_rng([u['HMMA'] for u in grp])} | "
                     f"{_rng([u.get('MUFU_EX2') for u in grp])} | {_rng([u.get('EX2_per_elem') for u in grp])} | "
                     f"{_rng([u.get('MUFU') for u in grp])} | {_rng([u.get('insts') for u in grp])} | "
                     f"{_rng([u.get('FFMA') for u in grp])} | {_rng([u.get('LDG') for u in grp])}/"
                     f"{_rng([u.get('STG') for u in grp])} | {_rng([u.get('loops') for u in grp])} | {nprob} |")
    for u in doc["units"]:
        if u.get("error"):
            lines.append(f"| {u['kernel']} | {u['arch']} | {u['dtype']} | {_tiles_str(u['tiles'])} | - | 1 | - | - | - "
                         f"| - | - | - | - | - | - | - | - | - | - | COMPILE ERROR |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cdp_fast.kernels._aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="every dtype x dim x target x variant (long)")
    ap.add_argument("--evidence", action="store_true",
                    help="the before/after units of issue 14 (EVIDENCE; see benchmarks/sass_compare.py)")
    ap.add_argument("--targets", nargs="+", type=int, default=None, help="override the plans' targets")
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None, help="override the plans' dtypes")
    ap.add_argument("--dims", nargs="+", type=int, default=None, help="override the plans' feature dims")
    ap.add_argument("--kernels", default=None, metavar="REGEX",
                    help="compile only the kernels whose name matches this regular expression (re.search)")
    ap.add_argument("--sass-dir", default=None, help="also write every unit's SASS into this folder")
    ap.add_argument("--table", action="store_true", help="also print every compile unit")
    ap.add_argument("--json", default=None, help="write every unit's numbers here")
    args = ap.parse_args(argv)
    if triton is None:
        print("aot: triton is not installed", file=sys.stderr)
        return 2
    if interpreting():
        print("aot: unset TRITON_INTERPRET (the kernels must be imported as compilable JIT functions)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = its default
    if args.full and args.evidence:
        ap.error("--full and --evidence are different plan sets; pick one")
    plans = FULL if args.full else EVIDENCE if args.evidence else QUICK
    over = {k: tuple(v) for k, v in (("targets", args.targets), ("dtypes", args.dtypes), ("dims", args.dims)) if v}
    plans = tuple(dataclasses.replace(p, **over) for p in plans)
    if args.kernels:
        try:
            re.compile(args.kernels)
        except re.error as e:
            ap.error(f"--kernels {args.kernels!r} is not a regular expression: {e}")
    doc = run_gate(plans, kernels=args.kernels, sass_dir=args.sass_dir)
    if args.kernels and not doc["units"]:
        print(f"aot: --kernels {args.kernels!r} matches none of the recorded kernels: "
              f"{', '.join(doc['recorded_kernels'])}", file=sys.stderr)
        return 2
    bad = [u for u in doc["units"] if u["problems"]]
    if args.table or bad:
        print("\nunit | sm | dtype | tiles | warps | flags | regs | smem | spill st/ld B | dots tc/fma | HGMMA | HMMA | "
              "MUFU.EX2 | EX2/elem | MUFU | insts | FFMA | LDG/STG | loops")
        for u in (doc["units"] if args.table else bad):
            if u.get("error"):
                print(f"{u['kernel']} | {u['arch']} | {u['dtype']} | {u['cases'][0]} | {u['problems'][0]}")
                continue
            print(f"{u['kernel']} | {u['arch']} | {u['dtype']} | {_tiles_str(u['tiles'])} | {u['num_warps']} | "
                  f"{_flag_str(u['flags'])} | {u['regs']} | {u['smem']} | {u['spill_stores']}/{u['spill_loads']} | "
                  f"{u['tc_dots']}/{u['fma_dots']} | {u['HGMMA']} | {u['HMMA']} | {u['MUFU_EX2']} | "
                  f"{u['EX2_per_elem']} | {u['MUFU']} | {u['insts']} | {u['FFMA']} | {u['LDG']}/{u['STG']} | {u['loops']}"
                  + (f" | {'; '.join(u['problems'])}" if u["problems"] else ""))
    print()
    print(summary_table(doc))
    for e in doc["record_errors"]:
        print(f"RECORD ERROR {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1, default=repr))
    n = len(doc["units"])
    verdict = "PASS" if not bad and not doc["record_errors"] else "FAIL"
    print(f"\nAOT GATE: {verdict} triton {doc['triton']}: {n} compile units, "
          f"{sum(1 for u in doc['units'] if u.get('error'))} compile errors, "
          f"{sum(1 for u in bad if any(p.startswith('SPILL') for p in u['problems']))} spilling, "
          f"{len(bad)} with a problem, {len(doc['record_errors'])} record errors, {doc['seconds']}s")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
