"""``featureviz datasets upload|list|images|delete``: manage the image sets of a featureviz server."""

from __future__ import annotations

import argparse
import json
import os
import sys

from featureviz.cli.remote import add_connection_args
from featureviz.cli.remote import client_command
from featureviz.cli.remote import connect

__all__ = ["register", "report_lines"]


def register(subparsers) -> None:
    p = subparsers.add_parser("datasets", help="upload, list and delete image sets on a server")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    up = actions.add_parser("upload", help="upload a folder of images, image files, or a zip or tar archive "
                                           "(chunked, resumable)")
    up.add_argument("source", nargs="+", help="a folder, a .zip or .tar[.gz|.bz2|.xz] archive, or image files")
    up.add_argument("--name", help="display name (default: the folder's or the archive's name)")
    up.add_argument("--json", action="store_true", help="print the dataset and its report as JSON")
    up.set_defaults(func=_upload)

    ls = actions.add_parser("list", help="list the datasets")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    im = actions.add_parser("images", help="the images of a dataset")
    im.add_argument("dataset", help="the dataset's id or datasets/<id>")
    im.add_argument("--json", action="store_true")
    im.set_defaults(func=_images)

    sh = actions.add_parser("show", help="a dataset's report and the priors learned from it (colour matrix, "
                                         "spectrum decay, the patch prior's held-out log-likelihood)")
    sh.add_argument("dataset", help="the dataset's id or datasets/<id>")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=_show)

    rm = actions.add_parser("delete", help="delete a dataset")
    rm.add_argument("dataset", help="the dataset's id or datasets/<id>")
    rm.set_defaults(func=_delete)

    for sub in (up, ls, im, sh, rm):
        add_connection_args(sub)


def _to_dict(message) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def report_lines(dataset) -> list[str]:
    """The dataset's report in words: held, skipped per cause with names, converted kinds."""
    report = dataset.report
    formats = ", ".join(f"{count} {fmt}" for fmt, count in sorted(report.formats.items()))
    lines = [f"  {dataset.image_count} images ({formats}), {dataset.size_bytes / 1e6:.2f} MB, "
             f"{report.skipped} of {report.files} files skipped"]
    for entry in report.skipped_by_cause:
        more = f" and {entry.count - len(entry.names)} more" if entry.count > len(entry.names) else ""
        lines.append(f"  skipped {entry.count} {entry.cause}: {', '.join(entry.names)}{more} ({entry.detail})")
    for entry in report.converted:
        more = f" and {entry.count - len(entry.names)} more" if entry.count > len(entry.names) else ""
        lines.append(f"  {entry.count} {entry.kind}, converted to RGB when used: {', '.join(entry.names)}{more}")
    return lines


def prior_lines(dataset) -> list[str]:
    """The priors learned from the set (issue 25), one line per channel count; none yet: a hint."""
    if not dataset.priors:
        return ["  no prior learned yet (a render with --prior DATASET or a prior:DATASET term learns one)"]
    lines = []
    for prior in dataset.priors:
        what = "luminance" if prior.channels == 1 else "RGB"
        text = f"  prior ({what}):"
        if prior.images:
            text += (f" spectrum decay {prior.decay:.3f} (power ~ f^-{prior.alpha:.2f}), colour matrix "
                     f"[{', '.join(f'{v:.3f}' for v in prior.color)}], {prior.images} images")
        if prior.patch_prior:
            text += (f"{';' if prior.images else ''} patch prior: held-out log-likelihood "
                     f"{prior.held_out_log_likelihood:.2f} nats per patch ({prior.components} components, "
                     f"{prior.patch_size}x{prior.patch_size} patches, {prior.patches} from {prior.patch_images} "
                     "images)")
        lines.append(text)
    return lines


@client_command
def _show(args: argparse.Namespace) -> int:
    with connect(args) as fv:
        dataset = fv.dataset(args.dataset)
    if args.json:
        print(json.dumps(_to_dict(dataset), indent=2))
        return 0
    print(f"{dataset.name}  {dataset.display_name}")
    print("\n".join(report_lines(dataset) + prior_lines(dataset)))
    return 0


@client_command
def _upload(args: argparse.Namespace) -> int:
    from featureviz.cli.progress import ProgressBar

    source = args.source[0] if len(args.source) == 1 else args.source
    label = os.path.basename(os.path.normpath(args.source[0])) if len(args.source) == 1 else \
        f"{len(args.source)} files"
    bar = ProgressBar(f"upload {label}")
    with connect(args) as fv:
        dataset = fv.upload_dataset(source, name=args.name,
                                    progress=lambda done, total: bar.update(done, total, "bytes"))
    if args.json:
        print(json.dumps(_to_dict(dataset), indent=2))
    else:
        note = " (already on the server)" if dataset.deduplicated else ""
        print(f"{dataset.name}{note}  {dataset.display_name}")
        print("\n".join(report_lines(dataset)))
    return 0


@client_command
def _list(args: argparse.Namespace) -> int:
    with connect(args) as fv:
        datasets = list(fv.datasets())
    if args.json:
        print(json.dumps([_to_dict(d) for d in datasets], indent=2))
        return 0
    for d in datasets:
        learned = "".join(f"  prior{p.channels}:ll={p.held_out_log_likelihood:.1f}" if p.patch_prior else
                          f"  prior{p.channels}:decay={p.decay:.2f}" for p in d.priors)
        print(f"{d.id}  {d.image_count:6d} images  {d.size_bytes / 1e6:8.2f} MB  {d.report.skipped:5d} skipped  "
              f"{d.display_name}{learned}")
    if not datasets:
        print("no datasets; upload one with: featureviz datasets upload DIR|ARCHIVE", file=sys.stderr)
    return 0


@client_command
def _images(args: argparse.Namespace) -> int:
    with connect(args) as fv:
        images = list(fv.dataset_images(args.dataset))
    if args.json:
        print(json.dumps([_to_dict(i) for i in images], indent=2))
        return 0
    for image in images:
        kinds = f"  ({', '.join(image.converted)})" if image.converted else ""
        print(f"{image.sha256[:16]}  {image.format:<4}  {image.width:5d}x{image.height:<5d}  {image.name}{kinds}")
    return 0


@client_command
def _delete(args: argparse.Namespace) -> int:
    with connect(args) as fv:
        fv.delete_dataset(args.dataset)
    print(f"deleted {args.dataset}")
    return 0
