"""The local worker in a child process (``featureviz serve --worker-process``): the device loop on its own core and
its own GIL, behind the same :class:`featureviz.worker.api.Worker` interface as the embedded worker.

On a CPU with a tiny model the device thread is mostly Python dispatch: in one process it and the event loop
(gRPC, the store) take turns on one GIL. Here the server process keeps the servicers, the store and the queue;
the child (``python -m featureviz.worker.child``) runs a :class:`featureviz.worker.local.LocalWorker`.

- **Wire**: a socketpair, framed messages (``multiprocessing.connection.Connection`` on the fd), pickled. Every
  Worker method is a request with an id and a reply: the value, or the error re-raised here with its class and
  message (a :class:`featureviz.errors.FeaturevizError` keeps its reason and field, so it maps to the same gRPC
  status; another exception keeps its class name). Calls come from several threads at once (admissions): the child
  runs them on a thread pool. ``submit``, ``cancel``, ``drop_model`` and ``admitting`` are one-way (no reply).
- **Events**: the child's sink sends each list of WorkerEvents as it comes; a thread here hands them to the
  server's sink in order (lists queued together go as one list: one store commit).
- **Model bytes**: the child's ``model_source(sha256)`` asks this process (a request the other way on the same
  connection), answered through the server's ``model_source`` (the store's checked read), so every path that reads
  a model (jobs, judges, generators, priors, exemplars, joins) works as in-process.
- **Trust**: the child runs tenants' models. What it sends is unpickled with an allow-list of classes (the worker
  API's dataclasses, the featureviz.v1 messages, the featureviz errors): a child that sends anything else is
  killed. Pickle between two processes of ours on a private socketpair is what Ray does too.
- **Death**: when the child dies (SIGKILL, a segfault, OOM), each job it held goes back to the queue (LOST; FAILED
  with WORKER_LOST after ``max_attempts`` losses, :class:`featureviz.worker.losses.Losses`), the calls in flight
  fail with UNAVAILABLE (WORKER_UNAVAILABLE), and a new child starts (at once, then backing off while it keeps
  dying young). When the server dies the child exits: EOF on its connection, and ``PR_SET_PDEATHSIG`` (Linux)
  tied to the one thread here that starts every child and lives as long as the worker.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import io
import itertools
import logging
import os
import pickle
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from featureviz import errors
from featureviz import phases
from featureviz.errors import Unavailable
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.worker import api
from featureviz.worker.losses import Losses

__all__ = ["ProcessWorker", "CHILD_MODULE", "START_SECONDS", "load_reply", "encode_error", "raise_error"]

log = logging.getLogger("featureviz.worker.process")

CHILD_MODULE = "featureviz.worker.child"
START_SECONDS = 600.0  # a child must say hello within this (it imports torch: slow on a loaded machine)
UP_WAIT_SECONDS = 300.0  # a call that finds the child restarting waits this long for the next one
STOP_WAIT_SECONDS = 60.0  # after its stop call, the child has this long to exit before it is killed
YOUNG_SECONDS = 10.0  # a child that dies younger than this makes the next start wait (backoff, at most 30 s)
_EVENTS_PER_BATCH = 4096  # events handed to the sink at once, at most
_PROTOCOL = pickle.HIGHEST_PROTOCOL
# builtin exception classes re-raised as themselves; any other class becomes a RuntimeError subclass of its name
_BUILTIN_ERRORS = frozenset(("ValueError", "TypeError", "KeyError", "IndexError", "RuntimeError", "OSError",
                             "FileNotFoundError", "PermissionError", "MemoryError", "AttributeError",
                             "NotImplementedError", "ZeroDivisionError", "AssertionError", "OverflowError",
                             "TimeoutError", "RecursionError", "ArithmeticError", "LookupError", "EOFError"))


# ----------------------------------------------------------------------------------------------- the wire


class _ReplyUnpickler(pickle.Unpickler):
    """What the child sends, unpickled with an allow-list: the worker API's classes, featureviz.v1 messages, the
    featureviz errors (through ``featureviz.errors._rebuild``)."""

    def find_class(self, module: str, name: str):
        if module == "featureviz.worker.api" and name in _API_CLASSES:
            return getattr(api, name)
        if module == "featureviz.v1.featureviz_pb2" and "." not in name:
            found = getattr(pb, name, None)
            if isinstance(found, type) and hasattr(found, "DESCRIPTOR") and hasattr(found, "SerializeToString"):
                return found
        if module == "featureviz.errors":
            found = getattr(errors, name, None)
            if name == "_rebuild" or (isinstance(found, type) and issubclass(found, errors.FeaturevizError)):
                return found
        raise pickle.UnpicklingError(f"the worker process sent a forbidden class {module[:80]}.{name[:80]}")


_API_CLASSES = frozenset(("WorkerEvent", "Admission", "Submission", "IndexWork", "PriorSource", "MatchSource",
                          "ExemplarQuery", "ImageQuery", "JoinQuery", "WorkerConfig"))


def load_reply(data: bytes):
    """Unpickle a message from the child (the allow-list of :class:`_ReplyUnpickler`)."""
    return _ReplyUnpickler(io.BytesIO(data)).load()


def encode_error(exc: BaseException) -> tuple:
    """An exception as the child sends it: a FeaturevizError whole (its class, message, reason, field), anything
    else as (class name, its plain arguments or its text)."""
    if isinstance(exc, errors.FeaturevizError):
        return "featureviz", exc
    args = exc.args if all(isinstance(a, (str, int, float)) for a in exc.args) else (str(exc),)
    return "other", type(exc).__name__, tuple(args)[:4]


def raise_error(encoded) -> None:
    """Raise what :func:`encode_error` made (on the other side)."""
    raise _decode_error(encoded)


_FOREIGN: dict[str, type] = {}


def _decode_error(encoded) -> BaseException:
    """The exception to raise here for what :func:`encode_error` made in the child."""
    try:
        if encoded[0] == "featureviz" and isinstance(encoded[1], errors.FeaturevizError):
            return encoded[1]
        _, name, args = encoded
        name = name if isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name) else "Error"
        args = tuple(errors.cap(a) if isinstance(a, str) else a for a in args if isinstance(a, (str, int, float)))
        if name in _BUILTIN_ERRORS:
            return getattr(builtins, name)(*args)
        cls = _FOREIGN.get(name)
        if cls is None:  # e.g. torch's OutOfMemoryError: the same name (errors.job_error reads it), no torch here
            cls = type(name, (RuntimeError,), {"__module__": __name__})
            if len(_FOREIGN) < 256:
                _FOREIGN[name] = cls
        return cls(*args)
    except Exception:  # noqa: BLE001 - a malformed error is still an error
        return RuntimeError("the worker process sent a malformed error")


def _exit_text(code: int | None) -> str:
    if code is None:
        return "it closed its connection"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Child:
    """One child process and its connection."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, hello: dict, generation: int):
        self.proc, self.conn, self.generation = proc, conn, generation
        self.pid = int(hello["pid"])
        self.max_step_images = int(hello["max_step_images"])
        self.device = pb.Device.FromString(hello["device"])
        self.started = time.monotonic()


