"""Shutdown timing every process agrees on: how long a drain may last and how long a supervisor waits for it."""

from __future__ import annotations

from loraplex.common.flags import FlagParser

# Default --drain-timeout of the router (in-flight requests) and the shard (cached batches).
DRAIN_TIMEOUT = 25.0
# What the shard's gRPC server grants calls still running once its drain is over.
SERVER_STOP_GRACE = 5.0
# Interpreter shutdown and socket removal after the server has stopped.
EXIT_MARGIN = 10.0


def add_drain_timeout_flag(p: FlagParser, help_text: str) -> None:
    """``--drain-timeout`` as the router and the shard define it (and the container entry point reads it)."""
    p.flag("--drain-timeout", type=float, default=DRAIN_TIMEOUT, help=help_text)


def stop_grace(drain_timeout: float) -> float:
    """Seconds a supervisor waits after SIGTERM before it kills a process that drains for ``drain_timeout``."""
    return drain_timeout + SERVER_STOP_GRACE + EXIT_MARGIN
