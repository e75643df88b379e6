"""The Node.js client's own tests (tests/node/, node's built-in runner), run from pytest so CI runs them.

They start a real ``featureviz serve`` subprocess from this environment and export real ONNX models with its
Python, so both are handed over explicitly (FEATUREVIZ_BIN, FEATUREVIZ_PYTHON) and this venv goes first on PATH.
``npm ci`` installs the pinned dependencies from clients/node/package-lock.json when node_modules is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NODE_CLIENT = REPO / "clients" / "node"
NODE_TESTS = REPO / "tests" / "node"


def _tail(text: str, lines: int = 200) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.slow
def test_node_client_against_real_server():
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"the Node client tests need node and npm on PATH (node: {node}, npm: {npm})")
    bin_dir = Path(sys.executable).parent
    featureviz = bin_dir / "featureviz"
    assert featureviz.exists(), f"{featureviz} is missing: install the project (pip install -e .[server,test])"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FEATUREVIZ_BIN": str(featureviz),
        "FEATUREVIZ_PYTHON": sys.executable,
    }
    if not (NODE_CLIENT / "node_modules").is_dir():
        ci = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, env=env, capture_output=True,
                            text=True, timeout=300)
        assert ci.returncode == 0, f"npm ci failed ({ci.returncode}):\n{_tail(ci.stdout + ci.stderr)}"
    # from clients/node, as `npm test` runs them: no test may assume the repository root as its working directory
    run = subprocess.run([node, "--test", "--test-reporter=spec", os.path.relpath(NODE_TESTS, NODE_CLIENT)],
                         cwd=NODE_CLIENT, env=env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, f"node --test tests/node/ failed ({run.returncode}):\n{_tail(run.stdout + run.stderr)}"
