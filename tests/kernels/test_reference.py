"""The PyTorch LoRA ops (the SGMV ops' CPU code and the CPU path's bmm) against the per-row loop."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import ops
from loraplex.kernels.bmm import gather_rows, sgmv_expand, sgmv_shrink
from loraplex.kernels.segments import Segments, SegmentWeights
from tests.kernels.oracle import lora_naive


def _zipf_keys(n: int, adapters: int, gen: torch.Generator) -> list[int]:
    weights = 1.0 / torch.arange(1, adapters + 1, dtype=torch.float64)
    return torch.multinomial(weights, n, replacement=True, generator=gen).tolist()


MIXES = {
    "distinct": lambda n, g: list(range(n)),
    "identical": lambda n, g: [0] * n,
    "skewed": lambda n, g: [0] + [1] * (n - 1),
    "with_empty_rows": lambda n, g: [(-1 if i % 3 == 0 else i % 5) for i in range(n)],
    "interleaved": lambda n, g: [i % 4 for i in range(n)],
    "zipf": lambda n, g: _zipf_keys(n, 12, g),
    "nobody": lambda n, g: [-1] * n,
    # Rows already in order but segments of unequal length: padded, so the layout is not the batch.
    "ordered_ragged": lambda n, g: [0] * (n - n // 3) + [1] * (n // 3),
    "ordered_two_one": lambda n, g: [i * 3 // n for i in range(n)] if n > 2 else [0] * n,
}


def _case(
    mix: str, rows: int
) -> tuple[list[int], dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows)
    keys = MIXES[mix](rows, gen)
    h_in, h_out = 40, 24
    ranks = {k: [1, 3, 8, 16, 5][k % 5] for k in set(keys) if k >= 0}
    weights = {k: (torch.randn(h_in, r, generator=gen), torch.randn(r, h_out, generator=gen)) for k, r in ranks.items()}
    return keys, weights, torch.randn(rows, h_in, generator=gen), torch.randn(rows, h_out, generator=gen)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_bmm_path_equals_naive_loop(mix: str, rows: int) -> None:
    keys, weights, x, y0 = _case(mix, rows)
    segs, seg_keys = Segments.from_keys(keys)
    chunk_keys = [seg_keys[s] for s in segs.chunk_segments]
    r_max = max((a.shape[1] for a, _ in weights.values()), default=1)
    a = torch.zeros(segs.num_chunks, x.shape[1], r_max)
    b = torch.zeros(segs.num_chunks, r_max, y0.shape[1])
    for c, key in enumerate(chunk_keys):
        wa, wb = weights[key]
        a[c, :, : wa.shape[1]] = wa
        b[c, : wb.shape[0]] = wb
    y = y0.clone()
    if segs.num_chunks:
        sgmv_expand(y, sgmv_shrink(gather_rows(x, segs), a), b, segs)
    expected = y0.double() + lora_naive(x, keys, weights) if weights else y0.double()
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-4)
    untouched = [i for i, k in enumerate(keys) if k < 0]
    assert torch.equal(y[untouched], y0[untouched])  # rows without adapter are bit-identical


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_reference_equals_naive_loop(mix: str, rows: int) -> None:
    keys, weights, x, y0 = _case(mix, rows)
    segs, seg_keys = Segments.from_keys(keys, {k: a.shape[1] for k, (a, _) in weights.items()})
    # Two layers, the weights in the second, as the kernels read a layer's matrix out of a stack.
    a = SegmentWeights.of([torch.stack([torch.zeros_like(weights[k][0].t()), weights[k][0].t()]) for k in seg_keys])
    b = SegmentWeights.of([torch.stack([torch.zeros_like(weights[k][1]), weights[k][1]]) for k in seg_keys])
    y = y0.clone()
    ops.sgmv_expand(y, ops.sgmv_shrink(x, segs, a, 1), segs, b, 1)  # CPU tensors: the reference
    expected = y0.double() + lora_naive(x, keys, weights) if weights else y0.double()
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-4)
    untouched = [i for i, k in enumerate(keys) if k < 0]
    assert torch.equal(y[untouched], y0[untouched])


def test_chunk_layout_groups_rows_and_bounds_padding() -> None:
    segs, seg_keys = Segments.from_keys([2, 0, 2, -1, 0, 2])
    assert seg_keys == [2, 0]  # segments in order of first appearance
    assert segs.rows.tolist() == [0, 2, 5, 1, 4] and segs.indptr.tolist() == [0, 3, 5]
    decode, _ = Segments.from_keys(list(range(64)))
    assert decode.identity and decode.chunk_len == 1 and decode.num_chunks == 64
    one, _ = Segments.from_keys([0] * 64)
    assert one.identity and one.num_chunks == 1
    for keys in ([0, 0, 1], [0, 0, 0, 1], [0] * 8 + [1] * 5):
        ragged, _ = Segments.from_keys(keys)
        assert not ragged.identity and ragged.num_chunks * ragged.chunk_len > len(keys)
    skewed, _ = Segments.from_keys([0] + [1] * 999)
    assert skewed.num_chunks * skewed.chunk_len <= 2 * 1000  # a long segment does not pad the short one to its length
    nobody, _ = Segments.from_keys([-1, -1])
    assert nobody.num_rows == 0 and nobody.num_chunks == 0 and not nobody.identity


def test_segment_weights_point_at_each_layer_of_each_stack() -> None:
    stacks = [torch.zeros(3, 2, 5), torch.zeros(3, 4, 5)]
    w = SegmentWeights.of(stacks)
    assert w.pointers.shape == (3, 2)
    assert w.pointers[2, 1] == stacks[1][2].data_ptr()
    with pytest.raises(ValueError, match="contiguous"):
        SegmentWeights.of([torch.zeros(3, 5, 2).transpose(1, 2)])
