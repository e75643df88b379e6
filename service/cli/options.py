"""Options shared by the local and the remote render commands (torch-free)."""

from __future__ import annotations

import argparse

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "parse_floats", "make_preprocess", "verdict_text", "add_transforms_arg",
           "add_schedule_args", "schedule_options", "stopped_text"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_floats(text: str) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"`` -> (0.5, 0.5, 0.5); one value or three."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1 or 3 comma-separated numbers, got {text!r}") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 comma-separated numbers, got {len(values)}")
    return values


def make_preprocess(mean, std, bgr: bool):
    """A :class:`featureviz.importer.Preprocess` from ``--mean``/``--std``/``--bgr`` values (None: ImageNet's); one
    value of either is repeated to match the other."""
    from featureviz.importer import Preprocess

    mean = mean if mean is not None else IMAGENET_MEAN
    std = std if std is not None else IMAGENET_STD
    if len(mean) != len(std):
        if len(mean) == 1:
            mean = mean * len(std)
        elif len(std) == 1:
            std = std * len(mean)
    return Preprocess(mean=mean, std=std, channel_order="BGR" if bgr else "RGB")


def verdict_text(verdict: dict) -> str:
    """``; judge: class 207 rank 1, p 0.930`` (the judge's best class when the image aims at no single class)."""
    if verdict.get("rank") is None:
        best = verdict["top"][0] if verdict.get("top") else None
        return f"; judge's top class {best[0]} (p {best[1]:.3f})" if best else ""
    return f"; judge: class {verdict['target']} rank {verdict['rank']}, p {verdict['probability']:.3f}"


# the engine's named transform stacks (featureviz.engine.transforms.TRANSFORMS; not imported here: no torch at start)
TRANSFORM_CHOICES = ("standard", "composed", "none")


def add_transforms_arg(parser: argparse.ArgumentParser) -> None:
    """``--transforms standard|composed|none`` (default standard)."""
    parser.add_argument("--transforms", choices=TRANSFORM_CHOICES, default="standard",
                        help="robustness transforms (default standard: lucid's pad, jitter, scale, rotate, each "
                             "step its own resample; composed: the same in one resample, cheaper on a CPU)")


def add_schedule_args(parser: argparse.ArgumentParser) -> None:
    """``--schedule``, ``--warmup``, ``--stop-at-plateau`` and ``--plateau-window`` (unset: the engine's defaults)."""
    parser.add_argument("--schedule", choices=("constant", "cosine", "linear"), default=None,
                        help="learning-rate schedule over the steps: constant (default), or a cosine or linear "
                             "decay from --lr to 0")
    parser.add_argument("--warmup", type=int, default=None, metavar="N",
                        help="steps of linear learning-rate warm-up (default 0)")
    parser.add_argument("--stop-at-plateau", type=float, default=None, metavar="GAIN", dest="plateau",
                        help="stop early once the objective's relative gain over the last --plateau-window steps "
                             "(against the window before) is below GAIN, e.g. 0.01 (default: run every step)")
    parser.add_argument("--plateau-window", type=int, default=None, metavar="N",
                        help="steps of each window of --stop-at-plateau (default 32)")


def schedule_options(args: argparse.Namespace) -> dict:
    """The schedule options given on the command line, as RenderSpec / spec_to_proto keywords."""
    names = {"schedule": "lr_schedule", "warmup": "lr_warmup", "plateau": "plateau",
             "plateau_window": "plateau_window"}
    return {key: getattr(args, name) for name, key in names.items() if getattr(args, name, None) is not None}


def stopped_text(stopped_at: int) -> str:
    return f" (stopped at a plateau after step {stopped_at})" if stopped_at else ""
