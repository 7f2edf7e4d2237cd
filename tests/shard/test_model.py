"""The shard's model against transformers' own: logits of ragged prefill and incremental decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.shard.runner import SequenceState, build_runner
from tests.factories import TINY, tiny_model

LENGTHS = [5, 17, 1, 9]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", sorted(TINY))
def test_logits_match_transformers_prefill_and_decode(tmp_path: Path, kind: str) -> None:
    hf = tiny_model(tmp_path, kind)
    runner = build_runner(tmp_path, kv_blocks=64, block_size=4)
    gen = torch.Generator().manual_seed(1)
    vocab = hf.config.vocab_size
    seqs = [SequenceState(i, torch.randint(vocab, (n,), generator=gen).tolist()) for i, n in enumerate(LENGTHS)]

    packed = runner.prefill(seqs, all_logits=True)
    start = 0
    with torch.no_grad():
        for s in seqs:
            ref = hf(input_ids=torch.tensor([s.token_ids])).logits[0]
            ours = packed[start : start + len(s.token_ids)]
            start += len(s.token_ids)
            assert rel_err(ours, ref) < 1e-4

        for _ in range(6):  # crosses block boundaries (block_size 4)
            for s in seqs:
                s.token_ids.append(int(torch.randint(vocab, (1,), generator=gen)))
            logits = runner.decode(seqs)
            for row, s in enumerate(seqs):
                ref = hf(input_ids=torch.tensor([s.token_ids])).logits[0, -1]
                assert rel_err(logits[row], ref) < 1e-4


def test_blocks_return_when_sequences_end(tmp_path: Path) -> None:
    tiny_model(tmp_path, "llama")
    runner = build_runner(tmp_path, kv_blocks=16, block_size=4)
    alloc = runner.cache.allocator
    seqs = [SequenceState(i, list(range(1, 1 + n))) for i, n in enumerate([3, 8, 5])]
    runner.prefill(seqs)
    assert alloc.num_used == 1 + 2 + 2
    for s in seqs:
        s.token_ids.append(7)
    runner.decode(seqs)
    assert alloc.num_used == 1 + 3 + 2  # only the 8-token sequence crossed into a new block
    runner.release(seqs[1])
    assert alloc.num_used == 3 and seqs[1].blocks == []
    for s in (seqs[0], seqs[2]):
        runner.release(s)
    assert alloc.num_used == 0


def test_kv_cache_full_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    from loraplex.shard.kv_cache import KVCacheFull

    tiny_model(tmp_path, "llama")
    runner = build_runner(tmp_path, kv_blocks=2, block_size=4)
    with pytest.raises(KVCacheFull, match="KV blocks"):
        runner.prefill([SequenceState(0, list(range(12)))])
    assert runner.cache.allocator.num_used == 0


@pytest.mark.parametrize("kind", ["qwen2", "mistral_sliding"])
def test_bfloat16_runs_close_to_float32(tmp_path: Path, kind: str) -> None:
    tiny_model(tmp_path, kind)
    f32 = build_runner(tmp_path, kv_blocks=16, block_size=4)
    bf16 = build_runner(tmp_path, dtype=torch.bfloat16, kv_blocks=16, block_size=4)
    prompts = [list(range(3, 20)), list(range(40, 46))]
    seqs = {r: [SequenceState(i, list(p)) for i, p in enumerate(prompts)] for r in (f32, bf16)}
    a = f32.prefill(seqs[f32])
    b = bf16.prefill(seqs[bf16])
    assert b.dtype == torch.float32  # logits are always returned in float32
    assert rel_err(b, a) < 5e-2
    # Decode (bfloat16 decode attention on the CPU has its own path): same next tokens fed to both.
    for step in range(3):
        for i in range(2):
            for r in (f32, bf16):
                seqs[r][i].token_ids.append(50 + 7 * step + i)
        assert rel_err(bf16.decode(seqs[bf16]), f32.decode(seqs[f32])) < 5e-2


def test_prefill_in_several_calls_generates_the_same_tokens(tmp_path: Path) -> None:
    tiny_model(tmp_path, "llama")
    runner = build_runner(tmp_path, kv_blocks=32, block_size=4)
    requests: list[tuple[list[int], None]] = [([1 + i, 5, 9, 2 + i], None) for i in range(5)]
    whole = runner.generate_greedy(requests, 4)
    sizes: list[int] = []
    prefill = runner.prefill

    def counted(seqs: list[SequenceState], all_logits: bool = False) -> torch.Tensor:
        sizes.append(len(seqs))
        return prefill(seqs, all_logits)

    runner.prefill = counted  # type: ignore[method-assign, assignment]
    assert runner.generate_greedy(requests, 4, prefill_batch=2) == whole
    assert sizes == [2, 2, 1]
    assert runner.cache.allocator.num_used == 0
    # Bad inputs are named, and take no KV blocks.
    with pytest.raises(ValueError, match="prefill_batch must be at least 1, not 0"):
        runner.generate_greedy(requests, 4, prefill_batch=0)
    with pytest.raises(ValueError, match="at least one request"):
        runner.generate_greedy([], 4)
    assert sizes == [2, 2, 1] and runner.cache.allocator.num_used == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral_sliding"])
def test_cuda_logits_match_transformers_on_cuda_prefill_and_decode(tmp_path: Path, kind: str) -> None:
    """The blocks-first KV cache and both attention paths on the GPU, against transformers on the GPU."""
    hf = tiny_model(tmp_path, kind).to("cuda")  # type: ignore[arg-type]
    runner = build_runner(tmp_path, device="cuda", kv_blocks=64, block_size=4)
    gen = torch.Generator().manual_seed(2)
    vocab = hf.config.vocab_size
    seqs = [SequenceState(i, torch.randint(vocab, (n,), generator=gen).tolist()) for i, n in enumerate(LENGTHS)]
    packed = runner.prefill(seqs, all_logits=True)
    assert packed.device.type == "cuda"
    start = 0
    with torch.no_grad():
        for s in seqs:
            ref = hf(input_ids=torch.tensor([s.token_ids], device="cuda")).logits[0]
            assert rel_err(packed[start : start + len(s.token_ids)], ref) < 1e-3
            start += len(s.token_ids)
        for _ in range(6):  # crosses block boundaries (block_size 4)
            for s in seqs:
                s.token_ids.append(int(torch.randint(vocab, (1,), generator=gen)))
            logits = runner.decode(seqs)
            for row, s in enumerate(seqs):
                ref = hf(input_ids=torch.tensor([s.token_ids], device="cuda")).logits[0, -1]
                assert rel_err(logits[row], ref) < 1e-3
