"""Failed sign-in throttling, shared by the gRPC auth interceptor and the web gateway (torch-free, no I/O).

A client address that fails ``max_per_minute`` times within a minute is refused until its oldest failure in the
window is a minute old, whatever it sends. Memory is bounded: at most ``max_clients`` addresses are tracked; past
that the one idle longest is forgotten (an attacker with many addresses only forgets its own old ones first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections import deque
from typing import Callable

__all__ = ["FailureThrottle", "client_address"]

WINDOW_SECONDS = 60.0


class FailureThrottle:
    def __init__(self, max_per_minute: int, *, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if max_per_minute < 1:
            raise ValueError(f"max_per_minute must be >= 1, got {max_per_minute}")
        self.max_per_minute = max_per_minute
        self._max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _window(self, key: str, now: float) -> deque[float]:
        failures = self._failures.get(key)
        if failures is None:
            return deque()
        while failures and now - failures[0] >= WINDOW_SECONDS:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return failures

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        now = self._clock()
        failures = self._window(key, now)
        if len(failures) < self.max_per_minute:
            return 0.0
        return max(0.0, WINDOW_SECONDS - (now - failures[0]))

    def failed(self, key: str) -> None:
        now = self._clock()
        failures = self._window(key, now)
        if key not in self._failures:
            self._failures[key] = failures
        self._failures.move_to_end(key)
        failures.append(now)
        while len(failures) > self.max_per_minute:
            failures.popleft()
        while len(self._failures) > self._max_clients:
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)


def client_address(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``, ``ipv6:[::1]:5`` ->
    ``ipv6:[::1]``); other forms (``unix:...``) are returned whole."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer
