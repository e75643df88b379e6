"""``featureviz exemplars MODEL DATASET "LAYER:C"``: a unit's top images, locally or on a server.

Local mode (no ``--server``): MODEL an ONNX file, DATASET a folder of images. The folder is indexed once
(:func:`featureviz.engine.exemplars.build_index`) and the index cached under the model cache folder's
``exemplars/``, keyed by (model sha256, the image set's hash, layers, preprocessing, input size, k); a second call
reads the cache. An interrupted pass resumes from its last finished chunk.

Remote mode (``--server ADDR`` or ``FEATUREVIZ_SERVER``; ``--local`` forces local mode): MODEL an uploaded model's
sha256 or a local file (uploaded unless the server has its bytes), DATASET a dataset id or a local folder or archive
(uploaded unless the tenant holds the set). The newest finished index holding the layer is used; without one an
index job runs (``Client.index_exemplars``; the server reuses an identical finished index). Then GetExemplars, and
the crops come from GetDatasetImage (each exemplar's ``image_box``) for ``--out``. ``--json`` has the same keys in
both modes; ``image`` is the image's index in the folder locally, its sha256 remotely.

This module imports neither torch nor grpc at the top: the remote mode needs the client (and Pillow for ``--out``)
only."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

__all__ = ["register", "parse_unit", "cache_key"]

_LINES_PER_CAUSE = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "exemplars",
        help="show the images of a folder that excite a unit most (dataset examples), cropped to its field",
        description="Index a folder of images through the model (one pass, cached) and print or draw the "
        "top images of one channel, each cropped to the receptive field of its strongest position.",
    )
    parser.add_argument("model", metavar="MODEL", help="path of the ONNX file; with --server also an uploaded "
                        "model's sha256")
    parser.add_argument("images", metavar="DATASET", help="a folder of PNG, JPEG, WebP or BMP files; with --server "
                        "also a zip or tar archive, or a dataset id")
    parser.add_argument("unit", metavar="LAYER:C", help="the layer (catalog name or alias) and channel")
    parser.add_argument("--k", type=int, default=9, help="how many examples (default 9, at most the index's k)")
    parser.add_argument("--order", choices=("max", "mean", "min"), default="max",
                        help="max: top by spatial max (default); mean: top by spatial mean; min: bottom by max")
    parser.add_argument("--out", default=None, metavar="GRID.png", help="write a grid of the crops")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--layers", default=None, help="more layers to index in the same pass (comma-separated)")
    parser.add_argument("--index-k", type=int, default=16, help="images the index keeps per channel (default 16)")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--tile", type=int, default=96, help="side of each crop in the grid (default 96)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the caches")
    parser.add_argument("--cache-dir", default=None, help="model cache folder (default $FEATUREVIZ_CACHE/models or "
                        "~/.cache/featureviz/models); the index goes in its exemplars/")
    from featureviz.cli.remote import add_connection_args

    # --server ADDR (or FEATUREVIZ_SERVER) asks a featureviz server instead; --token and --tls-ca go with it
    add_connection_args(parser, server_default=False)
    parser.add_argument("--local", action="store_true", help="run locally even when FEATUREVIZ_SERVER is set")
    parser.set_defaults(func=run)


def parse_unit(text: str) -> tuple[str, int]:
    from featureviz.errors import InvalidSpec
    from featureviz.errors import echo

    layer, sep, channel = text.rpartition(":")
    if not sep or not layer or not channel.strip().isdigit():
        raise InvalidSpec("unit", f"expected LAYER:CHANNEL (e.g. conv1/Relu:3), got {echo(text)}")
    return layer, int(channel)


def cache_key(model_sha: str, set_hash: str, layers: list[str], preprocess, size, k: int) -> str:
    from featureviz.engine.exemplars.index import FORMAT

    text = json.dumps({"format": FORMAT, "model": model_sha, "set": set_hash, "layers": layers, "k": k,
                       "size": list(size), "preprocess": [list(preprocess.mean), list(preprocess.std),
                                                          preprocess.channel_order]})
    return hashlib.sha256(text.encode()).hexdigest()


def run(args: argparse.Namespace) -> int:
    server = None if args.local else (args.server or os.environ.get("FEATUREVIZ_SERVER"))
    if server:
        args.server = server
        return run_remote(args)
    return run_local(args)


def run_local(args: argparse.Namespace) -> int:
    from pathlib import Path

    from featureviz.cli.progress import ProgressBar
    from featureviz.engine.exemplars import ExemplarIndex
    from featureviz.engine.exemplars import ImageFolder
    from featureviz.engine.exemplars import build_index
    from featureviz.engine.exemplars import index_layers
    from featureviz.errors import InvalidSpec
    from featureviz.importer import import_model
    from featureviz.importer.cache import default_cache_dir

    layer, channel = parse_unit(args.unit)
    if not 1 <= args.index_k <= 100:
        raise InvalidSpec("index_k", f"--index-k must be 1..100, got {args.index_k}")
    if not 1 <= args.k <= args.index_k:
        raise InvalidSpec("k", f"--k must be 1..{args.index_k} (--index-k), got {args.k}")
    source = ImageFolder(args.images)
    model = import_model(args.model, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    extra = [name.strip() for name in (args.layers or "").split(",") if name.strip()]
    layers = index_layers(model, [layer, *extra])  # unknown layers: NotFound before any compute
    target = layers[0]
    layers.sort(key=lambda name: model.layer(name).depth)  # one cache entry whatever the order they are named in
    channels = model.layer(target).channels
    if not 0 <= channel < channels:
        raise InvalidSpec("unit", f"channel {channel} is out of range: {target} has {channels} channels "
                                  f"(0..{channels - 1})")
    spec = model.input_spec
    size = (args.size, args.size) if args.size else tuple(spec.default_size)
    preprocess = spec.preprocess.for_channels(spec.channels)

    path = None
    if not args.no_cache:
        folder = Path(args.cache_dir or default_cache_dir()) / "exemplars"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = cache_key(model.sha256, source.digest(), layers, preprocess, size, args.index_k)
        path = folder / f"{key}.npz"
    index = None
    if path is not None and path.exists():
        try:
            index = ExemplarIndex.load(path)
        except ValueError:
            index = None
    if index is None or not index.complete:
        bar = ProgressBar(None if args.json else f"index {len(source.names)} images", stream=sys.stderr)
        index = build_index(model, source, layers=layers, k=args.index_k, size=size, batch_size=args.batch,
                            state_path=path, set_hash=path.stem if path else "",
                            progress=lambda done, total: bar.update(done, total))
        bar.close(f"{index.indexed} indexed")
    _report_skipped(index)
    known = target in index.fields
    examples = index.exemplars(target, channel, args.order, args.k, model=model)
    if not known and path is not None:
        index.save(path)  # keep the new receptive field with the index
    field = index.fields[target]
    if args.out:
        _write_grid(source, index, examples, args.out, args.tile)
    quantiles = {name: values[channel] for name, values in index.quantiles(target).items()}
    if args.json:
        print(json.dumps({"model": model.sha256, "dataset": str(args.images), "index": path.stem if path else None,
                          "layer": target, "channel": channel, "order": args.order, "images": len(source.names),
                          "indexed": index.indexed, "input_size": list(index.input_size),
                          "skipped": {cause: entry["count"] for cause, entry in index.skipped.items()},
                          "field": {"whole": field.whole, "regular": field.regular,
                                    "size": list(field.size) if field.size else None,
                                    "stride": list(field.stride) if field.stride else None},
                          "quantiles": quantiles, "grid": args.out,
                          "exemplars": [example.to_dict() for example in examples]}))
        return 0
    what = "the whole image" if field.whole else (f"field {field.size[1]}x{field.size[0]}, stride {field.stride[1]}"
                                                   if field.regular else "irregular field")
    print(f"{_printable(target)}:{channel}  {args.order}  ({index.indexed} images, {what}; p50 "
          f"{quantiles['p50']:.4g}, p99 {quantiles['p99']:.4g}, max {quantiles['max']:.4g})")
    for example in examples:
        where = "-" if example.position is None else f"({example.position[0]}, {example.position[1]})"
        print(f"{example.rank + 1:>3}  {example.value:>12.5g}  at {where:<10} box {list(example.image_box or [])}  "
              f"{_printable(example.name)}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _remote_model(fv, model: str):
    """A local file (uploaded unless the server has its bytes) or an uploaded model's sha256."""
    from featureviz.errors import InvalidSpec

    if os.path.isfile(model):
        return fv.upload(model)
    name = model.removeprefix("models/").strip().lower()
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return fv.model(name)
    raise InvalidSpec("MODEL", f"no such file, and not a model's sha256: {_printable(model)[:100]!r}")


