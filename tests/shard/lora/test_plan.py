"""The per-batch LoRA plan: dtype of the stacks, reuse across decode steps, and adapters missing a site."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.lora.torch_plan import TorchLoraPlan
from loraplex.shard.runner import ModelRunner, SequenceState, build_runner
from tests.factories import make_adapter, tiny_model


def _logits(runner: ModelRunner, store: AdapterStore, names: list[str | None]) -> torch.Tensor:
    seqs = [SequenceState(i, [3 + i, 7, 11, 2 * i + 1], store.get(n) if n else None) for i, n in enumerate(names)]
    out = runner.prefill(seqs, all_logits=True)
    for s in seqs:
        runner.release(s)
    return out


@pytest.mark.parametrize("lora_dtype", ["build_runner's", None, torch.float32])
def test_bfloat16_model_with_either_stack_dtype_tracks_float32(
    tmp_path: Path, lora_dtype: str | torch.dtype | None
) -> None:
    base = tiny_model(tmp_path / "base", "qwen2")
    make_adapter(base, tmp_path / "a", r=8, lora_alpha=16, target_modules="all-linear")
    make_adapter(base, tmp_path / "b", seed=1, r=2, lora_alpha=4, target_modules=["v_proj"])
    f32 = build_runner(tmp_path / "base", kv_blocks=32, block_size=4)
    bf16 = build_runner(tmp_path / "base", dtype=torch.bfloat16, kv_blocks=32, block_size=4)
    if not isinstance(lora_dtype, str):
        bf16.decode_lora_dtype = bf16.prefill_lora_dtype = lora_dtype
    else:  # on the CPU: float32 stacks in decode, the adapters' bfloat16 in prefill
        assert (bf16.decode_lora_dtype, bf16.prefill_lora_dtype) == (torch.float32, None)
    stores = {}
    for name, runner in (("f32", f32), ("bf16", bf16)):
        stores[name] = AdapterStore(runner.model.config, dtype=runner.model.dtype)
        for adapter in ("a", "b"):
            stores[name].load(adapter, tmp_path / adapter)
    names: list[str | None] = ["a", None, "b", "a"]
    ref = _logits(f32, stores["f32"], names)
    got = _logits(bf16, stores["bf16"], names)
    assert float((got - ref).norm() / ref.norm()) < 5e-2
    base_only = _logits(f32, stores["f32"], [None] * 4)
    assert float((base_only - ref).norm() / ref.norm()) > 0.1  # the adapters matter at this tolerance


def test_decode_reuses_the_plan_until_the_batch_changes(tmp_path: Path) -> None:
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj"])
    runner = build_runner(tmp_path / "base", kv_blocks=32, block_size=4)
    store = AdapterStore(runner.model.config, dtype=torch.float32)
    adapter = store.load("a", tmp_path / "a")
    seqs = [SequenceState(0, [1, 2, 3], adapter), SequenceState(1, [4, 5], None)]
    runner.prefill(seqs)
    plans = []
    for step in range(3):
        for s in seqs:
            s.token_ids.append(step + 1)
        runner.decode(seqs)
        plans.append(runner._plan)
    assert plans[0] is plans[1] is plans[2]
    runner.release(seqs[1])
    seqs[0].token_ids.append(9)
    runner.decode(seqs[:1])
    assert runner._plan is not plans[0]


def test_rows_whose_adapter_lacks_a_site_are_left_alone(tmp_path: Path) -> None:
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "q", r=4, target_modules=["q_proj"])
    runner = build_runner(tmp_path / "base", kv_blocks=8, block_size=4)
    store = AdapterStore(runner.model.config, dtype=torch.float32)
    plan = TorchLoraPlan([store.load("q", tmp_path / "q"), None], runner.model.config)
    x = torch.randn(2, 64)
    y = torch.randn(2, 128)
    before = y.clone()
    plan.apply("gate_up", 0, x, y)  # the adapter has no MLP weights: nothing changes
    assert torch.equal(y, before)
    qkv = torch.randn(2, runner.model.config.q_size + 2 * runner.model.config.kv_size)
    untouched = qkv.clone()
    plan.apply("qkv", 0, x, qkv)
    assert not torch.equal(qkv[0], untouched[0]) and torch.equal(qkv[1], untouched[1])
    assert torch.equal(qkv[0, runner.model.config.q_size :], untouched[0, runner.model.config.q_size :])


def test_decode_batch_of_ordered_unequal_segments_equals_solo_runs(tmp_path: Path) -> None:
    # [a, a, b] with no base rows: rows already in segment order, yet the layout is padded.
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=4, target_modules="all-linear")
    make_adapter(base, tmp_path / "b", seed=1, r=2, target_modules=["q_proj", "down_proj"])
    runner = build_runner(tmp_path / "base", kv_blocks=32, block_size=4)
    store = AdapterStore(runner.model.config, dtype=torch.float32)
    adapters = [store.load("a", tmp_path / "a"), store.load("b", tmp_path / "b")]
    rows = [adapters[0], adapters[0], adapters[1]]

    def decode_logits(members: list[int]) -> torch.Tensor:
        seqs = [SequenceState(i, [5 + i, 9, 4], rows[i]) for i in members]
        runner.prefill(seqs)
        for s in seqs:
            s.token_ids.append(7)
        out = runner.decode(seqs)
        for s in seqs:
            runner.release(s)
        return out

    together = decode_logits([0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(together[i], decode_logits([i])[0], rtol=1e-5, atol=1e-5)


def test_stacks_left_uninitialised_are_fully_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stacks skip zero-filling when no member needs padding: poison what torch.empty returns, and the
    # deltas must equal those of stacks built from zeros, with and without padding in one group.
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=3, target_modules=["q_proj", "v_proj", "down_proj"])
    make_adapter(base, tmp_path / "b", seed=1, r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    make_adapter(base, tmp_path / "c", seed=2, r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    runner = build_runner(tmp_path / "base", kv_blocks=8, block_size=4)
    config = runner.model.config
    store = AdapterStore(config, dtype=torch.float32)
    a, b, c = (store.load(n, tmp_path / n) for n in "abc")
    torch.manual_seed(0)
    x = {"qkv": torch.randn(4, config.hidden_size), "down": torch.randn(4, config.intermediate_size)}
    width = {"qkv": config.q_size + 2 * config.kv_size, "down": config.hidden_size}

    def deltas(rows: list, empty: object) -> dict[str, torch.Tensor]:
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", empty)
            plan = TorchLoraPlan(rows, config)
        out = {}
        for site in ("qkv", "down"):
            y = torch.zeros(4, width[site])
            plan.apply(site, 1, x[site], y)
            out[site] = y
        return out

    def poisoned(*shape: int, **kw: object) -> torch.Tensor:
        return torch.full(shape, float("nan"), **kw)  # type: ignore[call-overload]

    for rows in ([b, c, b, c], [a, b, c, a]):  # equal ranks everywhere; a's rank 3 and missing k_proj
        got, want = deltas(rows, poisoned), deltas(rows, torch.zeros)
        for site in got:
            assert torch.isfinite(got[site]).all() and torch.equal(got[site], want[site])
            assert got[site].abs().sum() > 0
