"""The drain timeout is one constant that router and shard flags share; a supervisor's grace outlasts the drain."""

from __future__ import annotations

from loraplex.common.flags import FlagParser
from loraplex.common.shutdown import DRAIN_TIMEOUT, SERVER_STOP_GRACE, add_drain_timeout_flag, stop_grace


def test_the_flag_defaults_to_the_constant_and_reads_its_twin() -> None:
    p = FlagParser(prog="demo", environ={"DRAIN_TIMEOUT": "3.5"})
    add_drain_timeout_flag(p, "seconds")
    assert p.get_default("drain_timeout") == DRAIN_TIMEOUT
    assert p.parse([]).drain_timeout == 3.5


def test_the_grace_outlasts_the_drain_and_the_servers_own_grace() -> None:
    for drain in (0.0, 3.0, DRAIN_TIMEOUT):
        assert stop_grace(drain) > drain + SERVER_STOP_GRACE
