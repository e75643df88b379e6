"""bench/gpu_check.sh in its dry-run mode: every stage of the GPU machine's check runs here on the CPU (tiny sizes,
featureviz through the script's folder of links) and writes its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    env = dict(os.environ, FEATUREVIZ_PYTHON=sys.executable, FEATUREVIZ_LINKS="1")
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path), "--dry-run"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"env.txt", "pytest_gpu.txt", "kernels.md", "step.md", "batching.md", "batching.json",
                     "variants.md", "summary.md"}
    assert len(names) <= 8  # what a device run can bring back
    summary = (tmp_path / "summary.md").read_text()
    stages = [line for line in summary.splitlines() if line.startswith("- ")]
    assert len(stages) == 8 and all(": exit 0 in " in line for line in stages), summary
    assert "DRY RUN" in summary
    env_txt = (tmp_path / "env.txt").read_text()
    assert "/pkg/featureviz/__init__.py" in env_txt  # featureviz came from the folder of links
    figures = json.loads((tmp_path / "batching.json").read_text())
    assert [row["jobs"] for row in figures["levels"]] == [1, 2]
    assert all(row[mode]["throughput"] > 0 for row in figures["levels"] for mode in ("batched", "solo"))
    assert figures["max_step_images"]["solo"] == 1
    assert "| bench_batching" not in summary and "### bench_batching.py" in summary
    assert "### bench_engine_variants.py" in summary and "| default | 2 |" in summary
    # the exemplar index pass: images per second against a plain forward, in the summary (no file of its own)
    exemplars = summary.split("### bench_exemplars.py", 1)[1]
    assert "| 8 | 4 | cpu |" in exemplars and "plain / index" in exemplars
    # the server cost table: the worker in the server's process and in a child process (--worker-process)
    assert "### bench_server_cost.py" in summary and "| tiny in-process | 2 |" in summary
    assert "| tiny process | 2 |" in summary
    # the atlas's unit rate through a real server (ResNet-18's 20 Conv layers, one channel each, in the dry run)
    atlas = summary.split("### Atlas unit rate", 1)[1]
    assert "| 20 | 32 | 2 |" in atlas and "every Conv channel (4800 units)" in atlas
