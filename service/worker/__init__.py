"""The worker: everything on the server side that touches torch (docs/ARCHITECTURE.md, "worker").

- the model cache (import by sha256) and the models' description (:mod:`featureviz.worker.models`);
- the JobSpec -> CheckedSpec adapter, run once at admission, the init-image decode and the results as PNG
  (:mod:`featureviz.worker.adapter`);
- the device: its description, the default images per step, memory admission and out-of-memory handling
  (:mod:`featureviz.worker.device`);
- what each device step is made of, a pure function (:mod:`featureviz.worker.planner`, with the time slicing of
  :mod:`featureviz.worker.slices`);
- the queries of finished exemplar indexes and of dataset images (:mod:`featureviz.worker.queries`);
- the batched device loop (:mod:`featureviz.worker.local`, on :mod:`featureviz.engine.batch`).

The server talks to a worker only through :class:`featureviz.worker.api.Worker` (plain data: spec messages, bytes,
events). Importing this package does not import torch; :func:`local_worker` does.
"""

from featureviz.worker.api import Admission
from featureviz.worker.api import Submission
from featureviz.worker.api import Worker
from featureviz.worker.api import WorkerConfig
from featureviz.worker.api import WorkerEvent

__all__ = ["Admission", "Submission", "Worker", "WorkerConfig", "WorkerEvent", "local_worker"]


def local_worker(config: WorkerConfig, *, model_source) -> Worker:
    """An in-process worker (a device thread and an output thread). ``model_source(sha256)`` -> bytes or a path."""
    from featureviz.worker.local import LocalWorker

    return LocalWorker(config, model_source=model_source)
