"""The real in-process worker with a gate on exemplar index passes, so a test decides where a pass stands when
something else happens (a render arrives, a cancel, a kill -9) instead of racing it.

:class:`HeldIndexWorker` is :class:`featureviz.worker.local.LocalWorker` unchanged except for one wait: after a pass
has run ``hold_after`` batches, its next batch waits on the worker's own condition until other work reaches the
device thread (a submission, a cancel, a call such as an admission's memory probe, a stop) or the test calls
:meth:`release`. Everything else is the real code path: the same device loop, the same :class:`IndexPass`, the same
files and events. It also records the index submissions it got (:attr:`index_submissions`: a cached job never
reaches it).

    worker = held_worker(store_dir, hold_after=2)
    with serve_in_background(ServerConfig(store_dir, ...), worker=worker) as server: ...

``python tests/support/held_worker.py STORE HOLD_AFTER CHUNK`` serves one on 127.0.0.1:0 (the kill -9 test's
subprocess; HOLD_AFTER -1: never hold) and prints ``listening on 127.0.0.1:PORT`` to stderr, as ``featureviz serve``
does; it runs until killed.
"""

from __future__ import annotations

import collections
import sys
import threading
from pathlib import Path

from featureviz.worker.api import WorkerConfig
from featureviz.worker.local import LocalWorker

__all__ = ["HeldIndexWorker", "held_worker"]


class HeldIndexWorker(LocalWorker):
    def __init__(self, config: WorkerConfig, *, model_source, hold_after: int | None = None):
        super().__init__(config, model_source=model_source)
        self.hold_after = hold_after  # None: never hold
        self.released = threading.Event()
        self.index_submissions: list[str] = []
        self.batches: collections.Counter = collections.Counter()

    def submit(self, submission) -> None:
        if submission.index is not None:
            self.index_submissions.append(submission.job_id)
        super().submit(submission)

    def release(self) -> None:
        """From now on the passes run freely."""
        with self._cv:
            self.released.set()
            self._cv.notify_all()

    def _step_index(self) -> None:
        with self._cv:
            job_id = next(iter(self._indexes), None)
            if job_id is not None and self.hold_after is not None and self.batches[job_id] >= self.hold_after:
                self._cv.wait_for(lambda: self.released.is_set() or self._incoming or self._calls or self._cancels
                                  or self._stopping)
            if job_id is not None:
                self.batches[job_id] += 1
        super()._step_index()


def held_worker(store_dir, *, hold_after: int | None = None, **config) -> HeldIndexWorker:
    """A HeldIndexWorker reading models from a server store's folder (as the server's own worker does)."""
    root = Path(store_dir)
    config.setdefault("progress_interval", 0.0)
    return HeldIndexWorker(WorkerConfig(device="cpu", **config), hold_after=hold_after,
                           model_source=lambda sha: root / "models" / sha[:2] / f"{sha}.onnx")


def main(argv: list[str]) -> int:
    import logging

    from featureviz.server import ServerConfig
    from featureviz.server import serve_in_background

    logging.basicConfig(level=logging.WARNING)
    store, hold_after, chunk = argv[0], int(argv[1]), int(argv[2])
    worker = held_worker(store, hold_after=None if hold_after < 0 else hold_after)
    server = serve_in_background(ServerConfig(store, index_chunk_images=chunk, progress_interval=0.0,
                                              heartbeat_seconds=0.5, grace_seconds=0.0), worker=worker)
    print(f"listening on 127.0.0.1:{server.port}", file=sys.stderr, flush=True)
    threading.Event().wait()  # until killed
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
