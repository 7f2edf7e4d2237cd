"""Prefix caching through a real server: a prompt's KV blocks are reused for the same adapter only, the reuse
shows in /metrics and in OpenAI's usage, and reused or not, greedy outputs are the same."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import openai

from loraplex.router.service import KV_READ_INTERVAL_S
from tests.servers import Server

# Other tests on the session server send prompts like this one: a nonce first, so no block of theirs matches.
PROMPT = uuid.uuid4().hex + " the quick brown fox jumps over the lazy dog, what is the capital of France? " * 3
HITS = "loraplex_prefix_cache_hit_tokens_total"
QUERIES = "loraplex_prefix_cache_queried_tokens_total"


def _counter(server: Server, name: str) -> float:
    time.sleep(KV_READ_INTERVAL_S + 0.2)  # the router reads the shards' counters at most this often
    text = httpx.get(server.url + "/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def _generate(server: Server, adapter: str | None, prompt: str = PROMPT) -> tuple[list[int], float, float]:
    """Greedy tokens, and the prompt tokens the shards looked up and found cached for this request alone."""
    hits, queries = _counter(server, HITS), _counter(server, QUERIES)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 6, "adapter_id": adapter, "details": True}}
    r = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    tokens = [t["id"] for t in r.json()["details"]["tokens"]]
    return tokens, _counter(server, QUERIES) - queries, _counter(server, HITS) - hits


def test_a_prefix_cached_under_one_adapter_is_reused_by_it_alone(server: Server) -> None:
    a, b = server.adapters[1], server.adapters[2]
    prompt_tokens = len(httpx.post(server.url + "/tokenize", json={"inputs": PROMPT}, timeout=30).json())
    assert prompt_tokens > 40  # several full blocks of 8 (the test server's block size)
    full_blocks = (prompt_tokens - 1) // 8 * 8  # the last prompt token is always computed

    first_a, queried, hit = _generate(server, a)
    assert queried == prompt_tokens and hit == 0  # nobody ran this prompt under a before
    again_a, queried, hit = _generate(server, a)
    assert (queried, hit) == (prompt_tokens, full_blocks)
    assert again_a == first_a  # reused KV, same greedy answer

    first_b, _, hit = _generate(server, b)
    assert hit == 0  # a's blocks are never read for b
    first_base, _, hit = _generate(server, None)
    assert hit == 0  # nor for the base model
    assert len({tuple(first_a), tuple(first_b), tuple(first_base)}) == 3  # the three really compute differently

    again_base, _, hit = _generate(server, None)
    assert hit == full_blocks and again_base == first_base


def test_openai_usage_reports_the_reused_prompt_tokens(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    adapter = server.adapters[3]
    prompt = uuid.uuid4().hex + " hello world, answer in json, talk like a pirate " * 4
    first = client.completions.create(model=adapter, prompt=prompt, max_tokens=3, temperature=0)
    second = client.completions.create(model=adapter, prompt=prompt, max_tokens=3, temperature=0)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None and second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == (second.usage.prompt_tokens - 1) // 8 * 8 and cached > 0
    assert second.choices[0].text == first.choices[0].text
