"""Options shared by the local and the remote render commands and evaluate (torch-free): the job options' flags,
derived from their declaration (:mod:`featureviz.options`), and the preprocessing and judge helpers."""

from __future__ import annotations

import argparse

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "parse_floats", "parse_size", "make_preprocess", "verdict_text",
           "add_option_args", "option_values", "stopped_text", "SIMPLE_TYPES"]

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


# the option types a flag of its own carries; init_image (--init FILE), preprocess (--mean/--std/--bgr) and judge
# (--judge FILE ...) are read from files or several flags by the commands themselves
SIMPLE_TYPES = ("int", "float", "bool", "choice", "size", "dataset")


def parse_size(text: str):
    """``"128"`` -> 128, ``"96x128"`` -> (96, 128)."""
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            return int(h), int(w)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be S or HxW with integers, got {text!r}") from None


_ARG_TYPES = {"int": int, "float": float, "size": parse_size, "dataset": str}


def add_option_args(parser: argparse.ArgumentParser, surface: str, *, defaults: dict | None = None,
                    helps: dict | None = None) -> None:
    """The flags of the job options that ``surface`` offers (``render``, ``evaluate``), from their declaration
    (:data:`featureviz.options.OPTIONS`: flag, type, choices, help, default); each lands in ``args.<option name>``.
    An option the command line sends explicitly defaults to the engine's default, the others to None (unset: the
    engine's). ``defaults`` / ``helps``: a command's own (evaluate renders 8 classes at once)."""
    from featureviz.options import offered

    defaults, helps = defaults or {}, helps or {}
    for option in offered(surface):
        if option.type not in SIMPLE_TYPES:
            continue
        default = defaults.get(option.name, option.default if option.explicit else None)
        shown = defaults.get(option.name, option.default)
        text = helps.get(option.name, option.help)
        if shown is not None and option.type != "bool" and "default" not in text:
            text += f" (default {shown})"
        kwargs = {"dest": option.name, "default": default, "help": text}
        if option.type == "bool":
            kwargs.update(action="store_true", default=False)
        elif option.type == "choice":
            kwargs["choices"] = option.choices
        else:
            kwargs.update(type=_ARG_TYPES[option.type], metavar=option.metavar)
        parser.add_argument(option.flag, **kwargs)


def option_values(args: argparse.Namespace, surface: str, *, engine: bool = False) -> dict:
    """The job options of :func:`add_option_args` given on the command line (or defaulted explicitly), as
    spec_to_proto keywords; with ``engine``, only the engine's (RenderSpec keywords, for a local render)."""
    from featureviz.options import offered

    values = {option.name: getattr(args, option.name, None) for option in offered(surface)
              if option.type in SIMPLE_TYPES and (option.engine or not engine)}
    return {name: value for name, value in values.items() if value is not None and value is not False}


def stopped_text(stopped_at: int) -> str:
    return f" (stopped at a plateau after step {stopped_at})" if stopped_at else ""
