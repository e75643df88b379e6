"""Start-up of a cached model: ``featureviz inspect MODEL.onnx`` (a cache hit) against ``python -c "import torch"``.

Both are whole processes of the project's interpreter, run alternately (torch, inspect, torch, ...) so background
load hits both alike; medians are reported, with the CPU model. The model is imported once first (the cache
miss), so every timed ``inspect`` is a hit. Goal (issue 11): inspect within 1.3x of importing torch.

    .venv/bin/python bench/bench_startup.py                     # the zoo's EfficientNet-Lite0, 7 runs each
    .venv/bin/python bench/bench_startup.py --model m.onnx --runs 11
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path



def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="ONNX file (default: the zoo's EfficientNet-Lite0)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from featureviz import zoo

        model = str(zoo.efficientnet_lite0())
    featureviz = str(Path(sys.executable).parent / "featureviz")
    subprocess.run([featureviz, "inspect", model], check=True, stdout=subprocess.DEVNULL)  # the miss, if any
    commands = {"import torch": [sys.executable, "-c", "import torch"], "featureviz inspect": [featureviz, "inspect",
                                                                                               model]}
    for cmd in commands.values():  # warm the page cache
        timed(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    load = [os.getloadavg()[0]]
    for _ in range(args.runs):
        for name, cmd in commands.items():
            times[name].append(timed(cmd))
    load.append(os.getloadavg()[0])
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{cpu_model()}, {os.cpu_count()} cores, load {load[0]:.1f} -> {load[1]:.1f}, {args.runs} runs each")
    for name, t in times.items():
        print(f"{name:20s} median {med[name]:.2f} s  ({', '.join(f'{x:.2f}' for x in t)})")
    print(f"ratio inspect / import torch: {med['featureviz inspect'] / med['import torch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
