"""docker/entrypoint.py for real: a 2-rank shard group and a router on a tiny model, health checks, unit failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from loraplex.common.shutdown import DRAIN_TIMEOUT, SERVER_STOP_GRACE, stop_grace
from loraplex.shard.parallel import rank_device
from loraplex.shard.settings import shard_parser
from tests.deploy.support import DOCKER, entrypoint, use_environ
from tests.factories import tiny_served_model
from tests.listening import is_loopback, listening
from tests.servers import free_port

SCRIPT = DOCKER / "entrypoint.py"


def test_each_rank_gets_its_own_gpu_by_the_shards_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry point puts only the rank's place on its command line; DEVICE reaches the shard, whose
    rank_device (the one rule) gives rank i the i-th GPU."""
    ep = entrypoint()
    assert not hasattr(ep, "rank_device")
    env = {"NUM_SHARD": "4", "DEVICE": "cuda"}
    use_environ(monkeypatch, env)
    prefix = len(ep.command("loraplex-shard", "loraplex.shard.main"))
    ranks = [shard_parser().parse(cmd[prefix:]) for cmd in ep.rank_commands(env)]
    assert [rank_device(ns.device, ns.rank, ns.num_shard) for ns in ranks] == [f"cuda:{r}" for r in range(4)]
    assert {ns.master_addr for ns in ranks} == {"127.0.0.1"}
    with pytest.raises(ValueError, match="at least 1"):
        ep.shard_addresses({"NUM_SHARD": "0"})


def test_empty_settings_count_as_unset() -> None:
    ep = entrypoint()
    assert ep.shard_addresses({"NUM_SHARD": "", "SHARD_SOCKET_DIR": ""}) == ["unix:///run/loraplex/shard-0.sock"]
    assert ep.router_environment({"SHARD_UDS": ""})["SHARD_UDS"] == "unix:///run/loraplex/shard-0.sock"
    assert ep.drain_timeout({"DRAIN_TIMEOUT": ""}, []) == DRAIN_TIMEOUT


def test_the_stop_grace_follows_the_ranks_drain_timeout() -> None:
    """The ranks' --drain-timeout, from their twin or the flags after ``shards``, sizes the group's stop grace."""
    ep = entrypoint()
    assert ep.drain_timeout({}, []) == DRAIN_TIMEOUT
    assert ep.drain_timeout({"DRAIN_TIMEOUT": "7"}, ["--json-output"]) == 7.0
    assert ep.drain_timeout({"DRAIN_TIMEOUT": "7"}, ["--json-output", "--drain-timeout", "3"]) == 3.0
    assert stop_grace(3.0) > 3.0 + SERVER_STOP_GRACE


def test_router_gets_the_sockets_unless_told_otherwise() -> None:
    ep = entrypoint()
    env = ep.router_environment({"NUM_SHARD": "2", "SHARD_SOCKET_DIR": "/s"})
    assert env["SHARD_UDS"] == "unix:///s/shard-0.sock,unix:///s/shard-1.sock"
    assert ep.router_environment({"SHARD_UDS": "10.0.0.5:7000"})["SHARD_UDS"] == "10.0.0.5:7000"


