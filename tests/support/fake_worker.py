"""A scripted worker for server tests: the real server (grpc.aio on loopback, the scheduler, the store, the event
log) with only the worker replaced, so the test decides when each job starts, progresses, finishes, fails or is
lost, and can hold events back to force a race. No torch, no device: a test takes milliseconds.

    fake = FakeWorker(max_step_images=2)
    with serve_in_background(ServerConfig(tmp_path), worker=fake) as server, Client(server.address) as fv:
        model = fv.upload(b"any bytes")                 # load_model: a made-up catalog (layers ``conv``, ``logits``)
        job = fv.submit(model.sha256, {"channel": {"layer": "conv", "channel": 0}}, steps=4)
        assert fake.granted() == [job.id]               # the scheduler's grants, in order
        fake.start_job(job.id); fake.progress(job.id, 2); fake.finish(job.id)
        assert fv.job(job.id).state == pb.JOB_STATE_SUCCEEDED

Events reach the server as the real worker's do: in order, on the worker's own output thread
(:class:`featureviz.worker.local.LocalWorker` emits from its output thread too). Each scripting call returns once
the server has handled its event (the scheduler's handler returned: the store, the log and the next grants are
done), so a test asserts right after it without waiting. Inside ``with fake.holding():`` events queue up instead
and are handed over, in order, when the block ends (a FINISHED the server has not seen yet, while a cancel
arrives).

Calls from the server are recorded: :attr:`submissions` (every grant, in order), :attr:`cancels`,
:attr:`admissions`, :attr:`loaded`. A cancel is only recorded: the test answers it (``fake.finish(job_id,
CANCELLED)``, as the real worker does at its next step), or ignores it (the job had ended in the worker). ``stop``
re-queues what the worker holds (REQUEUED events, as a stop whose grace ran out), or with ``crash=True`` sends
nothing (the process died: the store keeps whatever it had).
"""

from __future__ import annotations

import contextlib
import queue
import struct
import threading
import zlib

from featureviz.v1 import featureviz_pb2 as pb
from featureviz.worker import api

__all__ = ["FakeWorker", "SUCCEEDED", "FAILED", "CANCELLED", "TINY_PNG", "WAIT_SECONDS"]

SUCCEEDED, FAILED, CANCELLED = pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED
WAIT_SECONDS = 60.0  # the bound on every wait: events, not time, decide when a test goes on


def _png(width: int = 1, height: int = 1) -> bytes:
    """A valid grey RGB PNG, made without PIL."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


TINY_PNG = _png()
LAYERS = (pb.Layer(name="conv", op_type="Conv", shape=[1, 8, 32, 32], channels=8, spatial=True, depth=0,
                   layout="NCHW"),
          pb.Layer(name="logits", op_type="Gemm", shape=[1, 10], channels=10, spatial=False, depth=1,
                   is_logits=True, layout="NC"))


class _Delivery:
    """One event on its way to the server; ``done`` is set once the server's handler returned."""

    def __init__(self, event: api.WorkerEvent):
        self.event = event
        self.done = threading.Event()


