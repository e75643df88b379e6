"""The server's cost per job: N concurrent single-image jobs through a real server against the in-process batched
engine doing the same slots and steps, in one run (issue 26).

A ``featureviz serve`` subprocess (``--max-step-images`` the largest level, so every level's jobs share one device
step; ``FEATUREVIZ_PHASES=1``: the cost counters of :mod:`featureviz.phases` on, read from its metrics port) and,
in this process, :class:`featureviz.engine.batch.BatchEngine` on the same device. For each level (64 and 256
single-image jobs by default, a tiny model: one 3x3 conv, 32 px, 16 steps) and each repeat:

- server: the jobs are created at once from 8 tenants (asyncio clients: CreateJob, then WatchJob to the result
  event; with ``--one-call`` the client's ``run``, one CreateAndWatchJob per job)
  and the wall time runs from the first job's creation to the last job's end (server timestamps);
- engine: the same number of slots made, joined (the starting objective), stepped ``steps`` times as one group, and
  finished (the final objective and images), timed in this process;
- the ratio server wall / engine time, and the server's time per job beyond the device steps:
  (wall - the device steps' seconds, from ``featureviz_device_step_seconds``) / jobs; and per phase (self time of
  admission, dispatch, start, step bookkeeping, end, events, watch, store, PNG, the start and end forwards; and
  gc, the pauses of full garbage collections in the server's processes, inside the other phases) in ms per job.
  The phases run on several threads (the event loop, the worker's device, output and PNG threads), so they need
  not add up to the wall time; what the counters do not see is mostly gRPC and the event loop;
- the CPU seconds per job of the server process (all its threads, from /proc; with ``--worker-process`` plus its
  child, the worker process, and the server process alone in its own column), of the engine (this process while
  it runs) and of this process while the server runs, the client (on the same cores as the server: on a small
  machine it slows the server down). CPU time moves much less than wall time with the load of a shared machine.

Then the middle ground: 64 jobs of the demo model (EfficientNet-Lite0) at 64 px, with the same figures. Each
figure is the median over the repeats; ratios are taken within a repeat (the same machine load).

    .venv/bin/python bench/bench_server_cost.py [--results bench/RESULTS.md] [--json out.json]
    .venv/bin/python bench/bench_server_cost.py --levels 4 --steps 2 --repeats 1 --demo-jobs 0   # a smoke run
    .venv/bin/python bench/bench_server_cost.py --both     # in-process and --worker-process servers, alternately
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import bench_batching  # the serve subprocess harness (this folder)

ROOT = Path(__file__).resolve().parents[1]
TENANTS = tuple(f"t{i}" for i in range(8))  # 256 jobs: 32 queued per tenant at most (max_queued_jobs_per_tenant)
DEMO_LAYER = "/_blocks.4/_swish/Clip"
PHASE_ORDER = ("admission", "dispatch", "start", "step bookkeeping", "end", "events", "watch", "store", "png",
               "start forward", "end forward", "gc")


class Server(bench_batching.Server):
    """``featureviz serve`` in a subprocess (bench_batching's), on a free port, with metrics and the cost counters
    on (FEATUREVIZ_PHASES=1), no periodic progress events."""

    def __init__(self, store: Path, *args: str):
        super().__init__(store, *args, tenants=TENANTS, env={"FEATUREVIZ_PHASES": "1"}, progress_interval=False)

    def counters(self) -> dict[str, float]:
        """Every featureviz_ sample of the metrics endpoint, by its name and labels."""
        text = urllib.request.urlopen(self.metrics, timeout=60).read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("featureviz_"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


def tiny_model() -> bytes:
    """One 3x3 conv (3 -> 8 channels), dynamic batch and size, as ONNX."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(module, torch.rand(1, 3, 32, 32), buffer, input_names=["image"], output_names=["out"],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}}, opset_version=17, dynamo=False)
    return buffer.getvalue()


async def _run_jobs(address: str, sha: str, objective: dict, jobs: int, steps: int, size: int,
                    one_call: bool = False) -> list:
    from featureviz.client import AsyncClient

    clients = [AsyncClient(address, token=t, timeout=3600) for t in TENANTS]
    try:
        async def one(i: int):
            fv = clients[i % len(clients)]
            if one_call:
                return await fv.run(sha, objective, steps=steps, size=size, seed=i, timeout=3600)
            job = await fv.submit(sha, objective, steps=steps, size=size, seed=i)
            return await fv.wait(job.id, timeout=3600)

        return await asyncio.gather(*(one(i) for i in range(jobs)))
    finally:
        for fv in clients:
            await fv.close()


def run_server(server: Server, sha: str, objective: dict, jobs: int, steps: int, size: int,
               one_call: bool = False) -> dict:
    from featureviz.client import pb

    before = server.counters()
    pid = server.proc.pid
    cpu = _cpu_seconds(pid), time.process_time(), _cpu_seconds(pid, False)
    done = asyncio.run(_run_jobs(server.address, sha, objective, jobs, steps, size, one_call))
    server_cpu, client_cpu = _cpu_seconds(pid) - cpu[0], time.process_time() - cpu[1]
    front_cpu = _cpu_seconds(pid, False) - cpu[2]  # the server process alone (gRPC, store, events)
    after = server.counters()
    failed = [d for d in done if d.state != pb.JOB_STATE_SUCCEEDED]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed: {failed[0].error}")
    created = [d.create_time.ToNanoseconds() / 1e9 for d in done]
    started = [d.start_time.ToNanoseconds() / 1e9 for d in done]
    ended = [d.end_time.ToNanoseconds() / 1e9 for d in done]
    wall = max(ended) - min(created)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    device = delta("featureviz_device_step_seconds_sum")
    phases = {p: 1000 * delta(f'featureviz_phase_seconds_total{{phase="{p}"}}') / jobs for p in PHASE_ORDER}
    return {"wall": wall, "device": device, "created_spread": max(created) - min(created),
            "last_start": max(started) - min(created), "device_steps": delta("featureviz_device_step_seconds_count"),
            # the timeline: the last creation to the first start, the last start to the first end, the ends' spread
            "start_gap": min(started) - max(created), "running": min(ended) - max(started),
            "ended_spread": max(ended) - min(ended),
            "images_per_step": (delta("featureviz_batch_images_sum") / delta("featureviz_batch_images_count")
                                if delta("featureviz_batch_images_count") else 0.0),
            "beyond_ms": 1000 * (wall - device) / jobs, "phases_ms": phases,
            "server_cpu_ms": 1000 * server_cpu / jobs, "client_cpu_ms": 1000 * client_cpu / jobs,
            "front_cpu_ms": 1000 * front_cpu / jobs}


def _cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU seconds (user + system, all threads) of a process so far, from /proc (nan elsewhere); ``children``: plus
    its live child processes' (``--worker-process``: the worker process is the server's child)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")
    if children:
        total += sum(_cpu_seconds(child, False) for child in _children(pid))
    return total


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


