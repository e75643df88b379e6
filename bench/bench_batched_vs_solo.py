"""How far a batched job lands from its solo run: final objectives over seeds and objective kinds, on the real
EfficientNet-Lite0.

For each objective kind and seed the same RenderSpec runs twice: solo (``render``, the one-slot case) and batched
(every kind and seed as slots of one BatchEngine, all stepping together in one forward and backward). Adam
amplifies rounding differences, so the two trajectories part after a few steps: what is compared is the
distribution over seeds. Per kind: the mean final objective solo and batched, the mean and largest per-seed
difference relative to the kind's mean solo value, and the paired difference in units of its standard error.

    .venv/bin/python bench/bench_batched_vs_solo.py [--seeds 8] [--steps 64] [--size 96] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MID = "/_blocks.4/_swish/Clip"  # a ReLU6 output: a neuron there saturates at 6, so neurons read a conv output
MID_PRE = "/_blocks.4/_expand_conv/Conv"
LATE = "/_blocks.12/_project_conv/Conv"
KINDS = {
    "channel": {"channel": {"layer": MID, "channel": 5}},
    "neuron": {"neuron": {"layer": MID_PRE, "channel": 9}},
    "late channel": {"channel": {"layer": LATE, "channel": 11}},
    "logit": {"logit": {"index": 1}},
}


def measure(model, kinds: dict, seeds: list[int], steps: int, size: int, device: str = "cpu") -> dict:
    """{kind: {"solo": [final objective per seed], "batched": [...]}} (mean over the job's images)."""
    import torch

    from featureviz.engine import RenderSpec
    from featureviz.engine import render
    from featureviz.engine.batch import BatchEngine
    from featureviz.engine.batch import Slot

    dev = torch.device(device)

    def spec(objective, seed):
        return RenderSpec(objective=objective, steps=steps, size=size, seed=seed, device=device)

    out = {kind: {"solo": [], "batched": []} for kind in kinds}
    for kind, objective in kinds.items():
        for seed in seeds:
            out[kind]["solo"].append(statistics.fmean(render(model, spec(objective, seed)).objective_end))
    engine = BatchEngine(dev)
    slots = [Slot(model, spec(objective, seed), device=dev, handle=(kind, seed))
             for kind, objective in kinds.items() for seed in seeds]
    engine.join(slots)
    for _ in range(steps):
        engine.step(slots)
    for slot, result in zip(slots, engine.finish(slots)):
        out[slot.handle[0]]["batched"].append(statistics.fmean(result["objective_end"]))
    return out


def summarize(figures: dict) -> dict:
    """Per kind: solo and batched means, mean |diff| and max |diff| relative to |mean solo|, paired t."""
    rows = {}
    for kind, runs in figures.items():
        solo, batched = runs["solo"], runs["batched"]
        diffs = [b - s for s, b in zip(solo, batched)]
        scale = abs(statistics.fmean(solo)) or 1.0
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        rows[kind] = {
            "solo_mean": statistics.fmean(solo), "batched_mean": statistics.fmean(batched),
            "solo_sd": statistics.stdev(solo) if len(solo) > 1 else 0.0,
            "mean_rel": statistics.fmean(abs(d) for d in diffs) / scale, "max_rel": max(abs(d) for d in diffs) / scale,
            "mean_shift_rel": statistics.fmean(diffs) / scale,
            "t": statistics.fmean(diffs) / (sd / math.sqrt(len(diffs))) if sd > 0 else 0.0,
            "identical": sum(d == 0 for d in diffs), "n": len(diffs),
        }
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)

    from featureviz import zoo
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_batching import device_name

    model = import_model(zoo.efficientnet_lite0(dynamic_size=True),
                         preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS))
    rows = summarize(measure(model, KINDS, list(range(args.seeds)), args.steps, args.size, args.device))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    lines = [f"### bench_batched_vs_solo.py: {device_name(args.device)}, commit {commit}", "",
             f"EfficientNet-Lite0 (dynamic size), {args.size} px, {args.steps} steps, seeds 0..{args.seeds - 1}; "
             f"batched = all {len(KINDS) * args.seeds} jobs as slots of one device step. Relative to |mean solo|.",
             "", "| kind | mean solo | sd solo | mean batched | mean shift | mean abs diff | max abs diff | paired t "
                 "| identical |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {r['solo_mean']:.4f} | {r['solo_sd']:.4f} | {r['batched_mean']:.4f} | "
                     f"{r['mean_shift_rel']:+.2%} | {r['mean_rel']:.2%} | {r['max_rel']:.2%} | {r['t']:+.2f} | "
                     f"{r['identical']}/{r['n']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
