"""Process faults around the router: SIGTERM drains, a restarted router adopts live shards, slow readers."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from loraplex.proto.shard.v1 import shard_pb2 as shard_pb
from loraplex.proto.shard.v1 import shard_pb2_grpc as shard_grpc
from loraplex.proto.v1 import generate_pb2 as public_pb
from loraplex.proto.v1 import generate_pb2_grpc as public_grpc
from tests.servers import Server, start_server

LONG = ("--max-input-tokens", "100", "--max-total-tokens", "2000", "--drain-timeout", "60")


@pytest.fixture
def server(served_model: tuple[Path, dict[str, Path]], tmp_path: Path) -> Iterator[Server]:
    model_dir, adapters = served_model
    srv = start_server(tmp_path, model_dir, dict(list(adapters.items())[:2]), *LONG)
    yield srv
    srv.stop()


def _stream(server: Server, tokens: int, out: dict[str, Any], started: threading.Event) -> None:
    body = {"inputs": "hello world", "parameters": {"max_new_tokens": tokens, "details": True}}
    events = []
    try:
        with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line.removeprefix("data:")))
                    started.set()
    except httpx.HTTPError as exc:  # the router was killed under it (a test's own doing)
        out["error"] = exc
    out["events"] = events


def _generate(server: Server, inputs: str, tokens: int) -> httpx.Response:
    body = {"inputs": inputs, "parameters": {"max_new_tokens": tokens}}
    return httpx.post(server.url + "/generate", json=body, timeout=60)


def _shard_health(server: Server) -> shard_pb.HealthResponse:
    with grpc.insecure_channel(server.shard_addresses[0]) as channel:
        return shard_grpc.ShardStub(channel).Health(shard_pb.HealthRequest(), timeout=10)


def _rss(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match
    return int(match[1]) * 1024


def test_sigterm_drains_in_flight_refuses_new_and_exits_0(server: Server) -> None:
    results: list[dict[str, Any]] = [{} for _ in range(3)]
    started = [threading.Event() for _ in results]
    threads = [
        threading.Thread(target=_stream, args=(server, 1500, r, e)) for r, e in zip(results, started, strict=True)
    ]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)
    server.router.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(
        server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=30
    )
    assert refused.status_code == 503 and refused.json()["error_type"] == "unavailable"
    assert httpx.get(server.url + "/health", timeout=30).status_code == 503
    for t in threads:
        t.join(120)
    for r in results:  # every in-flight stream finished normally, to the last token
        last = r["events"][-1]
        assert last["details"]["finish_reason"] in ("length", "eos_token") and last["generated_text"] is not None
    assert any(r["events"][-1]["details"]["generated_tokens"] == 1500 for r in results) or all(
        r["events"][-1]["details"]["finish_reason"] == "eos_token" for r in results
    )
    assert server.router.wait(30) == 0
    server.shards[0].send_signal(signal.SIGTERM)
    assert server.shards[0].wait(30) == 0  # no batch left: the shard stops at once


def test_a_restarted_router_drops_orphaned_batches_and_serves(server: Server) -> None:
    solo = httpx.post(
        server.url + "/generate", json={"inputs": "the sea", "parameters": {"max_new_tokens": 8}}, timeout=60
    )
    result: dict[str, Any] = {}
    started = threading.Event()
    thread = threading.Thread(target=_stream, args=(server, 1500, result, started))
    thread.start()
    assert started.wait(60)
    server.router.kill()  # SIGKILL: no chance to clean up
    server.router.wait(10)
    thread.join(30)
    assert "error" in result  # the client saw its stream cut, not a silent success
    orphaned = _shard_health(server)
    assert orphaned.cached_batches >= 1 and orphaned.kv_blocks_used > 0
    server.start_router()
    adopted = _shard_health(server)
    assert adopted.cached_batches == 0 and adopted.kv_blocks_used == 0
    again = httpx.post(
        server.url + "/generate", json={"inputs": "the sea", "parameters": {"max_new_tokens": 8}}, timeout=60
    )
    assert again.status_code == 200 and again.json() == solo.json()


def test_a_client_that_stops_reading_does_not_grow_memory(server: Server) -> None:
    body = json.dumps({"inputs": "hello world", "parameters": {"max_new_tokens": 1800}}).encode()
    stalled = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = _rss(server.router.pid)
    stalled.sendall(
        b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )  # and never read a byte
    for _ in range(20):  # others are served meanwhile
        ok = httpx.post(
            server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 4}}, timeout=30
        )
        assert ok.status_code == 200
    time.sleep(3)
    grown = _rss(server.router.pid) - before
    print(f"\nrouter RSS growth with a stalled reader: {grown / 2**20:.1f} MiB")
    assert grown < 32 * 2**20
    stalled.close()
    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        if "loraplex_running_requests 0.0" in metrics and "loraplex_kv_blocks_used 0.0" in metrics:
            break
        assert time.monotonic() < deadline, "the abandoned stream was never cleaned up"
        time.sleep(0.2)


def test_a_router_refuses_shards_out_of_place_and_stops_waiting_at_connect_timeout(
    server: Server, tmp_path: Path
) -> None:
    base = [sys.executable, "-m", "loraplex.router.main", "--port", "0", "--grpc-port", "0"]
    # The one shard of a one-rank group listed as both ranks of two: serving would look right and split nothing.
    twice = ",".join(server.shard_addresses * 2)
    proc = subprocess.run([*base, "--shard-uds", twice], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "is rank 0 of 1, but it is listed as rank 0 of 2" in proc.stderr
    assert _shard_health(server).cached_batches == 0
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # the real router kept serving

    started = time.monotonic()
    missing = f"unix://{tmp_path / 'nobody.sock'}"
    proc = subprocess.run(
        [*base, "--shard-uds", missing, "--connect-timeout", "1"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "not reachable" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 30


def test_a_restarted_shard_is_taken_back_without_restarting_the_router(server: Server) -> None:
    body = {"inputs": "the sea", "parameters": {"max_new_tokens": 8, "adapter_id": server.adapters[0]}}
    solo = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert solo.status_code == 200
    server.shards[0].kill()
    server.shards[0].wait(10)
    failed = httpx.post(server.url + "/generate", json=body, timeout=30)
    assert failed.status_code in (424, 503), failed.text  # an explicit error, not a hang
    assert httpx.get(server.url + "/health", timeout=10).status_code == 503
    started = time.monotonic()
    again_dead = httpx.post(server.url + "/generate", json=body, timeout=30)  # while no shard answers
    assert again_dead.status_code == 424 and "not answering" in again_dead.json()["error"], again_dead.text
    assert time.monotonic() - started < 10

    server.restart_shard(0)  # what compose's restart policy or the kubelet does with the shard container
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.5)
    again = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert again.status_code == 200 and again.json() == solo.json()


def _cancelled(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(r'^loraplex_requests_total\{status="cancelled"\} (\S+)$', text, re.M)
    return float(match[1]) if match else 0.0


def _assert_freed_and_cancelled(server: Server, cancelled_before: float) -> None:
    deadline = time.monotonic() + 10
    while (health := _shard_health(server)).cached_requests or health.kv_blocks_used:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert _cancelled(server) == cancelled_before + 1  # cancelled, not generated to its end for nobody


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/generate", {"inputs": "hello world", "parameters": {"max_new_tokens": 1500}}),
        ("/", {"inputs": "hello world", "parameters": {"max_new_tokens": 1500}}),
        ("/v1/completions", {"prompt": "hello world", "max_tokens": 1500}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1500}),
    ],
)
def test_a_client_that_hangs_up_on_a_plain_request_frees_its_slot(
    server: Server, route: str, body: dict[str, Any]
) -> None:
    before = _cancelled(server)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + route, json=body, timeout=httpx.Timeout(60, read=1.0))
    _assert_freed_and_cancelled(server, before)


def test_a_grpc_client_whose_deadline_passes_frees_its_slot(server: Server) -> None:
    stub = public_grpc.TextGenerationStub(grpc.insecure_channel(server.grpc_address))
    before = _cancelled(server)
    request = public_pb.GenerateRequest(inputs="hello world", parameters=public_pb.Parameters(max_new_tokens=1500))
    with pytest.raises(grpc.RpcError) as failed:
        stub.Generate(request, timeout=1.0)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_freed_and_cancelled(server, before)
