"""SGMV/BGMV kernels on the GPU, side by side: the kernels, a per-segment torch loop, gather + torch.bmm.

Run (NVIDIA GPU, CuPy): ``python3 benchmarks/kernels_gpu.py [--json out.json]``. Each timing replays a CUDA
graph of ``INNER`` calls (launch gaps out of the numbers) over enough copies of the inputs that one replay
streams several times the L2 cache (no cache hits). GB/s counts the bytes the kernels must move, the
float32 partial sums included (``moved``), beside a measured device-to-device copy (read + write).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraplex.kernels import cuda, ops
from loraplex.kernels.segments import Segments, SegmentWeights

DTYPE = torch.bfloat16
INNER = 20  # calls per graph replay
ROTATE_BYTES = 400 << 20  # inputs one replay cycles through: 8x an H100/H200's 50 MB L2


def graph_seconds(fns: list[Callable[[], Any]], repeats: int = 10) -> float:
    """Median seconds of one call, from replays of a graph holding ``INNER`` calls cycling through ``fns``."""
    for fn in fns[:2]:
        fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(INNER):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / INNER)
    return sorted(times)[len(times) // 2]


def gpu_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace | None:
    """The GPU benchmarks' start: ``parser``'s arguments and ``--json``, parsed, and the kernels warmed up; None
    (after saying why) where there is no NVIDIA GPU with CuPy."""
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    why = cuda.missing()
    if why is not None:
        print(f"this benchmark needs an NVIDIA GPU and CuPy: {why}", file=sys.stderr)
        return None
    cuda.warm_up()
    return args


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, read plus write."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * src.numel() / sorted(times)[len(times) // 2]


def moved_bytes(tokens: int, segments: int, h: int, rank: int, parts: int) -> int:
    """What shrink + expand must move: x, A and B once each, y read and written, v's float32 partial sums
    written by the shrink and read by the expand."""
    e = 2
    return e * tokens * h + 2 * e * segments * rank * h + 2 * 4 * parts * tokens * rank + 2 * e * tokens * h


def case(name: str, segments: list[int], h: int, rank: int) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    total, s = sum(segments), len(segments)
    members, cursor = [], 0
    for n in segments:
        members.append(list(range(cursor, cursor + n)))
        cursor += n
    segs = Segments.build(members, [rank] * s, torch.device("cuda"))
    seg_of_row = torch.tensor([i for i, n in enumerate(segments) for _ in range(n)], device="cuda")
    one_set = 2 * (total * h * 2 + 2 * s * rank * h)
    copies = max(1, min(16, -(-ROTATE_BYTES // one_set)))
    sets = []
    for _ in range(copies):
        a_t = torch.randn(s, rank, h, generator=gen, device="cuda").to(DTYPE) / h**0.5
        b = torch.randn(s, rank, h, generator=gen, device="cuda").to(DTYPE)
        x = torch.randn(total, h, generator=gen, device="cuda").to(DTYPE)
        y = torch.randn(total, h, generator=gen, device="cuda").to(DTYPE)
        sets.append((a_t, b, x, y, SegmentWeights.of([a_t[i : i + 1] for i in range(s)]),
                     SegmentWeights.of([b[i : i + 1] for i in range(s)])))  # fmt: skip

    def kernel(a_t: Any, b: Any, x: Any, y: Any, a_w: Any, b_w: Any) -> None:
        ops.sgmv_expand(y, ops.sgmv_shrink(x, segs, a_w, 0), segs, b_w, 0)  # the ops the plan calls

    def loop(a_t: Any, b: Any, x: Any, y: Any, a_w: Any, b_w: Any) -> None:
        for i, rows in enumerate(members):
            lo, hi = rows[0], rows[-1] + 1
            y[lo:hi] += (x[lo:hi] @ a_t[i].t()) @ b[i]

    def gather_bmm(a_t: Any, b: Any, x: Any, y: Any, a_w: Any, b_w: Any) -> None:
        a_rows, b_rows = a_t[seg_of_row], b[seg_of_row]  # one weight copy per token
        v = torch.bmm(x.unsqueeze(1), a_rows.transpose(1, 2))
        y.add_(torch.bmm(v, b_rows).squeeze(1))

    def timed(fn: Callable[..., None]) -> float:
        return graph_seconds([functools.partial(fn, *st) for st in sets])

    kernel_s, loop_s, bmm_s = timed(kernel), timed(loop), timed(gather_bmm)
    parts = cuda.splits_for(s * max(1, -(-max(segments) // cuda.tile_for(max(segments)))), h)
    moved = moved_bytes(total, s, h, rank, parts)
    return {
        "case": name, "tokens": total, "segments": s, "h": h, "rank": rank, "splits": parts, "copies": copies,
        "moved_mb": round(moved / 1e6, 2),
        "kernel_us": round(kernel_s * 1e6, 1), "loop_us": round(loop_s * 1e6, 1),
        "gather_bmm_us": round(bmm_s * 1e6, 1),
        "kernel_gbs": round(moved / kernel_s / 1e9, 1),
        "x_gather_bmm": round(bmm_s / kernel_s, 2), "x_loop": round(loop_s / kernel_s, 2),
    }  # fmt: skip


def main() -> int:
    args = gpu_arguments(argparse.ArgumentParser(description=__doc__))
    if args is None:
        return 2
    copy = copy_bandwidth()
    cases = [
        case("decode: 64 distinct, r16", [1] * 64, 4096, 16),
        case("decode: 256 distinct, r64", [1] * 256, 4096, 64),
        case("decode: 64 distinct, r16, h14336", [1] * 64, 14336, 16),
        case("one segment of 1", [1], 4096, 16),
        case("prefill: 8 x 512, r16", [512] * 8, 4096, 16),
        case("prefill: 64 x 64, r64", [64] * 64, 4096, 64),
    ]
    for c in cases:
        c["pct_of_copy"] = round(100 * c["kernel_gbs"] * 1e9 / copy, 1)
    result = {"copy_gbs": round(copy / 1e9, 1), "device": torch.cuda.get_device_name(), "cases": cases}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"device-to-device copy: {result['copy_gbs']} GB/s")
    print(f"{'case':36} {'kernel us':>10} {'GB/s':>8} {'% copy':>7} {'x bmm':>7} {'x loop':>7}")
    for c in cases:
        print(
            f"{c['case']:36} {c['kernel_us']:>10} {c['kernel_gbs']:>8} {c['pct_of_copy']:>7} "
            f"{c['x_gather_bmm']:>7} {c['x_loop']:>7}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
