"""The shard engine: prompt logprobs at the edges, no KV block kept by a failed prefill, the model thread."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch

from loraplex.shard.engine import NewRequest, ShardEngine
from loraplex.shard.lora.store import AdapterStore
from tests.factories import tiny_model
from tests.shard.conftest import make_engine


def test_prompt_logprobs_of_a_one_token_prompt(engine: ShardEngine) -> None:
    gens = engine.prefill(
        1, [NewRequest(1, [7], prefill_logprobs=True), NewRequest(2, [3, 4, 5], prefill_logprobs=True)]
    )
    assert gens[0].prefill is not None and gens[0].prefill[0][0] == 7 and math.isnan(gens[0].prefill[0][1])
    assert gens[1].prefill is not None and [t for t, _ in gens[1].prefill] == [3, 4, 5]
    assert all(lp <= 0 for _, lp in gens[1].prefill[1:])


def test_a_failed_prefill_keeps_no_kv_block(engine: ShardEngine) -> None:
    used_before = engine.stats()[0]
    with pytest.raises(ValueError):
        engine.prefill(1, [NewRequest(1, [1, 2, 3]), NewRequest(2, [1, 2], adapter_id="missing")])
    too_long = [NewRequest(i, list(range(1, 12))) for i in range(4)]  # 4 x 3 blocks > 8 blocks
    with pytest.raises(Exception, match="KV"):
        engine.prefill(2, too_long)
    assert engine.stats()[0] == used_before and engine.stats()[2] == 0


def test_adapter_loads_run_on_the_model_thread_under_the_model_lock(engine: ShardEngine) -> None:
    def where() -> tuple[str, bool]:
        return threading.current_thread().name, engine.lock.locked()

    assert engine.store.pace is not None
    assert engine.store.pace(where) == ("model", True)
    assert not engine.lock.locked()


def test_steps_run_on_the_model_thread_whoever_calls(engine: ShardEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    step = engine.runner.step

    def run(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(threading.current_thread().name)
        return step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.runner, "step", run)
    engine.prefill(1, [NewRequest(1, [1, 2, 3])])
    engine.clear(1)
    assert seen == ["model"]


def test_an_engine_refuses_a_store_that_loads_off_its_model_thread(engine: ShardEngine) -> None:
    unpaced = AdapterStore(engine.runner.model.config, dtype=torch.float32)
    with pytest.raises(ValueError, match="pace"):
        ShardEngine(engine.runner, unpaced, engine.model)


def test_a_prefill_whose_sampling_fails_keeps_no_batch_and_no_block(
    engine: ShardEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("sampler failed")

    monkeypatch.setattr("loraplex.shard.engine.choose_tokens", broken)
    with pytest.raises(RuntimeError, match="sampler failed"):
        engine.prefill(1, [NewRequest(1, [1, 2, 3, 4, 5])])
    assert engine.stats() == (0, 8, 0, 0)


def test_warmup_reports_the_blocks_sequences_can_have_and_counts_no_prefix_query(tmp_path: Path) -> None:
    from loraplex.shard.decode_graph import DecodeGraph

    tiny_model(tmp_path, "llama")
    engine = make_engine(tmp_path, kv_blocks=16, prefix_caching=True)
    assert engine.warmup(4, 9) == 16
    assert engine.prefix_stats()[:2] == (0, 0) and engine.stats()[0] == 0
    runner = engine.runner
    runner.decode_graph = DecodeGraph(runner.model, runner.cache, max_batch=4, max_len=32, slots=2, mode="eager")
    assert engine.warmup(2, 5) == 15  # the graph's scratch block is nobody's to admit into
    engine.prefill(1, [NewRequest(1, list(range(1, 12)))])
    assert engine.warmup(0, 0) == 15  # a cached batch's blocks still count as the router's
