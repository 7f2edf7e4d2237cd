"""SGMV/BGMV kernels on the GPU, side by side: the kernels, a per-segment torch loop, gather + torch.bmm.

Run (NVIDIA GPU, CuPy): ``python3 benchmarks/kernels_gpu.py [--json out.json]``. Bandwidth counts the
bytes the kernels must move (``moved`` in ``case``; the kernels are described in docs/kernels.md) against a
measured device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraplex.kernels import cuda
from loraplex.kernels.segments import Segments, SegmentWeights

DTYPE = torch.bfloat16


def _time(fn: Any, repeats: int = 20) -> float:
    """Median seconds of ``fn`` by CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def gpu_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace | None:
    """The GPU benchmarks' start: ``parser``'s arguments and ``--json``, parsed, and the kernels warmed up; None
    (after saying why) where there is no NVIDIA GPU with CuPy."""
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not cuda.available():
        print("this benchmark needs an NVIDIA GPU and CuPy (see scripts/gpu_check.sh)", file=sys.stderr)
        return None
    cuda.warm_up()
    return args


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, read plus write."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), repeats=10)
    return 2 * src.numel() / seconds


def case(name: str, segments: list[int], h: int, rank: int) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = sum(segments)
    members, cursor = [], 0
    for n in segments:
        members.append(list(range(cursor, cursor + n)))
        cursor += n
    s = len(segments)
    a_t = torch.randn(s, rank, h, generator=gen, device="cuda").to(DTYPE) / h**0.5
    b = torch.randn(s, rank, h, generator=gen, device="cuda").to(DTYPE)
    x = torch.randn(total, h, generator=gen, device="cuda").to(DTYPE)
    y = torch.zeros(total, h, device="cuda", dtype=DTYPE)
    segs = Segments.build(members, [rank] * s, torch.device("cuda"))
    a_w = SegmentWeights.of([a_t[i : i + 1] for i in range(s)])  # one layer per segment
    b_w = SegmentWeights.of([b[i : i + 1] for i in range(s)])
    seg_of_row = torch.tensor([i for i, n in enumerate(segments) for _ in range(n)], device="cuda")

    def kernel() -> None:
        cuda.expand(y, cuda.shrink(x, segs, a_w, 0), segs, b_w, 0)

    def loop() -> None:
        for i, rows in enumerate(members):
            lo, hi = rows[0], rows[-1] + 1
            y[lo:hi] += (x[lo:hi] @ a_t[i].t()) @ b[i]

    def gather_bmm() -> None:
        a_rows, b_rows = a_t[seg_of_row], b[seg_of_row]  # one weight copy per token
        v = torch.bmm(x.unsqueeze(1), a_rows.transpose(1, 2))
        y.add_(torch.bmm(v, b_rows).squeeze(1))

    kernel_s, loop_s, bmm_s = _time(kernel), _time(loop), _time(gather_bmm)
    e = 2  # bytes per element
    moved = e * (total * h + s * rank * h + total * rank) + e * (total * rank + s * rank * h) + 4 * total * h
    return {
        "case": name, "tokens": total, "segments": s, "h": h, "rank": rank,
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
    result = {"copy_gbs": round(copy / 1e9, 1), "cases": cases}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"device-to-device copy: {result['copy_gbs']} GB/s")
    header = f"{'case':36} {'kernel us':>10} {'GB/s':>8} {'% copy':>7} {'x bmm':>7} {'x loop':>7}"
    print(header)
    for c in cases:
        print(
            f"{c['case']:36} {c['kernel_us']:>10} {c['kernel_gbs']:>8} {c['pct_of_copy']:>7} "
            f"{c['x_gather_bmm']:>7} {c['x_loop']:>7}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
