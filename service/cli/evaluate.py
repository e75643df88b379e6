"""``featureviz evaluate MODEL.onnx --judge J.onnx --classes 1,2,3``: how well a model's class visualizations
transfer to other classifiers, and the judge options of ``featureviz render``.

Transferability (Fel et al. 2023, MaCo): render the class visualization of each class on MODEL, show each image
to one or more independently trained classifiers (the judges) and count how often they name the class (top-1)
or rank it among their best five (top-5). Also reported per image: the judge's probability of the class, the
final logit on MODEL, and colour and spectrum statistics (:mod:`featureviz.engine.quality`). This is the
measurement of ``bench/bench_quality.py``, on your own models and classes.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register", "add_judge_args", "judge_preprocess", "load_judges", "judge_result", "run"]


def add_judge_args(parser: argparse.ArgumentParser, *, repeat: bool = False) -> None:
    """``--judge J.onnx`` (repeatable when ``repeat``), ``--judge-mean``, ``--judge-std``, ``--judge-bgr``."""
    from featureviz.cli.options import IMAGENET_MEAN
    from featureviz.cli.options import parse_floats

    parser.add_argument("--judge", action="append" if repeat else "store", default=[] if repeat else None,
                        metavar="JUDGE.onnx",
                        help="a classifier with the same classes that scores each class image: the rank of the "
                             "target class (1 = its top class) and its probability" +
                             (" (repeat for several judges)" if repeat else ""))
    parser.add_argument("--judge-mean", type=parse_floats, default=None, metavar="R,G,B",
                        help=f"the judge's preprocessing mean (default ImageNet's {','.join(map(str, IMAGENET_MEAN))})")
    parser.add_argument("--judge-std", type=parse_floats, default=None, metavar="R,G,B",
                        help="the judge's preprocessing std (default ImageNet's)")
    parser.add_argument("--judge-bgr", action="store_true", help="the judge takes BGR channel order")


def judge_preprocess(args: argparse.Namespace):
    from featureviz.cli.options import make_preprocess

    return make_preprocess(args.judge_mean, args.judge_std, args.judge_bgr)


def load_judges(paths, preprocess) -> dict:
    """``{file name: ImportedModel}`` of the judge files, each with ``preprocess``; refuses a judge without logits."""
    from pathlib import Path

    from featureviz.errors import InvalidSpec
    from featureviz.importer import import_model

    judges = {}
    for path in paths:
        judge = import_model(path).with_preprocess(preprocess)
        if not judge.logits:
            raise InvalidSpec("judge", f"{Path(path).name} has no logits output: a judge must be a classifier")
        name = Path(path).stem
        judges[name if name not in judges else f"{name}#{len(judges)}"] = judge
    return judges


def judge_result(judge, spec, images, *, device=None) -> list[dict]:
    """The judge's verdict on each image of a render of ``spec`` (class targets read from its objective)."""
    from featureviz.engine.quality import class_targets
    from featureviz.engine.quality import judge_images

    targets = class_targets(spec.objective, images.shape[0])
    return [s.to_dict() for s in judge_images(judge, images, targets, device=device)]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="render class visualizations and measure how well other classifiers (judges) recognise them",
        description="Render the class visualization (logit) of each class on MODEL, then let each judge classify "
        "the images: per class and seed the judge's rank of the class and its probability; overall top-1 and "
        "top-5 transfer, the final logit and colour/spectrum statistics.",
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="the model whose classes are visualized")
    parser.add_argument("--classes", required=True, metavar="K,K,...",
                        help="class indices, comma-separated (ranges A-B allowed)")
    parser.add_argument("--seeds", default="0", metavar="S,S,...", help="seeds (default 0)")
    parser.add_argument("--objective", choices=("logit", "prob"), default="logit",
                        help="what each image maximises (default logit)")
    from featureviz.cli.options import add_option_args

    add_option_args(parser, "evaluate", defaults={"batch": 8}, helps={  # steps, lr, size, param, decay, transforms
        "batch": "classes rendered together in one optimisation (default 8; each image has its own class and "
                 "transforms)"})
    parser.add_argument("--mean", type=_floats, default=None, metavar="R,G,B", help="MODEL's preprocessing mean")
    parser.add_argument("--std", type=_floats, default=None, metavar="R,G,B", help="MODEL's preprocessing std")
    parser.add_argument("--bgr", action="store_true", help="MODEL takes BGR channel order")
    add_judge_args(parser, repeat=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads")
    parser.add_argument("--out", default=None, metavar="DIR", help="also write the images (PNG) into DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _floats(text):
    from featureviz.cli.options import parse_floats

    return parse_floats(text)


def _ints(text: str, what: str) -> list[int]:
    """``"1,5,10-12"`` -> [1, 5, 10, 11, 12]."""
    out = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, sep, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
    except ValueError:
        raise SystemExit(f"featureviz evaluate: {what} must be integers >= 0 or ranges A-B, got {text!r}") from None
    if not out:
        raise SystemExit(f"featureviz evaluate: no {what} given")
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from featureviz.cli.options import make_preprocess
    from featureviz.cli.options import option_values
    from featureviz.engine.quality import evaluate_classes
    from featureviz.importer import import_model

    classes = _ints(args.classes, "classes")
    seeds = _ints(args.seeds, "seeds")
    if not args.judge:
        print("featureviz evaluate: give at least one --judge JUDGE.onnx", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model = import_model(args.model).with_preprocess(make_preprocess(args.mean, args.std, args.bgr))
    judges = load_judges(args.judge, judge_preprocess(args))
    report = evaluate_classes(model, judges, classes, seeds, objective=args.objective, device=args.device,
                              progress=None if args.json else _progress, **option_values(args, "evaluate", engine=True))
    images = report.pop("images")
    report["transforms"] = args.transforms
    if args.out:
        from pathlib import Path

        from featureviz.engine import save_images

        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        for record, image in zip(report["records"], images):
            save_images(image[None], folder / f"class{record['class']}_seed{record['seed']}.png")
    if args.json:
        print(json.dumps(report))
        return 0
    names = list(judges)
    print(f"{'class':>6} {'seed':>4} {'logit':>8}  " + "  ".join(f"{n[:18]:>18}" for n in names))
    for r in report["records"]:
        cells = [f"rank {j['rank']:>4} p {j['probability']:.3f}" for j in (r["judges"][n] for n in names)]
        print(f"{r['class']:>6} {r['seed']:>4} {r['activation']:>8.3f}  " + "  ".join(f"{c:>18}" for c in cells))
    for name, s in report["summary"]["judges"].items():
        print(f"{name}: top-1 {s['top1']}/{s['images']}, top-5 {s['top5']}/{s['images']}, mean probability "
              f"{s['mean_probability']:.3f}, median rank {s['median_rank']}")
    st = report["summary"]["statistics"]
    print("images: " + ", ".join(f"{k} {v:.3f}" for k, v in st.items()) +
          f"; final logit {report['summary']['activation']:.3f}; {report['seconds']:.1f} s")
    return 0


def _progress(done: int, total: int) -> None:
    print(f"rendered {done}/{total} images", file=sys.stderr)
