"""The physical floor of a LoRA workload: the base model's time plus the adapter bytes over memory bandwidth."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best bytes/s of summing a large float32 tensor: how fast this machine streams memory into the cores."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


@dataclass(frozen=True)
class Floor:
    """``seconds`` = base seconds + ``adapter_bytes`` / ``bandwidth``: what a pass cannot beat."""

    base_seconds: float
    adapter_bytes: float
    bandwidth: float

    @property
    def seconds(self) -> float:
        return self.base_seconds + self.adapter_bytes / self.bandwidth


def adapter_bytes_read(rows: float, prefill_rows: float, numel: int, prefill_itemsize: int) -> float:
    """Adapter bytes a pass reads when every row of every forward step has its own adapter.

    ``rows`` is the sum of the batch sizes of all prefill and decode steps (``loraplex_batch_size_sum``,
    one row per sequence): each row's adapter (``numel`` elements of A and B) is read once per step. On the
    CPU decode's LoRA stacks are float32 whatever the base dtype (4 bytes an element) and prefill's keep
    the adapters' dtype (``prefill_itemsize``); ``prefill_rows`` of the rows are prefill's.
    """
    return (rows - prefill_rows) * 4 * numel + prefill_rows * prefill_itemsize * numel
