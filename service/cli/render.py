"""``featureviz render MODEL.onnx OBJECTIVE [options]``: optimise images for an objective, write PNGs.

Runs the engine locally (CUDA when available, CPU otherwise), or on a featureviz server with ``--server ADDR``
(same options, same ``--json``). The objective syntax and its quoting rule are in ``featureviz.spec``.
"""

from __future__ import annotations

import argparse
import json
import sys

from featureviz.cli.options import IMAGENET_MEAN
from featureviz.cli.options import IMAGENET_STD
from featureviz.cli.options import add_option_args
from featureviz.cli.options import make_preprocess
from featureviz.cli.options import option_values
from featureviz.cli.options import parse_floats
from featureviz.cli.options import stopped_text
from featureviz.cli.options import verdict_text
from featureviz.cli.progress import ProgressBar

__all__ = ["register", "run", "parse_floats"]


_OBJECTIVE_HELP = """\
objective syntax (maximised):
  LAYER:C        channel C of LAYER          LAYER:C@X,Y   neuron at column X, row Y
  LAYER          DeepDream on LAYER          logit:K / prob:K   class K
  keywords: {keywords}   (e.g. '- 0.05*tv')
  -OBJ, 2*OBJ, OBJ / 4, A + B, A - 0.5*B, (A + B) * 2, or a JSON objective spec {...}
quoting: bare names may contain letters, digits and _ . / - # ~ [ ]; quote any other name in '...' or "..."
  (e.g. names with ':'), with \\ escaping a quote: 'conv1/Relu:0':5. Set '+', '-' and '/' between objectives
  off with spaces: 'A:1 - B:2' (A:1-B is not a subtraction when B is a name).
"""


def _objective_help() -> str:
    from featureviz.spec import keyword_forms  # the keywords of the declared kinds

    return _OBJECTIVE_HELP.replace("{keywords}", ", ".join(keyword_forms()))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "render",
        help="optimise images that maximise a neuron, channel, layer or class of an ONNX model",
        description="Feature visualization by optimization: optimise images so that OBJECTIVE is maximal, and "
        "write them as PNG.",
        epilog=_objective_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="path of the ONNX file")
    parser.add_argument("objective", metavar="OBJECTIVE",
                        help="what to maximise (syntax below); it may start with '-' (a negated objective)")
    parser.dash_positionals = True  # featureviz.cli.main lets OBJECTIVE start with '-' ("-LAYER:5")
    add_option_args(parser, "render")  # steps, lr, size, batch, seed, param, decay, transforms, schedule ...
    parser.add_argument("--init", default=None, metavar="IMAGE", help="start from this image file")
    parser.add_argument("--prior-images", default=None, metavar="[NAME=]DIR",
                        help="learn priors from this folder of images (local renders): its colour matrix and spectrum "
                             "decay replace ImageNet's in the parameterization, and 'prior:NAME' objective terms use "
                             "its patch prior (NAME: the folder's name unless given); both cached under the model "
                             "cache's priors/")
    parser.add_argument("--match-images", default=None, metavar="[NAME=]DIR",  # exemplar matching
                        help="'match:LAYER:C@NAME' objective terms (local renders) match the unit's top examples in "
                             "this folder of images (NAME: the folder's name unless given); indexed once, cached "
                             "under the model cache's exemplars/")
    parser.add_argument("--mean", type=parse_floats, default=None, metavar="R,G,B",
                        help=f"model preprocessing mean for images in [0, 1] (default ImageNet's "
                             f"{','.join(map(str, IMAGENET_MEAN))})")
    parser.add_argument("--std", type=parse_floats, default=None, metavar="R,G,B",
                        help=f"model preprocessing std (default ImageNet's {','.join(map(str, IMAGENET_STD))})")
    parser.add_argument("--bgr", action="store_true", help="the model takes BGR channel order")
    parser.add_argument("--out", default="featureviz.png", metavar="OUT.png",
                        help="output file; a batch writes OUT_0.png, OUT_1.png ... unless --grid")
    parser.add_argument("--grid", action="store_true", help="write a batch as one grid image")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=_positive, default=None, metavar="N",
                        help="CPU threads for a local render (default: torch's, one per core); on a busy machine "
                             "fewer threads than cores is often faster")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: objective_start, objective_end, seconds_per_step, files ...")
    from featureviz.cli.evaluate import add_judge_args
    from featureviz.cli.remote import add_connection_args

    add_judge_args(parser)
    # --- generator (issue 25)
    parser.add_argument("--generator", default=None, metavar="GEN.onnx",
                        help="with --param generator: an ONNX generator (a latent vector in, an image out) whose "
                             "latents are optimised instead of pixels (uploaded with --server)")
    parser.add_argument("--latent-l2", dest="latent_l2", type=float, default=None, metavar="X",
                        help="with --generator: subtract X * |z|^2 per image from the objective (default 0)")

    # --server ADDR renders on a featureviz server instead of locally; --token and --tls-ca go with it
    add_connection_args(parser, server_default=False)
    parser.set_defaults(func=run)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _preprocess(args):
    return make_preprocess(args.mean, args.std, args.bgr)


