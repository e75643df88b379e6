"""The explorer's TCP connections: a cap per client address and in all, and a rate-limited log of accept errors.

aiohttp has no connection cap, so the gateway listens with its own ``loop.create_server`` whose protocol factory
wraps aiohttp's request handler (``AppRunner.server``): a connection past ``max_http_connections_per_client``
from one address, or past the total the descriptor limit leaves after :data:`RESERVED_DESCRIPTORS` (the gRPC
server, SQLite, model files and the worker share the process's descriptors), is closed at once, before aiohttp
sees it. The header-read timeout is aiohttp's keep-alive timer, armed when a connection opens and after every
response, which closes a connection still waiting for a whole request header (the gateway sets it to
``http_header_timeout_seconds``).

When ``accept()`` fails anyway (EMFILE, ENFILE), asyncio logs every retry; :class:`AcceptErrorLog` lets one line
through per :data:`ACCEPT_LOG_SECONDS` with the count of those it held back. :class:`BadRequestLog` does the same
for aiohttp's traceback of every malformed request (a client could otherwise fill the disk with them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from typing import Callable

__all__ = ["ConnectionGuard", "AcceptErrorLog", "BadRequestLog", "descriptor_limit", "RESERVED_DESCRIPTORS",
           "ACCEPT_LOG_SECONDS"]

log = logging.getLogger("featureviz.web")

RESERVED_DESCRIPTORS = 1024  # kept for gRPC, SQLite, model files and the worker (at most half the limit)
ACCEPT_LOG_SECONDS = 60.0


def descriptor_limit() -> int | None:
    """The process's soft RLIMIT_NOFILE (None where unknown: no resource module, or unlimited)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


class ConnectionGuard:
    """Counts open connections per client address; ``factory(make_handler)`` is the protocol factory for
    ``loop.create_server``. ``per_client``: connections one address may hold; ``total``: all of them (None:
    the descriptor limit less :data:`RESERVED_DESCRIPTORS`, or unbounded where the limit is unknown)."""

    def __init__(self, per_client: int, total: int | None = None):
        if per_client < 1:
            raise ValueError(f"max_http_connections_per_client must be >= 1, got {per_client}")
        if total is None:
            limit = descriptor_limit()
            total = None if limit is None else max(per_client, limit - min(RESERVED_DESCRIPTORS, limit // 2))
        self.per_client = per_client
        self.total = total
        self.open: Counter[str] = Counter()
        self.refused = 0
        self._last_log = float("-inf")

    def admit(self, address: str) -> bool:
        if self.open[address] >= self.per_client:
            return self._refuse(f"{address} holds {self.per_client} connections "
                                f"(max_http_connections_per_client)")
        if self.total is not None and sum(self.open.values()) >= self.total:
            return self._refuse(f"{self.total} connections are open, all the file descriptors leave to the explorer")
        self.open[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]

    def _refuse(self, why: str) -> bool:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log >= ACCEPT_LOG_SECONDS:
            self._last_log = now
            log.warning("explorer: closed a new connection at once: %s (%d refused so far)", why, self.refused)
        return False

    def factory(self, make_handler: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, make_handler)


class _Guarded(asyncio.Protocol):
    """One connection: admitted -> aiohttp's handler gets every call; refused -> closed before it sees a byte."""

    def __init__(self, guard: ConnectionGuard, make_handler: Callable[[], asyncio.Protocol]):
        self._guard = guard
        self._make_handler = make_handler
        self._handler: asyncio.Protocol | None = None
        self._address = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        address = _address(transport)
        if not self._guard.admit(address):
            transport.abort()
            return
        self._address = address
        self._handler = self._make_handler()
        self._handler.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._handler is None:
            return
        handler, self._handler = self._handler, None
        self._guard.release(self._address)
        handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()


class AcceptErrorLog:
    """An event-loop exception handler: accept errors (asyncio: "socket.accept() out of system resource", logged
    on every retry) go to the log at most once per ``every`` seconds with the count held back; everything else
    goes to the handler that was installed before (or the loop's default)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, every: float = ACCEPT_LOG_SECONDS):
        self._loop = loop
        self._every = every
        self._previous = loop.get_exception_handler()
        self._last = float("-inf")
        self.held = 0

    def install(self) -> "AcceptErrorLog":
        self._loop.set_exception_handler(self)
        return self

    def uninstall(self) -> None:
        if self._loop.get_exception_handler() is self:
            self._loop.set_exception_handler(self._previous)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self._every:
            self.held += 1
            return
        held, self.held, self._last = self.held, 0, now
        error = context.get("exception")
        log.error("accepting connections fails: %s (%d more such errors in the last %g s not logged); raise the "
                  "descriptor limit (ulimit -n) or lower max_http_connections_per_client", error, held, self._every)


class BadRequestLog(logging.Filter):
    """A filter on ``aiohttp.server``: its record of a malformed request (an ``HttpProcessingError`` from the
    parser, with a traceback) passes at most once per ``every`` seconds, with the count held back; other records
    (a handler's bug) all pass."""

    def __init__(self, every: float = ACCEPT_LOG_SECONDS):
        super().__init__()
        self._every = every
        self._last = float("-inf")
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self._last < self._every:
            self.held += 1
            return False
        if self.held:
            record.msg = f"{record.msg} ({self.held} more malformed requests in {self._every:g} s not logged)"
        self.held, self._last = 0, now
        return True
