"""Shared, generic test helpers (no op-specific fixtures here).

* ``assert_close(actual, expected, *, rtol, atol=0.0, scale="max", name="")``: fails with a report
  of the worst mismatches. With ``scale="max"`` the tolerance is ``atol + rtol * max|expected|``
  (right for gradients, whose small entries have no meaningful relative error); with
  ``scale="elem"`` it is elementwise ``atol + rtol * |expected|``. Also available as a fixture.
* ``requires_cuda``: skip marker for GPU-only tests (combine with ``pytest.mark.gpu``).
"""
from __future__ import annotations

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
