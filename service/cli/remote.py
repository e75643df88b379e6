"""The client side of the command line: connection options, error reporting, a progress bar, and
``featureviz render MODEL.onnx ... --server ADDR`` (:func:`render_remote`), which runs the local render
command's job through the service.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from featureviz.cli.progress import ProgressBar
from featureviz.outputs import grid_layout
from featureviz.outputs import output_paths

__all__ = ["add_connection_args", "connect", "client_command", "render_remote", "DEFAULT_SERVER"]

DEFAULT_SERVER = "127.0.0.1:50051"


def add_connection_args(parser: argparse.ArgumentParser, *, server_default: bool = True) -> None:
    parser.add_argument("--server", default=os.environ.get("FEATUREVIZ_SERVER", DEFAULT_SERVER) if server_default
                        else None, metavar="ADDR", help="host:port of a featureviz server (env FEATUREVIZ_SERVER)")
    parser.add_argument("--token", default=os.environ.get("FEATUREVIZ_TOKEN"),
                        help="bearer token (env FEATUREVIZ_TOKEN)")
    parser.add_argument("--tls-ca", default=os.environ.get("FEATUREVIZ_TLS_CA"), metavar="PEM",
                        help="connect with TLS, trusting this CA (env FEATUREVIZ_TLS_CA)")


def connect(args: argparse.Namespace):
    from featureviz.client import Client

    return Client(args.server, token=args.token, tls=args.tls_ca)


def client_command(func):
    """Client errors end the command with one line naming the status code and the reason, exit status 1."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from featureviz.client import FeaturevizClientError

        try:
            return func(args)
        except FeaturevizClientError as err:
            name = f"featureviz {args.command}" + (f" {args.action}" if getattr(args, "action", None) else "")
            print(f"{name}: error: {err}", file=sys.stderr)
            for field, description in err.field_violations:
                if description not in err.message:
                    print(f"  {field}: {description}", file=sys.stderr)
            return 1

    return wrapper


def watch_with_progress(client, job_id: str, *, label: str, quiet: bool = False, timeout: float | None = None):
    """Watch a job, drawing a progress bar; returns the finished job (with images)."""
    from featureviz.client import pb

    bar = None if quiet else ProgressBar(label)
    indexing = False  # an exemplar index job counts images, and has no objective
    for event in client.watch(job_id, timeout=timeout):
        if bar is None:
            continue
        if event.HasField("snapshot"):
            indexing = event.snapshot.spec.HasField("exemplar_index")
            if event.snapshot.state == pb.JOB_STATE_QUEUED:
                bar.update(0, event.snapshot.steps or 1, f"queued (position {event.snapshot.queue_position})")
        elif event.HasField("progress"):
            p = event.progress
            if indexing:
                bar.update(p.step, p.steps, "images")
            else:
                mean = sum(p.objective) / len(p.objective) if p.objective else 0.0
                bar.update(p.step, p.steps, f"objective {mean:.4g}")
    job = client.job(job_id)
    if bar is not None:
        bar.close(pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower())
    return job


def job_failure(job) -> str:
    """One line for a job that did not succeed."""
    from featureviz.client import pb

    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_")
    if job.HasField("error") and job.error.code:
        return f"job {job.id} {state}: {job.error.code} [{job.error.reason}]: {job.error.message}"
    return f"job {job.id} {state}"


def write_images(job, out_dir: str | os.PathLike, stem: str) -> list[str]:
    from featureviz.client import images

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, png in enumerate(images(job)):
        path = out / (f"{stem}.png" if len(job.result.images) == 1 else f"{stem}_{i}.png")
        path.write_bytes(png)
        paths.append(str(path))
    return paths


def _remote_preprocess(args: argparse.Namespace) -> dict:
    """The preprocessing the local command would use (its defaults: ImageNet mean and std), torch-free."""
    from featureviz.cli.options import IMAGENET_MEAN
    from featureviz.cli.options import IMAGENET_STD

    mean = tuple(args.mean) if args.mean is not None else IMAGENET_MEAN
    std = tuple(args.std) if args.std is not None else IMAGENET_STD
    if len(mean) != len(std):
        if len(mean) == 1:
            mean = mean * len(std)
        elif len(std) == 1:
            std = std * len(mean)
    return {"mean": list(mean), "std": list(std), "channel_order": "BGR" if args.bgr else "RGB"}


def _write_outputs(job, out: str, as_grid: bool) -> list[Path]:
    """The files the local command writes (:func:`featureviz.outputs.output_paths`), from the job's PNGs."""
    from featureviz.client import images

    pngs = images(job)
    paths = output_paths(out, len(pngs), as_grid=as_grid)
    if len(paths) == 1:
        paths[0].write_bytes(_grid_png(pngs) if len(pngs) > 1 else pngs[0])
        return paths
    for path, png in zip(paths, pngs):
        path.write_bytes(png)
    return paths


