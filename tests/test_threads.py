"""OpenMP waiting: importing the package makes idle OpenMP threads sleep instead of spin (a CPU step
beside busy processes collapses otherwise), keeps an explicit
setting, and can be told to leave libgomp's default alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # trains or runs real models, compiles, or starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "import os, sparsepo_lite; print(os.environ.get('OMP_WAIT_POLICY', '<unset>'))"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "PASSIVE"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
        ({"SPARSEPO_LITE_OMP_PASSIVE": "0"}, "<unset>"),
    ],
)
def test_wait_policy_on_import(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SPARSEPO_LITE_OMP_PASSIVE")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**base, **env}, cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == expected
