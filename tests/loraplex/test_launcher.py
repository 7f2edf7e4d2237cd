"""The launcher: starts shard and router as separate processes, serves, stops cleanly, fails loudly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port


def _launch(
    model_dir: Path, adapters: dict[str, Path], log: Path, num_shard: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    spec = ",".join(f"{n}={p}" for n, p in list(adapters.items())[:2])
    cmd = [
        sys.executable,
        "-m",
        "loraplex.launcher",
        "--model-id",
        str(model_dir),
        "--lora-adapters",
        spec,
        "--port",
        str(port),
        "--grpc-port",
        str(free_port()),
        "--max-input-tokens",
        "200",
        "--max-total-tokens",
        "300",
        "--max-batch-total-tokens",
        "8192",
        "--num-shard",
        str(num_shard),
        "--json-output",
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(log.read_text())


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _is_shard(pid: int) -> bool:
    args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return any(a.endswith("loraplex-shard") for a in args)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_serves_then_sigterm_stops_everything_with_exit_0(
    served_model: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    model_dir, adapters = served_model
    proc, url = _launch(model_dir, adapters, tmp_path / "launcher.log")
    children = _children(proc.pid)
    assert len(children) == 2  # one shard, one router
    adapter = next(iter(adapters))
    r = httpx.post(
        url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": adapter, "max_new_tokens": 3}}, timeout=60
    )
    assert r.status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(0.5)
    assert not any(_alive(c) for c in children)


@pytest.mark.parametrize("num_shard", [1, 2])
def test_a_dead_shard_takes_the_launcher_down_non_zero(
    served_model: tuple[Path, dict[str, Path]], tmp_path: Path, num_shard: int
) -> None:
    model_dir, adapters = served_model
    proc, _ = _launch(model_dir, adapters, tmp_path / "launcher.log", num_shard)
    children = _children(proc.pid)
    shards = [c for c in children if _is_shard(c)]
    assert len(shards) == num_shard
    # Real tensor parallelism: the ranks joined one group and each holds its own part of the model
    # (the router also refuses shards that report another rank or world size than their place).
    ready = [
        json.loads(line) for line in (tmp_path / "launcher.log").read_text().splitlines() if '"shard ready"' in line
    ]
    assert sorted(r["rank"] for r in ready) == list(range(num_shard))
    assert len({r["sharded_weight_bytes"] for r in ready}) == 1  # equal slices
    os.kill(shards[-1], signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    time.sleep(0.5)
    assert not any(_alive(c) for c in children)
    assert "exited" in (tmp_path / "launcher.log").read_text()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--num-shard", "0"], "--num-shard"),
        (["--max-input-tokens", "many"], "--max-input-tokens"),
        (["--dtype", "int3"], "--dtype"),
    ],
)
def test_bad_flags_are_one_line_exit_2(args: list[str], words: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.launcher", *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_env_twins_are_read(tmp_path: Path) -> None:
    env = {**os.environ, "MAX_INPUT_TOKENS": "many"}
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.launcher"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 2 and "MAX_INPUT_TOKENS" in proc.stderr


def test_shard_with_missing_model_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.shard.main", "--model-id", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
