"""Installs `cdp_fast` and the Triton kernels folder as the subpackage `cdp_fast.kernels`.

The kernels live in the top-level `kernels/` folder (beside their references, as the project
layout promises) but are never importable as a top-level `kernels` module: PyPI's `kernels`
package owns that name.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["cdp_fast", "cdp_fast.*"]) + ["cdp_fast.kernels", "cdp_fast.benchmarks"]

setup(
    packages=packages,
    package_dir={"cdp_fast": "cdp_fast", "cdp_fast.kernels": "kernels",
                 "cdp_fast.benchmarks": "benchmarks"},
    py_modules=[],
)
