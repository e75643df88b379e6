"""The generator parameterization (issue 25): a unit rendered through a trained generator against fft, and the cost
of a step of each.

On the demo model (the zoo's trained EfficientNet-Lite0) and a generator trained here (bench/train_generator.py: a
VAE decoder on 32x32 patches of scikit-image's photos, latent 64, Sigmoid output), it renders the same unit with
``param="fft"`` and with ``param="generator"`` (the generator's 32x32 image resized to the render size; the same
steps, seeds, transforms), writes both rows into one grid PNG (``--out``: row 1 fft, row 2 the generator), prints the
objective each reached, then times a step of each at ``--time-size`` (alternating, median of ``--rounds``; the
ratio against fft in the same run).

    .venv/bin/python bench/train_generator.py --out /tmp/featureviz_generator.onnx
    .venv/bin/python bench/bench_generator.py --generator /tmp/featureviz_generator.onnx [--out docs/generator.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featureviz.engine import RenderSpec  # noqa: E402
from featureviz.engine import render  # noqa: E402
from featureviz.engine import save_images  # noqa: E402
from featureviz.importer import import_model  # noqa: E402
from featureviz.spec import parse_objective  # noqa: E402
from step_cost import add_timing_options, apply_threads, demo_model, print_threads, step_costs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="/tmp/featureviz_generator.onnx")
    parser.add_argument("--layer", default="/_blocks.5/_swish/Clip")
    parser.add_argument("--channel", type=int, default=3)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--gen-lr", type=float, default=0.05, help="the generator's learning rate (latents)")
    parser.add_argument("--latent-l2", type=float, default=0.0)
    parser.add_argument("--time-size", type=int, default=224)
    parser.add_argument("--out", default="/tmp/featureviz_generator.png")
    add_timing_options(parser)
    args = parser.parse_args()
    apply_threads(args)

    model = demo_model()
    generator = import_model(args.generator)
    info = generator.generator
    print(f"generator {Path(args.generator).name}: latent {info.latent}, {info.channels}x{info.height}x{info.width}, "
          f"range {info.low:g}..{info.high:g} ({info.last_op})")
    unit = parse_objective(f"'{args.layer}':{args.channel}")
    variants = {"fft": dict(param="fft"),
                "generator": dict(param="generator", generator=generator, lr=args.gen_lr, latent_l2=args.latent_l2)}
    rows = []
    print(f"\n| {args.steps} steps, {args.size} px, seeds 0..{args.batch - 1} | objective start | objective end |\n"
          "| --- | --- | --- |")
    for name, kw in variants.items():
        result = render(model, RenderSpec(objective=unit, steps=args.steps, size=args.size, batch=args.batch, **kw))
        rows.append(result.images)
        start, end = statistics.mean(result.objective_start), statistics.mean(result.objective_end)
        print(f"| {name} | {start:.3g} | {end:.3g} |")
    files = save_images(torch.cat(rows), args.out, as_grid=True)
    print(f"\nwrote {files[0]} (rows of {args.batch}: fft, then the generator)")

    step_costs(lambda name, kw: render(model, RenderSpec(objective=unit, steps=args.time_steps, size=args.time_size,
                                                         batch=1, **kw)),
               variants, rounds=args.rounds, heading=f"{args.time_size} px, batch 1")
    print_threads()
    return 0


if __name__ == "__main__":
    sys.exit(main())
