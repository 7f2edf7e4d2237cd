"""``loraplex-launcher``: starts the shard process(es) and the router, supervises them, stops them cleanly."""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import urllib.error
import urllib.request

from loraplex.common.flags import FlagParser, fail
from loraplex.common.shutdown import stop_grace
from loraplex.router.settings import add_serving_flags
from loraplex.shard.settings import shard_parser
from loraplex.supervisor import Supervisor, command, shard_argv, shard_socket

# Shard flags that place one rank in its group: the launcher chooses them, so it offers none of them.
PLACEMENT = ("--listen", "--rank", "--master-addr", "--master-port")


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
    """What the router is told: the launcher's value of each serving flag."""
    serving = FlagParser()
    add_serving_flags(serving)
    return p.to_argv(args, serving.flags)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    with tempfile.TemporaryDirectory(prefix="loraplex-") as run_dir:
        sockets = [shard_socket(run_dir, rank) for rank in range(args.num_shard)]
        # Where the ranks meet for torch.distributed: a free port, so that launchers side by side never clash.
        flags = [*shard_flags(p, args), f"--master-port={_free_port()}"]
        program = command("loraplex-shard", "loraplex.shard.main")
        shards = [f"shard rank {rank}" for rank in range(args.num_shard)]
        for rank, (role, sock) in enumerate(zip(shards, sockets, strict=True)):
            supervisor.start(role, shard_argv(program, rank, args.num_shard, sock, flags))
        router = [*command("loraplex-router", "loraplex.router.main"), f"--shard-uds={','.join(sockets)}"]
        router += [f"--connect-timeout={args.startup_timeout}", *router_flags(p, args)]
        supervisor.start("router", router)
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
