"""The shard's batch state: prompt logprobs at the edges, and no KV block kept by a failed prefill."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch

from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.runner import build_runner
from loraplex.shard.service import NewRequest, ShardService
from tests.factories import tiny_model


@pytest.fixture
def service(tmp_path: Path) -> ShardService:
    tiny_model(tmp_path, "llama")
    runner = build_runner(tmp_path, kv_blocks=8, block_size=4)
    return ShardService(runner, AdapterStore(runner.model.config, dtype=torch.float32))


def test_prompt_logprobs_of_a_one_token_prompt(service: ShardService) -> None:
    gens = service.prefill(
        1, [NewRequest(1, [7], prefill_logprobs=True), NewRequest(2, [3, 4, 5], prefill_logprobs=True)]
    )
    assert gens[0].prefill is not None and gens[0].prefill[0][0] == 7 and math.isnan(gens[0].prefill[0][1])
    assert gens[1].prefill is not None and [t for t, _ in gens[1].prefill] == [3, 4, 5]
    assert all(lp <= 0 for _, lp in gens[1].prefill[1:])


def test_a_failed_prefill_keeps_no_kv_block(service: ShardService) -> None:
    used_before = service.stats()[0]
    with pytest.raises(ValueError):
        service.prefill(1, [NewRequest(1, [1, 2, 3]), NewRequest(2, [1, 2], adapter_id="missing")])
    too_long = [NewRequest(i, list(range(1, 12))) for i in range(4)]  # 4 x 3 blocks > 8 blocks
    with pytest.raises(Exception, match="KV"):
        service.prefill(2, too_long)
    assert service.stats()[0] == used_before and service.stats()[2] == 0


def test_adapter_loads_run_on_the_model_thread_under_the_model_lock(service: ShardService) -> None:
    def where() -> tuple[str, bool]:
        return threading.current_thread().name, service.lock.locked()

    assert service.store.pace is not None
    assert service.store.pace(where) == ("model", True)
    assert not service.lock.locked()


def test_steps_run_on_the_model_thread_whoever_calls(service: ShardService, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    step = service.runner.prefill

    def prefill(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(threading.current_thread().name)
        return step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service.runner, "prefill", prefill)
    service.prefill(1, [NewRequest(1, [1, 2, 3])])
    service.clear(1)
    assert seen == ["model"]
