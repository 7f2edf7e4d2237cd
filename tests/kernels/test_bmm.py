"""The batched-matmul path over a ``ChunkLayout``: its shortcuts for reordered rows equal the general gather."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.kernels.bmm import ChunkLayout, gather_rows, sgmv_expand, sgmv_shrink


def _layout(rows: list[int], places: list[int], chunks: int, chunk_len: int, batch: int) -> ChunkLayout:
    """The layout with every shortcut its rows and places allow."""
    order = back = None
    if sorted(places) == list(range(chunks * chunk_len)):
        order = [0] * len(places)
        for r, p in zip(rows, places, strict=True):
            order[p] = r
    first = min(rows)
    if max(rows) - first + 1 == len(rows):
        back = [0] * len(rows)
        for r, p in zip(rows, places, strict=True):
            back[r - first] = p

    def index(v: list[int] | None) -> torch.Tensor | None:
        return None if v is None else torch.tensor(v, dtype=torch.long)

    identity = chunk_len == 1 and chunks == len(rows) == batch and rows == places
    return ChunkLayout(
        torch.tensor(rows), torch.tensor(places), chunks, chunk_len, identity, index(order), index(back), first
    )


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shortcuts_equal_the_general_gather_and_scatter(seed: int, dtype: torch.dtype) -> None:
    rnd = random.Random(seed)
    batch, chunk_len = rnd.randint(2, 24), rnd.choice([1, 1, 2, 4])
    start = rnd.randint(0, batch - 1)
    taking = list(range(start, rnd.randint(start + 1, batch))) if seed % 3 else rnd.sample(range(batch), 2)
    chunks = -(-len(taking) // chunk_len) + rnd.randint(0, 2)  # some chunks idle
    places = rnd.sample(range(chunks * chunk_len), len(taking))
    rows = taking if seed % 2 else rnd.sample(taking, len(taking))
    layout = _layout(rows, places, chunks, chunk_len, batch)
    general = ChunkLayout(layout.rows, layout.slots, chunks, chunk_len, False)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, generator=gen).to(dtype)
    a = torch.randn(chunks, 8, 3, generator=gen)
    b = torch.randn(chunks, 3, 5, generator=gen)
    a[[c for c in range(chunks) if all(p // chunk_len != c for p in places)]] = float("nan")  # idle: unread
    y0 = torch.randn(batch, 7, generator=gen).to(dtype)
    got, want = y0.clone(), y0.clone()
    sgmv_expand(got[:, 1:6], sgmv_shrink(gather_rows(x, layout), a), b, layout)
    sgmv_expand(want[:, 1:6], sgmv_shrink(gather_rows(x, general), a), b, general)
    assert torch.equal(got, want)
    naive = y0.double()
    for r, p in zip(rows, places, strict=True):
        naive[r, 1:6] += x[r].double() @ a[p // chunk_len].double() @ b[p // chunk_len].double()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.double(), naive, rtol=tol, atol=tol)
    others = [r for r in range(batch) if r not in taking]
    assert torch.equal(got[others], y0[others])
