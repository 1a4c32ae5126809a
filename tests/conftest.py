"""Shared, generic test helpers (no op-specific fixtures here).

* ``assert_close(actual, expected, *, rtol, atol=0.0, scale="max", name="")``: fails with a report
  of the worst mismatches. With ``scale="max"`` the tolerance is ``atol + rtol * max|expected|``
  (right for gradients, whose small entries have no meaningful relative error); with
  ``scale="elem"`` it is elementwise ``atol + rtol * |expected|``. Also available as a fixture.
* ``requires_cuda``: skip marker for GPU-only tests (combine with ``pytest.mark.gpu``).

Without diffusers (the ``interop`` extra) the diffusers-equivalence tests are skipped; the header
and the end of the run say so, with the count, so a green run never hides them.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _assert_close(actual, expected, *, rtol, atol=0.0, scale="max", name="", show=5):
    actual = torch.as_tensor(actual).detach()
    expected = torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.to(torch.float64).cpu().reshape(-1)
    e = expected.to(torch.float64).cpu().reshape(-1)
    assert bool(torch.isfinite(a).all()), f"{name}: non-finite values in the result"
    if scale == "max":
        tol = atol + rtol * (float(e.abs().max()) if e.numel() else 0.0)
        tol = torch.full_like(e, tol)
    elif scale == "elem":
        tol = atol + rtol * e.abs()
    else:
        raise ValueError(f"scale must be 'max' or 'elem', got {scale!r}")
    err = (a - e).abs()
    bad = err > tol
    if bool(bad.any()):
        idx = torch.argsort(err - tol, descending=True)[:show]
        rows = "\n".join(f"  [{int(i)}] got {a[i]:.9g} expected {e[i]:.9g} |diff| {err[i]:.3g} tol {tol[i]:.3g}"
                         for i in idx)
        raise AssertionError(f"{name}: {int(bad.sum())}/{e.numel()} elements mismatch "
                             f"(max |diff| {float(err.max()):.3g}); worst:\n{rows}")


@pytest.fixture
def assert_close():
    return _assert_close


DIFFUSERS_NOTE = ("diffusers is not installed: {n} diffusers-equivalence tests (tests/test_diffusers_compat.py, "
                  "tests/test_sampler.py) were SKIPPED; pip install -e '.[dev,interop]' (as CI does) runs them")


def pytest_report_header(config):
    if importlib.util.find_spec("diffusers") is None:
        return ["diffusers not installed: the diffusers-equivalence tests will be skipped "
                "(pip install -e '.[dev,interop]' runs them)"]
    return []


def diffusers_skips(skipped_reports) -> int:
    """How many skipped tests were skipped for want of diffusers."""
    return sum("diffusers" in str(getattr(r, "longrepr", "")) for r in skipped_reports)


def pytest_terminal_summary(terminalreporter):
    n = diffusers_skips(terminalreporter.stats.get("skipped", []))
    if n:
        terminalreporter.write_line(DIFFUSERS_NOTE.format(n=n), yellow=True, bold=True)
