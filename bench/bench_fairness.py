"""Fairness of the batched server, measured on a real server on loopback with EfficientNet-Lite0.

1. Tenants: one tenant floods the queue with N jobs, then another submits one. Policy: the tenant holding the
   fewest images on the worker is granted the next free slot (then the one served least recently; FIFO within a
   tenant). Measured: how many flood jobs started before the calm tenant's job, and its queue wait, against FIFO
   (which would start all N first).
2. Models: jobs on two different models at once. Policy: the worker steps its groups (one per model and input
   size) in turn, one device step each, so every running job advances one step per round. Measured: each job's
   steps per second while all four run; min / max across jobs (1.0 is perfectly even).

    .venv/bin/python bench/bench_fairness.py [--flood 16] [--max-step-images 4] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = "/_blocks.4/_swish/Clip"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=16)
    parser.add_argument("--max-step-images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)

    from featureviz import zoo
    from featureviz.client import Client
    from featureviz.client import pb
    from featureviz.server import ServerConfig
    from featureviz.server import serve_in_background

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_batching import device_name

    objective = {"channel": {"layer": LAYER, "channel": 7}}
    tokens = {"tok-flood": "flood", "tok-calm": "calm"}
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(tmp, tokens=tokens, max_step_images=args.max_step_images, progress_interval=0.0)
        with serve_in_background(config) as server, Client(server.address, token="tok-flood", timeout=3600) as flood, \
                Client(server.address, token="tok-calm", timeout=3600) as calm:
            dynamic = zoo.efficientnet_lite0(dynamic_size=True)
            fixed = zoo.efficientnet_lite0()  # the same network exported at a fixed 224 px: another model
            a = flood.upload(dynamic).sha256
            calm.upload(dynamic)
            b = calm.upload(fixed).sha256
            for fv, sha in ((flood, a), (calm, b)):  # warm-up: imports, probes
                fv.wait(fv.submit(sha, objective, steps=2, size=args.size).id)

            # 1. tenants
            floods = [flood.submit(a, objective, steps=args.steps, size=args.size, seed=i) for i in range(args.flood)]
            mine = calm.wait(calm.submit(a, objective, steps=args.steps, size=args.size, seed=99).id)
            done = [flood.wait(j.id) for j in floods]
            assert all(j.state == pb.JOB_STATE_SUCCEEDED for j in done + [mine])
            before = sum(j.start_time.ToNanoseconds() < mine.start_time.ToNanoseconds() for j in done)
            wait = (mine.start_time.ToNanoseconds() - mine.create_time.ToNanoseconds()) / 1e9
            flood_waits = sorted((j.start_time.ToNanoseconds() - j.create_time.ToNanoseconds()) / 1e9 for j in done)
            print(f"tenants: {before} of {args.flood} flood jobs started first; wait {wait:.2f} s", flush=True)

            # 2. models: two jobs on each model at once, long enough to measure while all four run
            long = 10_000  # the server's max_steps
            jobs = [(flood, flood.submit(a, objective, steps=long, size=args.size, seed=1)),
                    (flood, flood.submit(a, objective, steps=long, size=args.size, seed=2)),
                    (calm, calm.submit(b, objective, steps=long, size=args.size, seed=3)),
                    (calm, calm.submit(b, objective, steps=long, size=args.size, seed=4))]
            for fv, job in jobs:  # all four running
                next(e for e in fv.watch(job.id) if e.HasField("progress"))
            start = [fv.job(job.id).step for fv, job in jobs]
            t0 = time.perf_counter()
            threading.Event().wait(20.0)  # a fixed measuring window (a benchmark, not a test)
            seconds = time.perf_counter() - t0
            rates = [(fv.job(job.id).step - s) / seconds for (fv, job), s in zip(jobs, start)]
            for fv, job in jobs:
                fv.cancel(job.id)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    text = "\n".join([
        f"### bench_fairness.py: {device_name(None)}, commit {commit}", "",
        f"EfficientNet-Lite0, {args.size} px, `--max-step-images {args.max_step_images}`.", "",
        f"- Tenants: {args.flood} flood jobs of {args.steps} steps queued first, then one job of another tenant. "
        f"Flood jobs started before it: {before} of {args.flood} (FIFO: {args.flood}); its queue wait "
        f"{wait:.2f} s, against a median flood-job wait of {statistics.median(flood_waits):.2f} s (max "
        f"{flood_waits[-1]:.2f} s).",
        f"- Models: two jobs on model A (dynamic-size export) and two on model B (fixed 224 export, a separate "
        f"group), all running: steps/s per job {', '.join(f'{r:.2f}' for r in rates)}; min / max = "
        f"{min(rates) / max(rates):.2f} (1.0 = every job advances at the same rate).", ""])
    print(text)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
