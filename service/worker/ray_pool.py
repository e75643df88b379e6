"""Workers as Ray actors (``featureviz serve --ray``): one :class:`WorkerHost` actor per GPU (``num_gpus=1``) or
``--workers N`` CPU actors, behind the same :class:`featureviz.worker.api.Worker` interface as the embedded worker.

- Each actor runs a :class:`featureviz.worker.local.LocalWorker` (its model LRU cache, the batched device loop).
  The front end (server, store, queue, event log) imports neither torch nor this module's actor code paths.
- Placement (:meth:`RayPool._place`): a worker that already holds the job's model and has room (model affinity),
  else the least-loaded worker (ties: the one given a job least recently).
- Model bytes reach the actors through Ray's object store: the pool ``ray.put``\\ s a model's bytes once per sha256
  and passes the reference inside a list, so an actor fetches the bytes only when its cache misses. No shared
  filesystem.
- Events: one poller thread per actor pulls every buffered event in one call (``poll``, blocking up to half a
  second when there is none), not one RPC per step per job.
- Faults: actors have ``max_restarts=-1``. When a poll fails or an actor answers with a new incarnation, the jobs
  it held are lost: each goes back to the server's queue (a LOST event) and runs again from step 0 with the same
  spec and seed, or ends FAILED with reason WORKER_LOST after ``max_attempts`` losses. A cancel goes to the actor
  at once (it leaves at the next step); a lost job that was being cancelled ends CANCELLED.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid

from featureviz.errors import FeaturevizError
from featureviz.errors import Unavailable
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.worker import api
from featureviz.worker.losses import Losses

__all__ = ["RayPool", "WorkerHost", "ray_pool", "import_ray", "RAY_MISSING", "init_local_ray", "connect_ray",
           "RayUnreachable", "RAY_CONNECT_SECONDS"]

log = logging.getLogger("featureviz.worker.ray")

RAY_MISSING = "serving with Ray (--ray) needs the optional extra: pip install 'featureviz[ray]'"
POLL_SECONDS = 0.5
RAY_CONNECT_SECONDS = 30.0  # --ray ADDRESS: joining the cluster takes at most this long, else serve exits
UP_WAIT_SECONDS = 300.0  # a call that finds every actor restarting waits this long for one to come back
_REFS_KEPT = 32  # model references the pool keeps (their bytes stay in the object store while referenced)
# tests only: a job with this seed kills the actor that receives it (a job that crashes its worker)
FAULT_CRASH_SEED = "FEATUREVIZ_FAULT_CRASH_SEED"
_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayMissing(FeaturevizError):
    """Ray is not installed."""




def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayMissing(RAY_MISSING, reason="RAY_MISSING") from exc
    return ray


def init_local_ray(num_cpus: int, num_gpus: int | None = None) -> None:
    """Start a local Ray instance bound to loopback (no dashboard), unless this process already joined one.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray replaces a loopback address by the
    machine's routable one (``services.resolve_ip_for_localhost``) and its servers bind there. Ray's own switch
    for single-machine instances, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read at import, inherited by the Ray
    processes), makes the node's address 127.0.0.1: GCS, raylet and workers then listen on loopback only."""
    os.environ[_LOCAL_ONLY] = "0"
    ray = import_ray()
    if ray.is_initialized():
        return
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # ray was imported before the variable was set
    kwargs = {"num_gpus": num_gpus} if num_gpus is not None else {}
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, **kwargs)


