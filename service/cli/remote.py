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
import time
from pathlib import Path

__all__ = ["add_connection_args", "connect", "client_command", "ProgressBar", "render_remote", "DEFAULT_SERVER"]

DEFAULT_SERVER = "127.0.0.1:50051"


def add_connection_args(parser: argparse.ArgumentParser, *, server_default: bool = True) -> None:
    parser.add_argument("--server", default=os.environ.get("FEATUREVIZ_SERVER", DEFAULT_SERVER) if server_default
                        else None, metavar="ADDR", help="host:port of a featureviz server (env FEATUREVIZ_SERVER)")
    parser.add_argument("--token", default=os.environ.get("FEATUREVIZ_TOKEN"),
                        help="bearer token (env FEATUREVIZ_TOKEN)")


def connect(args: argparse.Namespace):
    from featureviz.client import Client

    return Client(args.server, token=getattr(args, "token", None))


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


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal; elsewhere a line every 10%."""

    def __init__(self, label: str, stream=None, width: int = 30):
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._last_decile = -1
        self._start = time.monotonic()

    def update(self, done: int, total: int, note: str = "") -> None:
        total = max(total, 1)
        frac = min(1.0, done / total)
        if self.tty:
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {note}\x1b[K")
            self.stream.flush()
        elif int(frac * 10) > self._last_decile:
            self._last_decile = int(frac * 10)
            self.stream.write(f"{self.label}: {done}/{total} {note}\n")

    def close(self, note: str = "") -> None:
        seconds = time.monotonic() - self._start
        if self.tty:
            self.stream.write("\n")
        self.stream.write(f"{self.label}: done in {seconds:.1f} s {note}\n")
        self.stream.flush()


def watch_with_progress(client, job_id: str, *, label: str, quiet: bool = False, timeout: float | None = None):
    """Watch a job, drawing a progress bar; returns the finished job (with images)."""
    from featureviz.client import pb

    bar = None if quiet else ProgressBar(label)
    for event in client.watch(job_id, timeout=timeout):
        if bar is None:
            continue
        if event.HasField("snapshot") and event.snapshot.state == pb.JOB_STATE_QUEUED:
            bar.update(0, event.snapshot.steps or 1, f"queued (position {event.snapshot.queue_position})")
        elif event.HasField("progress"):
            p = event.progress
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


@client_command
def render_remote(args: argparse.Namespace) -> int:
    """``featureviz render MODEL.onnx OBJECTIVE ... --server ADDR``: upload the model unless the server has it,
    submit the job, draw progress, write the PNGs; ``--json`` prints the same fields as the local command."""
    raise NotImplementedError  # replaced below once the local render command's options are known