# ----------------------------------------------------------------------------------------------- the worker


class ProcessWorker(api.Worker):
    """A :class:`featureviz.worker.local.LocalWorker` in a child process (see the module docstring).
    ``model_source(sha256)`` -> bytes or a path (the store's checked read). Blocks until the child has started
    (it imports torch); a child that cannot start (a bad ``--device``) raises its error here."""

    def __init__(self, config: api.WorkerConfig, *, model_source, max_attempts: int = 3,
                 start_seconds: float = START_SECONDS):
        self._config = config
        self._model_source = model_source
        self._start_seconds = start_seconds
        self._losses = Losses(max_attempts)
        self._lock = threading.Condition()  # the state below; notified when a child is up or the worker closes
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls: dict[int, tuple[concurrent.futures.Future, str]] = {}  # id -> (future, method)
        self._held: dict[str, int] = {}  # job id -> images: the jobs the child holds (submitted, not yet ended)
        self._pending: list[api.Submission] = []  # submitted while no child was up
        self._child: _Child | None = None
        self._generation = 0
        self._closing = False  # stopped: no call waits for a child any more
        self._quitting = False  # stopping: the child's end is not a death (no restart)
        self._failed: BaseException | None = None  # the first child could not start
        self._admitting = 0
        self._admitting_posted = 0  # the count the child last got
        self.restarts = 0
        self._sink = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._sources = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="featureviz-model-source")
        self._host = threading.Thread(target=self._host_loop, name="featureviz-worker-process", daemon=True)
        self._out = threading.Thread(target=self._event_loop, name="featureviz-worker-events", daemon=True)
        self._host.start()
        with self._lock:
            while self._child is None and self._failed is None:
                self._lock.wait()
            if self._failed is not None:
                raise self._failed
            self.max_step_images = self._child.max_step_images
            self._device = self._child.device

    # ------------------------------------------------------------------------------------------- the child

    def _spawn(self) -> _Child:
        """Start a child and wait for its hello (called on the host thread only: PR_SET_PDEATHSIG is tied to it)."""
        mine, theirs = socket.socketpair()
        try:
            cmd = [sys.executable, "-m", CHILD_MODULE, str(theirs.fileno()), str(os.getpid())]
            proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        conn = Connection(mine.detach())
        try:
            conn.send_bytes(pickle.dumps(("init", self._config, logging.getLogger("featureviz").getEffectiveLevel()),
                                         _PROTOCOL))
            deadline = time.monotonic() + self._start_seconds
            while not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                if proc.poll() is not None or time.monotonic() >= deadline:
                    raise Unavailable(f"the worker process did not start ({_exit_text(proc.poll())})",
                                      reason="WORKER_UNAVAILABLE")
            message = load_reply(conn.recv_bytes())
            if message[0] == "failed":
                raise _decode_error(message[1])
            if message[0] != "hello" or not isinstance(message[1], dict):
                raise Unavailable("the worker process did not start (no hello)", reason="WORKER_UNAVAILABLE")
            self._generation += 1
            return _Child(proc, conn, message[1], self._generation)
        except (EOFError, OSError):
            conn.close()
            raise Unavailable(f"the worker process did not start ({_exit_text(_end(proc, 5.0))})",
                              reason="WORKER_UNAVAILABLE") from None
        except BaseException:
            conn.close()
            _end(proc, 5.0)
            raise

    def _host_loop(self) -> None:
        """Start a child, read it until it dies, account for what it held, start the next one; until stop."""
        young = 0
        while True:
            try:
                child = self._spawn()
            except BaseException as exc:  # noqa: BLE001
                with self._lock:
                    if self._child is None and self.restarts == 0 and self._generation == 0:
                        self._failed = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
                        self._lock.notify_all()
                        return
                    if self._closing:
                        return
                young += 1
                log.error("the worker process could not start again (%s); trying again in %.0f s", exc,
                          min(30.0, 2.0 ** young))
                if self._wait_closing(min(30.0, 2.0 ** young)):
                    return
                continue
            with self._lock:
                if self._closing or self._quitting:
                    child.conn.close()
                    _end(child.proc, 5.0)
                    return
                self._child = child
                pending, self._pending = self._pending, []
                self._lock.notify_all()
            if child.generation > 1:
                log.warning("worker process started again (pid %d, restart %d)", child.pid, self.restarts)
            self._admitting_posted = self._admitting
            if self._admitting:
                self._post(child, "admitting", self._admitting)
            for submission in pending:
                self.submit(submission)
            self._read(child)
            with self._lock:
                quitting = self._quitting
            self._died(child, quitting)
            if quitting:  # stop: the child exits after its stop call (else it is killed); no other starts
                return
            young = young + 1 if time.monotonic() - child.started < YOUNG_SECONDS else 0
            if young and self._wait_closing(min(30.0, 0.5 * 2.0 ** young)):
                return

    def _wait_closing(self, seconds: float) -> bool:
        with self._lock:
            self._lock.wait_for(lambda: self._closing, timeout=seconds)
            return self._closing

    def _read(self, child: _Child) -> None:
        """Every message of the child until its connection ends."""
        conn = child.conn
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                message = load_reply(data)
                kind = message[0]
                if kind == "events":
                    self._on_events(message[1])
                elif kind == "reply":
                    _, ident, ok, value = message
                    with self._lock:
                        future = self._calls.pop(ident, (None, ""))[0]
                    if future is not None:
                        if ok:
                            future.set_result(value)
                        else:
                            future.set_exception(_decode_error(value))
                elif kind == "source":
                    self._sources.submit(self._answer_source, child, message[1], message[2])
                else:
                    raise ValueError(f"unknown message {str(kind)[:40]!r}")
            except Exception as exc:  # noqa: BLE001 - a child that breaks the protocol is not trusted further
                log.error("the worker process (pid %d) sent a bad message (%s); stopping it", child.pid, exc)
                _signal(child.proc, signal.SIGKILL)
                conn.close()
                return

    def _answer_source(self, child: _Child, ident: int, sha256) -> None:
        try:
            if not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
                raise errors.InvalidSpec("model", "not a sha256")
            value = self._model_source(sha256)
            reply = ("source", ident, True, value if isinstance(value, (bytes, bytearray, type(None))) else str(value))
        except Exception as exc:  # noqa: BLE001 - the child raises it where it asked
            reply = ("source", ident, False, encode_error(exc))
        try:
            self._send(child, reply)
        except OSError:
            pass  # it died meanwhile

    def _died(self, child: _Child, stopping: bool = False) -> None:
        """The child is gone (``stopping``: after its stop call, or during it): fail its calls in flight, send its
        jobs back to the queue, reap it."""
        code = _end(child.proc, STOP_WAIT_SECONDS if stopping else 5.0)
        how = _exit_text(code)
        child.conn.close()
        with self._lock:
            self._child = None
            self.restarts += 0 if stopping else 1
            calls, self._calls = self._calls, {}
            held, self._held = list(self._held), {}
            events = self._losses.lost(held, f"the worker process, pid {child.pid}, {how}")
            self._lock.notify_all()
        if not stopping or calls or held:
            log.warning("the worker process (pid %d) died (%s): %d job(s) go back to the queue, %d call(s) fail%s",
                        child.pid, how, len(held), len(calls), "" if stopping else "; starting another")
        for future, method in calls.values():
            future.set_exception(Unavailable(f"the worker process died ({how}) during {method}; try again",
                                             reason="WORKER_UNAVAILABLE"))
        if events:
            self._events.put(events)

    # ------------------------------------------------------------------------------------------- the wire

    def _send(self, child: _Child, message) -> None:
        data = pickle.dumps(message, _PROTOCOL)
        with self._send_lock:
            child.conn.send_bytes(data)

    def _post(self, child: _Child, method: str, *args) -> None:
        try:
            self._send(child, ("post", method, args))
        except OSError:
            pass  # the child died: the host thread accounts for it

    def _up(self, method: str) -> _Child:
        """The child, waiting while one is starting (call with the lock held)."""
        deadline = time.monotonic() + UP_WAIT_SECONDS
        while self._child is None:
            left = deadline - time.monotonic()
            if self._closing or self._quitting or left <= 0:
                raise Unavailable(f"the worker process is not running ({method}); try again",
                                  reason="WORKER_UNAVAILABLE")
            self._lock.wait(left)
        return self._child

    def _call(self, method: str, *args):
        with self._lock:
            child = self._up(method)
            ident, future = self._register(method)
        self._send_call(child, ident, method, args)
        return future.result()

    def _register(self, method: str) -> tuple[int, concurrent.futures.Future]:
        """A call's id and future, in ``_calls`` (call with the lock held, in the same hold that found the child:
        ``_died`` then either came before, and no child was found, or fails this future). The future cannot be
        cancelled: the reply sets it whoever still waits."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        ident = next(self._ids)
        self._calls[ident] = (future, method)
        return ident, future

    def _send_call(self, child: _Child, ident: int, method: str, args: tuple) -> None:
        try:
            self._send(child, ("call", ident, method, args))
        except OSError:
            pass  # the child died: the host thread fails the call

    # ------------------------------------------------------------------------------------------- events

    def _on_events(self, events) -> None:
        events = events if isinstance(events, list) else [events]
        with self._lock:
            for event in events:
                if event.kind in (api.FINISHED, api.REQUEUED):
                    self._held.pop(event.job_id, None)
                    self._losses.forget(event.job_id)
        self._events.put(events)

    def _event_loop(self) -> None:
        """Hand the events to the sink in order; lists queued together go as one list (one store commit)."""
        while True:
            item = self._events.get()
            batch, marks, end = [], [], False
            while True:
                if item is None:
                    end = True
                elif isinstance(item, threading.Event):
                    marks.append(item)
                else:
                    batch.extend(item)
                if end or len(batch) >= _EVENTS_PER_BATCH:
                    break
                try:
                    item = self._events.get_nowait()
                except queue.Empty:
                    break
            if batch and self._sink is not None:
                try:
                    self._sink(batch if len(batch) > 1 else batch[0])
                except Exception:  # noqa: BLE001
                    log.exception("emitting %d worker event(s) failed", len(batch))
            for mark in marks:
                mark.set()
            if end:
                return

    def _flush(self) -> None:
        """Until every event queued so far has reached the sink."""
        if not self._out.is_alive():
            return
        mark = threading.Event()
        self._events.put(mark)
        mark.wait()

    # ------------------------------------------------------------------------------------------- interface

    def start(self, sink) -> None:
        self._sink = sink
        self._out.start()
        if phases.enabled:  # the child's cost counters (PNG, the start and end forwards) count with the server's
            phases.add_source(self._phases)

    def _phases(self) -> dict:
        with self._lock:
            if self._child is None:
                return {}
        return self._call("phases")

    def load_model(self, sha256: str, source, limits: dict | None = None) -> tuple[pb.Model, pb.ListLayersResponse]:
        if not isinstance(source, (bytes, bytearray)):
            source = os.fspath(source)
        return self._call("load_model", sha256, source, limits)

    def drop_model(self, sha256: str) -> None:
        with self._lock:
            child = self._child
        if child is not None:
            self._post(child, "drop_model", sha256)

    def admit(self, sha256: str, spec: bytes, priors: dict | None = None, matches: dict | None = None) -> api.Admission:
        return self._call("admit", sha256, spec, priors, matches)

    def admit_future(self, sha256: str, spec: bytes, priors: dict | None = None,
                     matches: dict | None = None) -> concurrent.futures.Future | None:
        with self._lock:
            child = self._child
            if child is None:  # starting: admit() waits for it
                return None
            ident, future = self._register("admit")
        self._send_call(child, ident, "admit", (sha256, spec, priors, matches))
        return future

    def submit(self, submission: api.Submission) -> None:
        with self._lock:
            child = self._child
            if child is None:  # restarting: the next child takes it
                self._pending.append(submission)
                return
            self._held[submission.job_id] = submission.images
        self._post(child, "submit", submission)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            for submission in self._pending:
                if submission.job_id == job_id:
                    self._pending.remove(submission)
                    self._events.put([api.WorkerEvent(api.FINISHED, job_id, state=pb.JOB_STATE_CANCELLED)])
                    return
            child = self._child
            if job_id in self._held:
                self._losses.cancelling(job_id)
        if child is not None:
            self._post(child, "cancel", job_id)

    def admitting(self, count: int) -> None:
        """Posted when the count reaches or leaves zero, or halves or doubles since the last post: the hold reads
        whether admissions are in flight and roughly how many (planner.hold), and a burst moves the count by one per
        CreateJob, twice (a message each would be two sends per job on the server's event loop)."""
        self._admitting = count = max(0, int(count))
        posted = self._admitting_posted
        if (count == 0) == (posted == 0) and posted // 2 < count < 2 * posted:
            return
        child = self._child
        if child is not None:
            self._admitting_posted = count
            self._post(child, "admitting", count)

    def exemplars(self, query: api.ExemplarQuery) -> pb.GetExemplarsResponse:
        return self._call("exemplars", query)

    def dataset_image(self, query: api.ImageQuery) -> pb.DatasetImageData:
        return self._call("dataset_image", query)

    def join_scores(self, query: api.JoinQuery) -> list[tuple[float, float, float, float]]:
        return self._call("join_scores", query)

    def device(self) -> pb.Device:
        return self._device

    def info(self) -> pb.WorkerInfo:
        """The child's (its pid); while it restarts: its device and size, ``up`` false, no slots."""
        with self._lock:
            child = self._child
        if child is not None:
            try:
                return self._call("info")
            except Unavailable:
                pass
        return pb.WorkerInfo(device=self._device, max_step_images=self.max_step_images, id="local", up=False)

    def workers(self) -> list[pb.WorkerInfo]:
        """One: the child (id ``local``, this machine, its pid; ``up`` false while it restarts)."""
        info = self.info()
        info.id, info.node = info.id or "local", info.node or socket.gethostname()
        return [info]

    @property
    def pid(self) -> int:
        """The child's process id (0 while it restarts)."""
        child = self._child
        return child.pid if child is not None else 0

    def stop(self, grace: float) -> None:
        """The child's LocalWorker stops (its events delivered), then the child exits (killed if it does not)."""
        with self._lock:
            self._quitting = True
            child = self._child
        if child is not None:
            try:
                self._call("stop", grace)  # the child exits after its reply
            except Exception as exc:  # noqa: BLE001 - it died meanwhile: its jobs are LOST, i.e. queued again
                log.warning("stopping the worker process: %s", exc)
        with self._lock:
            self._closing = True
            child = self._child
            pending, self._pending = self._pending, []
            self._lock.notify_all()
        for submission in pending:  # never reached a child: they stay queued, as a stopped worker's jobs do
            self._events.put([api.WorkerEvent(api.REQUEUED, submission.job_id)])
        if child is not None and child.proc.poll() is None:
            try:
                child.proc.wait(STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                _signal(child.proc, signal.SIGKILL)  # the host thread reads EOF and reaps it
        self._host.join(STOP_WAIT_SECONDS + 35)
        phases.remove_source(self._phases)
        self._flush()
        self._events.put(None)
        if self._out.is_alive():
            self._out.join()
        self._sources.shutdown(wait=False)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except OSError:
        pass


def _end(proc: subprocess.Popen, wait: float) -> int | None:
    """Wait up to ``wait`` seconds for the process to exit, then kill it; its exit code."""
    try:
        return proc.wait(wait)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            return None
