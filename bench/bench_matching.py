"""Exemplar matching (VITAL, ICCV 2025; issue 25 item 4): a unit rendered with and without the ``match`` term.

On the demo model (the zoo's trained EfficientNet-Lite0) and the demo dataset (``featureviz.demo.images``: the
scikit-image photos and crops, written as PNG files), it builds an exemplar index of the unit's layer
(:func:`featureviz.engine.exemplars.build_index`), takes the unit's top-k images as targets
(:func:`featureviz.engine.matching.index_targets`: whole images at the render size, sorted features per channel),
renders the unit ``--seeds`` times (one batch, each image its own random start) with the plain channel objective and
with ``UNIT - W*match:UNIT@demo`` for each weight W, and measures on each final image (pads and resize only, no
random transforms, as ``RenderResult.objective_start``):

- the match distance: the mean over channels of the squared 1-D Wasserstein-2 distance between the image's sorted
  features at the layer and the exemplars' (the term's own value; should fall);
- the channel's activation (the spatial mean: the render's objective; the cost of matching);

with the exemplar images themselves as the reference, and the cost per step (median of ``--rounds``, ratio against
the plain render in the same run). A grid PNG (``--out``): the top exemplars, the plain renders, the matched ones.

    .venv/bin/python bench/bench_matching.py [--steps 128] [--size 128] [--weights 1,10] [--seeds 4]
        [--out docs/matching.png]
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

from featureviz.demo.images import write_dataset  # noqa: E402
from featureviz.engine import RenderSpec  # noqa: E402
from featureviz.engine import render  # noqa: E402
from featureviz.engine import save_images  # noqa: E402
from featureviz.engine.exemplars import ImageFolder  # noqa: E402
from featureviz.engine.exemplars import build_index  # noqa: E402
from featureviz.engine.images import decode_image  # noqa: E402
from featureviz.engine.matching import index_targets  # noqa: E402
from featureviz.spec import parse_objective  # noqa: E402
from step_cost import add_timing_options, apply_threads, demo_model, print_threads, step_costs  # noqa: E402


def _stats(values) -> str:
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} ± {sd:.2g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="/_blocks.5/_swish/Clip")
    parser.add_argument("--channel", type=int, default=3)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--weights", default="1,10", help="the match term's weights, comma separated")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", default="/tmp/featureviz_matching.png")
    add_timing_options(parser)
    args = parser.parse_args()
    apply_threads(args)

    model = demo_model(verify=False)
    layer = model.layer(args.layer).name
    size = (args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        images = write_dataset(Path(tmp) / "demo")
        source = ImageFolder(Path(tmp) / "demo")
        start = time.perf_counter()
        index = build_index(model, source, layers=[layer], k=max(args.k, 8), size=size, batch_size=8, workers=1)
        index_s = time.perf_counter() - start
        start = time.perf_counter()
        targets = index_targets(model, index, source.read, layer=layer, channel=args.channel, k=args.k,
                                match_layer=layer, size=size)
        targets_s = time.perf_counter() - start
        top = index.exemplars(layer, args.channel, "max", args.k)
        exemplars = torch.stack([decode_image(source.read(e.image), size) for e in top])
    print(f"demo dataset: {len(images)} images; index of {layer} at {args.size} px in {index_s:.1f} s; targets of "
          f"{layer}:{args.channel} from its top {len(top)} images in {targets_s:.2f} s "
          f"({targets.channels} channels x {targets.values.shape[1]} values)")

    def resolver(term, **kw):
        return targets

    unit = f"'{layer}':{args.channel}"
    match = f"match:'{layer}':{args.channel}@demo"
    if args.k != 8:
        match = ('{"match": {"layer": "%s", "channel": %d, "index": "demo", "k": %d}}'
                 % (layer, args.channel, args.k))

    def measure(batch):
        """(match distance, channel activation) per image, pads and resize only."""
        values = []
        for text in (match, unit):
            result = render(model, RenderSpec(objective=parse_objective(text), steps=1, size=args.size,
                                              batch=batch.shape[0], init_image=batch, lr=1e-9, match_targets=resolver))
            values.append(result.objective_start)
        return values

    weights = [float(w) for w in args.weights.split(",") if w.strip()]
    variants = {"plain": unit} | {f"- {w:g}*match": f"{unit} - {w:g}*{match}" for w in weights}
    rows = [exemplars[:args.seeds]]
    reference = measure(exemplars)
    print(f"\n| {args.steps} steps, {args.size} px, {args.seeds} images (own random starts) | match distance "
          f"(mean ± sd) | channel activation (mean ± sd) |\n| --- | --- | --- |")
    print(f"| the top-{len(top)} exemplars themselves | {_stats(reference[0])} | {_stats(reference[1])} |")
    for name, text in variants.items():
        result = render(model, RenderSpec(objective=parse_objective(text), steps=args.steps, size=args.size,
                                          batch=args.seeds, match_targets=resolver))
        rows.append(result.images)
        distance, activation = measure(result.images)
        print(f"| {name} | {_stats(distance)} | {_stats(activation)} |")
    files = save_images(torch.cat(rows), args.out, as_grid=True)
    print(f"\nwrote {files[0]} (rows of {args.seeds}: top exemplars, {', '.join(variants)})")

    step_costs(lambda name, text: render(model, RenderSpec(objective=parse_objective(text), steps=args.time_steps,
                                                           size=args.size, batch=1, match_targets=resolver)),
               variants, rounds=args.rounds, heading=f"{args.size} px, batch 1")
    print_threads()
    return 0


if __name__ == "__main__":
    sys.exit(main())
