"""Sign-in sessions of the explorer: a random id in the cookie, the bearer token only in the gateway's memory.

A cookie is shared by every web app on the host (cookies ignore ports), so it must never hold the token itself:
``POST api/login`` creates a session id (``secrets.token_urlsafe(32)``) that maps to the token until
``session_ttl_seconds`` pass or ``POST api/logout`` deletes it; an id the table does not hold (a raw token, a
signed-out or expired session, one from before a restart) is refused. Memory is bounded: at most
:data:`MAX_SESSIONS` sessions, :data:`MAX_SESSIONS_PER_TOKEN` per token; past either the oldest goes first.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Callable

__all__ = ["Sessions", "MAX_SESSIONS", "MAX_SESSIONS_PER_TOKEN"]

MAX_SESSIONS = 10_000
MAX_SESSIONS_PER_TOKEN = 64


class Sessions:
    def __init__(self, ttl_seconds: float, *, max_sessions: int = MAX_SESSIONS,
                 per_token: int = MAX_SESSIONS_PER_TOKEN, clock: Callable[[], float] = time.monotonic):
        if not ttl_seconds > 0:
            raise ValueError(f"session_ttl_seconds must be > 0, got {ttl_seconds}")
        self.ttl = ttl_seconds
        self._max = max_sessions
        self._per_token = per_token
        self._clock = clock
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (token, expiry), oldest first
        self._by_token: dict[str, OrderedDict[str, None]] = {}

    def create(self, token: str) -> str:
        self._expire()
        session = secrets.token_urlsafe(32)
        self._sessions[session] = (token, self._clock() + self.ttl)
        own = self._by_token.setdefault(token, OrderedDict())
        own[session] = None
        while len(own) > self._per_token:
            self.delete(next(iter(own)))
        while len(self._sessions) > self._max:
            self.delete(next(iter(self._sessions)))
        return session

    def token(self, session: str) -> str | None:
        """The token of a live session; None for an unknown or expired id."""
        entry = self._sessions.get(session)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            self.delete(session)
            return None
        return entry[0]

    def delete(self, session: str) -> None:
        entry = self._sessions.pop(session, None)
        if entry is None:
            return
        own = self._by_token.get(entry[0])
        if own is not None:
            own.pop(session, None)
            if not own:
                del self._by_token[entry[0]]

    def _expire(self) -> None:
        now = self._clock()
        while self._sessions:
            session, (_, expiry) = next(iter(self._sessions.items()))
            if expiry > now:
                break
            self.delete(session)

    def __len__(self) -> int:
        return len(self._sessions)
