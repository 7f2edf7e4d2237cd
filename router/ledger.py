"""What a request holds besides its KV blocks: its adapter's reference and its place in its tenant's counts."""

from __future__ import annotations

from collections import Counter

from loraplex.router.adapters import AdapterRegistry
from loraplex.router.errors import ApiError
from loraplex.router.inflight import InFlightRequest


class RequestLedger:
    """Per-tenant counts (requests in flight, adapter loads waiting) and adapter references.

    Built before the scheduler, which calls ``release`` exactly once for every request it was handed; the
    service counts a request in with ``enter`` and, should it never reach the scheduler, out with ``leave``.
    The empty tenant name (no keys file) is never limited.
    """

    def __init__(self, registry: AdapterRegistry, max_requests_per_tenant: int, max_loads_per_tenant: int) -> None:
        self._registry = registry
        self._max_requests = max_requests_per_tenant
        self._max_loads = max_loads_per_tenant
        self.requests: Counter[str] = Counter()  # in flight per tenant name, until released
        self.loads: Counter[str] = Counter()  # waiting for an adapter load per tenant name

    def enter(self, tenant: str) -> None:
        """Count a request in; a tenant at --max-concurrent-requests-per-tenant gets 429."""
        if tenant and self._max_requests and self.requests[tenant] >= self._max_requests:
            raise ApiError(
                429, "overloaded", f"this API key has {self._max_requests} requests in flight already; retry later"
            )
        self.requests[tenant] += 1

    def leave(self, tenant: str) -> None:
        _decrement(self.requests, tenant)

    async def load(self, adapter: str, tenant: str) -> None:
        """The adapter loaded; a tenant already waiting for --max-adapter-loads-per-tenant loads gets 429."""
        if not tenant or not self._max_loads or adapter in self._registry.loaded:
            await self._registry.ensure(adapter)
            return
        if self.loads[tenant] >= self._max_loads:
            raise ApiError(
                429, "overloaded", f"this API key has {self._max_loads} adapter loads in progress; retry later"
            )
        self.loads[tenant] += 1
        try:
            await self._registry.ensure(adapter)
        finally:
            _decrement(self.loads, tenant)

    def release(self, request: InFlightRequest) -> None:
        """The scheduler is done with ``request`` (it holds nothing on the shards): its adapter reference and
        its place in its tenant's count are given back."""
        if request.params.adapter_id:
            self._registry.release(request.params.adapter_id)
        self.leave(request.tenant)


def _decrement(counts: Counter[str], key: str) -> None:
    """One less for ``key``; a key at zero leaves, so the counters list only tenants with something held."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]
