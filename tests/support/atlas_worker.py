"""The real in-process worker with a record of its device steps and an optional stop after some atlas units, so
a test reads what each device step held (an interactive job's first step after its submission) and meets an
atlas part way (the kill -9 test) by construction, not by timing.

:class:`AtlasWorker` is :class:`featureviz.worker.local.LocalWorker` unchanged except that it records, per device
step, the job ids of the chunk (:attr:`steps`), per submission the number of steps recorded when it arrived
(:attr:`submitted`), and that with ``hold_after_units`` set, once that many atlas units (job ids ``atlas:index``)
have finished its device thread waits until the worker stops: the process can then be killed with those units
stored and the others not.

``python tests/support/atlas_worker.py STORE HOLD_AFTER_UNITS MAX_STEP_IMAGES`` serves one on 127.0.0.1:0 and
prints ``listening on 127.0.0.1:PORT`` to stderr, as ``featureviz serve`` does; it runs until killed.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from featureviz.worker.api import WorkerConfig
from featureviz.worker.local import LocalWorker

__all__ = ["AtlasWorker", "atlas_worker"]


class AtlasWorker(LocalWorker):
    def __init__(self, config: WorkerConfig, *, model_source, hold_after_units: int | None = None):
        super().__init__(config, model_source=model_source)
        self.hold_after_units = hold_after_units
        self.steps: list[tuple[str, ...]] = []
        self.submitted: list[tuple[int, str, bool]] = []
        self.units_finished = 0

    def submit(self, submission) -> None:
        with self._cv:
            self.submitted.append((len(self.steps), submission.job_id, submission.background))
        super().submit(submission)

    def _step(self, key, chunk) -> None:
        with self._cv:
            if self.hold_after_units is not None and self.units_finished >= self.hold_after_units:
                self._cv.wait_for(lambda: self._stopping)
            self.steps.append(tuple(job.sub.job_id for job in chunk))
        super()._step(key, chunk)

    def _finished(self, job_id: str, state: int, **kwargs) -> None:
        if ":" in job_id:
            with self._cv:
                self.units_finished += 1
        super()._finished(job_id, state, **kwargs)

    def unit_submissions(self) -> list[str]:
        with self._cv:
            return [job_id for _, job_id, background in self.submitted if background]


def atlas_worker(store_dir, *, hold_after_units: int | None = None, **config) -> AtlasWorker:
    """An AtlasWorker reading models from a server store's folder (as the server's own worker does)."""
    root = Path(store_dir)
    config.setdefault("progress_interval", 0.0)
    return AtlasWorker(WorkerConfig(device="cpu", **config), hold_after_units=hold_after_units,
                       model_source=lambda sha: root / "models" / sha[:2] / f"{sha}.onnx")


def main(argv: list[str]) -> int:
    import logging

    from featureviz.server import ServerConfig
    from featureviz.server import serve_in_background

    logging.basicConfig(level=logging.WARNING)
    store, hold_after, step_images = argv[0], int(argv[1]), int(argv[2])
    worker = atlas_worker(store, hold_after_units=None if hold_after < 0 else hold_after, max_step_images=step_images)
    server = serve_in_background(ServerConfig(store, progress_interval=0.0, heartbeat_seconds=0.5, grace_seconds=0.0,
                                              max_step_images=step_images), worker=worker)
    print(f"listening on 127.0.0.1:{server.port}", file=sys.stderr, flush=True)
    threading.Event().wait()  # until killed
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
