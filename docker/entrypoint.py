#!/usr/bin/env python3
"""Container entry point: ``router``, ``shards`` (every tensor-parallel rank of one replica) and ``health`` checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from loraplex.common.flags import FlagParser
from loraplex.common.shutdown import add_drain_timeout_flag, stop_grace
from loraplex.supervisor import Supervisor, command, rank_environment, rendezvous, shard_argv, shard_socket

PROG = "loraplex-entrypoint"
HEALTH_PATH = "/health"
DEFAULT_SOCKET_DIR = "/run/loraplex"
# Every rank of a replica runs in this container: the ranks meet through a file in a private directory
# (``run_shards``); without one, on loopback.
MASTER_ADDR = "127.0.0.1"
# Variables this script reads that are no loraplex flag's twin (the others are the flags' own twins).
OWN_ENV = {"SHARD_SOCKET_DIR": "directory of the shards' unix sockets, shared with the router"}


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def num_shard(env: Mapping[str, str]) -> int:
    raw = env.get("NUM_SHARD") or "1"
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"NUM_SHARD={raw!r} is not a whole number") from None
    if n < 1:
        raise ValueError("NUM_SHARD must be at least 1")
    return n


def socket_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("SHARD_SOCKET_DIR") or DEFAULT_SOCKET_DIR)


def shard_addresses(env: Mapping[str, str]) -> list[str]:
    """Rank 0 first, as ``loraplex-router --shard-uds`` wants them."""
    return [shard_socket(socket_dir(env), rank) for rank in range(num_shard(env))]


def rank_commands(
    env: Mapping[str, str], extra: Sequence[str] = (), run_dir: Path | str | None = None
) -> list[list[str]]:
    """One ``loraplex-shard`` command per rank. Only the rank's place is on its command line: every other
    setting (DEVICE included, which the shard turns into this rank's GPU) reaches it through its env twin.
    With ``run_dir`` the ranks meet through a file there, which opens no port (``--init-method``)."""
    world = num_shard(env)
    program = command("loraplex-shard", "loraplex.shard.main")
    place = ["--master-addr", MASTER_ADDR]
    if run_dir is not None:
        place.append(f"--init-method={rendezvous(run_dir)}")
    return [
        shard_argv(program, rank, world, address, [*place, *extra]) for rank, address in enumerate(shard_addresses(env))
    ]


def drain_timeout(env: Mapping[str, str], extra: Sequence[str]) -> float:
    """The ranks' --drain-timeout, read as they read it: by the flag's one definition, not the shard's parser
    (loraplex.shard.settings), which the router image, running this script too, does not have."""
    p = FlagParser(prog=PROG, environ=env, add_help=False)
    add_drain_timeout_flag(p, "")
    return float(p.parse_known(extra).drain_timeout)


def run_shards(env: Mapping[str, str], extra: Sequence[str]) -> int:
    """Start every rank, and stop them all when one dies: a process group cannot take back a restarted rank,
    so the container (restarted by compose or the kubelet) must restart as a unit."""
    try:
        num_shard(env)
    except ValueError as exc:
        return _fail(str(exc))
    # The rendezvous file's directory: private (mkdtemp, 0700) and new for each start of the group, since a
    # file left by a group that died would confuse the next one. Under TMPDIR: a tmpfs or emptyDir.
    run_dir = tempfile.mkdtemp(prefix="loraplex-ranks-")
    try:
        return _supervise_ranks(env, extra, rank_commands(env, extra, run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _supervise_ranks(env: Mapping[str, str], extra: Sequence[str], commands: list[list[str]]) -> int:
    grace = stop_grace(drain_timeout(env, extra))
    sockets = socket_dir(env)
    sockets.mkdir(parents=True, exist_ok=True)
    for stale in sockets.glob("shard-*.sock"):  # left by a previous container of this replica
        stale.unlink(missing_ok=True)
    if not env.get("MODEL_ID"):
        # Convert the embedded model once, before N ranks would each try to (conversion needs ~1 GB of RAM).
        converted = subprocess.run(
            command("loraplex-convert-embedded", "loraplex.shard.embedded"),
            env=env,
            stdout=subprocess.DEVNULL,
            check=False,
        )
        if converted.returncode != 0:
            return converted.returncode
    supervisor = Supervisor(PROG)
    supervisor.catch_signals()
    ranks = [f"shard rank {rank}" for rank in range(len(commands))]
    rank_env = rank_environment(env)
    for role, cmd in zip(ranks, commands, strict=True):
        supervisor.start(role, cmd, rank_env)
    return supervisor.run(stop_order=[ranks], grace=grace)


def router_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The router's environment: this replica's shard sockets, unless SHARD_UDS names other addresses."""
    out = dict(env)
    if not out.get("SHARD_UDS"):
        out["SHARD_UDS"] = ",".join(shard_addresses(env))
    return out


def run_router(env: Mapping[str, str], extra: Sequence[str]) -> int:
    """Exec ``loraplex-router`` (so that it receives the container's signals directly)."""
    try:
        router_env = router_environment(env)
    except ValueError as exc:
        return _fail(str(exc))
    argv = [*command("loraplex-router", "loraplex.router.main"), *extra]
    os.execve(argv[0], argv, router_env)
    return 1  # not reached: execve replaces this process


def router_healthy(env: Mapping[str, str], timeout: float = 5.0) -> bool:
    url = f"http://127.0.0.1:{env.get('PORT') or '8080'}{HEALTH_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError) as exc:
        print(f"{PROG}: {url}: {exc}", file=sys.stderr)
        return False


def shards_healthy(env: Mapping[str, str], timeout: float = 5.0) -> bool:
    """Every rank answers the shard service's Health call (the probe runs where the sockets are)."""
    import grpc

    from loraplex.proto.shard.v1 import shard_pb2, shard_pb2_grpc

    for address in shard_addresses(env):
        with grpc.insecure_channel(address) as channel:
            try:
                shard_pb2_grpc.ShardStub(channel).Health(shard_pb2.HealthRequest(), timeout=timeout)
            except grpc.RpcError as exc:
                print(f"{PROG}: {address}: {exc.code().name}", file=sys.stderr)
                return False
    return True


USAGE = f"usage: {PROG} router [router flags] | shards [shard flags] | health router|shards"


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Empty settings need no special care here: every flag parser treats an empty twin as unset."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if environ is None else environ)
    if not args:
        return _fail(USAGE)
    role, rest = args[0], args[1:]
    if role == "router":
        return run_router(env, rest)
    if role == "shards":
        return run_shards(env, rest)
    if role == "health" and rest in (["router"], ["shards"]):
        try:
            ok = router_healthy(env) if rest == ["router"] else shards_healthy(env)
        except ValueError as exc:
            return _fail(str(exc))
        return 0 if ok else 1
    return _fail(USAGE)


if __name__ == "__main__":
    sys.exit(main())
