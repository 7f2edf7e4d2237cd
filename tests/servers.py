"""Real server processes for the tests: a shard and a router on a tiny model, with PEFT adapters."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

NUM_ADAPTERS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    grpc_address: str
    model_dir: Path
    adapters: list[str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    shard_addresses: list[str] = field(default_factory=list)
    router_cmd: list[str] = field(default_factory=list)

    @property
    def router(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    def start_router(self, timeout: float = 120) -> None:
        """Start (or restart) the router process against the running shards and wait for /health."""
        log = self.logs[-1]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs.append(subprocess.Popen(self.router_cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.router.poll() is not None or any(p.poll() is not None for p in self.shards):
                self.stop()
                raise RuntimeError("a server process died:\n" + self.log_text())
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy:\n" + self.log_text())

    def restart_shard(self, rank: int) -> None:
        """Start rank ``rank`` again with its first command line (after it died), as a supervisor would."""
        old = self.procs[rank]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = self.logs[rank].open("ab")
        self.procs[rank] = subprocess.Popen(old.args, stdout=log, stderr=subprocess.STDOUT, env=env)

    @property
    def shards(self) -> list[subprocess.Popen[bytes]]:
        return self.procs[: len(self.shard_addresses)]

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.logs if p.exists())


def start_server(
    root: Path,
    model_dir: Path,
    adapters: dict[str, Path],
    *router_args: str,
    num_shard: int = 1,
    shard_args: tuple[str, ...] = (),
) -> Server:
    """Start ``num_shard`` shard processes and a router as separate processes; wait for /health."""
    port, grpc_port, master = free_port(), free_port(), free_port()
    socks = [root / f"shard-{port}-{rank}.sock" for rank in range(num_shard)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    spec = ",".join(f"{n}={p}" for n, p in adapters.items())
    server = Server(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", model_dir, list(adapters))
    router_log = root / f"router-{port}.log"
    for rank, sock in enumerate(socks):
        shard_log = root / f"shard-{port}-{rank}.log"
        server.logs.append(shard_log)
        shard_cmd = [
            sys.executable, "-m", "loraplex.shard.main", "--model-id", str(model_dir), "--listen", f"unix://{sock}",
            "--lora-adapters", spec, "--max-batch-total-tokens", "16384", "--block-size", "8",
            "--rank", str(rank), "--num-shard", str(num_shard), "--master-port", str(master), *shard_args,
        ]  # fmt: skip
        server.procs.append(subprocess.Popen(shard_cmd, stdout=shard_log.open("wb"), stderr=subprocess.STDOUT, env=env))
    server.logs.append(router_log)
    server.shard_addresses = [f"unix://{s}" for s in socks]
    server.router_cmd = [
        sys.executable, "-m", "loraplex.router.main", "--shard-uds", ",".join(server.shard_addresses),
        "--port", str(port), "--grpc-port", str(grpc_port),
        "--max-input-tokens", "200", "--max-total-tokens", "300", "--max-batch-total-tokens", "16384",
        *router_args,
    ]  # fmt: skip
    server.start_router()
    return server
