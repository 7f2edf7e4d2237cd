"""A running server against hostile tenants: ids that do not exist evict nobody, a backtracking pattern is
refused within seconds while other requests flow, an adapter over the byte budget is refused."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch

from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import inspect_adapter
from tests.factories import tiny_served_model, write_raw_adapter
from tests.servers import Server, start_server

ADMIN = "admin-secret-0003"
KEY_A, KEY_B = "key-team-a-0003", "key-team-b-0003"
TENANTS = {
    "tenants": [
        {"name": "team-a", "keys": [KEY_A], "adapters": ["team-a/*"]},
        {"name": "team-b", "keys": [KEY_B], "adapters": ["team-b/*"]},
    ]
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    top = tmp_path_factory.mktemp("hostile-server")
    model_dir = top / "model"
    tiny_served_model(model_dir)
    root = top / "adapters"
    for name in ("team-a/one", "team-a/two", "team-b/real"):
        write_raw_adapter(root / name, model_dir, rank=4, seed=len(name))
    # A tenant who may write into its folder of the root ships a pattern that backtracks for minutes.
    evil = write_raw_adapter(root / "team-b/evil", model_dir, rank=4)
    cfg = json.loads((evil / "adapter_config.json").read_text())
    (evil / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"(.|.)*X": 4}}))
    write_raw_adapter(root / "team-b/huge", model_dir, rank=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    config = ModelConfig.from_dir(model_dir)
    size = {  # as the shard will lay them out (float32 on CPU)
        name: inspect_adapter(name, root / name, config, max_rank=128, dtype=torch.float32).memory_bytes
        for name in ("team-a/one", "team-b/huge")
    }
    budget = 3 * size["team-a/one"]
    assert size["team-b/huge"] > budget
    keys = top / "keys.yaml"
    keys.write_text(json.dumps(TENANTS))
    server = start_server(
        top,
        model_dir,
        {},
        "--api-keys-file",
        str(keys),
        "--admin-token",
        ADMIN,
        shard_args=(
            "--adapter-dirs",
            str(root),
            "--max-active-adapters",
            "1",
            "--max-cpu-adapters",
            "1",
            "--max-cpu-adapter-bytes",
            str(budget),
            "--max-device-adapter-bytes",
            str(budget),
        ),
    )
    yield dict(server=server)
    server.stop()


def _generate(server: Server, adapter: str, key: str, tokens: int = 4) -> httpx.Response:
    body = {"inputs": "hello world", "parameters": {"adapter_id": adapter, "max_new_tokens": tokens}}
    return httpx.post(server.url + "/generate", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _tiers(server: Server) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    listing = httpx.get(server.url + "/adapters", headers=admin, timeout=30).json()["adapters"]
    return {a["id"]: a["tier"] for a in listing}


def _evictions(server: Server) -> float:
    match = re.search(r"^loraplex_adapter_evictions_total ([0-9.e+-]+)$", httpx.get(server.url + "/metrics").text, re.M)
    assert match
    return float(match[1])


def test_fifty_ids_that_do_not_exist_evict_nobody(world: dict[str, Any]) -> None:
    server = world["server"]
    assert _generate(server, "team-a/one", KEY_A).status_code == 200
    assert _generate(server, "team-a/two", KEY_A).status_code == 200  # the tiers are full now (1 + 1)
    before, evictions = _tiers(server), _evictions(server)
    assert before["team-a/one"] in ("host", "device") and before["team-a/two"] in ("host", "device")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _generate(server, f"team-b/missing-{i}", KEY_B), range(50)))
    assert [r.status_code for r in answers] == [404] * 50
    assert {r.json()["error_type"] for r in answers} == {"adapter_not_found"}
    after = _tiers(server)
    assert after["team-a/one"] == before["team-a/one"] and after["team-a/two"] == before["team-a/two"]
    assert _evictions(server) == evictions
    # A real id of team-b's does make room, as the LRU says: the least recently used team-a adapter goes.
    assert _generate(server, "team-b/real", KEY_B).status_code == 200
    tiers = _tiers(server)
    assert tiers["team-a/one"] == "disk" and tiers["team-a/two"] in ("host", "device")


def test_a_backtracking_rank_pattern_is_refused_within_seconds_while_requests_flow(world: dict[str, Any]) -> None:
    server = world["server"]
    streamed: dict[str, Any] = {}

    def stream() -> None:
        body = {
            "inputs": "the quick brown fox",
            "parameters": {"adapter_id": "team-a/two", "max_new_tokens": 60, "details": True},
        }
        headers = {"Authorization": f"Bearer {KEY_A}"}
        with httpx.stream("POST", server.url + "/generate_stream", json=body, headers=headers, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        streamed["last"] = json.loads(lines[-1].removeprefix("data:"))

    runner = threading.Thread(target=stream)
    runner.start()
    flowing: list[int] = []
    stop = threading.Event()

    def others() -> None:  # other requests keep being answered while the hostile load is refused
        while not stop.is_set():
            flowing.append(_generate(server, "team-a/two", KEY_A, tokens=2).status_code)

    side = threading.Thread(target=others)
    side.start()
    started = time.monotonic()
    resp = _generate(server, "team-b/evil", KEY_B)
    elapsed = time.monotonic() - started
    stop.set()
    side.join(60)
    runner.join(120)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error_type"] == "adapter_invalid" and "pattern_timeout" in resp.json()["error"]
    assert elapsed < 15
    assert flowing and set(flowing) == {200}
    assert streamed["last"]["details"]["finish_reason"] in ("length", "eos_token")
    # Nothing was held by the refused load: it is refused again just as fast, and others still load.
    assert _generate(server, "team-b/evil", KEY_B).status_code == 422
    assert _generate(server, "team-a/one", KEY_A).status_code == 200


def test_an_adapter_over_the_byte_budget_is_refused_for_good(world: dict[str, Any]) -> None:
    server = world["server"]
    resp = _generate(server, "team-b/huge", KEY_B)
    assert resp.status_code == 422 and "too_large" in resp.json()["error"], resp.text
    assert _generate(server, "team-a/two", KEY_A).status_code == 200
