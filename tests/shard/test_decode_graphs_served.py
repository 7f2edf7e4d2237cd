"""``--decode-graphs on`` installs the capturable decode in a served shard: mixed-adapter answers stay the same."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.servers import Server, start_server


async def _answers(url: str, jobs: list[tuple[str, str | None]]) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(prompt: str, adapter: str | None) -> list[int]:
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "adapter_id": adapter, "details": True}}
            r = await client.post(url + "/generate", json=body)
            assert r.status_code == 200, r.text
            return [t["id"] for t in r.json()["details"]["tokens"]]

        return list(await asyncio.gather(*(one(p, a) for p, a in jobs)))


@pytest.mark.slow
def test_a_shard_with_decode_graphs_answers_as_one_without(
    server: Server, served_model: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    model_dir, adapters = served_model
    jobs = [(f"hello world {i}", server.adapters[i % 4] if i % 3 else None) for i in range(12)]
    graphed = start_server(tmp_path, model_dir, adapters, shard_args=("--decode-graphs", "on", "--json-output"))
    try:
        assert '"decode_graphs": true' in graphed.log_text()
        with_graphs = asyncio.run(_answers(graphed.url, jobs))
    finally:
        graphed.stop()
    without = asyncio.run(_answers(server.url, jobs))
    assert with_graphs == without
    assert len({tuple(a) for a in without}) > 4  # adapters really change the answers