def run_script(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_usage_and_bad_settings_exit_2() -> None:
    env = {**os.environ, "NUM_SHARD": "two"}
    assert run_script("serve", env=env).returncode == 2
    bad = run_script("health", "shards", env=env)
    assert bad.returncode == 2 and "NUM_SHARD='two'" in bad.stderr


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def group_env(tmp_path: Path) -> dict[str, str]:
    """The settings a container would have, with the empty ones compose passes through."""
    tiny_served_model(tmp_path / "model")
    env = {
        **os.environ,
        "NUM_SHARD": "2",
        "DEVICE": "cpu",
        "MODEL_ID": str(tmp_path / "model"),
        "SHARD_SOCKET_DIR": str(tmp_path / "run"),
        "MASTER_PORT": str(free_port()),
        "MAX_BATCH_TOTAL_TOKENS": "4096",
        "LORA_ADAPTERS": "",
        "API_KEYS_FILE": "",  # would be Path("") if an empty twin were not unset
        "LORAPLEX_HOSTNAME": "127.0.0.1",
        "PORT": str(free_port()),
        "GRPC_PORT": str(free_port()),
        "MAX_INPUT_TOKENS": "200",
        "MAX_TOTAL_TOKENS": "300",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SHARD_UDS", None)
    return env


def test_two_ranks_and_a_router_serve_then_fall_as_a_unit(group_env: dict[str, str], tmp_path: Path) -> None:
    env = group_env
    assert run_script("health", "shards", env=env).returncode == 1  # nothing listens yet
    # A socket a previous container left behind must not stop the new rank from listening.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "shard-1.sock").write_text("stale")
    log = (tmp_path / "shards.log").open("wb")
    shards = subprocess.Popen([sys.executable, str(SCRIPT), "shards"], env=env, stdout=log, stderr=log)
    router = None
    try:
        wait_until(lambda: run_script("health", "shards", env=env).returncode == 0, 120, "both ranks")
        ranks = children(shards.pid)
        assert len(ranks) == 2
        rank_args = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in ranks]
        assert sorted(a[a.index(b"--rank") + 1] for a in rank_args) == [b"0", b"1"]
        # The ranks met through a file in a private directory: nothing of theirs listens off loopback (a
        # tcp:// rendezvous has rank 0's store listen on every interface of the container).
        (init,) = {a for args in rank_args for a in args if a.startswith(b"--init-method=file://")}
        rendezvous_dir = Path(init.removeprefix(b"--init-method=file://").decode()).parent
        assert (rendezvous_dir.stat().st_mode & 0o777) == 0o700
        for pid in ranks:
            assert not [(a, port) for a, port in listening(pid) if not is_loopback(a)], f"rank pid {pid}"

        router = subprocess.Popen([sys.executable, str(SCRIPT), "router"], env=env, stdout=log, stderr=log)
        wait_until(lambda: run_script("health", "router", env=env).returncode == 0, 60, "the router")
        url = f"http://127.0.0.1:{env['PORT']}"
        assert httpx.get(url + "/info", timeout=10).json()["num_shard"] == 2
        reply = httpx.post(url + "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 4}}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["generated_text"]

        # One rank dies: the entry point stops the other and exits non-zero, so the container restarts whole.
        os.kill(ranks[1], signal.SIGKILL)
        assert shards.wait(timeout=30) != 0
        assert not alive(ranks[0])
        assert "shard rank 1 exited" in (tmp_path / "shards.log").read_text()
        assert not rendezvous_dir.exists()  # a new group gets a new file
        wait_until(lambda: run_script("health", "router", env=env).returncode == 1, 30, "the router to turn 503")
        assert httpx.get(url + "/health", timeout=10).status_code == 503
    finally:
        for proc in (router, shards):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
        log.close()


def test_sigterm_stops_the_group_cleanly(group_env: dict[str, str], tmp_path: Path) -> None:
    env = {**group_env, "NUM_SHARD": "1"}
    shards = subprocess.Popen(
        [sys.executable, str(SCRIPT), "shards"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: run_script("health", "shards", env=env).returncode == 0, 120, "the rank")
        (rank,) = children(shards.pid)
        shards.send_signal(signal.SIGTERM)
        assert shards.wait(timeout=45) == 0
        assert not alive(rank)
        assert not (tmp_path / "run" / "shard-0.sock").exists()  # the rank removed its socket on the way out
    finally:
        if shards.poll() is None:
            shards.kill()


def fake_script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_no_model_id_converts_the_embedded_model_once_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks start only after one conversion succeeded; a failed conversion is the container's exit code."""
    ep = entrypoint()
    calls = tmp_path / "calls"
    scripts = {
        "loraplex-convert-embedded": fake_script(tmp_path / "convert", f'echo convert "$LORAPLEX_CACHE" >> {calls}'),
        "loraplex-shard": fake_script(tmp_path / "shard", f'echo shard "$@" >> {calls}; exit 5'),
    }
    monkeypatch.setattr(ep, "command", lambda script, module: [str(scripts[script])])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own handlers
    env = {"NUM_SHARD": "2", "SHARD_SOCKET_DIR": str(tmp_path / "run"), "LORAPLEX_CACHE": "/data/loraplex"}
    # A rank that exits takes the group down with its exit code.
    assert ep.run_shards(env, ["--json-output"]) == 5
    lines = calls.read_text().splitlines()
    assert lines[0] == "convert /data/loraplex"
    assert {line.split()[2] for line in lines[1:]} <= {"0", "1"} and lines[1].endswith("--json-output")

    fake_script(scripts["loraplex-convert-embedded"], "exit 2")
    calls.unlink()
    assert ep.run_shards(env, []) == 2
    assert not calls.exists()  # no rank started
    # With a model named, nothing is converted.
    assert ep.run_shards({**env, "MODEL_ID": "org/model"}, []) == 5
    assert not [line for line in calls.read_text().splitlines() if line.startswith("convert")]
