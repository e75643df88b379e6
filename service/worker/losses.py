"""Jobs lost with their worker (a Ray actor, a worker process): back to the queue, or FAILED after a bound.

Shared by :class:`featureviz.worker.ray_pool.RayPool` and :class:`featureviz.worker.process.ProcessWorker`. Plain
data, no torch. Not thread-safe by itself: the caller holds its own lock around every call.

    losses = Losses(max_attempts=3)
    losses.cancelling(job_id)           # a cancel went to the worker: if it dies now, the job ends CANCELLED
    losses.forget(job_id)               # the job ended or was re-queued normally (FINISHED, REQUEUED)
    events = losses.lost(job_ids, "worker process pid 123")   # LOST each, or FINISHED (FAILED, WORKER_LOST)
"""

from __future__ import annotations

from featureviz.v1 import featureviz_pb2 as pb
from featureviz.worker import api

__all__ = ["Losses"]


class Losses:
    """How many times each job lost its worker. ``max_attempts``: the loss that ends a job FAILED (WORKER_LOST)."""

    def __init__(self, max_attempts: int = 3):
        self.max_attempts = max(1, int(max_attempts))
        self._count: dict[str, int] = {}
        self._cancelled: set[str] = set()

    def cancelling(self, job_id: str) -> None:
        self._cancelled.add(job_id)

    def forget(self, job_id: str) -> None:
        self._count.pop(job_id, None)
        self._cancelled.discard(job_id)

    def lost(self, job_ids, where: str) -> list[api.WorkerEvent]:
        """The events of jobs whose worker (``where``: named in the message) died: CANCELLED for one being
        cancelled, LOST (the server queues it again from step 0), or FAILED with reason WORKER_LOST once a job has
        lost its worker ``max_attempts`` times."""
        events = []
        for job_id in job_ids:
            if job_id in self._cancelled:
                self.forget(job_id)
                events.append(api.WorkerEvent(api.FINISHED, job_id, state=pb.JOB_STATE_CANCELLED))
                continue
            count = self._count[job_id] = self._count.get(job_id, 0) + 1
            if count >= self.max_attempts:
                self.forget(job_id)
                events.append(api.WorkerEvent(api.FINISHED, job_id, state=pb.JOB_STATE_FAILED, error=pb.JobError(
                    code="ABORTED", reason="WORKER_LOST",
                    message=f"the worker running this job died {count} times (last: {where}); the job is not run "
                            "again")))
            else:
                events.append(api.WorkerEvent(api.LOST, job_id))
        return events
