"""The atlas's unit rate on ResNet-50 (issue 24's GPU goal), through a real embedded server, from a timed subset.

One atlas job over every Conv layer of torchvision's ResNet-50 (random weights: the cost does not depend on the
values), the first ``--channels`` channels of each (53 layers x 10 = 530 units by default: a subset spread over
the whole depth), at ``--size`` px for ``--steps`` steps (the timed part: fewer steps than the 512 the goal names,
so the device time stays short). The figure is the units per hour at ``--goal-steps`` steps
(units x steps / goal_steps per wall second, the steps being the cost) and the projected time of every Conv
channel of the model (about 26,500 for ResNet-50: the sum of the Conv layers' channels, read from its catalog).
The goal: all of ResNet-50's conv channels in under 30 minutes on one H100/H200.

    .venv/bin/python bench/bench_atlas_gpu.py [--model resnet50] [--channels 10] [--size 128] [--steps 32]
                                              [--goal-steps 512] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision


def export(name: str, folder: Path) -> Path:
    path = folder / f"{name}.onnx"
    model = getattr(torchvision.models, name)(weights=None).eval()
    torch.onnx.export(model, torch.rand(1, 3, 224, 224), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}}, opset_version=17, dynamo=False)
    return path


def main(argv=None) -> int:
    from featureviz.client import Client
    from featureviz.client import pb
    from featureviz.server import ServerConfig
    from featureviz.server import serve_in_background

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--channels", type=int, default=10, help="the first N channels of every Conv layer")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32, help="steps each unit is timed for")
    parser.add_argument("--goal-steps", type=int, default=512, help="steps of the units the rate is given for")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-atlas-gpu-") as tmp:
        onnx_path = export(args.model, Path(tmp))
        server = serve_in_background(ServerConfig(Path(tmp) / "store", device=args.device, metrics_port=0))
        try:
            with Client(server.address) as fv:
                model = fv.upload(str(onnx_path))
                convs = [layer for layer in fv.layers(model.sha256) if layer.op_type == "Conv"]
                every = sum(layer.channels for layer in convs)
                began = time.perf_counter()
                job = fv.atlas(model.sha256, op_types=["Conv"], channels=args.channels, size=args.size,
                               steps=args.steps, seed=0, wait=True, timeout=None)
                seconds = time.perf_counter() - began
                info = fv.info()
        finally:
            server.stop()
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    atlas = job.result.atlas
    per_hour = atlas.rendered * args.steps / args.goal_steps / seconds * 3600
    projected = every / per_hour * 60
    print(f"### Atlas unit rate ({args.model}, {info.device.name}, {time.strftime('%Y-%m-%d')})\n")
    print(f"`bench/bench_atlas_gpu.py --model {args.model} --channels {args.channels} --size {args.size} "
          f"--steps {args.steps}`: one atlas job over {len(convs)} Conv layers, {atlas.rendered} units rendered, "
          f"max {info.worker.max_step_images} images per device step.\n")
    print("| units | px | steps timed | wall s | device s (units' shares) | units/hour at "
          f"{args.goal_steps} steps | every Conv channel ({every} units) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {atlas.rendered} | {args.size} | {args.steps} | {seconds:.1f} | {atlas.device_seconds:.1f} | "
          f"{per_hour:.0f} | {projected:.1f} min (goal < 30) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
