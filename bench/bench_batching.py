"""Batched device steps against one job at a time, through real servers on loopback, in one run.

Two ``featureviz serve`` processes on one device: one with the default (or given) ``--max-step-images``, one
with ``--max-step-images 1`` (one job at a time, the behaviour before batching). For each concurrency level (1, 4,
16, 64 by default) the same set of single-image jobs (a channel of EfficientNet-Lite0 at 224 px, fixed seeds) is
submitted at once to each server in turn, and the run measures:

- throughput: image-steps per second, from the first job's creation to the last job's end (server timestamps);
- where that time goes: the admissions' spread, the last start, the first end and the ends' spread, and the share
  of it the device thread spent in device steps ("device busy");
- job latency: end - creation per job, p50 and p95;
- the mean images per device step (the server's ``featureviz_batch_images`` histogram);

and prints batched / solo ratios. ``--phases`` also times the batched engine's phases in-process (profiled:
parameterization, transforms, model, optimizer per device step at the largest level), to compare the time
outside the model with the model's own forward and backward.

    .venv/bin/python bench/bench_batching.py [--results bench/RESULTS.md] [--json out.json]
    .venv/bin/python bench/bench_batching.py --levels 1,2 --steps 2 --size 64   # a quick smoke run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = "/_blocks.4/_swish/Clip"  # a middle block of EfficientNet-Lite0 (240 channels)
TENANTS = ("t0", "t1", "t2", "t3")


class Server:
    """``featureviz serve`` in a subprocess, on a free port, with metrics (also bench_server_cost's server).
    ``tenants``: the tokens it accepts (jobs spread over tenants: 64 exceed one tenant's queue); ``env``: more
    environment variables; ``progress_interval``: ``--progress-interval 1`` (a progress event every second)."""

    def __init__(self, store: Path, *args: str, tenants=TENANTS, env: dict | None = None,
                 progress_interval: bool = True):
        cmd = [sys.executable, "-m", "featureviz", "serve", "--port", "0", "--metrics-port", "0", "--store",
               str(store), "--log-level", "WARNING", *(("--progress-interval", "1") if progress_interval else ()),
               *args]
        tokens = ",".join(f"{t}={t}" for t in tenants)
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", FEATUREVIZ_TOKENS=tokens,
                                              **(env or {})))
        self.lines: list[str] = []
        self.address = self.metrics = None
        ready = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.lines.append(line)
                found = re.search(r"listening on (\S+:\d+)", line)
                if found:
                    self.address = found.group(1)
                metrics = re.search(r"metrics on (http://\S+/metrics)", line)
                if metrics:
                    self.metrics = metrics.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(600) or self.address is None or self.metrics is None:
            self.proc.kill()
            raise RuntimeError("featureviz serve did not start:\n" + "".join(self.lines[-40:]))

    def mean_batch(self) -> tuple[float, float, float]:
        """(images, device steps, device step seconds) so far, from featureviz_batch_images and
        featureviz_device_step_seconds."""
        text = urllib.request.urlopen(self.metrics, timeout=30).read().decode()
        values = dict(line.split(" ") for line in text.splitlines() if line.startswith("featureviz_"))
        return (float(values.get("featureviz_batch_images_sum", 0)),
                float(values.get("featureviz_batch_images_count", 0)),
                float(values.get("featureviz_device_step_seconds_sum", 0)))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_level(server: Server, sha: str, jobs: int, steps: int, size: int, layer: str) -> dict:
    from featureviz.client import Client
    from featureviz.client import pb

    before = server.mean_batch()
    objective = {"channel": {"layer": layer, "channel": 7}}

    def one(seed: int):
        with Client(server.address, timeout=3600, token=TENANTS[seed % len(TENANTS)]) as fv:
            job = fv.submit(sha, objective, steps=steps, size=size, seed=seed)
            return fv.wait(job.id, timeout=3600)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        done = list(pool.map(one, range(jobs)))
    failed = [d for d in done if d.state != pb.JOB_STATE_SUCCEEDED]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed: {failed[0].error}")
    created = [d.create_time.ToNanoseconds() / 1e9 for d in done]
    started = [d.start_time.ToNanoseconds() / 1e9 for d in done]
    ended = [d.end_time.ToNanoseconds() / 1e9 for d in done]
    latency = sorted(e - c for c, e in zip(created, ended))
    after = server.mean_batch()
    images, count, device = after[0] - before[0], after[1] - before[1], after[2] - before[2]
    wall = max(ended) - min(created)
    return {"jobs": jobs, "seconds": wall,
            # where the wall time goes: the admissions' spread, the last start, the ends' spread (all from the
            # first creation), and the share of the wall time the device thread spent in device steps
            "created_spread": max(created) - min(created), "last_start": max(started) - min(created),
            "first_end": min(ended) - min(created), "ended_spread": max(ended) - min(ended),
            "device_busy": device / wall if wall > 0 else 0.0,
            "throughput": jobs * steps / wall,
            "p50": statistics.median(latency), "p95": latency[min(len(latency) - 1, round(0.95 * (len(latency) - 1)))],
            "images_per_step": images / count if count else 0.0,
            "device_ms_per_image": 1000 * device / images if images else 0.0}


def phases(model_path: Path, jobs: int, size: int, layer: str, device: str | None, steps: int = 8) -> dict:
    """Per device step, ms in each phase of the batched engine (profiled: CUDA synchronised at the boundaries)."""
    import torch

    from featureviz import zoo
    from featureviz.engine import RenderSpec
    from featureviz.engine.batch import BatchEngine
    from featureviz.engine.batch import Slot
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    model = import_model(model_path, preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    engine = BatchEngine(dev, profile=True)
    slots = [Slot(model, RenderSpec(objective={"channel": {"layer": layer, "channel": 7}}, steps=steps + 2,
                                    size=size, seed=i, relu_warmup=0), device=dev) for i in range(jobs)]
    engine.join(slots)
    for _ in range(2):  # warm-up: kernels, the layout probe
        engine.step(slots)
    start = dict(slots[0].phase_seconds)
    for _ in range(steps):
        engine.step(slots)
    ms = {k: (slots[0].phase_seconds[k] - start[k]) * 1000 / steps for k in start}
    ms["outside / model"] = (ms["param"] + ms["transforms"] + ms["optimizer"]) / ms["model"]
    return ms


def device_name(device: str | None) -> str:
    import torch

    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        return torch.cuda.get_device_name()
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,16,64", help="concurrent single-image jobs (default %(default)s)")
    parser.add_argument("--steps", type=int, default=16, help="steps per job (default %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="image side (default %(default)s)")
    parser.add_argument("--layer", default=LAYER)
    parser.add_argument("--max-step-images", type=int, default=None,
                        help="the batched server's (default: the largest level, so every level can share a step)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--phases", action="store_true", help="also time the batched engine's phases in-process")
    parser.add_argument("--model", type=Path, default=None, help="an ONNX file (default: EfficientNet-Lite0)")
    parser.add_argument("--results", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]

    from featureviz import zoo
    from featureviz.client import Client

    model_path = args.model or zoo.efficientnet_lite0()
    extra = ["--device", args.device] if args.device else []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    figures: dict = {"device": device_name(args.device), "commit": commit, "steps": args.steps, "size": args.size,
                     "model": "EfficientNet-Lite0" if args.model is None else Path(args.model).name,
                     "layer": args.layer, "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
                     "levels": []}
    with tempfile.TemporaryDirectory() as tmp:
        batched_args = ["--max-step-images", str(args.max_step_images or max(levels))]
        servers = {"batched": Server(Path(tmp) / "batched", *batched_args, *extra),
                   "solo": Server(Path(tmp) / "solo", "--max-step-images", "1", *extra)}
        try:
            shas = {}
            for name, server in servers.items():
                for tenant in TENANTS:
                    with Client(server.address, timeout=3600, token=tenant) as fv:
                        shas[name] = fv.upload(model_path).sha256
                with Client(server.address, timeout=3600, token=TENANTS[0]) as fv:
                    # warm-up: the import, the layout and row-independence probes, a shared step's kernels
                    warm = [fv.submit(shas[name], {"channel": {"layer": args.layer, "channel": 1}}, steps=3,
                                      size=args.size, seed=s) for s in range(2)]
                    for job in warm:
                        fv.wait(job.id, timeout=3600)
                    figures.setdefault("max_step_images", {})[name] = fv.info().max_step_images
            for jobs in levels:
                row = {"jobs": jobs}
                for name, server in servers.items():  # the two in turn at each level: the same machine load
                    row[name] = run_level(server, shas[name], jobs, args.steps, args.size, args.layer)
                    print(f"{jobs:3d} jobs {name:8s}: {row[name]['throughput']:8.2f} image-steps/s, p50 "
                          f"{row[name]['p50']:7.2f} s, p95 {row[name]['p95']:7.2f} s, "
                          f"{row[name]['images_per_step']:.1f} images/step, "
                          f"{row[name]['device_ms_per_image']:.1f} device ms/image-step", flush=True)
                figures["levels"].append(row)
        finally:
            for server in servers.values():
                server.stop()
    if args.phases:
        figures["phases"] = phases(model_path, max(levels), args.size, args.layer, args.device)
    text = report(figures)
    print(text)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def report(figures: dict) -> str:
    lines = [f"### bench_batching.py: {figures['device']}, {figures['date']}, commit {figures['commit']}",
             "",
             f"{figures.get('model', 'EfficientNet-Lite0')}, `{figures['layer']}` channel, {figures['size']} px, {figures['steps']} steps per "
             f"single-image job; batched = `--max-step-images {figures['max_step_images']['batched']}`, "
             "solo = `--max-step-images 1`. Ratios are batched / solo (throughput: higher is better; latency: lower is better).",
             "",
             "| jobs | img-steps/s batched | solo | ratio | p50 s batched | solo | ratio | p95 s batched | solo | ratio "
             "| images/step batched | device ms/image batched | solo |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in figures["levels"]:
        b, s = row["batched"], row["solo"]
        lines.append(f"| {row['jobs']} | {b['throughput']:.2f} | {s['throughput']:.2f} | "
                     f"{b['throughput'] / s['throughput']:.2f}x | {b['p50']:.2f} | {s['p50']:.2f} | "
                     f"{b['p50'] / s['p50']:.2f}x | {b['p95']:.2f} | {s['p95']:.2f} | {b['p95'] / s['p95']:.2f}x | "
                     f"{b['images_per_step']:.1f} | {b['device_ms_per_image']:.1f} | {s['device_ms_per_image']:.1f} |")
    lines += ["", "Where the batched server's wall time goes (seconds from the first job's creation; device busy = "
                  "the device thread's time in device steps / wall):", "",
              "| jobs | wall s | admissions spread s | last start s | first end s | ends spread s | device busy |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in figures["levels"]:
        b = row["batched"]
        if "created_spread" in b:
            lines.append(f"| {row['jobs']} | {b['seconds']:.2f} | {b['created_spread']:.2f} | {b['last_start']:.2f} | "
                         f"{b['first_end']:.2f} | {b['ended_spread']:.2f} | {b['device_busy']:.0%} |")
    if "phases" in figures:
        p = figures["phases"]
        lines += ["", f"Batched engine phases per device step at {max(r['jobs'] for r in figures['levels'])} images "
                      f"(profiled): param {p['param']:.2f} ms, transforms {p['transforms']:.2f} ms, model "
                      f"{p['model']:.2f} ms, optimizer {p['optimizer']:.2f} ms; outside / model = "
                      f"{p['outside / model']:.1%}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
