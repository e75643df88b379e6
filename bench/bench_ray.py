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
import statistics
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


def measure(fv: Client, sha: str, args) -> tuple[float, list[str]]:
    """Seconds from the first submit to the last job's end, and the workers the jobs ran on."""
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", help="append a markdown section to this file")
    args = parser.parse_args()
    # both servers at once (3 actors: Ray's CPU count here is logical), measured in turns so that the load of the
    # other sessions on this shared machine falls on both alike; the median of the rounds' ratios is the figure
    init_local_ray(num_cpus=max(3, os.cpu_count() or 1))
    model = onnx_bytes()
    times: dict[int, list[float]] = {1: [], 2: []}
    ran: dict[int, list[str]] = {}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, \
            serve_in_background(ServerConfig(a, ray="auto", workers=1, threads=1, progress_interval=1.0)) as s1, \
            serve_in_background(ServerConfig(b, ray="auto", workers=2, threads=1, progress_interval=1.0)) as s2, \
            Client(s1.address, timeout=600) as c1, Client(s2.address, timeout=600) as c2:
        clients = {1: (c1, c1.upload(model).sha256), 2: (c2, c2.upload(model).sha256)}
        for fv, sha in clients.values():  # warm: every actor imports the model once
            warm = [fv.submit(sha, CHANNEL, steps=3, size=args.size, seed=900 + i) for i in range(args.jobs)]
            for job in warm:
                fv.wait(job.id, timeout=600)
        for _ in range(args.rounds):
            for n in (1, 2):
                seconds, ran[n] = measure(*clients[n], args)
                times[n].append(seconds)
    ratios = sorted(t1 / t2 for t1, t2 in zip(times[1], times[2]))
    one, two = statistics.median(times[1]), statistics.median(times[2])
    work = args.jobs * args.steps
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "unknown")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = [f"| 1 CPU worker actor | {', '.join(ran[1])} | {' '.join(f'{t:.1f}' for t in times[1])} | "
            f"{work / one:.1f} |",
            f"| 2 CPU worker actors | {', '.join(ran[2])} | {' '.join(f'{t:.1f}' for t in times[2])} | "
            f"{work / two:.1f} |"]
    text = "\n".join([
        f"Machine: {cpu}, {os.cpu_count()} cores shared with other sessions; Python {platform.python_version()}, "
        f"torch {torch.__version__}, ray {__import__('ray').__version__}, commit {commit}, "
        f"{time.strftime('%Y-%m-%d')}.",
        f"Workload: {args.jobs} jobs x {args.steps} steps, {args.size}x{args.size}, a 3-conv net; one torch "
        "thread per actor; the clock runs from the first submit to the last job's end (actors started and the "
        "model imported before).", "",
        "| workers | ran on | seconds per round | steps/s (median round) |", "| --- | --- | --- | --- |", *rows, "",
        f"**Throughput ratio 2 workers / 1 worker: {statistics.median(ratios):.2f}x** (median of {args.rounds} "
        f"rounds; the rounds' ratios, sorted: {', '.join(f'{r:.2f}' for r in ratios)}). Load average at the end: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", ""])
    print(text)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n## Ray workers (issue 12): 1 against 2 CPU worker actors (bench/bench_ray.py)\n\n" + text)
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
