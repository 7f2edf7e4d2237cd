"""Greedy generation with PEFT adapters equals transformers + peft, alone and in mixed batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.runner import build_runner
from tests.factories import hf_greedy, make_adapter, peft_model, tiny_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS: dict[str, dict[str, Any]] = {
    "r1_qv": dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
    "r8_attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r64_all_linear": dict(r=64, lora_alpha=32, target_modules="all-linear"),
    "r8_rslora_mlp": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r4_layer1": dict(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj"], layers_to_transform=[1]),
    "r8_patterns": dict(
        r=8,
        lora_alpha=8,
        target_modules=ALL,
        rank_pattern={"layers.0.self_attn.q_proj": 16, "down_proj": 2},
        alpha_pattern={"k_proj": 3},
    ),
    "r16_regex": dict(r=16, lora_alpha=4, target_modules=r".*\.(k_proj|up_proj)"),
    # Patterns that are regular expressions: matched in the bounded child process (shard/lora/patterns.py).
    "r8_regex_patterns": dict(
        r=8,
        lora_alpha=8,
        target_modules=ALL,
        rank_pattern={r"layers\.1\.(self_attn|mlp)\.(q|up)_proj": 4},
        alpha_pattern={r"(k|v)_proj": 3},
    ),
    "r3_odd": dict(r=3, lora_alpha=7, target_modules=["v_proj", "down_proj"]),
}
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("peft")
    base = tiny_model(root / "base", "llama")
    dirs = {name: make_adapter(base, root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(ADAPTERS.items())}
    runner = build_runner(root / "base", kv_blocks=256, block_size=8)
    store = AdapterStore(runner.model.config, dtype=torch.float32)
    for name, d in dirs.items():
        store.load(name, d)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(base.config.vocab_size, (n,), generator=gen).tolist() for n in (4, 11, 7, 2)]
    return dict(base=base, dirs=dirs, runner=runner, store=store, prompts=prompts)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_greedy_equals_peft_token_for_token(world: dict[str, Any], name: str) -> None:
    oracle = peft_model(world["base"], world["dirs"][name])
    adapter = world["store"].get(name)
    ours = world["runner"].generate_greedy([(p, adapter) for p in world["prompts"]], NEW_TOKENS)
    expected = [hf_greedy(oracle, p, NEW_TOKENS) for p in world["prompts"]]
    assert ours == expected
    base_only = [hf_greedy(world["base"], p, NEW_TOKENS) for p in world["prompts"]]
    assert expected != base_only, "the adapter must visibly change the output for this test to mean anything"


def test_adapter_logits_match_peft(world: dict[str, Any]) -> None:
    prompt = world["prompts"][1]
    for name in ADAPTERS:
        oracle = peft_model(world["base"], world["dirs"][name])
        from loraplex.shard.runner import SequenceState

        seq = SequenceState(0, list(prompt), world["store"].get(name))
        ours = world["runner"].prefill([seq], all_logits=True)
        world["runner"].release(seq)
        with torch.no_grad():
            ref = oracle(input_ids=torch.tensor([prompt])).logits[0]
        assert float((ours - ref).norm() / ref.norm()) < 1e-4, name


def test_mixed_batch_rows_equal_their_solo_results(world: dict[str, Any]) -> None:
    runner, store = world["runner"], world["store"]
    names: list[str | None] = [*ADAPTERS, None]
    gen = torch.Generator().manual_seed(11)
    requests = []
    for i in range(16):
        name = names[i % len(names)]
        prompt = torch.randint(
            world["base"].config.vocab_size, (int(torch.randint(1, 14, (1,), generator=gen)),), generator=gen
        ).tolist()
        requests.append((prompt, store.get(name) if name else None))
    mixed = runner.generate_greedy(requests, NEW_TOKENS)
    solo = [runner.generate_greedy([r], NEW_TOKENS)[0] for r in requests]
    assert mixed == solo
    assert len({tuple(m) for m in mixed}) > 8  # adapters really differ from each other
    assert runner.cache.allocator.num_used == 0
