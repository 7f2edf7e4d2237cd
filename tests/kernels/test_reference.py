"""SGMV reference against the per-row loop, across segment mixes, ranks and untouched rows."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.reference import gather_rows, lora_naive, sgmv_expand, sgmv_shrink
from loraplex.kernels.segments import segment_layout


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


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_sgmv_equals_naive_loop(mix: str, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    keys = MIXES[mix](rows, gen)
    h_in, h_out = 40, 24
    ranks = {k: [1, 3, 8, 16, 5][k % 5] for k in set(keys) if k >= 0}
    r_max = max(ranks.values(), default=1)
    weights = {k: (torch.randn(h_in, r, generator=gen), torch.randn(r, h_out, generator=gen)) for k, r in ranks.items()}
    x = torch.randn(rows, h_in, generator=gen)
    y0 = torch.randn(rows, h_out, generator=gen)
    layout = segment_layout(keys)
    a = torch.zeros(layout.num_chunks, h_in, r_max)
    b = torch.zeros(layout.num_chunks, r_max, h_out)
    for c, key in enumerate(layout.chunk_keys):
        wa, wb = weights[key]
        a[c, :, : wa.shape[1]] = wa
        b[c, : wb.shape[0]] = wb
    y = y0.clone()
    if layout.num_chunks:
        sgmv_expand(y, sgmv_shrink(gather_rows(x, layout), a), b, layout)
    expected = y0.double() + lora_naive(x, keys, weights) if weights else y0.double()
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-4)
    untouched = [i for i, k in enumerate(keys) if k < 0]
    assert torch.equal(y[untouched], y0[untouched])  # rows without adapter are bit-identical


def test_layout_groups_rows_and_bounds_padding() -> None:
    layout = segment_layout([2, 0, 2, -1, 0, 2])
    assert layout.chunk_keys[0] == 2  # segments in order of first appearance
    assert sorted(layout.rows.tolist()) == [0, 1, 2, 4, 5]
    decode = segment_layout(list(range(64)))
    assert decode.identity and decode.chunk_len == 1 and decode.num_chunks == 64
    one = segment_layout([0] * 64)
    assert one.identity and one.num_chunks == 1
    for keys in ([0, 0, 1], [0, 0, 0, 1], [0] * 8 + [1] * 5):
        ragged = segment_layout(keys)
        assert not ragged.identity and ragged.num_chunks * ragged.chunk_len > len(keys)
    skewed = segment_layout([0] + [1] * 999)
    assert skewed.num_chunks * skewed.chunk_len <= 2 * 1000  # a long segment does not pad the short one to its length
