"""The kernels compile for an H100 (sm_90) through the real Triton compiler and ptxas, without a GPU.

The interpreter that runs the other kernel tests on CPU skips the compiler: it accepted a constexpr
reassigned inside a static loop that the compiler rejects. This test catches that class of error in CI.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "compile_check.py"


@pytest.mark.slow  # ~40-80 s on 2 cores: four real compiles (ptxas included)
def test_kernels_compile_for_sm90_without_spilling_much(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit
    run = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--json", "--quick"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == 4  # one variant per kernel: fft forward, fft backward, resample forward, resample backward
    for row in rows:
        # a spill of a few bytes is harmless; hundreds mean a launch configuration that no longer fits
        assert row["spill_stack_bytes"] <= 64, row
    assert {row["tensor_cores"] for row in rows if row["kernel"].startswith("spectrum")} <= {"wgmma", "mma"}