def _remote_dataset(fv, dataset: str, quiet: bool):
    """A local folder or archive (uploaded unless the tenant holds the set) or a dataset id."""
    from featureviz.cli.progress import ProgressBar
    from featureviz.errors import InvalidSpec

    if os.path.exists(dataset):
        bar = ProgressBar(None if quiet else f"upload {os.path.basename(os.path.normpath(dataset))}",
                          stream=sys.stderr)
        uploaded = fv.upload_dataset(dataset, progress=lambda done, total: bar.update(done, total, "bytes"))
        bar.close("already on the server" if uploaded.deduplicated else f"{uploaded.image_count} images")
        return uploaded
    name = dataset.removeprefix("datasets/").strip().lower()
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return fv.dataset(name)
    raise InvalidSpec("DATASET", f"no such folder or archive, and not a dataset id: {_printable(dataset)[:100]!r}")


def run_remote(args: argparse.Namespace) -> int:
    from featureviz.cli.remote import client_command

    return client_command(_remote)(args)


def _remote(args: argparse.Namespace) -> int:
    from featureviz.cli.remote import connect
    from featureviz.cli.remote import job_failure
    from featureviz.cli.remote import watch_with_progress
    from featureviz.client import FeaturevizClientError
    from featureviz.client import pb
    from featureviz.errors import InvalidSpec

    layer, channel = parse_unit(args.unit)
    if not 1 <= args.k <= args.index_k:
        raise InvalidSpec("k", f"--k must be 1..{args.index_k} (--index-k), got {args.k}")
    if args.no_cache or args.cache_dir:
        print("featureviz exemplars: --no-cache and --cache-dir apply to local mode; the server keeps its indexes",
              file=sys.stderr)
    order = args.order
    quiet = args.json or not sys.stderr.isatty()
    with connect(args) as fv:
        model = _remote_model(fv, args.model)
        dataset = _remote_dataset(fv, args.images, quiet)
        size = args.size or None
        job = None
        try:
            answer = fv.exemplars(model.sha256, dataset.id, layer, channel, order=order, k=args.k, size=size)
        except FeaturevizClientError as err:
            if err.reason != "EXEMPLAR_INDEX_NOT_FOUND":
                raise
            extra = [name.strip() for name in (args.layers or "").split(",") if name.strip()]
            job = fv.index_exemplars(model.sha256, dataset.id, [layer, *extra], k=args.index_k,
                                     batch_size=args.batch, size=size)
            job = watch_with_progress(fv, job.id, label=f"index {dataset.image_count} images", quiet=quiet)
            if job.state != pb.JOB_STATE_SUCCEEDED:
                print(f"featureviz exemplars: error: {job_failure(job)}", file=sys.stderr)
                return 1
            result = job.result.exemplar_index
            answer = fv.exemplars(model.sha256, dataset.id, layer, channel, order=order, k=args.k,
                                  size=(result.size.height, result.size.width) if result.size.height else size)
        crops = None
        if args.out:
            crops = [fv.dataset_image(dataset.id, e.image, box=e.image_box if e.HasField("image_box") else None)
                     for e in answer.exemplars]
    if crops is not None:
        _write_remote_grid(crops, args.out, args.tile)
    regular = answer.field_size > 0
    examples = [{"rank": e.rank, "image": e.image, "name": e.name, "value": e.value,
                 "position": [e.x, e.y] if e.HasField("x") else None,
                 "box": _box_list(e, "box"), "image_box": _box_list(e, "image_box"), "whole": e.whole}
                for e in answer.exemplars]
    quantiles = {"p50": answer.p50, "p99": answer.p99, "max": answer.max}
    if args.json:
        print(json.dumps({"model": model.sha256, "dataset": dataset.id, "index": answer.index,
                          "layer": answer.layer, "channel": channel, "order": order, "images": dataset.image_count,
                          "indexed": answer.images, "input_size": [answer.size.height, answer.size.width],
                          "skipped": {e.cause: e.count for e in dataset.report.skipped_by_cause},
                          "field": {"whole": answer.whole, "regular": regular,
                                    "size": [answer.field_size] * 2 if regular else None,
                                    "stride": [answer.field_stride] * 2 if regular else None},
                          "quantiles": quantiles, "grid": args.out, "exemplars": examples}))
        return 0
    what = "the whole image" if answer.whole else (f"field {answer.field_size}x{answer.field_size}, stride "
                                                   f"{answer.field_stride}" if regular else "irregular field")
    print(f"{_printable(answer.layer)}:{channel}  {order}  ({answer.images} images, {what}; p50 "
          f"{answer.p50:.4g}, p99 {answer.p99:.4g}, max {answer.max:.4g})")
    for example in examples:
        where = "-" if example["position"] is None else f"({example['position'][0]}, {example['position'][1]})"
        print(f"{example['rank'] + 1:>3}  {example['value']:>12.5g}  at {where:<10} box "
              f"{example['image_box'] or []}  {_printable(example['name'])}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _box_list(example, name: str):
    if not example.HasField(name):
        return None
    box = getattr(example, name)
    return [box.x0, box.y0, box.x1, box.y1]


def _write_remote_grid(crops: list[bytes], out: str, tile: int) -> None:
    """The crops (PNG bytes) resized to ``tile`` x ``tile`` (bilinear, as local mode) on a white grid
    (:func:`featureviz.outputs.grid_layout`), written atomically."""
    import io

    try:
        from PIL import Image
    except ImportError:
        from featureviz.errors import InvalidSpec

        raise InvalidSpec("--out", "writing the grid needs Pillow (pip install 'featureviz[server]' or pillow)") \
            from None
    from featureviz.outputs import grid_layout

    (height, width), places = grid_layout(max(1, len(crops)), tile, tile)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    for data, (top, left) in zip(crops, places):
        with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
            sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR), (left, top))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, out)