def _grid_png(pngs: list[bytes]) -> bytes:
    """The local command's grid (:func:`featureviz.outputs.grid_layout`) of PNG bytes (needs Pillow)."""
    import io

    from PIL import Image

    from featureviz.client import to_pil

    tiles = [to_pil(png).convert("RGB") for png in pngs]
    size, places = grid_layout(len(tiles), tiles[0].height, tiles[0].width)
    sheet = Image.new("RGB", (size[1], size[0]), (255, 255, 255))
    for tile, (top, left) in zip(tiles, places):
        sheet.paste(tile, (left, top))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


@client_command
def render_remote(args: argparse.Namespace) -> int:
    """``featureviz render MODEL.onnx OBJECTIVE ... --server ADDR``: the local render command's job run by a
    server. Uploads the model unless the server has its bytes, submits, draws progress, writes the same files
    and prints the same ``--json`` fields (plus ``job`` and ``model``). ``--device`` is the server's business."""
    from featureviz.client import pb
    from featureviz.cli.options import option_values
    from featureviz.codec import spec_to_proto
    from featureviz.errors import InvalidSpec
    from featureviz.spec import parse_objective

    objective = parse_objective(args.objective)  # syntax errors before any upload
    if not os.path.isfile(args.model):
        raise InvalidSpec("MODEL.onnx", f"no such file: {args.model!r}")
    init_image = Path(args.init).read_bytes() if args.init else None
    judge_file = getattr(args, "judge", None)
    if judge_file and not os.path.isfile(judge_file):
        raise InvalidSpec("--judge", f"no such file: {judge_file!r}")
    generator_file = getattr(args, "generator", None)
    if generator_file and not os.path.isfile(generator_file):
        raise InvalidSpec("--generator", f"no such file: {generator_file!r}")
    with connect(args) as fv:
        model = fv.upload(args.model)
        judge = None
        if judge_file:  # the judge is a model like any other: uploaded (or found by its sha256) first
            judge = {"model": fv.upload(judge_file).sha256, "preprocess": _remote_preprocess(argparse.Namespace(
                mean=args.judge_mean, std=args.judge_std, bgr=args.judge_bgr))}
        generator = None
        if generator_file:  # --- generator (issue 25): uploaded like any model, then named by its sha256
            generator = {"model": fv.upload(generator_file).sha256, "latent_l2": getattr(args, "latent_l2", None)}
        spec = spec_to_proto(model.sha256, objective, init_image=init_image, preprocess=_remote_preprocess(args),
                             judge=judge, generator=generator, **option_values(args, "render"))
        job = fv.submit(model.sha256, spec=spec)
        job = watch_with_progress(fv, job.id, label=f"render {Path(args.model).name}",
                                  quiet=not sys.stderr.isatty())
    if job.state != pb.JOB_STATE_SUCCEEDED:
        print(f"featureviz render: error: {job_failure(job)}", file=sys.stderr)
        return 1
    files = _write_outputs(job, args.out, args.grid)
    result = job.result
    ordered = sorted(result.images, key=lambda image: image.index)
    starts = [image.objective_start for image in ordered]
    ends = [image.objective_end for image in ordered]
    verdicts = None
    if judge_file:
        from featureviz.codec import judge_score_from_proto

        verdicts = [judge_score_from_proto(image.judge) for image in ordered]
    if args.json:
        print(json.dumps({
            "objective": result.objective_description,
            "objective_start": starts,
            "objective_end": ends,
            "seconds_per_step": result.seconds_per_step,
            "phase_seconds": dict(result.phase_seconds),
            "steps": result.steps_done,
            "stopped_at": result.stopped_at,
            "size": [ordered[0].height, ordered[0].width],
            "batch": len(ordered),
            "seed": args.seed,
            "files": [str(p) for p in files],
            "job": job.id,
            "model": model.sha256,
            **({"judge": verdicts} if verdicts is not None else {}),
        }))
    else:
        from featureviz.cli.options import stopped_text
        from featureviz.cli.options import verdict_text

        for i, (a, b) in enumerate(zip(starts, ends)):
            print(f"image {i}: objective {a:.4g} -> {b:.4g}{verdict_text(verdicts[i]) if verdicts else ''}")
        print(f"{result.steps_done} steps{stopped_text(result.stopped_at)}, {result.seconds_per_step:.3f} s/step on "
              "the server; "
              f"wrote {', '.join(map(str, files))}")
    return 0
