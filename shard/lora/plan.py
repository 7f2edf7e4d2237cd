"""What the model calls at each LoRA site, and the choice between the CUDA and the PyTorch plan."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.lora.cuda_plan import CudaLoraPlan
from loraplex.shard.lora.torch_plan import TorchLoraPlan


class LoraPlan(Protocol):
    """One batch composition's LoRA work, built once and applied at every site of every forward pass."""

    def apply(self, site: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add every row's LoRA delta for ``site`` (``shard/projections.py``) at ``layer`` into the fused
        base output ``y``, whose input was ``x``."""


def make_plan(
    row_adapters: Sequence[LoraAdapter | None],
    config: ModelConfig,
    lora_dtype: torch.dtype | None,
    device: torch.device,
) -> LoraPlan:
    """The CUDA kernels' plan where they can run, else the PyTorch plan (also the CPU path); ``lora_dtype``
    is the PyTorch plan's stack dtype (None: the adapters' own)."""
    if CudaLoraPlan.supports(row_adapters, lora_dtype, device):
        return CudaLoraPlan(row_adapters, config, device)
    return TorchLoraPlan(row_adapters, config, lora_dtype)