class WorkerHost:
    """The actor: a LocalWorker and a buffer of its events. Ray runs ``__init__`` again after a restart (a new
    incarnation, nothing in memory)."""

    def __init__(self, worker_id: str, config: api.WorkerConfig):
        import ray

        from featureviz.worker.local import LocalWorker

        self.worker_id = worker_id
        self.incarnation = uuid.uuid4().hex
        node_id = ray.get_runtime_context().get_node_id()
        self.node = next((n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("NodeID") == node_id),
                         node_id)  # the Ray node's address
        self._refs: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._events: list[api.WorkerEvent] = []
        self._cv = threading.Condition()
        self._crash_seed = os.environ.get(FAULT_CRASH_SEED)
        self.worker = LocalWorker(config, model_source=self._source)
        self.worker.start(self._sink)
        from featureviz.heap import WORKER_PRELOAD
        from featureviz.heap import settle

        settle(WORKER_PRELOAD)  # the actor's process: frozen before any model (featureviz.heap)

    def _source(self, sha256: str):
        import ray

        ref = self._refs.get(sha256)
        return None if ref is None else ray.get(ref)

    def _learn(self, sha256: str, refs: list, extra: dict | None = None) -> None:
        """Remember the object-store refs of a job's model (``refs[0]``) and of the other models it reads
        (``extra``: sha256 -> ref; a judge), so ``_source`` finds their bytes."""
        learned = ({sha256: refs[0]} if refs else {}) | dict(extra or {})
        for sha, ref in learned.items():
            self._refs[sha] = ref
            self._refs.move_to_end(sha)
        while len(self._refs) > _REFS_KEPT:
            self._refs.popitem(last=False)

    def _sink(self, event: api.WorkerEvent | list[api.WorkerEvent]) -> None:
        events = event if isinstance(event, list) else [event]
        for one in events:
            if one.kind in (api.STARTED, api.STEPS):
                one.worker = self.worker_id
        with self._cv:
            self._events.extend(events)
            self._cv.notify_all()

    def hello(self) -> dict:
        return {"incarnation": self.incarnation, "pid": os.getpid(), "node": self.node,
                "max_step_images": self.worker.max_step_images, "device": self.worker.device().SerializeToString()}

    def load_model(self, sha256: str, refs: list, limits: dict | None):
        self._learn(sha256, refs)
        return self.worker.load_model(sha256, self._source(sha256), limits=limits)

    def admit(self, sha256: str, refs: list, spec: bytes, extra: dict | None = None,
              priors: dict | None = None, matches: dict | None = None) -> api.Admission:
        self._learn(sha256, refs, extra)
        return self.worker.admit(sha256, spec, priors, matches)

    def submit(self, submission: api.Submission, refs: list, extra: dict | None = None) -> None:
        self._learn(submission.model, refs, extra)
        if self._crash_seed is not None and pb.JobSpec.FromString(submission.spec).seed == int(self._crash_seed):
            log.error("job %s: %s matches its seed; exiting", submission.job_id, FAULT_CRASH_SEED)
            os._exit(70)
        self.worker.submit(submission)

    def cancel(self, job_id: str) -> None:
        self.worker.cancel(job_id)

    def exemplars(self, sha256: str, refs: list, query: api.ExemplarQuery) -> pb.GetExemplarsResponse:
        self._learn(sha256, refs)
        return self.worker.exemplars(query)

    def dataset_image(self, query: api.ImageQuery) -> pb.DatasetImageData:
        return self.worker.dataset_image(query)

    def join_scores(self, sha256: str, refs: list, query: api.JoinQuery) -> list:
        self._learn(sha256, refs)
        return self.worker.join_scores(query)

    def drop_model(self, sha256: str) -> None:
        self._refs.pop(sha256, None)
        self.worker.drop_model(sha256)

    def poll(self, timeout: float):
        """(incarnation, events since the last poll, WorkerInfo bytes); waits up to ``timeout`` for an event."""
        with self._cv:
            if not self._events:
                self._cv.wait(timeout)
            events, self._events = self._events, []
        return self.incarnation, events, self._info().SerializeToString()

    def _info(self) -> pb.WorkerInfo:
        info = self.worker.info()
        info.id, info.node, info.pid, info.up = self.worker_id, self.node, os.getpid(), True
        return info

    def stop(self, grace: float) -> list[api.WorkerEvent]:
        self.worker.stop(grace)
        with self._cv:
            events, self._events = self._events, []
        return events


@dataclasses.dataclass
class _Host:
    index: int
    id: str
    actor: object
    incarnation: str = ""
    pid: int = 0
    node: str = ""
    max_step_images: int = 1
    device: pb.Device | None = None
    up: bool = True
    jobs: dict = dataclasses.field(default_factory=dict)  # job id -> images
    models: set = dataclasses.field(default_factory=set)
    info: pb.WorkerInfo | None = None
    turn: int = 0

    @property
    def load(self) -> int:
        return sum(self.jobs.values())


