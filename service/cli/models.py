"""``featureviz models upload|list|layers|delete``: manage the models of a featureviz server."""

from __future__ import annotations

import argparse
import json
import os
import sys

from featureviz.cli.remote import add_connection_args
from featureviz.cli.remote import client_command
from featureviz.cli.remote import connect

__all__ = ["register", "model_ref"]


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="upload, list, inspect and delete models on a server")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    up = actions.add_parser("upload", help="upload an ONNX file (chunked, resumable; known bytes are not re-sent)")
    up.add_argument("file", help="the .onnx file")
    up.add_argument("--name", help="display name (default: the file name)")
    up.add_argument("--json", action="store_true", help="print the model as JSON")
    up.set_defaults(func=_upload)

    ls = actions.add_parser("list", help="list the models")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    lay = actions.add_parser("layers", help="the layer catalog of a model")
    lay.add_argument("model", help="sha256, models/<sha256>, or the .onnx file itself")
    lay.add_argument("--filter", default="", help="substring of the name, an alias or the op type")
    lay.add_argument("--spatial-only", action="store_true", help="only layers with a spatial activation map")
    lay.add_argument("--json", action="store_true")
    lay.set_defaults(func=_layers)

    rm = actions.add_parser("delete", help="delete a model")
    rm.add_argument("model", help="sha256, models/<sha256>, or the .onnx file itself")
    rm.set_defaults(func=_delete)

    for sub in (up, ls, lay, rm):
        add_connection_args(sub)


def model_ref(text: str) -> str:
    """A model argument: an existing file means its sha256; anything else is passed as the name."""
    if os.path.isfile(text):
        from featureviz.client import file_sha256

        return file_sha256(text)[0]
    return text


def _to_dict(message) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@client_command
def _upload(args: argparse.Namespace) -> int:
    from featureviz.cli.progress import ProgressBar

    bar = ProgressBar(f"upload {os.path.basename(args.file)}")
    with connect(args) as fv:
        model = fv.upload(args.file, name=args.name, progress=lambda done, total: bar.update(done, total, "bytes"))
    if args.json:
        print(json.dumps(_to_dict(model), indent=2))
    else:
        note = " (already on the server)" if model.deduplicated else ""
        print(f"{model.name}{note}\n  {model.display_name}: {model.layer_count} layers, input "
              f"{model.input_spec.channels}x{model.input_spec.default_height}x{model.input_spec.default_width}, "
              f"logits {model.logits_layer or '-'}, max relative error vs onnxruntime {model.check.max_rel_err:.2g}")
    return 0


@client_command
def _list(args: argparse.Namespace) -> int:
    with connect(args) as fv:
        models = list(fv.models())
    if args.json:
        print(json.dumps([_to_dict(m) for m in models], indent=2))
        return 0
    for m in models:
        print(f"{m.sha256}  {m.layer_count:4d} layers  {m.size_bytes / 1e6:8.2f} MB  {m.display_name}")
    if not models:
        print("no models; upload one with: featureviz models upload FILE.onnx", file=sys.stderr)
    return 0


@client_command
def _layers(args: argparse.Namespace) -> int:
    with connect(args) as fv:
        layers = list(fv.layers(model_ref(args.model), filter=args.filter, spatial_only=args.spatial_only))
    if args.json:
        print(json.dumps([_to_dict(layer) for layer in layers], indent=2))
        return 0
    width = max((len(layer.name) for layer in layers), default=10)
    for layer in layers:
        shape = "x".join(str(s) for s in layer.shape)
        mark = " logits" if layer.is_logits else (f" (pre-{layer.pre_activation_of})" if layer.pre_activation_of
                                                   else "")
        mark += " NHWC" if layer.layout == "NHWC" else ""
        print(f"{layer.depth:4d}  {layer.name:<{width}}  {layer.op_type:<14} {layer.channels:5d} ch  {shape}{mark}")
    return 0


@client_command
def _delete(args: argparse.Namespace) -> int:
    with connect(args) as fv:
        ref = model_ref(args.model)
        fv.delete_model(ref)
    print(f"deleted {ref}")
    return 0
