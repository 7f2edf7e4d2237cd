"""Graceful shutdown: on SIGTERM the router refuses new work (503), lets in-flight requests finish, exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn

from loraplex.router.service import RouterService

log = logging.getLogger("loraplex.router")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that a termination signal drains instead of closing the door on in-flight requests.

    uvicorn's own handling stops accepting connections and re-raises the signal afterwards (so the
    process dies by it); here new requests get a clear 503 while running ones finish, `/health` turns
    503 so load balancers move on, and the process exits 0 once idle or after ``timeout`` seconds.
    A second signal stops at once.
    """

    def __init__(self, config: uvicorn.Config, service: RouterService, timeout: float) -> None:
        if config.limit_concurrency is None and service.settings.max_connections > 0:
            # --max-connections: uvicorn answers 503 past it, before the app (and its body buffer) runs, so
            # a flood of connections costs a bounded amount of memory.
            config.limit_concurrency = service.settings.max_connections
        super().__init__(config)
        self.service = service
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.service.draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self.service.drain()
        log.info("draining", extra={"signal": signal.Signals(sig).name, "in_flight": self.service.in_flight})
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._wait_idle())

    async def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.timeout
        while self.service.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.service.busy:
            log.warning("drain timed out", extra={"in_flight": self.service.in_flight})
        self.should_exit = True