class FakeWorker(api.Worker):
    """A :class:`featureviz.worker.api.Worker` whose events the test scripts (see the module docstring).
    ``max_step_images``: the images the scheduler may grant it at once (its share rule may grant more). ``worker_id``:
    what STARTED events carry (the job's ``worker``)."""

    def __init__(self, max_step_images: int = 1, *, worker_id: str = "fake", layers=LAYERS):
        self.max_step_images = max_step_images
        self.worker_id = worker_id
        self.layers = list(layers)
        self.submissions: list[api.Submission] = []  # every grant, in order (a lost or re-queued job again)
        self.cancels: list[str] = []
        self.admissions: list[tuple[str, pb.JobSpec]] = []
        self.loaded: list[str] = []
        self.refuse_admission: BaseException | None = None  # raised by every admit while set
        self._held: dict[str, api.Submission] = {}  # granted and not ended (nor lost, nor re-queued)
        self._started: set[str] = set()
        self._cv = threading.Condition()
        self._sink = None
        self._out: queue.Queue[_Delivery | None] = queue.Queue()
        self._holding: list[_Delivery] | None = None
        self._thread = threading.Thread(target=self._deliver, name="fake-worker-events", daemon=True)
        self._stopped = False
        self._crash = False

    # ------------------------------------------------------------------------------------------- the interface

    def start(self, sink) -> None:
        self._sink = sink
        self._thread.start()

    def load_model(self, sha256: str, source, limits: dict | None = None) -> tuple[pb.Model, pb.ListLayersResponse]:
        size = len(source) if isinstance(source, (bytes, bytearray)) else 0
        with self._cv:
            self.loaded.append(sha256)
        model = pb.Model(name=f"models/{sha256}", sha256=sha256, size_bytes=size, state=pb.MODEL_STATE_READY,
                         input_spec=pb.InputSpec(name="image", layout="NCHW", channels=3, default_height=32,
                                                 default_width=32, preprocess=pb.Preprocess(
                                                     mean=[0.0], std=[1.0], channel_order="RGB")),
                         layer_count=len(self.layers), logits_layer="logits")
        return model, pb.ListLayersResponse(layers=self.layers, total_size=len(self.layers))

    def drop_model(self, sha256: str) -> None:
        pass

    def admit(self, sha256: str, spec: bytes, priors: dict | None = None, matches: dict | None = None) -> api.Admission:
        job_spec = pb.JobSpec.FromString(spec)
        with self._cv:
            self.admissions.append((sha256, job_spec))
            ticket = f"ticket-{len(self.admissions)}"
        if self.refuse_admission is not None:
            raise self.refuse_admission
        if job_spec.HasField("atlas"):  # an atlas: its layers and units resolved on the fake catalog
            atlas = job_spec.atlas
            layers = [layer for layer in self.layers if not atlas.layers or layer.name in atlas.layers]
            units = [min(layer.channels, atlas.channels) if atlas.channels else layer.channels for layer in layers]
            size = (job_spec.size.height, job_spec.size.width) if job_spec.HasField("size") else (32, 32)
            return api.Admission(ticket="", kind="atlas", layers=[layer.name for layer in layers], units=units,
                                 depths=[layer.depth for layer in layers], size=size, channels=sum(units))
        if job_spec.HasField("exemplar_index"):  # an index job: resolved as the real worker does, on the fake catalog
            index = job_spec.exemplar_index
            size = (job_spec.size.height, job_spec.size.width) if job_spec.HasField("size") else (32, 32)
            p = job_spec.preprocess
            return api.Admission(ticket="", kind="exemplar_index",
                                 layers=list(index.layers) or [layer.name for layer in self.layers], size=size,
                                 preprocess={"mean": list(p.mean) or [0.0] * 3, "std": list(p.std) or [1.0] * 3,
                                             "channel_order": p.channel_order or "RGB"},
                                 k=index.k if index.HasField("k") else 16,
                                 batch_size=index.batch_size if index.HasField("batch_size") else 32, channels=4)
        return api.Admission(ticket=ticket, steps=job_spec.steps if job_spec.HasField("steps") else 512,
                             batch=job_spec.batch if job_spec.HasField("batch") else 1,
                             seed=job_spec.seed if job_spec.HasField("seed") else 0)

    def submit(self, submission: api.Submission) -> None:
        with self._cv:
            self.submissions.append(submission)
            self._held[submission.job_id] = submission
            self._cv.notify_all()

    def cancel(self, job_id: str) -> None:
        with self._cv:
            self.cancels.append(job_id)
            self._cv.notify_all()

    def device(self) -> pb.Device:
        return pb.Device(kind="cpu", name="fake worker", kernels="torch")

    def info(self) -> pb.WorkerInfo:
        with self._cv:
            started = [s for j, s in self._held.items() if j in self._started]
            return pb.WorkerInfo(device=self.device(), max_step_images=self.max_step_images, active_slots=len(started),
                                 active_images=sum(s.images for s in started), id=self.worker_id)

    def stop(self, grace: float, *, crash: bool | None = None) -> None:
        """Every held job back to the queue (REQUEUED), delivered before this returns; with ``crash`` (or after
        :meth:`crash_on_stop`) nothing at all, events held back included: the worker died with the process."""
        crash = self._crash if crash is None else crash
        if self._stopped:
            return
        self._stopped = True
        if not crash:
            self._release()
            for job_id in self.held():
                self.requeue(job_id)
        if self._thread.is_alive():
            self._out.put(None)
            self._thread.join(WAIT_SECONDS)

    # ------------------------------------------------------------------------------------------- what it saw

    def granted(self) -> list[str]:
        """The job ids of every grant so far, in order."""
        with self._cv:
            return [s.job_id for s in self.submissions]

    def held(self) -> list[str]:
        """The jobs the worker holds now (granted, not yet ended, lost or re-queued), in grant order."""
        with self._cv:
            return list(self._held)

    def wait_for(self, condition, what: str = "the condition") -> None:
        """Until ``condition()`` (read under the worker's lock) is true: a grant or a cancel made on another thread.
        Bounded by WAIT_SECONDS, so a broken server fails the test instead of hanging it."""
        with self._cv:
            if not self._cv.wait_for(condition, WAIT_SECONDS):
                raise AssertionError(f"the fake worker waited {WAIT_SECONDS:.0f} s for {what}; granted "
                                     f"{[s.job_id for s in self.submissions]}, cancels {self.cancels}")

    def wait_granted(self, job_id: str, times: int = 1) -> api.Submission:
        """The submission of ``job_id``'s ``times``-th grant, once it came."""
        self.wait_for(lambda: sum(s.job_id == job_id for s in self.submissions) >= times,
                      f"grant {times} of job {job_id}")
        with self._cv:
            return [s for s in self.submissions if s.job_id == job_id][times - 1]

    def wait_cancel(self, job_id: str) -> None:
        self.wait_for(lambda: job_id in self.cancels, f"a cancel of job {job_id}")

    def crash_on_stop(self) -> None:
        """The next stop sends nothing: as if the process running the server and its worker was killed."""
        self._crash = True

    # ------------------------------------------------------------------------------------------- scripting

    def start_job(self, job_id: str) -> None:
        """STARTED: the job joined the device steps (RUNNING)."""
        with self._cv:
            self._started.add(job_id)
        self._emit(api.WorkerEvent(api.STARTED, job_id, worker=self.worker_id))

    def progress(self, job_id: str, step: int, steps: int | None = None, objective=(0.5,)) -> None:
        steps = steps if steps is not None else self._steps(job_id)
        self._emit(api.WorkerEvent(api.PROGRESS, job_id, progress=pb.Progress(
            step=step, steps=steps, objective=list(objective), seconds_per_step=0.001)))

    def preview(self, job_id: str, step: int) -> None:
        self._emit(api.WorkerEvent(api.PREVIEW, job_id, preview=pb.Preview(
            step=step, images=[pb.RenderedImage(index=0, png=TINY_PNG, width=1, height=1)])))

    def finish(self, job_id: str, state: int = SUCCEEDED, *, error: pb.JobError | None = None) -> None:
        """FINISHED: SUCCEEDED (a result of one 1x1 PNG per image), CANCELLED (a result, as a cancelled run has) or
        FAILED (``error``, or an INTERNAL one). An index job's SUCCEEDED writes a stand-in file at its final path (the
        real worker's finished index) and carries ``result.exemplar_index``."""
        result = None
        with self._cv:
            work = next((s.index for s in reversed(self.submissions) if s.job_id == job_id), None)
        if work is not None and state == SUCCEEDED:
            with open(work.final_path, "wb") as f:
                f.write(b"a stand-in for the index file")
            result = pb.JobResult(steps_done=len(work.names), exemplar_index=pb.ExemplarIndexResult(
                index=work.index, dataset=work.dataset, layers=work.layers, images=len(work.names), k=work.k,
                size=pb.ImageSize(height=work.size[0], width=work.size[1]), channels=4))
        elif state != FAILED:
            images = self._images(job_id)
            result = pb.JobResult(images=[pb.RenderedImage(index=i, png=TINY_PNG, width=1, height=1)
                                          for i in range(images)], steps_done=self._steps(job_id),
                                  objective_description="fake")
        elif error is None:
            error = pb.JobError(code="INTERNAL", reason="INTERNAL_ERROR", message="the fake worker failed the job")
        self._forget(job_id)
        self._emit(api.WorkerEvent(api.FINISHED, job_id, state=state, result=result, error=error))

    def fail(self, job_id: str, code: str = "INTERNAL", reason: str = "INTERNAL_ERROR", message: str = "failed",
             field: str = "") -> None:
        self.finish(job_id, FAILED, error=pb.JobError(code=code, reason=reason, message=message, field=field))

    def run(self, job_id: str, steps: int | None = None) -> None:
        """A whole uneventful run: STARTED, one PROGRESS per step, FINISHED SUCCEEDED."""
        steps = steps if steps is not None else self._steps(job_id)
        self.start_job(job_id)
        for step in range(1, steps + 1):
            self.progress(job_id, step, steps)
        self.finish(job_id)

    def lose(self, job_id: str) -> None:
        """LOST: the worker running the job died (a Ray actor restarted); the server queues it again."""
        self._forget(job_id)
        self._emit(api.WorkerEvent(api.LOST, job_id))

    def requeue(self, job_id: str) -> None:
        """REQUEUED: stopped before it ended (a stop's grace ran out); it stays QUEUED for the next start."""
        self._forget(job_id)
        self._emit(api.WorkerEvent(api.REQUEUED, job_id))

    @contextlib.contextmanager
    def holding(self):
        """Events emitted inside the block wait; they reach the server, in order, when it ends."""
        with self._cv:
            assert self._holding is None, "holding() does not nest"
            self._holding = []
        try:
            yield self
        finally:
            self._release()

    # ------------------------------------------------------------------------------------------- internals

    def _release(self) -> None:
        with self._cv:
            held, self._holding = self._holding or [], None
        for delivery in held:
            self._out.put(delivery)
        for delivery in held:
            self._wait(delivery)

    def _steps(self, job_id: str) -> int:
        spec = self._spec(job_id)
        return spec.steps if spec is not None and spec.HasField("steps") else 512

    def _images(self, job_id: str) -> int:
        spec = self._spec(job_id)
        return spec.batch if spec is not None and spec.HasField("batch") else 1

    def _spec(self, job_id: str) -> pb.JobSpec | None:
        with self._cv:
            found = self._held.get(job_id) or next((s for s in reversed(self.submissions) if s.job_id == job_id),
                                                   None)
        return pb.JobSpec.FromString(found.spec) if found is not None else None

    def _forget(self, job_id: str) -> None:
        with self._cv:
            self._held.pop(job_id, None)
            self._started.discard(job_id)

    def _emit(self, event: api.WorkerEvent) -> None:
        assert self._sink is not None, "the server has not started the worker"
        delivery = _Delivery(event)
        with self._cv:
            if self._holding is not None:
                self._holding.append(delivery)
                return
        self._out.put(delivery)
        self._wait(delivery)

    def _wait(self, delivery: _Delivery) -> None:
        if not delivery.done.wait(WAIT_SECONDS):
            raise AssertionError(f"the server did not handle the {delivery.event.kind} event of job "
                                 f"{delivery.event.job_id} within {WAIT_SECONDS:.0f} s")

    def _deliver(self) -> None:
        while True:
            delivery = self._out.get()
            if delivery is None:
                return
            try:
                self._sink(delivery.event)  # the scheduler logs its own errors and keeps going
            finally:
                delivery.done.set()