def run_engine(model, layer: str, jobs: int, steps: int, size: int, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the in-process batched engine: make ``jobs`` single-image slots, join,
    ``steps`` steps, finish."""
    import torch

    from featureviz.engine import RenderSpec
    from featureviz.engine.batch import BatchEngine
    from featureviz.engine.batch import Slot

    dev = torch.device(device)
    engine = BatchEngine(dev)

    def once(n: int, k: int) -> float:
        began = time.perf_counter()  # the slots' making counts: the server's worker makes them too
        slots = [Slot(model, RenderSpec(objective={"channel": {"layer": layer, "channel": 1}}, steps=k, size=size,
                                        seed=i), device=dev) for i in range(n)]
        engine.join(slots)
        for _ in range(k):
            engine.step(slots)
        engine.finish(slots)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    once(min(jobs, 4), 2)  # warm-up: kernels, the layout probe
    cpu = time.process_time()
    wall = once(jobs, steps)
    return wall, time.process_time() - cpu


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores)"


def measure(label: str, server: Server, sha: str, model, layer: str, jobs: int, steps: int, size: int,
            device: str, one_call: bool = False) -> dict:
    engine, engine_cpu = run_engine(model, layer, jobs, steps, size, device)  # first: the server is idle meanwhile
    served = run_server(server, sha, {"channel": {"layer": layer, "channel": 1}}, jobs, steps, size, one_call)
    served.update(engine=engine, ratio=served["wall"] / engine, label=label, jobs=jobs, size=size, steps=steps,
                  beyond_engine_ms=1000 * (served["wall"] - engine) / jobs, engine_cpu_ms=1000 * engine_cpu / jobs,
                  cpu_ratio=served["server_cpu_ms"] * jobs / 1000 / engine_cpu if engine_cpu else float("nan"))
    print(f"{label:>12s} {jobs:4d} jobs: server {served['wall']:.3f} s, engine {engine:.3f} s, ratio "
          f"{served['ratio']:.2f}x, beyond the device steps {served['beyond_ms']:.2f} ms/job, "
          f"{served['images_per_step']:.0f} images/step, created over {served['created_spread']:.2f} s, last start "
          f"{served['last_start']:.2f} s (then the first start {served['start_gap']:.3f} s after the last creation, "
          f"the first end {served['running']:.2f} s after the last start, the ends over {served['ended_spread']:.3f} s); "
          f"CPU ms/job: server {served['server_cpu_ms']:.2f}, engine "
          f"{served['engine_cpu_ms']:.2f} ({served['cpu_ratio']:.2f}x), of the server the server process alone "
          f"{served['front_cpu_ms']:.2f}, client {served['client_cpu_ms']:.2f}; ms/job: "
          + ", ".join(f"{p} {v:.2f}" for p, v in served["phases_ms"].items()), flush=True)
    return served


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="64,256", help="concurrent single-image jobs (default %(default)s)")
    parser.add_argument("--steps", type=int, default=16, help="steps per job (default %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="image side of the tiny model (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each level; medians (default %(default)s)")
    parser.add_argument("--demo-jobs", type=int, default=64, help="jobs on the demo model (0: skip)")
    parser.add_argument("--demo-size", type=int, default=64)
    parser.add_argument("--demo-steps", type=int, default=None, help="steps of the demo jobs (default: --steps)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--results", type=Path, default=None, help="append the tables to this markdown file")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the server's worker and of the engine here (default: 1 on a CPU, "
                             "which a loaded shared machine needs; torch's own on CUDA)")
    parser.add_argument("--label", default="", help="a word for the table's heading (before, after, ...)")
    parser.add_argument("--serve-args", default="",
                        help="more `featureviz serve` arguments, e.g. \"--progress-interval 1\"")
    parser.add_argument("--worker-process", action="store_true",
                        help="serve with --worker-process (the worker in a child process; its CPU counts in the "
                             "server's)")
    parser.add_argument("--one-call", action="store_true",
                        help="each job as the client's run(): one CreateAndWatchJob (default: submit, then wait)")
    parser.add_argument("--both", action="store_true",
                        help="two servers, in-process and --worker-process, run alternately level by level (one "
                             "table; the label says which)")
    args = parser.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]

    import torch

    from featureviz import zoo
    from featureviz.client import Client
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    figures: dict = {"device": device_name(device), "commit": commit, "steps": args.steps, "size": args.size,
                     "threads": args.threads or (1 if device == "cpu" else 0),
                     "repeats": args.repeats, "label": args.label, "one_call": args.one_call,
                     "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tiny_path = Path(tmp) / "tiny.onnx"
        tiny_path.write_bytes(tiny_model())
        tiny = import_model(tiny_path)
        tiny_layer = next(layer.name for layer in tiny.layers if layer.spatial)
        demo = demo_path = None
        if args.demo_jobs:
            demo_path = zoo.efficientnet_lite0()
            demo = import_model(demo_path, preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS))
        common = ["--max-step-images", str(max(levels + [args.demo_jobs])), "--device", device,
                  *(["--threads", str(threads)] if threads else []), *args.serve_args.split()]
        variants = {" in-process": [], " process": ["--worker-process"]} if args.both else \
            {" process": ["--worker-process"]} if args.worker_process else {"": []}
        servers: dict[str, Server] = {}
        try:
            for name, extra in variants.items():
                servers[name] = Server(Path(tmp) / f"store{len(servers)}", *common, *extra)
            shas = {}
            for server in servers.values():
                for tenant in TENANTS:
                    with Client(server.address, timeout=3600, token=tenant) as fv:
                        shas["tiny"] = fv.upload(tiny_path).sha256
                        if demo_path is not None:
                            shas["demo"] = fv.upload(demo_path).sha256
                # warm-up: the import, the layout and row-independence probes, a shared step's kernels
                run_server(server, shas["tiny"], {"channel": {"layer": tiny_layer, "channel": 1}}, 8, 2, args.size)
                if demo_path is not None:
                    run_server(server, shas["demo"], {"channel": {"layer": DEMO_LAYER, "channel": 1}}, 4, 2,
                               args.demo_size)
            for repeat in range(args.repeats):
                for jobs in levels:
                    for name, server in servers.items():  # alternately: the same load for both
                        figures["runs"].append(dict(measure("tiny" + name, server, shas["tiny"], tiny, tiny_layer,
                                                            jobs, args.steps, args.size, device, args.one_call),
                                                    repeat=repeat))
                if demo is not None:
                    for name, server in servers.items():
                        figures["runs"].append(dict(measure("demo" + name, server, shas["demo"], demo, DEMO_LAYER,
                                                            args.demo_jobs, args.demo_steps or args.steps,
                                                            args.demo_size, device, args.one_call),
                                                    repeat=repeat))
        finally:
            for server in servers.values():
                server.stop()
    text = report(figures)
    print(text)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def _median(runs: list[dict], key) -> float:
    return statistics.median(key(r) for r in runs)


def report(figures: dict) -> str:
    label = f" ({figures['label']})" if figures.get("label") else ""
    lines = [f"### bench_server_cost.py{label}: {figures['device']}, {figures['date']}, commit {figures['commit']}",
             "",
             f"Single-image jobs, {figures['steps']} steps, each "
             + ("one call (the client's run: CreateAndWatchJob)" if figures.get("one_call") else
                "two calls (CreateJob, then WatchJob to its result)") + f"; tiny = one 3x3 conv at {figures['size']} px, demo = "
             f"EfficientNet-Lite0 `{DEMO_LAYER}`; one server with `--max-step-images` the largest level. Medians of "
             f"{figures['repeats']} run(s); torch threads {figures.get('threads') or 'default'}; each ratio is taken within a run. beyond = (server wall - the device "
             "steps' seconds) / jobs; per phase: ms of self time per job (several threads: they need not add up).",
             "",
             "| model | jobs | size, steps | server wall s | engine s | server / engine | beyond ms/job | images/step | created over s | "
             "last creation -> first start s | last start -> first end s | ends over s | server CPU ms/job | of it the server process | engine CPU ms/job | server / engine CPU | "
             "client CPU ms/job | "
             + " | ".join(PHASE_ORDER) + " |",
             "| --- " * (17 + len(PHASE_ORDER)) + "|"]
    keys = []
    for run in figures["runs"]:
        if (run["label"], run["jobs"]) not in keys:
            keys.append((run["label"], run["jobs"]))
    for name, jobs in keys:
        runs = [r for r in figures["runs"] if (r["label"], r["jobs"]) == (name, jobs)]
        phases = " | ".join(f"{_median(runs, lambda r, p=p: r['phases_ms'][p]):.2f}" for p in PHASE_ORDER)
        lines.append(f"| {name} | {jobs} | {runs[0]['size']} px, {runs[0].get('steps', figures['steps'])} steps | {_median(runs, lambda r: r['wall']):.3f} | "
                     f"{_median(runs, lambda r: r['engine']):.3f} | {_median(runs, lambda r: r['ratio']):.2f}x | "
                     f"{_median(runs, lambda r: r['beyond_ms']):.2f} | {_median(runs, lambda r: r['images_per_step']):.0f}"
                     f" | {_median(runs, lambda r: r.get('created_spread', 0.0)):.2f}"
                     f" | {_median(runs, lambda r: r.get('start_gap', float('nan'))):.3f}"
                     f" | {_median(runs, lambda r: r.get('running', float('nan'))):.2f}"
                     f" | {_median(runs, lambda r: r.get('ended_spread', float('nan'))):.3f}"
                     f" | {_median(runs, lambda r: r.get('server_cpu_ms', float('nan'))):.2f}"
                     f" | {_median(runs, lambda r: r.get('front_cpu_ms', float('nan'))):.2f}"
                     f" | {_median(runs, lambda r: r.get('engine_cpu_ms', float('nan'))):.2f}"
                     f" | {_median(runs, lambda r: r.get('cpu_ratio', float('nan'))):.2f}x"
                     f" | {_median(runs, lambda r: r.get('client_cpu_ms', float('nan'))):.2f} | {phases} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
