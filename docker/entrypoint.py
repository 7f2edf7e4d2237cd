#!/usr/bin/env python3
"""Container entry point: ``router``, ``shards`` (every tensor-parallel rank of one replica) and ``health`` checks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

PROG = "loraplex-entrypoint"
HEALTH_PATH = "/health"
DEFAULT_SOCKET_DIR = "/run/loraplex"
# Rank 0's process-group rendezvous never leaves the container: every rank of a replica runs here.
MASTER_ADDR = "127.0.0.1"
# Variables this script reads that are no loraplex flag's twin (the others are the flags' own twins).
OWN_ENV = {"SHARD_SOCKET_DIR": "directory of the shards' unix sockets, shared with the router"}
# Whole seconds a shard may take to drain on SIGTERM (its --drain-timeout, 25 s by default) plus gRPC's grace.
STOP_GRACE = 40.0


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def command(script: str, module: str) -> list[str]:
    """The console script beside this interpreter, else on PATH, else ``python -m`` (as the launcher does)."""
    beside = Path(sys.executable).parent / script
    if beside.exists():
        return [str(beside)]
    found = shutil.which(script)
    return [found] if found else [sys.executable, "-m", module]


def setting_env_names() -> set[str]:
    """Environment twins of the launcher's and router's flags (the settings a deployment passes)."""
    from loraplex.launcher import parser as launcher_parser
    from loraplex.router.settings import router_parser

    return set(launcher_parser().env_names.values()) | set(router_parser().env_names.values())


def without_empty_settings(env: Mapping[str, str]) -> dict[str, str]:
    """Drop settings set to ``""``: compose passes ``${VAR:-}`` through, and an empty value means "default".

    Only flags' twins are touched; an empty ``CUDA_VISIBLE_DEVICES`` (no GPU) keeps its meaning.
    """
    names = setting_env_names()
    return {k: v for k, v in env.items() if not (k in names and v == "")}


def num_shard(env: Mapping[str, str]) -> int:
    raw = env.get("NUM_SHARD") or "1"
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"NUM_SHARD={raw!r} is not a whole number") from None
    if n < 1:
        raise ValueError("NUM_SHARD must be at least 1")
    return n


def shard_addresses(env: Mapping[str, str]) -> list[str]:
    """Rank 0 first, as ``loraplex-router --shard-uds`` wants them."""
    root = Path(env.get("SHARD_SOCKET_DIR") or DEFAULT_SOCKET_DIR)
    return [f"unix://{root / f'shard-{rank}.sock'}" for rank in range(num_shard(env))]


def rank_device(device: str, rank: int, world: int) -> str:
    """``cuda`` gives rank i the i-th GPU the container sees; ``cpu`` stays ``cpu``."""
    if device in ("cuda", "cpu"):
        return f"cuda:{rank}" if device == "cuda" else "cpu"
    if world > 1:
        raise ValueError(f"DEVICE={device} names one device; {world} ranks need DEVICE=cuda (one GPU each) or cpu")
    return device


def rank_commands(env: Mapping[str, str], extra: Sequence[str] = ()) -> list[list[str]]:
    """One ``loraplex-shard`` command per rank; every other setting reaches the shards through its env twin."""
    world = num_shard(env)
    device = env.get("DEVICE") or "cpu"
    master_port = env.get("MASTER_PORT") or "29500"
    commands = []
    for rank, address in enumerate(shard_addresses(env)):
        flags = {
            "--rank": str(rank),
            "--num-shard": str(world),
            "--listen": address,
            "--device": rank_device(device, rank, world),
            "--master-addr": MASTER_ADDR,
            "--master-port": master_port,
        }
        commands.append(
            [*command("loraplex-shard", "loraplex.shard.main"), *(t for kv in flags.items() for t in kv), *extra]
        )
    return commands


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_shards(env: Mapping[str, str], extra: Sequence[str]) -> int:
    """Start every rank, and stop them all when one dies: a process group cannot take back a restarted rank,
    so the container (restarted by compose or the kubelet) must restart as a unit."""
    try:
        commands = rank_commands(env, extra)
    except ValueError as exc:
        return _fail(str(exc))
    sockets = Path(env.get("SHARD_SOCKET_DIR") or DEFAULT_SOCKET_DIR)
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
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs = [subprocess.Popen(cmd, env=env) for cmd in commands]
    while not stopping:
        for rank, p in enumerate(procs):
            if p.poll() is not None:
                print(f"{PROG}: shard rank {rank} exited with {p.returncode}; stopping its group", file=sys.stderr)
                _stop(procs, 10.0)
                return p.returncode or 1
        time.sleep(0.2)
    _stop(procs, STOP_GRACE)
    return 0


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
    args = list(sys.argv[1:] if argv is None else argv)
    env = without_empty_settings(os.environ if environ is None else environ)
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