class RayPool(api.Worker):
    """``actors`` WorkerHost actors (``num_gpus`` each, else ``num_cpus``), created at once; blocks until each
    has answered (they import torch). ``max_attempts``: a job whose worker died that many times ends FAILED."""

    def __init__(self, config: api.WorkerConfig, *, model_source, actors: int, num_gpus: float = 0,
                 num_cpus: float = 1, max_attempts: int = 3, owns_ray: bool = False):
        ray = import_ray()
        self._ray = ray
        self._source = model_source
        self._owns_ray = owns_ray
        self._lock = threading.RLock()
        self._up = threading.Condition()  # notified when an actor is back
        self._sink_lock = threading.Lock()
        self._sink = None
        self._closing = threading.Event()
        self._refs: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._job_host: dict[str, _Host] = {}
        self._job_model: dict[str, str] = {}
        self._pending: list[api.Submission] = []  # submitted while no actor was up
        self._losses = Losses(max_attempts)  # jobs lost with their actor: LOST, or FAILED after max_attempts
        self._tickets: dict[str, int] = {}  # admission ticket -> host index
        self._turn = 0
        options = {"num_cpus": num_cpus}
        if num_gpus:
            options["num_gpus"] = num_gpus
            config = dataclasses.replace(config, device=config.device if (config.device or "").startswith("cuda")
                                         else "cuda")
        else:
            config = dataclasses.replace(config, device="cpu")
            if config.threads is None:
                config = dataclasses.replace(config, threads=max(1, int(num_cpus)))
        cls = ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"io": 2, "load": 2})(WorkerHost)
        self._hosts = [_Host(i, f"ray-{i}", cls.options(**options).remote(f"ray-{i}", config)) for i in range(actors)]
        for host, hello in zip(self._hosts, ray.get([h.actor.hello.remote() for h in self._hosts])):
            self._greet(host, hello)
        self.max_step_images = sum(h.max_step_images for h in self._hosts)
        self._pollers = [threading.Thread(target=self._poll_loop, args=(h,), name=f"featureviz-{h.id}", daemon=True)
                         for h in self._hosts]

    @staticmethod
    def _greet(host: _Host, hello: dict) -> None:
        host.incarnation, host.pid, host.node = hello["incarnation"], hello["pid"], hello["node"]
        host.max_step_images = int(hello["max_step_images"])
        host.device = pb.Device.FromString(hello["device"])
        host.models = set()
        host.up = True

    # ------------------------------------------------------------------------------------------- interface

    def start(self, sink) -> None:
        self._sink = sink
        for thread in self._pollers:
            thread.start()

    def _ref(self, sha256: str, data=None):
        with self._lock:
            ref = self._refs.get(sha256)
            if ref is not None:
                self._refs.move_to_end(sha256)
                return ref
        if data is None:
            data = self._source(sha256)
            if data is None:
                from featureviz.errors import FailedPrecondition

                raise FailedPrecondition(f"the file of model {sha256} is missing from the store; upload it again",
                                         reason="MODEL_FILE_MISSING")
        if not isinstance(data, (bytes, bytearray)):
            with open(data, "rb") as f:
                data = f.read()
        ref = self._ray.put(bytes(data))
        with self._lock:
            self._refs[sha256] = ref
            while len(self._refs) > _REFS_KEPT:
                self._refs.popitem(last=False)
        return ref

    def _extra(self, spec: bytes) -> dict:
        """Refs of the other models a job reads besides its own: its judge (``JobSpec.judge``) and its generator
        (``JobSpec.generator``)."""
        job_spec = pb.JobSpec.FromString(spec)
        shas = [field.model.removeprefix("models/") for name in ("judge", "generator")
                if job_spec.HasField(name) and (field := getattr(job_spec, name)).model]
        return {sha: self._ref(sha) for sha in shas}

    def _call(self, sha256: str, method: str, *args):
        """A blocking call on the placed worker (another one if it is down); the actor's own error re-raised."""
        ray = self._ray
        deadline = time.monotonic() + UP_WAIT_SECONDS
        while True:
            with self._lock:
                first = self._place(sha256, 1, commit=False)
                order = [first] + [h for h in self._hosts if h is not first and h.up]
            last = None
            for host in order:
                try:
                    return host, ray.get(getattr(host.actor, method).options(concurrency_group="load").remote(*args))
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    raise cause if isinstance(cause, BaseException) else exc
                except ray.exceptions.UnserializableException as exc:  # a bug (its error did not pickle), not a
                    # dead actor: retrying elsewhere would fail the same way
                    raise RuntimeError(f"worker {host.id}: {method} raised an error that could not be sent back: "
                                       f"{str(exc)[:300]}") from None
                except ray.exceptions.RayError as exc:  # the actor died or is restarting: try the next one
                    log.warning("worker %s: %s failed (%s: %s); trying another", host.id, method,
                                type(exc).__name__, str(exc)[:300])
                    last = exc
            with self._up:  # every actor is restarting: wait for one to come back
                left = deadline - time.monotonic()
                if left <= 0 or self._closing.is_set():
                    raise Unavailable(f"no worker answered ({type(last).__name__}); try again",
                                      reason="WORKER_UNAVAILABLE")
                self._up.wait(min(left, POLL_SECONDS * 4))

    def load_model(self, sha256: str, source, limits: dict | None = None) -> tuple[pb.Model, pb.ListLayersResponse]:
        ref = self._ref(sha256, source)
        host, result = self._call(sha256, "load_model", sha256, [ref], limits)
        with self._lock:
            host.models.add(sha256)
        return result

    def drop_model(self, sha256: str) -> None:
        with self._lock:
            self._refs.pop(sha256, None)
            for host in self._hosts:
                host.models.discard(sha256)
                host.actor.drop_model.remote(sha256)

    def admit(self, sha256: str, spec: bytes, priors: dict | None = None, matches: dict | None = None) -> api.Admission:
        ref = self._ref(sha256)
        host, admission = self._call(sha256, "admit", sha256, [ref], spec, self._extra(spec), priors, matches)
        with self._lock:
            host.models.add(sha256)
            if admission.ticket:  # an exemplar index job has none: it is resolved, not checked into a spec
                self._tickets[admission.ticket] = host.index
            while len(self._tickets) > 4096:
                self._tickets.pop(next(iter(self._tickets)))
        return admission

    def exemplars(self, query: api.ExemplarQuery) -> pb.GetExemplarsResponse:
        """On the worker that holds the model (its field is computed there the first time). The index file's path
        is the server's store: the actors must see the same store folder (one machine, or a shared volume)."""
        ref = self._ref(query.model)
        host, result = self._call(query.model, "exemplars", query.model, [ref], query)
        with self._lock:
            host.models.add(query.model)
        return result

    def join_scores(self, query: api.JoinQuery) -> list:
        """On the worker that holds the model (an atlas's dataset join: the index file by path, as for
        :meth:`exemplars`)."""
        ref = self._ref(query.model)
        host, result = self._call(query.model, "join_scores", query.model, [ref], query)
        with self._lock:
            host.models.add(query.model)
        return result

    def dataset_image(self, query: api.ImageQuery) -> pb.DatasetImageData:
        """On any worker (the store's image file by path: a shared store folder, as for :meth:`exemplars`)."""
        return self._call("", "dataset_image", query)[1]

    def _place(self, sha256: str, images: int, *, commit: bool = True) -> _Host:
        """Model affinity if that worker has room, else the least-loaded worker (call with the lock held)."""
        hosts = [h for h in self._hosts if h.up] or self._hosts
        holding = [h for h in hosts if sha256 in h.models and (h.load == 0 or h.load + images <= h.max_step_images)]
        host = min(holding or hosts, key=lambda h: (h.load / max(1, h.max_step_images), h.turn))
        if commit:
            self._turn += 1
            host.turn = self._turn
        return host

    def submit(self, submission: api.Submission) -> None:
        ref = self._ref(submission.model)
        extra = self._extra(submission.spec)  # outside the lock: _ref takes it
        with self._lock:
            if not any(h.up for h in self._hosts):  # every actor is restarting: the first one back takes it
                self._pending.append(submission)
                return
            host = self._place(submission.model, submission.images)
            if self._tickets.pop(submission.ticket, None) != host.index:
                submission = dataclasses.replace(submission, ticket="")  # that worker converts the spec again
            host.jobs[submission.job_id] = submission.images
            host.models.add(submission.model)
            self._job_host[submission.job_id] = host
            self._job_model[submission.job_id] = submission.model
            host.actor.submit.remote(submission, [ref], extra)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            for submission in self._pending:
                if submission.job_id == job_id:
                    self._pending.remove(submission)
                    self._emit(api.WorkerEvent(api.FINISHED, job_id, state=pb.JOB_STATE_CANCELLED))
                    return
            host = self._job_host.get(job_id)
            if host is not None:
                self._losses.cancelling(job_id)
                host.actor.cancel.remote(job_id)

    def device(self) -> pb.Device:
        return self._hosts[0].device

    def workers(self) -> list[pb.WorkerInfo]:
        out = []
        with self._lock:
            for host in self._hosts:
                info = pb.WorkerInfo()
                if host.info is not None:
                    info.CopyFrom(host.info)
                info.id, info.node, info.pid, info.up = host.id, host.node, host.pid, host.up
                info.device.CopyFrom(host.device)
                info.max_step_images = host.max_step_images
                if not host.up:
                    info.active_slots = info.active_images = info.parked_slots = 0
                out.append(info)
        return out

    def info(self) -> pb.WorkerInfo:
        """All workers together: the models any holds, the slots and images of all, their images per step summed."""
        workers = self.workers()
        total = pb.WorkerInfo(device=self.device(), max_step_images=self.max_step_images, id="ray", node="",
                              up=all(w.up for w in workers))
        total.models.extend(sorted({m for w in workers for m in w.models}))
        total.active_slots = sum(w.active_slots for w in workers)
        total.active_images = sum(w.active_images for w in workers)
        total.parked_slots = sum(w.parked_slots for w in workers)
        total.memory_allocated_bytes = sum(w.memory_allocated_bytes for w in workers)
        return total

    def pid_of(self, worker_id: str) -> int:
        """The process id of a worker actor (tests kill it)."""
        with self._lock:
            return next(h.pid for h in self._hosts if h.id == worker_id)

    def stop(self, grace: float) -> None:
        ray = self._ray
        finals = [h.actor.stop.options(concurrency_group="load").remote(grace) for h in self._hosts]
        results = []
        for ref in finals:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError:
                results.append([])
        self._closing.set()
        for thread in self._pollers:
            if thread.is_alive():
                thread.join()
        for host, events in zip(self._hosts, results):
            self._forward(host, events)
        for host in self._hosts:
            try:
                ray.kill(host.actor, no_restart=True)
            except Exception:
                pass
        if self._owns_ray:
            ray.shutdown()

    # ------------------------------------------------------------------------------------------- events

    def _poll_loop(self, host: _Host) -> None:
        ray = self._ray
        while not self._closing.is_set():
            try:
                call = host.actor.poll.options(concurrency_group="io").remote(POLL_SECONDS)
                incarnation, events, info = ray.get(call, timeout=POLL_SECONDS + 30)
            except ray.exceptions.GetTimeoutError:
                continue
            except ray.exceptions.RayError as exc:
                if self._closing.is_set():
                    return
                log.warning("worker %s (pid %d) is gone (%s); its jobs go back to the queue", host.id, host.pid,
                            type(exc).__name__)
                self._host_lost(host)
                self._wait_up(host)
                continue
            if incarnation != host.incarnation:  # it restarted between two polls
                self._host_lost(host)
                self._wait_up(host)
                continue
            with self._lock:
                host.info = pb.WorkerInfo.FromString(info)
                host.models = set(host.info.models) | {self._job_model[j] for j in host.jobs if j in self._job_model}
            self._forward(host, events)

    def _forward(self, host: _Host, events: list[api.WorkerEvent]) -> None:
        for event in events:
            with self._lock:
                if event.kind != api.STEPS and self._job_host.get(event.job_id) is not host:
                    continue  # a job this worker no longer holds (lost and placed again)
                if event.kind in (api.FINISHED, api.REQUEUED):
                    host.jobs.pop(event.job_id, None)
                    self._job_host.pop(event.job_id, None)
                    self._job_model.pop(event.job_id, None)
                    self._losses.forget(event.job_id)
            self._emit(event)

    def _emit(self, event: api.WorkerEvent) -> None:
        if self._sink is None:
            return
        with self._sink_lock:
            try:
                self._sink(event)
            except Exception:
                log.exception("worker event %s of job %s", event.kind, event.job_id)

    def _host_lost(self, host: _Host) -> None:
        """The actor died: each of its jobs is queued again (LOST), or FAILED after max_attempts losses."""
        with self._lock:
            host.up = False
            host.info = None
            host.models = set()
            lost, host.jobs = list(host.jobs), {}
            for job_id in lost:
                self._job_host.pop(job_id, None)
                self._job_model.pop(job_id, None)
            events = self._losses.lost(lost, f"{host.id} on {host.node}")
        for event in events:
            log.warning("job %s: worker %s lost (%s)", event.job_id, host.id,
                        "failed" if event.kind == api.FINISHED else "queued again")
            self._emit(event)

    def _wait_up(self, host: _Host) -> None:
        """Until Ray has restarted the actor (``__init__`` again: a new incarnation)."""
        ray = self._ray
        while not self._closing.is_set():
            try:
                hello = ray.get(host.actor.hello.options(concurrency_group="io").remote(), timeout=60)
            except ray.exceptions.RayError:
                self._closing.wait(POLL_SECONDS)
                continue
            with self._lock:
                self._greet(host, hello)
                pending, self._pending = self._pending, []
            with self._up:
                self._up.notify_all()
            log.info("worker %s is back (pid %d)", host.id, host.pid)
            for submission in pending:
                self.submit(submission)
            return


