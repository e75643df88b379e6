"""Host names that mean this machine only (torch- and grpc-free): the server refuses to listen elsewhere without
auth, and the web gateway checks the ``Host`` header against them on loopback (DNS rebinding)."""

from __future__ import annotations

__all__ = ["LOOPBACK_HOSTS"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
