"""Cheap counters of where the server's time goes, per phase, switched on by ``FEATUREVIZ_PHASES=1``.

Torch- and grpc-free (a root module: the server and the worker both record into it). ``with phase("store"):``
adds the block's wall time to its phase; phases nest, and each phase gets its *self* time (an inner phase pauses
the outer one on the same thread), so the phases add up to the time the instrumented code ran. Off (the
default), ``phase`` returns one shared null context: a dictionary look-up and two no-op calls.

Read them with :func:`snapshot` (phase -> (seconds, entries)); the server exports them as
``featureviz_phase_seconds_total`` and ``featureviz_phase_entries_total`` (label ``phase``) on its metrics port
(``bench/bench_server_cost.py`` reads them). Only synchronous blocks may be wrapped: on the event loop, a block
that awaits would count the other coroutines' time too.

``gc`` is not a block of code: it is the pauses of Python's full (generation 2) garbage collections, in every
process that records (a collection stops every thread of its process: it holds the GIL). Its seconds are also
inside whichever phase the collection interrupted (:mod:`featureviz.heap` keeps them short).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time

__all__ = ["phase", "snapshot", "enabled", "PHASES", "add_source", "remove_source"]

# the phases the server and the in-process worker record (a name outside this list is refused)
PHASES = ("admission", "dispatch", "start", "step bookkeeping", "end", "events", "watch", "store", "png",
          "start forward", "end forward", "gc")

enabled = os.environ.get("FEATUREVIZ_PHASES", "") not in ("", "0")
_totals = {name: [0.0, 0] for name in PHASES}
_lock = threading.Lock()
_local = threading.local()
_NULL = contextlib.nullcontext()


class _Phase:
    __slots__ = ("name", "start")

    def __init__(self, name: str):
        self.name = name
        self.start = 0.0

    def __enter__(self):
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        now = time.perf_counter()
        if stack:  # pause the outer phase
            outer = stack[-1]
            _add(outer.name, now - outer.start, 0)
        self.start = now
        stack.append(self)
        return self

    def __exit__(self, *exc):
        now = time.perf_counter()
        stack = _local.stack
        stack.pop()
        _add(self.name, now - self.start, 1)
        if stack:
            stack[-1].start = now  # the outer phase resumes
        return False


def _add(name: str, seconds: float, entries: int) -> None:
    with _lock:
        total = _totals[name]
        total[0] += seconds
        total[1] += entries


def phase(name: str):
    """A context manager adding its block's self time to ``name`` (one of :data:`PHASES`); a no-op when off."""
    if not enabled:
        return _NULL
    if name not in _totals:
        raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
    return _Phase(name)


_gc_began = [0.0]


def _on_gc(event: str, info: dict) -> None:
    """gc.callbacks: a full collection's pause. No lock (a collection may start while this thread holds one); the
    collector never runs twice at once."""
    if info.get("generation") != 2:
        return
    if event == "start":
        _gc_began[0] = time.perf_counter()
    else:
        total = _totals["gc"]
        total[0] += time.perf_counter() - _gc_began[0]
        total[1] += 1


if enabled:
    gc.callbacks.append(_on_gc)


def snapshot() -> dict[str, tuple[float, int]]:
    """phase -> (seconds, entries) so far (all zero when off), this process's plus its sources' (a worker in a
    child process: :func:`add_source`)."""
    with _lock:
        found = {name: [total[0], total[1]] for name, total in _totals.items()}
        sources = list(_sources)
    for source in sources:
        try:
            more = source()
        except Exception:  # noqa: BLE001 - e.g. the worker process is restarting: its counters are left out
            continue
        for name, (secs, count) in more.items():
            if name in found:
                found[name][0] += float(secs)
                found[name][1] += int(count)
    return {name: (secs, count) for name, (secs, count) in found.items()}


_sources: list = []


def add_source(source) -> None:
    """Add ``source()`` (another process's :func:`snapshot`) to this process's snapshots."""
    with _lock:
        _sources.append(source)


def remove_source(source) -> None:
    with _lock:
        if source in _sources:
            _sources.remove(source)
