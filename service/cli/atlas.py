"""``featureviz atlas MODEL [--layers ...] [--op-types ...] [--channels N] [render options] --out DIR``: one image
per unit (channel) of the selected layers, as an atlas job (``JobSpec.atlas``) on ``--server`` (or
``FEATUREVIZ_SERVER``), or on an embedded server on a free local port with a temporary store (as ``featureviz
demo`` does). When it finishes, DIR receives the atlas as a static site (``atlas_site.export_site``: index.html,
``units/<index>.png``, ``atlas.json`` with per unit its layer, channel, key, options, seed, objective, device and
device seconds). ``featureviz atlas export ATLAS --out DIR [--server ...]`` writes the site of an atlas the server
holds. No string of the model becomes a path: files are named by the unit's index. A DIR that is not empty and
holds no ``atlas.json`` is refused; an earlier export is updated in place."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from featureviz.cli.atlas_site import MANIFEST
from featureviz.cli.atlas_site import check_out as _check_out

__all__ = ["register", "run", "MANIFEST"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "atlas", help="render every unit of a model's layers (an atlas job)",
        description="Render one image per channel of the selected layers (default: every layer with channels) as "
                    "one atlas job: through --server, or an embedded server; DIR receives the atlas as a static "
                    "site. Units already rendered with the same options (by any atlas) are served from the "
                    "server's unit store. `featureviz atlas export ATLAS --out DIR --server ADDR` writes the site "
                    "of an atlas job the server holds.")
    parser.add_argument("model", metavar="MODEL", help="path of the ONNX file; with --server also an uploaded "
                                                       "model's sha256; or `export`, then ATLAS")
    parser.add_argument("atlas", metavar="ATLAS", nargs="?", default=None,
                        help="with `export`: the atlas job's id")
    parser.add_argument("--layers", default=None, help="layer names (catalog names or aliases), comma-separated")
    parser.add_argument("--op-types", default=None, help="layers of these op types, comma-separated (Conv,Relu)")
    parser.add_argument("--min-depth", type=int, default=None, help="layers at this catalog depth or deeper")
    parser.add_argument("--max-depth", type=int, default=None, help="layers at this catalog depth or shallower")
    parser.add_argument("--channels", type=int, default=None, metavar="N", help="the first N channels of each layer "
                                                                                 "(default: all)")
    parser.add_argument("--dataset", default=None, metavar="D",
                        help="join a dataset to every unit: a folder or archive of images (uploaded), or an uploaded "
                             "set's id; its exemplar index over the atlas's layers is built or reused")
    parser.add_argument("--prior", default=None, metavar="D",
                        help="learn the image statistics from a dataset (a folder or archive of images, uploaded, or "
                             "an uploaded set's id): every unit's parameterization uses its colour matrix and spectrum "
                             "decay instead of ImageNet's and 1/f")
    parser.add_argument("--generator", default=None, metavar="GEN",
                        help="with --param generator: a generator (GEN.onnx, uploaded, or an uploaded model's sha256) "
                             "whose latents are optimised for every unit instead of pixels")
    parser.add_argument("--latent-l2", type=float, default=None, metavar="X",
                        help="with --generator: each unit's objective minus X * |z|^2")
    parser.add_argument("--negative", action="store_true", help="also render each unit's negative (channel minimised)")
    parser.add_argument("--diversity", type=int, default=None, metavar="N",
                        help="also render a diversity set of N images per unit")
    parser.add_argument("--size", type=int, default=None, metavar="S", help="image side (default 128, or the "
                                                                             "model's fixed input side)")
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="optimisation steps (default 256)")
    parser.add_argument("--seed", type=int, default=None, metavar="K", help="random seed (default 0)")
    parser.add_argument("--lr", type=float, default=None, metavar="X", help="Adam learning rate (default 0.05)")
    parser.add_argument("--param", default=None, help="image parameterization (default fft)")
    parser.add_argument("--transforms", default=None, help="robustness transforms (default standard)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--server", default=os.environ.get("FEATUREVIZ_SERVER"), metavar="ADDR",
                        help="a featureviz server (host:port; env FEATUREVIZ_SERVER); default: an embedded one")
    parser.add_argument("--token", default=os.environ.get("FEATUREVIZ_TOKEN"),
                        help="bearer token for --server (env FEATUREVIZ_TOKEN)")
    parser.add_argument("--device", default=None, help="torch device of the embedded server")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def run(args: argparse.Namespace) -> int:
    import contextlib
    import tempfile

    from featureviz.errors import InvalidSpec

    out = Path(args.out)
    if args.atlas is not None and args.model != "export":
        raise InvalidSpec("ATLAS", f"one MODEL only, or `export ATLAS`; got {args.atlas[:100]!r} after the model")
    exporting = args.model == "export" and args.atlas is not None
    if exporting and not args.server:
        raise InvalidSpec("--server", "export reads an atlas from a server: give --server (or FEATUREVIZ_SERVER)")
    if args.latent_l2 is not None and not args.generator:
        raise InvalidSpec("--latent-l2", "applies to a generator: add --param generator --generator GEN")
    _check_out(out)
    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))

    @contextlib.contextmanager
    def server():
        if args.server:
            yield args.server
            return
        from featureviz.server import ServerConfig
        from featureviz.server import serve_in_background

        with tempfile.TemporaryDirectory(prefix="featureviz-atlas-store-") as store:
            running = serve_in_background(ServerConfig(store_dir=store, host="127.0.0.1", port=0, device=args.device))
            log(f"embedded featureviz server on {running.address}")
            try:
                yield running.address
            finally:
                running.stop()

    if exporting:
        from featureviz.cli.atlas_site import export_site
        from featureviz.client import Client

        with Client(args.server, token=args.token) as fv:
            fv.wait_ready(timeout=30)
            export_site(fv, args.atlas, out, log)
        return 0
    with server() as address:
        return _run(args, address, out, log)


def _dataset_id(fv, given: str | None) -> str | None:
    """--dataset and --prior: a folder or archive (uploaded: its id), or an uploaded set's id."""
    if not given:
        return None
    return fv.upload_dataset(given).id if os.path.exists(given) else given


