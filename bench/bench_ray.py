"""Throughput of ``serve --ray`` with 1 against 2 CPU worker actors (one torch thread each), in one run on one
local Ray cluster (loopback). The same jobs (a small conv net, several jobs of fixed steps) go to a server with
one actor, then to a server with two; the figure is steps per second over all jobs and the ratio 2 / 1.

    .venv/bin/python bench/bench_ray.py [--jobs 8] [--steps 80] [--size 64] [--results bench/RESULTS.md]

GPUs (1 against all GPUs of a machine) are not measured: this machine has none.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from featureviz.client import Client
from featureviz.client import pb
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from featureviz.worker.ray_pool import init_local_ray

CHANNEL = {"channel": {"layer": "/Relu_2", "channel": 5}}


class Net(torch.nn.Module):
    """conv(3->32)-relu-conv(32->64, stride 2)-relu-conv(64->64)-relu-pool-linear: a few ms per step at 64x64."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = torch.nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.c3 = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


def onnx_bytes() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(Net().eval(), torch.rand(1, 3, 64, 64), buffer, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}}, opset_version=17, dynamo=False)
    return buffer.getvalue()


def run(workers: int, model: bytes, args) -> tuple[float, list[str]]:
    """Seconds from the first submit to the last job's end, and the workers the jobs ran on."""
    with tempfile.TemporaryDirectory() as store:
        config = ServerConfig(store, ray="auto", workers=workers, threads=1, progress_interval=1.0)
        with serve_in_background(config) as server, Client(server.address, timeout=600) as fv:
            sha = fv.upload(model).sha256
            fv.wait(fv.submit(sha, CHANNEL, steps=3, size=args.size, seed=999).id, timeout=600)  # warm: import
            began = time.perf_counter()
            jobs = [fv.submit(sha, CHANNEL, steps=args.steps, size=args.size, seed=i) for i in range(args.jobs)]
            done = [fv.wait(j.id, timeout=3600) for j in jobs]
            seconds = time.perf_counter() - began
            assert all(d.state == pb.JOB_STATE_SUCCEEDED for d in done), [d.error for d in done]
            return seconds, sorted({d.worker for d in done})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--results", help="append a markdown section to this file")
    args = parser.parse_args()
    init_local_ray(num_cpus=max(2, os.cpu_count() or 1))
    model = onnx_bytes()
    one, w1 = run(1, model, args)
    two, w2 = run(2, model, args)
    work = args.jobs * args.steps
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "unknown")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = [f"| 1 CPU worker actor | {', '.join(w1)} | {one:.1f} | {work / one:.1f} |",
            f"| 2 CPU worker actors | {', '.join(w2)} | {two:.1f} | {work / two:.1f} |"]
    text = "\n".join([
        f"Machine: {cpu}, {os.cpu_count()} cores shared with other sessions; Python {platform.python_version()}, "
        f"torch {torch.__version__}, ray {__import__('ray').__version__}, commit {commit}, "
        f"{time.strftime('%Y-%m-%d')}.",
        f"Workload: {args.jobs} jobs x {args.steps} steps, {args.size}x{args.size}, a 3-conv net; one torch "
        "thread per actor; the clock runs from the first submit to the last job's end (actors started and the "
        "model imported before).", "",
        "| workers | ran on | seconds | steps/s (all jobs) |", "| --- | --- | --- | --- |", *rows, "",
        f"**Ratio 2 workers / 1 worker: {one / two:.2f}x**", ""])
    print(text)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n## Ray workers (issue 12): 1 against 2 CPU worker actors (bench/bench_ray.py)\n\n" + text)
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