def prior_cache_dir():
    """Where ``--prior-images`` caches what it learns: the model cache folder (``priors/`` below it)."""
    from featureviz.importer.cache import default_cache_dir

    return default_cache_dir()


def _priors(text: str, channels: int) -> dict:
    """``--prior-images [NAME=]DIR`` -> the RenderSpec's ``prior`` (the folder's statistics) and ``patch_priors``
    (``prior:NAME`` -> its patch prior, fitted on first use). The statistics are computed here, before the render."""
    import os

    from featureviz.engine.priors import FolderPriors

    name, sep, folder = text.partition("=")
    if not sep or not name or os.sep in name:
        folder = text
        name = os.path.basename(os.path.normpath(text)) or "images"
    priors = FolderPriors({name: folder}, cache_dir=prior_cache_dir(), channels=channels)
    return {"prior": priors.stats(name), "patch_priors": priors}


def run(args: argparse.Namespace) -> int:
    if args.server:
        from featureviz.cli.remote import render_remote

        if args.prior_images:
            print("featureviz render: --prior-images applies to a local render; on a server, upload the folder "
                  "(featureviz datasets upload DIR) and give --prior DATASET (and prior:DATASET terms)",
                  file=sys.stderr)
            return 2
        if getattr(args, "match_images", None):  # exemplar matching
            print("featureviz render: --match-images applies to a local render; on a server a match term names "
                  "an exemplar index id (featureviz exemplars ... --server)", file=sys.stderr)
            return 2
        if args.threads is not None:
            print("featureviz render: --threads applies to a local render; a server sets its own "
                  "(featureviz serve --threads)", file=sys.stderr)
            return 2
        return render_remote(args)

    if args.prior_dataset:
        print("featureviz render: --prior DATASET names a server's dataset (with --server); locally give "
              "--prior-images DIR", file=sys.stderr)
        return 2

    import torch

    from featureviz.engine import RenderSpec
    from featureviz.engine import load_image
    from featureviz.engine import render
    from featureviz.engine import save_images
    from featureviz.engine import validate
    from featureviz.importer import import_model
    from featureviz.spec import parse_objective

    objective = parse_objective(args.objective)  # syntax errors before the (slow) import
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preprocess = _preprocess(args)
    model = import_model(args.model)
    model = model.with_preprocess(preprocess)
    size = args.size if args.size is not None else tuple(model.input_spec.default_size)
    init = None
    if args.init:
        hw = (size, size) if isinstance(size, int) else size
        init = load_image(args.init, hw)
    options = option_values(args, "render", engine=True) | {"size": size}
    if args.generator:  # --- generator (issue 25): imported like a model; the engine checks it against the model
        options |= {"generator": import_model(args.generator), "latent_l2": args.latent_l2 or 0.0}
    if args.prior_images:
        options |= _priors(args.prior_images, model.input_spec.channels)
    if args.match_images:  # exemplar matching: match:L:C@NAME terms resolve against the folder
        from featureviz.cli.matching import local_match_targets

        options["match_targets"] = local_match_targets(args.match_images, model)
    spec = RenderSpec(objective=objective, init_image=init, preprocess=model.input_spec.preprocess, device=args.device,
                      **options)
    checked = validate(model, spec)  # render takes the checked spec as it is (no second check)

    bar = ProgressBar()  # no label: silent unless stderr is a terminal
    try:
        result = render(model, checked, progress=lambda step, total, values: bar.update(
            step, total, f"objective {float(values.mean()):.4g}" if bar.enabled else ""))
    finally:
        bar.close()
    files = save_images(result.images, args.out, as_grid=args.grid)
    verdicts = None
    if args.judge:
        from featureviz.cli.evaluate import judge_preprocess
        from featureviz.cli.evaluate import judge_result
        from featureviz.cli.evaluate import load_judges

        (judge,) = load_judges([args.judge], judge_preprocess(args)).values()
        verdicts = judge_result(judge, spec, result.images, device=args.device)
    if args.json:
        print(json.dumps({
            "objective": result.objective,
            "objective_start": result.objective_start,
            "objective_end": result.objective_end,
            "seconds_per_step": result.seconds_per_step,
            "phase_seconds": result.phase_seconds,
            "steps": result.steps_done,
            "stopped_at": result.stopped_at,
            "size": list(result.images.shape[-2:]),
            "batch": result.images.shape[0],
            "seed": args.seed,
            "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "threads": torch.get_num_threads(),
            "memory_format": result.memory_format,
            "files": [str(p) for p in files],
            **({"judge": verdicts} if verdicts is not None else {}),
        }))
    else:
        for i, (a, b) in enumerate(zip(result.objective_start, result.objective_end)):
            print(f"image {i}: objective {a:.4g} -> {b:.4g}{verdict_text(verdicts[i]) if verdicts else ''}")
        print(f"{result.steps_done} steps{stopped_text(result.stopped_at)}, {result.seconds_per_step:.3f} s/step; "
              f"wrote {', '.join(map(str, files))}")
    return 0

