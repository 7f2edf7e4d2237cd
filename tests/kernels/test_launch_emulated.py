"""The launchers' arguments, run through a numpy double of the kernels, against the PyTorch reference (no GPU)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from loraplex.kernels import cuda, ops, reference
from loraplex.kernels.segments import Segments, SegmentWeights
from tests.kernels.emulator import Emulator, kernels_on_cpu


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with kernels_on_cpu() as double:
        yield double


def _members(lengths: list[int], rng: random.Random) -> tuple[list[list[int]], int]:
    total = sum(lengths) + 3  # rows no segment takes
    order = list(range(total))
    rng.shuffle(order)
    members, cursor = [], 0
    for n in lengths:
        members.append(sorted(order[cursor : cursor + n]))
        cursor += n
    return members, total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lengths", [[1] * 9, [0, 5, 0, 2], [1, 30], [12]], ids=["distinct", "empty", "skewed", "one"])
def test_segment_launches_equal_the_reference(emulator: Emulator, lengths: list[int], dtype: torch.dtype) -> None:
    rng = random.Random(len(lengths))
    gen = torch.Generator().manual_seed(sum(lengths))
    members, total = _members(lengths, rng)
    h_in, h_out = 2048, 1048  # h_in split in several parts; h_out not a multiple of a block's columns
    ranks = [rng.choice([1, 3, 8, 16, 24]) for _ in lengths]
    layers = 2
    a_t = [torch.randn(layers, r, h_in, generator=gen).to(dtype) / h_in**0.5 for r in ranks]
    b = [torch.randn(layers, r, h_out, generator=gen).to(dtype) for r in ranks]
    x = torch.randn(total, h_in, generator=gen).to(dtype)
    wide = torch.randn(total, h_out + 24, generator=gen).to(dtype)  # poisoned, with columns left and right
    before = wide.clone()
    segs = Segments.build(members, ranks, "cpu", total)

    y64 = before[:, 8 : 8 + h_out].double()
    v64 = reference.sgmv_shrink(
        x.double(), [t.double() for t in a_t], 1, segs.rows, segs.indptr, segs.ranks, segs.max_rank
    )
    reference.sgmv_expand(y64, v64, [t.double() for t in b], 1, segs.rows, segs.indptr, segs.ranks)

    vp = ops.sgmv_shrink(x, segs, SegmentWeights.of(a_t), 1)  # through the op: its CUDA code, emulated
    assert vp.shape[0] > 1 or h_in < 2 * cuda.MIN_SPLIT  # the split-K path is exercised
    ops.sgmv_expand(wide[:, 8 : 8 + h_out], vp, segs, SegmentWeights.of(b), 1)
    touched = sorted(r for m in members for r in m)
    untouched = [r for r in range(total) if r not in set(touched)]
    assert torch.equal(wide[untouched], before[untouched])
    assert torch.equal(wide[:, :8], before[:, :8]) and torch.equal(wide[:, 8 + h_out :], before[:, 8 + h_out :])
    got, want = wide[touched, 8 : 8 + h_out].double(), y64[touched]
    delta = want - before[touched, 8 : 8 + h_out].double()
    assert float((got - want).norm() / delta.norm()) < 2e-2
    assert emulator.launches[0].startswith("lora_shrink") and emulator.launches[1].startswith("lora_expand")


def test_the_launcher_refuses_what_the_vector_loads_cannot_take(emulator: Emulator) -> None:
    segs = Segments.build([[0]], [4])
    a = SegmentWeights.of([torch.zeros(1, 4, 20, dtype=torch.bfloat16)])
    with pytest.raises(cuda.KernelError, match="16-byte"):
        ops.sgmv_shrink(torch.zeros(1, 20, dtype=torch.bfloat16), segs, a, 0)
    with pytest.raises(cuda.KernelError, match="float16 or bfloat16"):
        ops.sgmv_shrink(torch.zeros(1, 16), segs, a, 0)
    v = torch.zeros(1, 1, cuda.MAX_RANK + 1)
    with pytest.raises(cuda.KernelError, match=f"<= {cuda.MAX_RANK}"):
        ops.sgmv_expand(torch.zeros(1, 16, dtype=torch.bfloat16), v, segs, a, 0)


def _slots(dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    slots, rank, h_in, h_out, t = 5, 16, 1024, 520, 11
    a = torch.randn(slots, rank, h_in, generator=gen).to(dtype) / h_in**0.5
    b = torch.randn(slots, rank, h_out, generator=gen).to(dtype)
    ranks = torch.tensor([16, 3, 8, 0, 1], dtype=torch.int32)
    idx = torch.tensor([0, -1, 1, 2, 2, 4, -1, 3, 0, 1, 4], dtype=torch.int32)
    x = torch.randn(t, h_in, generator=gen).to(dtype)
    y = torch.randn(t, h_out + 8, generator=gen).to(dtype)
    return a, b, ranks, idx, x, y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bgmv_ops_cuda_implementation_equals_their_cpu_implementation(emulator: Emulator, dtype: torch.dtype) -> None:
    a, b, ranks, idx, x, y = _slots(dtype, torch.Generator().manual_seed(3))
    expected = y.clone()
    reference.bgmv_expand(expected[:, 8:], reference.bgmv_shrink(x, a, ranks, idx), b, ranks, idx)
    got = y.clone()  # the ops, whose CPU code is their CUDA code here (emulated launches)
    torch.ops.loraplex.bgmv_expand(got[:, 8:], torch.ops.loraplex.bgmv_shrink(x, a, ranks, idx), b, ranks, idx)
    plain = [i for i, s in enumerate(idx.tolist()) if s < 0 or ranks[s] == 0]
    assert torch.equal(got[plain], y[plain]) and torch.equal(expected[plain], y[plain])
    assert torch.equal(got[:, :8], y[:, :8])
    delta = (expected - y).double().norm()
    assert float((got.double() - expected.double()).norm() / delta) < 2e-2
    assert len(emulator.launches) == 2


def test_bgmv_ops_fake_implementations_give_the_kernels_shapes() -> None:
    with FakeTensorMode():
        for device, parts in (("cpu", 1), ("cuda", cuda.splits_for(64, 4096))):
            x = torch.empty(64, 4096, dtype=torch.bfloat16, device=device)
            a = torch.empty(8, 24, 4096, dtype=torch.bfloat16, device=device)
            ranks = torch.empty(8, dtype=torch.int32, device=device)
            idx = torch.empty(64, dtype=torch.int32, device=device)
            v = torch.ops.loraplex.bgmv_shrink(x, a, ranks, idx)
            assert v.shape == (parts, 64, 24) and v.dtype == torch.float32 and v.device.type == device
            y = torch.empty(64, 1024, dtype=torch.bfloat16, device=device)
            b = torch.empty(8, 16, 1024, dtype=torch.bfloat16, device=device)
            assert torch.ops.loraplex.bgmv_expand(y, v.narrow(2, 0, 16), b, ranks, idx) is None
    assert parts > 1  # a decode batch splits h_in to fill the device
    args = (torch.randn(4, 64), torch.randn(3, 8, 64), torch.tensor([8, 2, 0], dtype=torch.int32))
    idx = torch.tensor([0, -1, 1, 2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.loraplex.bgmv_shrink.default, (*args, idx))
    y = torch.randn(4, 32)
    v = torch.ops.loraplex.bgmv_shrink(*args, idx)
    torch.library.opcheck(torch.ops.loraplex.bgmv_expand.default, (y, v, torch.randn(3, 8, 32), args[2], idx))


def test_sgmv_ops_fake_implementations_give_the_kernels_shapes() -> None:
    lengths, ranks = [3, 1, 9], [8, 24, 16]
    host = Segments.build([list(range(3)), [3], list(range(4, 13))], ranks, "cpu", 16)
    with FakeTensorMode():
        for device in ("cpu", "cuda"):
            fields = {
                f: torch.empty(getattr(host, f).shape, dtype=torch.int32, device=device)
                for f in ("rows", "indptr", "ranks")
            }
            segs = dataclasses.replace(host, **fields)
            stacks = [torch.empty(2, r, 4096, dtype=torch.bfloat16, device=device) for r in ranks]
            a = SegmentWeights(tuple(stacks), torch.empty(2, 3, dtype=torch.int64, device=device))
            x = torch.empty(16, 4096, dtype=torch.bfloat16, device=device)
            v = ops.sgmv_shrink(x, segs, a, 1)
            tiles = len(lengths) * -(-max(lengths) // cuda.tile_for(max(lengths)))
            parts = cuda.splits_for(tiles, 4096) if device == "cuda" else 1
            assert v.shape == (parts, 13, 24) and v.dtype == torch.float32 and v.device.type == device
            y = torch.empty(16, 1024, dtype=torch.bfloat16, device=device)
            b = SegmentWeights(tuple(torch.empty(2, r, 1024, device=device) for r in ranks), a.pointers)
            assert ops.sgmv_expand(y, v.narrow(2, 0, 16), segs, b, 1) is None
    assert parts > 1  # a short batch splits h_in to fill the device
    gen = torch.Generator().manual_seed(5)
    segs = Segments.build([[0, 2], [1]], [8, 3])
    a_stacks = [torch.randn(2, r, 64, generator=gen) for r in (8, 3)]
    a = SegmentWeights.of(a_stacks)
    x = torch.randn(4, 64, generator=gen)
    args = (x, list(a.stacks), a.pointers, 1, segs.rows, segs.indptr, segs.ranks, segs.max_rank, segs.longest)
    torch.library.opcheck(torch.ops.loraplex.sgmv_shrink.default, args)
    v = torch.ops.loraplex.sgmv_shrink.default(*args)
    assert torch.allclose(v[0, 0, :8], a_stacks[0][1] @ x[0]) and torch.equal(v[0, 2, 3:], torch.zeros(5))
    b = SegmentWeights.of([torch.randn(2, r, 32, generator=gen) for r in (8, 3)])
    y = torch.randn(4, 32, generator=gen)
    ranks = torch.tensor([0, 3], dtype=torch.int32)  # the first segment left alone: its rows stay as they were
    expand = (v, list(b.stacks), b.pointers, 1, segs.rows, segs.indptr, ranks, segs.longest)
    torch.library.opcheck(torch.ops.loraplex.sgmv_expand.default, (y.clone(), *expand))
    before = y.clone()
    torch.ops.loraplex.sgmv_expand.default(y, *expand)
    assert torch.equal(y[[0, 2, 3]], before[[0, 2, 3]])
    assert torch.allclose(y[1], before[1] + v[0, 2, :3] @ b.stacks[1][1])  # row 1 is listed third
