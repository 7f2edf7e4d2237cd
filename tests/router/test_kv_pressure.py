"""A KV cache that holds only a few requests at once (real router and shard processes): every valid request
answers with its solo tokens, preempted ones included, streamed or not, and nothing is streamed twice."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Server, start_server

# 6 blocks of 8 tokens; the longest request (33 tokens) needs 5 of them, so one or two fit at a time.
SMALL_KV = ("--max-input-tokens", "17", "--max-total-tokens", "33", "--max-batch-total-tokens", "48")
ROUTER_ARGS = (*SMALL_KV, "--max-batch-prefill-tokens", "48")
SHARD_ARGS = ("--max-batch-total-tokens", "48", "--block-size", "8")


@pytest.fixture(scope="module")
def small_kv(served_model: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir, adapters = served_model
    root = tmp_path_factory.mktemp("small-kv")
    srv = start_server(root, model_dir, dict(list(adapters.items())[:4]), *ROUTER_ARGS, shard_args=SHARD_ARGS)
    yield srv
    srv.stop()


def _preemptions(server: Server) -> float:
    match = re.search(r"^loraplex_preemptions_total (\S+)$", httpx.get(server.url + "/metrics").text, re.MULTILINE)
    assert match
    return float(match.group(1))


def _body(prompt: str, new: int, adapter: str | None, **extra: Any) -> dict[str, Any]:
    return {"inputs": prompt, "parameters": {"max_new_tokens": new, "adapter_id": adapter, "details": True, **extra}}


async def _generate(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[int]:
    r = await client.post(url + "/generate", json=body)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], started: asyncio.Event | None = None
) -> list[int]:
    ids: list[int] = []
    async with client.stream("POST", url + "/generate_stream", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            assert "error" not in event, event
            ids.append(event["token"]["id"])
            assert event["index"] == len(ids)  # each token once, in order
            if started is not None:
                started.set()
            if event.get("details"):
                assert event["details"]["generated_tokens"] == len(ids)
    return ids


def _jobs(server: Server) -> list[tuple[str, int, str | None]]:
    """40 requests, half with an adapter; prompts and totals on and just past multiples of 8 and 16."""
    jobs = []
    for i in range(40):
        prompt = "xqzjkvw"[i % 7] * (7, 8, 9, 15, 16, 17)[i % 6]
        total = (16, 17, 24, 25, 32, 33)[(i // 6 + i) % 6]
        new = total - len(prompt) if total > len(prompt) else total + 16 - len(prompt)
        jobs.append((prompt, new, server.adapters[i % 4] if i % 2 else None))
    return jobs


@pytest.fixture(scope="module")
def alone(small_kv: Server) -> list[list[int]]:
    """Each burst request's tokens when it runs alone (nothing to preempt)."""

    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=300) as client:
            return [await _generate(client, small_kv.url, _body(p, n, a)) for p, n, a in _jobs(small_kv)]

    return asyncio.run(run())


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
def test_a_burst_into_a_small_kv_cache_answers_everyone_with_their_solo_tokens(
    small_kv: Server, alone: list[list[int]], stream: bool
) -> None:
    jobs = _jobs(small_kv)
    before = _preemptions(small_kv)

    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=300) as client:
            call = _stream if stream else _generate
            return list(await asyncio.gather(*(call(client, small_kv.url, _body(p, n, a)) for p, n, a in jobs)))

    assert asyncio.run(run()) == alone
    assert [len(t) for t in alone] == [n for _, n, _ in jobs]  # no early end hides a length
    assert _preemptions(small_kv) > before  # the cache really was too small for the burst (17 preemptions)


def test_a_preempted_stream_ends_with_its_exact_answer(small_kv: Server) -> None:
    greedy = _body("x" * 5, 28, None)  # 33 tokens: 5 of the 6 blocks at its end
    seeded = _body("q" * 5, 27, small_kv.adapters[1], do_sample=True, seed=42, temperature=0.9, top_k=30)
    before = _preemptions(small_kv)

    async def run() -> tuple[list[int], list[int], list[int], list[int]]:
        async with httpx.AsyncClient(timeout=300) as client:
            started = asyncio.Event()
            first = asyncio.ensure_future(_stream(client, small_kv.url, greedy, started))
            await started.wait()  # the seeded one is the newer: it gives its blocks back when the older grows
            second = await _stream(client, small_kv.url, seeded)
            together = await first
            return (
                together,
                second,
                await _generate(client, small_kv.url, greedy),
                await _generate(client, small_kv.url, seeded),
            )

    together, preempted, greedy_alone, seeded_alone = asyncio.run(run())
    assert _preemptions(small_kv) > before
    assert together == greedy_alone
    assert preempted == seeded_alone and len(preempted) == 27


def test_info_reports_the_budget_in_tokens_and_blocks(small_kv: Server) -> None:
    info = httpx.get(small_kv.url + "/info", timeout=10).json()
    assert (info["max_batch_total_tokens"], info["kv_block_size"], info["kv_blocks"]) == (48, 8, 6)


def test_a_router_whose_longest_request_cannot_fit_the_shards_cache_refuses_to_start(
    served_model: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    model_dir, _ = served_model
    with pytest.raises(RuntimeError, match="does not fit the KV cache"):
        start_server(tmp_path, model_dir, {}, *SMALL_KV, shard_args=("--max-batch-total-tokens", "24"))


def test_a_preempted_constrained_request_continues_in_its_grammar(small_kv: Server) -> None:
    """The recomputed request replays its tokens into a fresh matcher: it ends with exactly its solo tokens."""
    pattern = "([a-z]{3}[0-9]){40,}"  # longer than any budget here; what may come next depends on the position
    grammar = {"type": "regex", "value": pattern}
    older = {"inputs": "x" * 5, "parameters": {"max_new_tokens": 28, "grammar": grammar, "details": True}}
    params = {"max_new_tokens": 27, "grammar": grammar, "details": True, "do_sample": True, "seed": 4, "top_k": 40}
    newer = {"inputs": "q" * 5, "parameters": {**params, "adapter_id": small_kv.adapters[1]}}
    before = _preemptions(small_kv)

    async def tokens(client: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Event | None = None) -> Any:
        async with client.stream("POST", small_kv.url + "/generate_stream", json=body) as r:
            assert r.status_code == 200
            ids, text = [], ""
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    assert "error" not in event, event
                    ids.append(event["token"]["id"])
                    text = event["generated_text"] or text
                    if started is not None:
                        started.set()
            return ids, text

    async def run() -> list[Any]:
        async with httpx.AsyncClient(timeout=300) as client:
            started = asyncio.Event()
            first = asyncio.ensure_future(tokens(client, older, started))
            await started.wait()  # the newer one gives its blocks back when the older grows
            second = await tokens(client, newer)
            return [await first, second, await tokens(client, older), await tokens(client, newer)]

    together, preempted, older_alone, newer_alone = asyncio.run(run())
    assert _preemptions(small_kv) > before
    assert together == older_alone and preempted == newer_alone and len(preempted[0]) == 27
    assert all(re.fullmatch("([a-z]{3}[0-9])*[a-z]{0,3}", text) for _, text in (together, preempted))
