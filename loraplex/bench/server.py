"""A loraplex launcher started for a benchmark run, stopped (SIGTERM) when the run is done."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launcher() -> list[str]:
    path = Path(sys.executable).parent / "loraplex-launcher"
    if path.exists():
        return [str(path)]
    found = shutil.which("loraplex-launcher")
    return [found] if found else [sys.executable, "-m", "loraplex.launcher"]


class LaunchedServer:
    """``loraplex-launcher`` on free ports with ``args``; its output goes to ``log``."""

    def __init__(self, args: Sequence[str], log: Path, startup_timeout: float = 600.0) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.cmd = [*_launcher(), "--port", str(self.port), "--grpc-port", str(self.grpc_port), *args]
        self.log = log
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LaunchedServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not become healthy:\n{self.log_tail()}")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
