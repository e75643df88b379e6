"""The worker process's side (``python -m featureviz.worker.child FD PARENT_PID``), started by
:class:`featureviz.worker.process.ProcessWorker`: a :class:`featureviz.worker.local.LocalWorker` served over the
connection on ``FD``.

- The reader (the main thread) takes each message: a call runs on a thread pool (admissions arrive from several
  server threads at once) and answers with its id; a one-way message (submit, cancel, drop_model, admitting) runs
  at once, in order; an answer to this side's model request wakes the caller.
- The LocalWorker's events go to the server as they come (each list as one message).
- It exits when its connection ends (the server stopped or died) and, on Linux, when the server's thread that
  started it ends (``PR_SET_PDEATHSIG``): no orphan keeps a device.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import pickle
import signal
import sys
import threading
from multiprocessing.connection import Connection

__all__ = ["main"]

log = logging.getLogger("featureviz.worker.child")

_CALLS = ("load_model", "admit", "exemplars", "dataset_image", "join_scores", "info", "stop", "phases")
_POSTS = ("submit", "cancel", "drop_model", "admitting")
_CALL_THREADS = 16  # calls run at once (admissions, imports, queries); more wait for a thread
_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the thread of the server that started it ends (Linux); exit now if it is gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(0)


class _Host:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.send_lock = threading.Lock()
        self.ids = itertools.count(1)
        self.asked: dict[int, concurrent.futures.Future] = {}
        self.asked_lock = threading.Lock()
        self.worker = None
        self.pool = concurrent.futures.ThreadPoolExecutor(_CALL_THREADS, thread_name_prefix="featureviz-call")

    def send(self, message) -> None:
        data = pickle.dumps(message, _PROTOCOL)
        with self.send_lock:
            self.conn.send_bytes(data)

    def model_source(self, sha256: str):
        """The model's bytes (or path), from the server's store."""
        from featureviz.worker.process import raise_error

        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.asked_lock:
            ident = next(self.ids)
            self.asked[ident] = future
        self.send(("source", ident, sha256))
        ok, value = future.result()
        if not ok:
            raise_error(value)
        return value

    def sink(self, events) -> None:
        self.send(("events", events if isinstance(events, list) else [events]))

    def call(self, ident: int, method: str, args: tuple) -> None:
        from featureviz.worker.process import encode_error

        try:
            if method == "phases":  # the cost counters (featureviz.phases), added to the server's
                from featureviz import phases

                value = phases.snapshot()
            elif method == "info":
                value = self.worker.info()
                value.id, value.pid, value.up = value.id or "local", os.getpid(), True
            else:
                value = getattr(self.worker, method)(*args)
            reply = ("reply", ident, True, value)
        except BaseException as exc:  # noqa: BLE001 - the server re-raises it
            if not isinstance(exc, Exception):
                log.exception("call %s", method)
            reply = ("reply", ident, False, encode_error(exc))
        self.reply(reply)
        if method == "stop":
            with self.send_lock:  # no message of another thread is cut short
                os._exit(0)  # its events went before the reply; the server reads EOF

    def admit_now(self, ident: int, args: tuple) -> bool:
        """A render's admission that imports nothing (``LocalWorker.admit_future``) is checked on this thread: a hop
        to the call pool and back would cost more than the check. The reply goes when its future is done (at once,
        or after a memory probe). False: the pool takes it."""
        from featureviz.worker.process import encode_error

        try:
            future = self.worker.admit_future(*args)
        except Exception:  # noqa: BLE001 - the pool's admit() answers it, error and all
            return False
        if future is None:
            return False

        def answer(done) -> None:
            error = done.exception()
            self.reply(("reply", ident, False, encode_error(error)) if error is not None else
                       ("reply", ident, True, done.result()))
        future.add_done_callback(answer)
        return True

    def reply(self, reply: tuple) -> None:
        from featureviz.worker.process import encode_error

        try:
            self.send(reply)
        except Exception as exc:  # noqa: BLE001 - e.g. a value that does not pickle: the caller must not hang
            self.send(("reply", reply[1], False, encode_error(exc)))

    def serve(self) -> None:
        conn = self.conn
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())  # from the server: trusted
            except (EOFError, OSError):
                os._exit(0)  # the server is gone (or closed the connection)
            kind = message[0]
            if kind == "call" and message[2] in _CALLS:
                if message[2] == "admit" and self.admit_now(message[1], message[3]):
                    continue
                self.pool.submit(self.call, message[1], message[2], message[3])
            elif kind == "post" and message[1] in _POSTS:
                try:
                    getattr(self.worker, message[1])(*message[2])
                except Exception:  # noqa: BLE001
                    log.exception("%s", message[1])
            elif kind == "source":
                with self.asked_lock:
                    future = self.asked.pop(message[1], None)
                if future is not None:
                    future.set_result((message[2], message[3]))
            else:
                log.error("unknown message %r", str(kind)[:40])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server stops this
    conn = Connection(fd)
    try:
        first = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return 0
    _, config, level = first
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s %(name)s [worker pid {os.getpid()}]: "
                                            "%(message)s")
    host = _Host(conn)
    from featureviz.worker.process import encode_error

    try:
        from featureviz.worker.local import LocalWorker

        host.worker = LocalWorker(config, model_source=host.model_source)
    except BaseException as exc:  # noqa: BLE001 - e.g. --device cuda without one: the server says why
        host.send(("failed", encode_error(exc)))
        return 1
    host.worker.start(host.sink)
    from featureviz.heap import WORKER_PRELOAD
    from featureviz.heap import settle

    settle(WORKER_PRELOAD)  # before any model: no full collection walks torch's objects in the middle of a step
    host.send(("hello", {"pid": os.getpid(), "max_step_images": host.worker.max_step_images,
                         "device": host.worker.device().SerializeToString()}))
    host.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
