"""What preemption needs of the shard: a refused decode changes nothing, and a recomputed request (its
generated tokens appended to the prompt) continues exactly, seeded sampling included."""

from __future__ import annotations

import pytest
import torch

from loraplex.shard.engine import NewRequest, ShardEngine
from loraplex.shard.kv_cache import KVCacheFull
from loraplex.shard.sampling import SamplingParams, TokenChooser

SEEDED = SamplingParams(do_sample=True, seed=11, temperature=0.8, top_k=40, repetition_penalty=1.2)


def test_skipped_draws_leave_a_sampler_where_drawing_would_have() -> None:
    torch.manual_seed(0)
    rows = [torch.randn(64) * 3 for _ in range(8)]
    first = TokenChooser(SEEDED)
    drawn = [first.choose(first.process(r, [])) for r in rows]
    again = TokenChooser(SEEDED)
    again.resume([5, 6, 7], 64)  # the probabilities of the skipped draws do not matter
    assert [again.choose(again.process(r, [])) for r in rows[3:]] == drawn[3:]
    greedy = TokenChooser(SamplingParams(min_tokens=5), eos_ids=[2])
    greedy.resume([5, 6, 7], 64)  # no generator to advance, but min_tokens counts the 3 tokens
    assert greedy.generator is None and greedy.generated == 3 and greedy.holds_eos
    greedy.resume([8, 9], 64)
    assert not greedy.holds_eos


def _run(engine: ShardEngine, request: NewRequest, steps: int) -> list[int]:
    tokens = [engine.prefill(request.request_id, [request])[0].choice.token_id]
    for _ in range(steps - 1):
        tokens.append(engine.decode([request.request_id])[1][0].choice.token_id)
    engine.clear(request.request_id)
    return tokens


MIN_TOKENS = SamplingParams(min_tokens=8)


@pytest.mark.parametrize("sampling", [SamplingParams(), SEEDED, MIN_TOKENS], ids=["greedy", "seeded", "min_tokens"])
def test_a_recomputed_request_continues_exactly(engine: ShardEngine, sampling: SamplingParams) -> None:
    prompt = [5, 9, 2]
    whole = _run(engine, NewRequest(1, prompt, sampling=sampling), 10)
    resumed = NewRequest(2, prompt + whole[:4], sampling=sampling, generated_tokens=4)
    assert whole[:4] + _run(engine, resumed, 6) == whole


def test_a_refused_decode_leaves_the_batches_as_they_were(engine: ShardEngine) -> None:
    engine.prefill(1, [NewRequest(1, list(range(1, 17)))])  # 16 tokens: 4 blocks of 4
    engine.prefill(2, [NewRequest(2, list(range(1, 17)))])  # the other 4: none free
    with pytest.raises(KVCacheFull):
        engine.decode([1, 2])  # each needs a fifth block
    assert engine.stats() == (8, 0, 2, 2)  # nothing merged, nothing allocated
    engine.filter(2, [])  # the router preempts the newest ...
    batch, gens = engine.decode([1])  # ... and the step runs
    assert batch == 1 and [g.request_id for g in gens] == [1]
    engine.clear()
    assert engine.stats() == (0, 8, 0, 0)
