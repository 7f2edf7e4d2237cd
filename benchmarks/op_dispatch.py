"""What calling the SGMV op through the dispatcher adds over calling its code directly (CPU, tiny shapes)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from loraplex.kernels import ops
from loraplex.kernels.segments import Segments, SegmentWeights


@torch.library.custom_op("loraplex_bench::sgmv_shrink", mutates_args=())
def _decorated(
    x: torch.Tensor, weights: list[torch.Tensor], pointers: torch.Tensor, layer: int, rows: torch.Tensor,
    indptr: torch.Tensor, ranks: torch.Tensor, max_rank: int, longest: int,
) -> torch.Tensor:  # fmt: skip
    """The same op registered through ``torch.library.custom_op``, for comparison."""
    return ops.IMPLEMENTATIONS["sgmv_shrink"]["CPU"](
        x, weights, pointers, layer, rows, indptr, ranks, max_rank, longest
    )


def per_call_us(fn: Callable[..., Any], args: tuple[Any, ...], calls: int) -> float:
    """Best of five: microseconds per call."""
    for _ in range(200):
        fn(*args)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--segments", type=int, default=8, help="adapters in the batch (one row each)")
    args = parser.parse_args(argv)
    segs = Segments.build([[i] for i in range(args.segments)], [8] * args.segments)
    a = SegmentWeights.of([torch.zeros(2, 8, 64) for _ in range(args.segments)])
    x = torch.zeros(args.segments, 64)
    op_args = (x, list(a.stacks), a.pointers, 1, segs.rows, segs.indptr, segs.ranks, segs.max_rank, segs.longest)
    with torch.inference_mode():
        direct = per_call_us(ops.IMPLEMENTATIONS["sgmv_shrink"]["CPU"], op_args, args.calls)
        library = per_call_us(torch.ops.loraplex.sgmv_shrink.default, op_args, args.calls)
        decorated = per_call_us(torch.ops.loraplex_bench.sgmv_shrink.default, op_args, args.calls)
    result = {
        "segments": args.segments,
        "direct_us": round(direct, 1),
        "library_op_us": round(library, 1),
        "custom_op_us": round(decorated, 1),
        "library_dispatch_us": round(library - direct, 1),
        "custom_op_dispatch_us": round(decorated - direct, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
