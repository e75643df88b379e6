"""The server's event loop: uvloop's where it is installed (the ``server`` extra, not on Windows), else asyncio's.

The event loop thread runs gRPC's callbacks, the servicers and the web gateway; on a small model most of a job's
server time is there, and uvloop's loop takes about a tenth less of the server process's CPU per job than
asyncio's (bench/RESULTS.md, issue 26, "Seventh pass"). ``FEATUREVIZ_EVENT_LOOP``: ``auto`` (the default),
``uvloop`` (an error without it) or ``asyncio``.

    run(main())                 # featureviz serve: asyncio.run on this loop
    loop = new_event_loop()     # BackgroundServer's thread
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys

from featureviz.errors import InvalidSpec

__all__ = ["new_event_loop", "run", "loop_name", "EVENT_LOOP_ENV"]

EVENT_LOOP_ENV = "FEATUREVIZ_EVENT_LOOP"
_CHOICES = ("auto", "uvloop", "asyncio")


def _choice() -> str:
    value = os.environ.get(EVENT_LOOP_ENV, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise InvalidSpec(EVENT_LOOP_ENV, f"must be one of {', '.join(_CHOICES)}, got {value[:40]!r}")
    if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise InvalidSpec(EVENT_LOOP_ENV, "is uvloop, but uvloop is not installed (pip install uvloop; it does not "
                                          "run on Windows)")
    if value == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return value


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the kind ``FEATUREVIZ_EVENT_LOOP`` names (InvalidSpec for an unknown or missing one)."""
    if _choice() == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: the kind of ``loop`` (for the server's startup line)."""
    return "uvloop" if type(loop).__module__.split(".")[0] == "uvloop" else "asyncio"


def run(main):
    """``asyncio.run(main)`` on :func:`new_event_loop`'s loop: the loop is closed after it, its remaining tasks
    cancelled and its async generators shut down."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(main)
    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
