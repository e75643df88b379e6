"""The re-attach logic of a job watch, shared by :meth:`Client.watch` and :meth:`AsyncClient.watch`.

A watch is a WatchJob stream from a sequence number. When a stream breaks with a retryable status, the watch
opens a new one from the last ``seq`` it saw, after a back-off, up to ``reconnects`` times in a row; the whole
watch keeps one deadline. The two clients differ only in how they wait and iterate.
"""

from __future__ import annotations

import time

import grpc

from featureviz.client.errors import reconnect_delay
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["Reattach"]


class Reattach:
    """State of one watch: the next request, the time left, what an event or a broken stream means.

    ``create``: the watch begins with CreateAndWatchJob (``job`` empty). Until its snapshot names the job, a broken
    stream sends that request again (its request id makes it idempotent: one job); after, it re-attaches by
    WatchJob from the last seq, as any watch."""

    def __init__(self, job: str, *, from_seq: int = 0, previews: bool = False, timeout: float | None = None,
                 reconnects: int = 5, create: pb.CreateAndWatchJobRequest | None = None):
        self.job, self.seq, self.previews, self.reconnects = job, from_seq, previews, reconnects
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.failures = 0
        self.create = create

    def creating(self) -> bool:
        """Whether the next stream is the CreateAndWatchJob call (the job is not known yet)."""
        return self.create is not None and not self.job

    def request(self) -> pb.WatchJobRequest:
        return pb.WatchJobRequest(job=self.job, from_seq=self.seq, include_previews=self.previews)

    def remaining(self) -> float | None:
        """Seconds left for the next stream (the whole watch's deadline), or None."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def seen(self, event: pb.JobEvent) -> bool:
        """Record an event; True when it is the result (the watch ends after handing it over)."""
        self.failures = 0
        self.seq = max(self.seq, event.seq)
        if not self.job and event.HasField("snapshot"):
            self.job = event.snapshot.id
        return event.HasField("result")

    def broken(self, err: grpc.RpcError) -> float:
        """Seconds to wait before re-attaching; raises the client error when the watch must end instead."""
        self.failures += 1
        return reconnect_delay(err, self.failures, self.reconnects)