def _run(args, address: str, out: Path, log) -> int:
    from featureviz.client import Client
    from featureviz.client import pb
    from featureviz.errors import InvalidSpec

    options = {name: getattr(args, name) for name in ("size", "steps", "seed", "lr", "param", "transforms")
               if getattr(args, name) is not None}
    with Client(address, token=args.token) as fv:
        fv.wait_ready(timeout=30)
        if os.path.isfile(args.model):
            model = fv.upload(args.model)
        else:
            name = args.model.removeprefix("models/").strip().lower()
            if not (len(name) == 64 and all(c in "0123456789abcdef" for c in name)):
                raise InvalidSpec("MODEL", f"no such file, and not a model's sha256: {args.model[:100]!r}")
            model = fv.model(name)
        # a folder or archive is uploaded (an embedded server holds nothing); else a set's id
        dataset = _dataset_id(fv, args.dataset)
        if args.prior:
            options["prior_dataset"] = _dataset_id(fv, args.prior)
        if args.generator:  # a file is uploaded; else an uploaded model's sha256
            generator = fv.upload(args.generator).sha256 if os.path.isfile(args.generator) else args.generator
            options["generator"] = {"model": generator, **({"latent_l2": args.latent_l2}
                                                           if args.latent_l2 is not None else {})}
        job = fv.atlas(model.sha256, layers=_names(args.layers), op_types=_names(args.op_types),
                       min_depth=args.min_depth, max_depth=args.max_depth, channels=args.channels, dataset=dataset,
                       negative=args.negative, diversity=args.diversity, **options)
        log(f"atlas {job.id}: started")
        for event in fv.watch(job.id):
            if event.HasField("progress"):
                progress = event.progress
                log(f"atlas {job.id}: {progress.step}/{progress.steps} units")
            if event.HasField("result"):
                job = event.result
        if job.state == pb.JOB_STATE_FAILED:
            print(f"featureviz atlas: the atlas failed: {job.error.message}", file=sys.stderr)
            return 1
        from featureviz.cli.atlas_site import export_site

        export_site(fv, job.id, out, log)
        atlas = fv.atlas_progress(job.id)
        log(f"atlas {job.id}: {atlas.done}/{atlas.units} units ({atlas.rendered} rendered, {atlas.cached} from the "
            f"store) in {out}")
    return 0 if job.state == pb.JOB_STATE_SUCCEEDED else 1
