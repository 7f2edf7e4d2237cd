"""Tensor parallelism: which slice of every weight a rank holds, and the all-reduce that joins the ranks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from loraplex.shard.config import ModelConfig
from loraplex.shard.projections import Projection


class ParallelError(ValueError):
    """The model cannot be split over this many ranks."""


@dataclass(frozen=True)
class TensorParallel:
    """One rank's view of the split: heads and MLP columns are divided, KV heads divided or replicated."""

    rank: int = 0
    world: int = 1
    distributed: bool = False

    def check(self, config: ModelConfig) -> None:
        h, kv, inter, w = config.num_heads, config.num_kv_heads, config.intermediate_size, self.world
        if h % w:
            raise ParallelError(f"{h} attention heads cannot be split evenly over {w} shards")
        if inter % w:
            raise ParallelError(f"intermediate size {inter} cannot be split evenly over {w} shards")
        if (kv >= w and kv % w) or (kv < w and w % kv):
            raise ParallelError(f"{kv} key/value heads cannot be split or replicated evenly over {w} shards")

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shapes this rank computes with: its heads, its KV heads, its slice of the MLP."""
        self.check(config)
        return dataclasses.replace(
            config,
            num_heads=config.num_heads // self.world,
            num_kv_heads=max(1, config.num_kv_heads // self.world),
            intermediate_size=config.intermediate_size // self.world,
        )

    def _heads(self, total: int) -> range:
        if total >= self.world:
            per = total // self.world
            return range(self.rank * per, (self.rank + 1) * per)
        # Fewer KV heads than ranks: each rank keeps the one KV head its query heads use.
        head = self.rank * total // self.world
        return range(head, head + 1)

    def weight_part(self, proj: Projection, config: ModelConfig) -> tuple[slice | None, slice | None]:
        """(rows, cols) of the ``[out_features, in_features]`` weight this rank holds: a column-parallel
        projection keeps its slice of output rows, a row-parallel one its slice of input columns."""
        part = self._part(proj, config)
        return (part, None) if proj.parallel == "column" else (None, part)

    def _part(self, proj: Projection, config: ModelConfig) -> slice:
        """Features of the split dimension this rank holds: its query heads, its KV heads or its MLP slice."""
        if proj.split_dim == "mlp":
            per = config.intermediate_size // self.world
            return slice(self.rank * per, (self.rank + 1) * per)
        r = self._heads(config.num_heads if proj.split_dim == "q" else config.num_kv_heads)
        return slice(r.start * config.head_dim, r.stop * config.head_dim)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial row-parallel outputs over the ranks (float32 on the wire: gloo has no bfloat16)."""
        if self.world == 1:
            return x
        buf = x.float() if x.dtype != torch.float32 else x
        dist.all_reduce(buf)
        return buf.to(x.dtype) if buf is not x else buf


def rank_device(device: str, rank: int, world: int) -> str:
    """The device a rank runs on: plain ``cuda`` means one GPU per rank (``cuda:<rank>``), as torchrun does;
    an explicit ``cuda:N`` or ``cpu`` is kept."""
    if device == "cuda" and world > 1:
        return f"cuda:{rank}"
    return device


def init_tensor_parallel(
    rank: int, world: int, init_method: str, device: str = "cpu", timeout_s: float = 30.0
) -> TensorParallel:
    """Join the process group (gloo on CPU, NCCL on CUDA); a dead rank makes the others' collectives time out."""
    if world == 1:
        return TensorParallel()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        device_id=torch.device(device) if backend == "nccl" else None,  # each rank binds its own GPU at once
    )
    return TensorParallel(rank, world, distributed=True)
