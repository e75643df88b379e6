"""``featureviz atlas MODEL [--layers ...] [--op-types ...] [--channels N] [render options] --out DIR``: one image
per unit (channel) of the selected layers, as an atlas job (``JobSpec.atlas``) on ``--server`` (or
``FEATUREVIZ_SERVER``), or on an embedded server on a free local port with a temporary store (as ``featureviz
demo`` does). DIR receives ``units/<index>.png`` and ``atlas.json`` (per unit: layer, channel, key, objective,
device, device seconds; the job's options and seed). No string of the model becomes a path: files are named by
the unit's index. A DIR that is not empty and holds no ``atlas.json`` is refused."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["register", "run"]

MANIFEST = "atlas.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "atlas", help="render every unit of a model's layers (an atlas job)",
        description="Render one image per channel of the selected layers (default: every layer with channels) as "
                    "one atlas job: through --server, or an embedded server. Units already rendered with the same "
                    "options (by any atlas) are served from the server's unit store.")
    parser.add_argument("model", metavar="MODEL", help="path of the ONNX file; with --server also an uploaded "
                                                       "model's sha256")
    parser.add_argument("--layers", default=None, help="layer names (catalog names or aliases), comma-separated")
    parser.add_argument("--op-types", default=None, help="layers of these op types, comma-separated (Conv,Relu)")
    parser.add_argument("--min-depth", type=int, default=None, help="layers at this catalog depth or deeper")
    parser.add_argument("--max-depth", type=int, default=None, help="layers at this catalog depth or shallower")
    parser.add_argument("--channels", type=int, default=None, metavar="N", help="the first N channels of each layer "
                                                                                 "(default: all)")
    parser.add_argument("--dataset", default=None, metavar="D",
                        help="join a dataset to every unit: a folder or archive of images (uploaded), or an uploaded "
                             "set's id; its exemplar index over the atlas's layers is built or reused")
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


def _check_out(out: Path) -> None:
    from featureviz.errors import InvalidSpec

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise InvalidSpec("--out", f"{str(out)[:200]!r} is not empty and holds no earlier atlas ({MANIFEST}); "
                                   "give a new or empty folder")


def run(args: argparse.Namespace) -> int:
    import contextlib
    import tempfile

    out = Path(args.out)
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

    with server() as address:
        return _run(args, address, out, log)


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
        dataset = None
        if args.dataset:  # a folder or archive is uploaded (an embedded server holds nothing); else a set's id
            dataset = fv.upload_dataset(args.dataset).id if os.path.exists(args.dataset) else args.dataset
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
        (out / "units").mkdir(parents=True, exist_ok=True)
        units = []
        for unit in fv.atlas_units(job.id):
            entry = {"index": unit.index, "layer": unit.layer, "channel": unit.channel, "key": unit.key,
                     "done": unit.done, "cached": unit.cached}
            if unit.exemplar_index:  # the dataset join
                entry.update(exemplar_index=unit.exemplar_index, dataset_p50=unit.dataset_p50,
                             dataset_p99=unit.dataset_p99, dataset_max=unit.dataset_max,
                             render_score=unit.render_score, activation_ratio=unit.activation_ratio,
                             selectivity=unit.selectivity, dead=unit.dead)
            if unit.done:
                image = fv.atlas_unit_image(job.id, unit.index)
                path = out / "units" / f"{unit.index}.png"
                path.write_bytes(image.png)
                entry.update(image=f"units/{unit.index}.png", objective=unit.objective, device=unit.device,
                             device_seconds=unit.device_seconds, width=unit.width, height=unit.height)
            units.append(entry)
        spec = job.spec
        atlas = job.result.atlas
        manifest = {
            "job": job.id, "model": model.sha256, "state": pb.JobState.Name(job.state),
            "options": {"size": [spec.size.height, spec.size.width], "steps": spec.steps, "seed": spec.seed,
                        "lr": spec.lr if spec.HasField("lr") else 0.05,
                        "param": pb.Parameterization.Name(spec.param),
                        "transforms": pb.Transforms.Name(spec.transforms)},
            "progress": {"units": atlas.units, "done": atlas.done, "rendered": atlas.rendered, "cached": atlas.cached,
                         "failed": atlas.failed, "device_seconds": atlas.device_seconds,
                         "layers": [{"layer": layer.layer, "depth": layer.depth, "units": layer.units,
                                     "done": layer.done} for layer in atlas.layers]},
            "units": units,
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        log(f"atlas {job.id}: {atlas.done}/{atlas.units} units ({atlas.rendered} rendered, {atlas.cached} from the "
            f"store) in {out}")
    return 0 if job.state == pb.JOB_STATE_SUCCEEDED else 1
