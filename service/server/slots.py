"""Per-tenant counts of open streams (uploads, watches), refused past a published limit.

The servicers run on the event loop, so no lock is needed: a slot is taken and given back on the loop thread."""

from __future__ import annotations

import contextlib

from featureviz.errors import ResourceExhausted

__all__ = ["TenantSlots"]


class TenantSlots:
    """``hold(tenant, limit)`` holds one of the tenant's ``limit`` slots until the block ends, or raises
    RESOURCE_EXHAUSTED ``reason`` naming ``what``, the limit's published name and ``advice``."""

    def __init__(self, what: str, limit_name: str, reason: str, advice: str):
        self.what, self.limit_name, self.reason, self.advice = what, limit_name, reason, advice
        self._open: dict[str, int] = {}

    def open(self, tenant: str) -> int:
        return self._open.get(tenant, 0)

    @contextlib.contextmanager
    def hold(self, tenant: str, limit: int):
        open_now = self.open(tenant)
        if open_now >= limit:
            raise ResourceExhausted(f"{open_now} {self.what} of this tenant are open, the limit is {limit} "
                                    f"({self.limit_name}); {self.advice}", reason=self.reason)
        self._open[tenant] = open_now + 1
        try:
            yield
        finally:
            self._open[tenant] -= 1
            if not self._open[tenant]:
                del self._open[tenant]
