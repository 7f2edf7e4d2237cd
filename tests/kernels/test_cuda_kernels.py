"""The CUDA kernels against ``kernels/reference.py`` in float64: segment mixes, ranks, sizes and dtypes."""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import pytest
import torch

from loraplex.kernels import cuda, ops, reference
from loraplex.kernels.segments import Segments, SegmentWeights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda.available(), reason="needs an NVIDIA GPU with CuPy (scripts/gpu_check.sh)"),
]

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _lengths(mix: str, tokens: int, rng: random.Random) -> list[int]:
    if mix == "with_empty":
        return [0, tokens // 3, 0, tokens - tokens // 3, 0]
    if mix == "skewed":
        return [1, tokens - 1]
    if mix == "distinct":
        return [1] * tokens
    if mix == "identical":
        return [tokens]
    if mix == "long":
        return [1200, 3, 40]
    weights = [1 / (k + 1) for k in range(24)]  # zipf
    picks = rng.choices(range(24), weights=weights, k=tokens)
    return [picks.count(k) for k in range(24)]


def _case(mix: str, h_in: int, h_out: int, dtype: torch.dtype, seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lengths = _lengths(mix, 96, rng)
    total = sum(lengths) + 7  # rows no segment takes: they must come back bit-identical
    order = list(range(total))
    rng.shuffle(order)  # segments' rows are scattered over the batch, as in a real mixed batch
    members, cursor = [], 0
    for n in lengths:
        members.append(sorted(order[cursor : cursor + n]))
        cursor += n
    ranks = [rng.choice([1, 3, 8, 16, 24, 64, 128]) for _ in lengths]
    a_t = [torch.randn(r, h_in, generator=gen, device="cuda").to(dtype) / h_in**0.5 for r in ranks]
    b = [torch.randn(r, h_out, generator=gen, device="cuda").to(dtype) for r in ranks]
    x = torch.randn(total, h_in, generator=gen, device="cuda").to(dtype)
    wide = torch.randn(total, h_out + 40, generator=gen, device="cuda").to(dtype)  # poisoned output
    y = wide[:, 8 : 8 + h_out]  # a column slice of a fused output: strided rows, 16-byte aligned as the k/v slices
    before = wide.clone()

    segs = Segments.build(members, ranks, torch.device("cuda"), total)
    a = SegmentWeights.of([t.unsqueeze(0) for t in a_t])  # one layer per segment
    b_w = SegmentWeights.of([t.unsqueeze(0) for t in b])
    # The oracle: the same call on the reference, in float64.
    a64, b64 = [t.double().unsqueeze(0) for t in a_t], [t.double().unsqueeze(0) for t in b]
    y64 = before[:, 8 : 8 + h_out].double()
    v64 = reference.sgmv_shrink(x.double(), a64, 0, segs.rows, segs.indptr, segs.ranks, segs.max_rank)
    reference.sgmv_expand(y64, v64, b64, 0, segs.rows, segs.indptr, segs.ranks)
    expected = y64 - before[:, 8 : 8 + h_out].double()

    deltas = []
    for _ in range(2):  # a result that moves between runs is a race
        wide.copy_(before)
        ops.sgmv_expand(y, ops.sgmv_shrink(x, segs, a, 0), segs, b_w, 0)
        torch.cuda.synchronize()
        deltas.append(wide[:, 8 : 8 + h_out].double() - before[:, 8 : 8 + h_out].double())
        touched = sorted(r for rows in members for r in rows)
        untouched = [r for r in range(total) if r not in set(touched)]
        assert torch.equal(wide[untouched].view(torch.int16), before[untouched].view(torch.int16))
        assert torch.equal(wide[:, :8].view(torch.int16), before[:, :8].view(torch.int16))
        assert torch.equal(wide[:, 8 + h_out :].view(torch.int16), before[:, 8 + h_out :].view(torch.int16))
        if touched:
            err = float((deltas[-1][touched] - expected[touched]).norm() / expected[touched].norm())
            # The output is rounded to dtype once more than the reference: allow that rounding too.
            assert err <= TOLERANCE[dtype] * 2, (mix, h_in, h_out, dtype, err)
    assert float((deltas[0] - deltas[1]).abs().max()) <= float(expected.abs().max()) * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mix", ["with_empty", "skewed", "distinct", "identical", "long", "zipf"])
@pytest.mark.parametrize(("h_in", "h_out"), [(4096, 4096), (5120, 1000), (11008, 4096), (4096, 14336)])
def test_kernels_match_the_reference(mix: str, h_in: int, h_out: int, dtype: torch.dtype) -> None:
    _case(mix, h_in, h_out, dtype, seed=zlib.crc32(f"{mix}-{h_in}-{h_out}".encode()))


def test_cuda_plan_matches_the_torch_plan_on_a_model(tmp_path: Path) -> None:
    from loraplex.shard.lora.cuda_plan import CudaLoraPlan
    from loraplex.shard.lora.plan import make_plan
    from loraplex.shard.lora.store import AdapterStore
    from loraplex.shard.runner import SequenceState, build_runner
    from tests.factories import make_adapter, tiny_model

    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=8, target_modules="all-linear")
    make_adapter(base, tmp_path / "b", seed=1, r=3, target_modules=["q_proj", "v_proj", "down_proj"])
    runner = build_runner(tmp_path / "base", dtype=torch.bfloat16, device="cuda", kv_blocks=64, block_size=4)
    store = AdapterStore(runner.model.full_config, dtype=torch.bfloat16, device="cuda")
    for name in ("a", "b"):
        store.load(name, tmp_path / name)
    adapters = store.acquire(["a", "b"], pinned=set())
    rows = [adapters["a"], None, adapters["b"], adapters["a"]]
    assert isinstance(make_plan(rows, runner.model.config, torch.device("cuda")), CudaLoraPlan)

    def logits(use_kernels: bool) -> torch.Tensor:
        runner.lora_backend = "cupy" if use_kernels else "torch"
        runner.forget_plan()
        stacks = None if use_kernels else torch.float32  # float32 stacks in the PyTorch plan
        runner.decode_lora_dtype = runner.prefill_lora_dtype = stacks
        seqs = [SequenceState(i, [3 + i, 7, 11, 2 * i + 1], a) for i, a in enumerate(rows)]
        out = runner.prefill(seqs, all_logits=True)
        for s in seqs:
            s.token_ids.append(5)
        out = torch.cat([out, runner.decode(seqs)])
        for s in seqs:
            runner.release(s)
        return out

    kernels, torch_plan = logits(True), logits(False)
    assert float((kernels - torch_plan).norm() / torch_plan.norm()) < 2e-2
