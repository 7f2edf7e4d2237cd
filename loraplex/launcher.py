"""``loraplex-launcher``: starts the shard process(es) and the router, supervises them, stops them cleanly."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.error
import urllib.request

from loraplex.common.flags import FlagParser, fail
from loraplex.common.shutdown import stop_grace
from loraplex.router.settings import add_serving_flags
from loraplex.shard.settings import shard_parser
from loraplex.supervisor import Supervisor, command, rank_environment, rendezvous, shard_argv, shard_socket

# Shard flags that place one rank in its group: the launcher chooses them, so it offers none of them.
PLACEMENT = ("--listen", "--rank", "--master-addr", "--master-port", "--init-method")
# Router flags that reach the router through their environment twin, never its command line: anyone on the
# host can read a command line (``ps``), only the process's own user its environment.
SECRET = {"--admin-token": "ADMIN_TOKEN"}


def parser() -> FlagParser:
    """The router's serving flags, then every shard flag but the placement ones (with the shard's defaults)."""
    p = FlagParser(prog="loraplex-launcher", description=__doc__)
    p.flag("--startup-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    add_serving_flags(p)
    p.adopt(shard_parser(), exclude=PLACEMENT)
    return p


def shard_flags(p: FlagParser, args: argparse.Namespace) -> list[str]:
    """What every rank is told: the launcher's value of each flag the shard's parser defines (but the placement
    flags and --num-shard, which ``shard_argv`` sets)."""
    return p.to_argv(args, [name for name in shard_parser().flags if name not in (*PLACEMENT, "--num-shard")])


def router_flags(p: FlagParser, args: argparse.Namespace) -> list[str]:
    """What the router is told on its command line: the launcher's value of each serving flag but the secrets."""
    serving = FlagParser()
    add_serving_flags(serving)
    return p.to_argv(args, [name for name in serving.flags if name not in SECRET])


def router_environment(p: FlagParser, args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """``env`` with the launcher's value of each secret flag in its twin (set even when empty, so that the
    twin the launcher was started with cannot override a value given on its own command line)."""
    return {**env, **{twin: str(getattr(args, p.flags[name].dest) or "") for name, twin in SECRET.items()}}


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse(argv)
    if args.num_shard < 1:
        fail("loraplex-launcher", "--num-shard must be at least 1")
    supervisor = Supervisor("loraplex-launcher")
    supervisor.catch_signals()
    # This run's own directory (mkdtemp: mode 0700, a random name, removed at exit) holds the shards' sockets and
    # the ranks' rendezvous file: no other user can reach a shard or join the group, and launchers side by side
    # never clash.
    with tempfile.TemporaryDirectory(prefix="loraplex-") as run_dir:
        sockets = [shard_socket(run_dir, rank) for rank in range(args.num_shard)]
        flags = [*shard_flags(p, args), f"--init-method={rendezvous(run_dir)}"]
        program = command("loraplex-shard", "loraplex.shard.main")
        shards = [f"shard rank {rank}" for rank in range(args.num_shard)]
        rank_env = rank_environment(os.environ)
        for rank, (role, sock) in enumerate(zip(shards, sockets, strict=True)):
            supervisor.start(role, shard_argv(program, rank, args.num_shard, sock, flags), rank_env)
        router = [*command("loraplex-router", "loraplex.router.main"), f"--shard-uds={','.join(sockets)}"]
        router += [f"--connect-timeout={args.startup_timeout}", *router_flags(p, args)]
        supervisor.start("router", router, router_environment(p, args, dict(os.environ)))
        url = f"http://{'127.0.0.1' if args.hostname in ('0.0.0.0', '') else args.hostname}:{args.port}"
        return supervisor.run(
            stop_order=[["router"], shards],
            grace=stop_grace(args.drain_timeout),
            ready=lambda: _healthy(url),
            ready_timeout=args.startup_timeout,
            on_ready=lambda: supervisor.say(f"serving on {url} (gRPC on port {args.grpc_port})"),
        )


if __name__ == "__main__":
    sys.exit(main())
