"""The batched engine's device step alone (no server), one job against many, under engine settings, in one run.

For each setting (the default; channels_last activations; cuDNN's benchmark mode; both) and each level of
concurrent single-image jobs, the wall time of a device step (no synchronisation inside it; one at the end of
the timed steps), the time per image-step, and the throughput ratio against the one-job step of the same
setting. This is the device part of issue 9's goal (64 concurrent 224-px jobs >= 20x one at a time) without the
server's per-job costs (admission, results, events), which bench_batching.py includes.

    python bench/bench_engine_variants.py [--levels 1,64] [--size 224] [--steps 16] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = "/_blocks.4/_swish/Clip"
VARIANTS = {
    "default": dict(layout="auto", benchmark=False),
    "channels_last": dict(layout="channels_last", benchmark=False),
    "cudnn.benchmark": dict(layout="auto", benchmark=True),
    "channels_last + cudnn.benchmark": dict(layout="channels_last", benchmark=True),
}


def step_ms(model, jobs: int, size: int, steps: int, device, variant: dict) -> float:
    import torch

    from featureviz.engine import RenderSpec
    from featureviz.engine.batch import BatchEngine
    from featureviz.engine.batch import Slot

    os.environ["FEATUREVIZ_MEMORY_FORMAT"] = variant["layout"]
    torch.backends.cudnn.benchmark = variant["benchmark"]
    engine = BatchEngine(device)
    slots = [Slot(model, RenderSpec(objective={"channel": {"layer": LAYER, "channel": 7}}, steps=steps + 3,
                                    size=size, seed=i, relu_warmup=0), device=device) for i in range(jobs)]
    engine.join(slots)
    for _ in range(3):  # warm-up: kernels, the layout probe, cuDNN's search
        engine.step(slots)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    began = time.perf_counter()
    for _ in range(steps):
        engine.step(slots)
    engine.flush()
    sync()
    seconds = (time.perf_counter() - began) / steps
    engine.drop(slots)
    return seconds * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,64")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from featureviz import zoo
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_batching import device_name

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = import_model(zoo.efficientnet_lite0(dynamic_size=True),
                         preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS))
    levels = [int(n) for n in args.levels.split(",")]
    lines = [f"### bench_engine_variants.py: {device_name(args.device)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "",
             f"EfficientNet-Lite0 to `{LAYER}`, {args.size} px, single-image jobs, {args.steps} timed steps; "
             "ratio = image-steps per second at that level / at 1 job, same setting.",
             "",
             "| setting | jobs | step ms | ms per image-step | ratio vs 1 job |",
             "| --- | --- | --- | --- | --- |"]
    for name in args.variants.split(","):
        variant = VARIANTS[name]
        solo = None
        for jobs in levels:
            try:
                ms = step_ms(model, jobs, args.size, args.steps, device, variant)
            except Exception as exc:  # a setting that fails is a figure too
                lines.append(f"| {name} | {jobs} | failed: {type(exc).__name__}: {str(exc)[:80]} | | |")
                continue
            solo = ms if jobs == 1 else solo
            ratio = f"{solo / (ms / jobs):.2f}x" if solo else ""
            lines.append(f"| {name} | {jobs} | {ms:.2f} | {ms / jobs:.3f} | {ratio} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
