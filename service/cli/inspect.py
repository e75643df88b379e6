"""``featureviz inspect MODEL.onnx [--json]``: import a model and print its input spec, check and catalog."""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="import an ONNX model and list its input, verification figure and layers",
        description="Import an ONNX vision model (clean up, convert, verify against onnxruntime) and print its "
        "input spec, the verification figure and the layer catalog.",
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="path of the ONNX file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max relative difference (default 1e-3)")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the model cache")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default $FEATUREVIZ_CACHE/models or "
                        "~/.cache/featureviz/models)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:  # `featureviz inspect m.onnx | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args: argparse.Namespace) -> int:
    from featureviz.importer import import_model

    model = import_model(args.model, verify=not args.no_verify, tolerance=args.tolerance,
                         cache_dir=args.cache_dir, use_cache=not args.no_cache)
    if args.json:
        print(json.dumps(model.to_dict()))
        return 0
    spec = model.input_spec
    size = f"{spec.height or '?'}x{spec.width or '?'}"
    print(f"model   {model.sha256[:16]}  ({len(model.layers)} layers, logits: {_printable(model.logits or '-')})")
    print(f"input   {spec.name!r} {spec.layout} {spec.channels} channel(s), {size}, batch {spec.batch or 'dynamic'}, "
          f"default size {spec.default_size[0]}x{spec.default_size[1]}")
    check = model.check
    if check.verified:
        print(f"check   max relative difference from {check.reference}: {check.max_rel_err:.2e} (batch 1: "
              f"{check.max_rel_err_batch1:.2e}, batch {check.batch}: {check.max_rel_err_batch:.2e}), tolerance "
              f"{check.tolerance:g}{', batch rewritten' if check.batch_rewritten else ''}")
    else:
        print("check   not verified")
    width = max((len(_printable(layer.name)) for layer in model.layers), default=4)
    print(f"{'depth':>5}  {'name':<{width}}  {'op':<18} {'shape':<20} notes")
    for layer in model.layers:
        notes = []
        if layer.is_logits:
            notes.append("logits")
        if layer.pre_activation_of:
            notes.append(f"pre-activation of {_printable(layer.pre_activation_of)}")
        if layer.layout == "NHWC":
            notes.append(f"channels last: {layer.channels} channels on axis 3")
        shape = "x".join(str(s) for s in layer.shape)
        name = _printable(layer.name)
        print(f"{layer.depth:>5}  {name:<{width}}  {layer.op_type:<18} {shape:<20} {'; '.join(notes)}")
    return 0


def _printable(name: str) -> str:
    """A name from the file as one line of text: control and format characters (newlines, terminal escapes,
    bidirectional overrides) escaped, so a name cannot rewrite the terminal or forge table rows."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