def _report_skipped(index) -> None:
    for cause, entry in index.skipped.items():
        for name, reason in entry["names"][:_LINES_PER_CAUSE]:
            print(f"skipped {_printable(name)}: {cause.replace('_', ' ')}: {_printable(reason)}", file=sys.stderr)
        if entry["count"] > len(entry["names"][:_LINES_PER_CAUSE]):
            print(f"skipped {entry['count'] - _LINES_PER_CAUSE} more ({cause.replace('_', ' ')})", file=sys.stderr)


def _write_grid(source, index, examples, out: str, tile: int) -> None:
    import torch

    from featureviz.engine.images import decode_image
    from featureviz.engine.images import grid
    from featureviz.engine.images import png_bytes
    from featureviz.engine.exemplars.index import IMAGE_FORMATS

    crops = []
    for example in examples:
        image = decode_image(source.read(example.image), index.input_size, field="image", formats=IMAGE_FORMATS)
        x0, y0, x1, y1 = example.box
        crop = image[:, y0:y1, x0:x1].unsqueeze(0)
        crops.append(torch.nn.functional.interpolate(crop, size=(tile, tile), mode="bilinear",
                                                     align_corners=False).clamp(0, 1)[0])
    data = png_bytes(grid(torch.stack(crops)))
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out)


def _printable(name: str) -> str:
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
