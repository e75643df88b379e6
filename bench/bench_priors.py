"""Learned priors (issue 25): a picture of what each prior does, and its cost per step against the default.

On the demo model (the zoo's trained EfficientNet-Lite0) and an image set made offline: dead-leaves images
(occluding discs with power-law radii, tests/support/natural.py: piecewise smooth, edges, a ~1/f^2 power
spectrum), written as PNG files. It fits both priors (:func:`featureviz.engine.priors.image_statistics`,
:func:`featureviz.engine.priors.fit_patch_prior`, timed), then renders

1. the patch prior alone (``-prior:leaves``, no model objective): what the prior wants;
2. the same unit four ways: the default, the learned colour and spectrum (``RenderSpec.prior``), the patch prior
   term (``UNIT - W*prior:leaves``), both;

into one grid PNG (``--out``), and times a step of each of the four at ``--size`` (alternating, median of
``--rounds``; ratios against the default in the same run).

    .venv/bin/python bench/bench_priors.py [--steps 128] [--size 128] [--weight 0.5] [--out /tmp/priors.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featureviz.engine import RenderSpec  # noqa: E402
from featureviz.engine import render  # noqa: E402
from featureviz.engine import save_images  # noqa: E402
from featureviz.engine.exemplars import ImageFolder  # noqa: E402
from featureviz.engine.priors import fit_patch_prior  # noqa: E402
from featureviz.engine.priors import image_statistics  # noqa: E402
from featureviz.engine.priors import spectrum_decay  # noqa: E402
from featureviz.spec import parse_objective  # noqa: E402
from step_cost import add_timing_options, apply_threads, demo_model, print_threads, step_costs  # noqa: E402
from tests.support.natural import dead_leaves  # noqa: E402
from tests.support.natural import write_pngs  # noqa: E402


def _colour(images):
    out = []
    for image in images.double():
        c = torch.corrcoef(image.reshape(3, -1))
        out.append(float((c[0, 1] + c[0, 2] + c[1, 2]) / 3))
    return statistics.mean(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="/_blocks.5/_swish/Clip")
    parser.add_argument("--channel", type=int, default=3)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--weight", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--time-size", type=int, default=224)
    parser.add_argument("--out", default="/tmp/featureviz_priors.png")
    add_timing_options(parser)
    args = parser.parse_args()
    apply_threads(args)

    model = demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_pngs(Path(tmp), [dead_leaves(160, seed) for seed in range(args.images)])
        start = time.perf_counter()
        stats = image_statistics(ImageFolder(folder))
        stats_s = time.perf_counter() - start
        start = time.perf_counter()
        prior = fit_patch_prior(ImageFolder(folder))
        fit_s = time.perf_counter() - start
    print(f"image set: {args.images} dead-leaves images, 160 px; statistics {stats_s:.1f} s (decay {stats.decay:.2f}, "
          f"colour matrix {[[round(v, 3) for v in row] for row in stats.color]}); patch prior {fit_s:.1f} s "
          f"({prior.components} components, {prior.patches} patches, {prior.iterations} EM iterations, held-out "
          f"log-likelihood {prior.held_out / prior.dim:.3f} nats per value, training {prior.train / prior.dim:.3f})")

    unit = f"'{args.layer}':{args.channel}"
    priors = {"leaves": prior}
    variants = {
        "default": dict(objective=parse_objective(unit)),
        "learned colour+spectrum": dict(objective=parse_objective(unit), prior=stats),
        f"- {args.weight:g}*prior": dict(objective=parse_objective(f"{unit} - {args.weight:g}*prior:leaves"),
                                         patch_priors=priors),
        "both": dict(objective=parse_objective(f"{unit} - {args.weight:g}*prior:leaves"), prior=stats,
                     patch_priors=priors),
    }
    rows = [render(model, RenderSpec(objective=parse_objective("-prior:leaves"), steps=args.steps, size=args.size,
                                     batch=2, patch_priors=priors)).images]
    print(f"\n| {args.steps} steps, {args.size} px, seed 0 | unit objective | NLL per value | channel correlation "
          f"| spectrum decay |\n| --- | --- | --- | --- | --- |")
    print(f"| prior alone | - | {float(prior.nll(rows[0]).mean()):.2f} | {_colour(rows[0]):.2f} | "
          f"{statistics.mean(spectrum_decay(i) for i in rows[0]):.2f} |")
    for name, kw in variants.items():
        result = render(model, RenderSpec(steps=args.steps, size=args.size, batch=2, **kw))
        unit_only = render(model, RenderSpec(objective=parse_objective(unit), steps=1, size=args.size, batch=2,
                                             init_image=result.images, lr=1e-9))
        rows.append(result.images)
        print(f"| {name} | {statistics.mean(unit_only.objective_start):.3g} | "
              f"{float(prior.nll(result.images).mean()):.2f} | {_colour(result.images):.2f} | "
              f"{statistics.mean(spectrum_decay(i) for i in result.images):.2f} |")
    print(f"| the image set | - | {prior.held_out / -prior.dim:.2f} (held out) | - | {stats.decay:.2f} |")
    files = save_images(torch.cat(rows), args.out, as_grid=True)
    print(f"\nwrote {files[0]} (rows of 2: prior alone, then {', '.join(variants)})")

    step_costs(lambda name, kw: render(model, RenderSpec(steps=args.time_steps, size=args.time_size, batch=1, **kw)),
               variants, rounds=args.rounds, heading=f"{args.time_size} px, batch 1")
    print_threads()
    return 0


if __name__ == "__main__":
    sys.exit(main())