class RayUnreachable(FeaturevizError):
    """The Ray cluster of ``--ray ADDRESS`` did not answer within the timeout."""

    reason = "RAY_UNREACHABLE"


def connect_ray(address: str, timeout: float = RAY_CONNECT_SECONDS) -> None:
    """Join the Ray cluster at ``address`` (``HOST:PORT`` of its GCS, or ``ray://HOST:PORT``) within ``timeout``
    seconds, else raise :class:`RayUnreachable` (one line naming the address and the timeout).

    ``ray.init(address=...)`` does not give up on an address that does not answer: it retries (minutes), printing
    warnings. So the GCS port is probed first with a plain TCP connect (a closed port or a silent host fails in
    ``timeout`` at most), then ``ray.init`` runs in a daemon thread that is waited for until the deadline (a port
    that accepts but is not Ray). A thread left hanging there is abandoned: ``featureviz serve`` then exits."""
    ray = import_ray()
    deadline = time.monotonic() + timeout
    endpoint = _host_port(address)
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=timeout).close()
        except OSError as exc:
            raise RayUnreachable(f"could not reach the Ray cluster at {address} within {timeout:g} s (--ray-timeout): "
                                 f"{exc.strerror or type(exc).__name__}; check the address and that Ray runs there "
                                 "(ray status)") from None
    outcome: list[BaseException | None] = []

    def join() -> None:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            outcome.append(exc)

    thread = threading.Thread(target=join, name="featureviz-ray-init", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not outcome:
        raise RayUnreachable(f"the Ray cluster at {address} did not answer within {timeout:g} s (--ray-timeout): its "
                             "port accepts connections but ray.init did not finish; check that it is a Ray GCS "
                             "address (ray status)")
    if outcome[0] is not None:
        first = (str(outcome[0]).strip().splitlines() or [type(outcome[0]).__name__])[0][:300]
        raise RayUnreachable(f"could not join the Ray cluster at {address}: {first}") from outcome[0]


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` or ``ray://HOST:PORT`` (IPv6 in brackets); None for other forms."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def ray_pool(address: str, config: api.WorkerConfig, *, model_source, workers: int | None = None,
             max_attempts: int = 3, timeout: float = RAY_CONNECT_SECONDS) -> RayPool:
    """``address``: "auto" starts a local Ray bound to loopback; anything else joins that cluster
    (:func:`connect_ray`, within ``timeout`` seconds). ``workers``: that many CPU actors; None: one actor per GPU
    of the cluster (one CPU actor when it has none)."""
    ray = import_ray()
    owns = False
    if not ray.is_initialized():
        if address == "auto":
            init_local_ray(num_cpus=max(workers or 1, os.cpu_count() or 1))
            owns = True
        else:
            connect_ray(address, timeout)
    gpus = 0 if workers else int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return RayPool(config, model_source=model_source, actors=gpus, num_gpus=1, num_cpus=1,
                       max_attempts=max_attempts, owns_ray=owns)
    return RayPool(config, model_source=model_source, actors=workers or 1, num_cpus=1, max_attempts=max_attempts,
                   owns_ray=owns)
