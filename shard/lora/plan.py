"""What the model calls at each LoRA site, and the choice between the CUDA and the PyTorch plan (``--lora-backend``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch

from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.lora.cuda_plan import CudaLoraPlan
from loraplex.shard.lora.stack_pool import StackPool
from loraplex.shard.lora.torch_plan import TorchLoraPlan

Backend = Literal["torch", "cupy"]
BACKENDS = ("auto", "torch", "cupy")


class LoraPlan(Protocol):
    """One batch composition's LoRA work, built once and applied at every site of every forward pass."""

    def apply(self, site: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add every row's LoRA delta for ``site`` (``shard/projections.py``) at ``layer`` into the fused
        base output ``y``, whose input was ``x``."""


def resolve_backend(name: str, device: torch.device | str) -> Backend:
    """``--lora-backend``: ``auto`` is the CuPy kernels on CUDA and PyTorch elsewhere; ``cupy`` off CUDA is an error."""
    kind = torch.device(device).type
    if name == "auto":
        return "cupy" if kind == "cuda" else "torch"
    if name == "cupy" and kind != "cuda":
        raise ValueError(f"--lora-backend cupy needs a CUDA device, not {kind}")
    if name not in ("torch", "cupy"):
        raise ValueError(f"unknown LoRA backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


def make_plan(
    row_adapters: Sequence[LoraAdapter | None],
    config: ModelConfig,
    device: torch.device,
    backend: Backend | None = None,
    *,
    dtype: torch.dtype | None = None,
    long_dtype: torch.dtype | Literal["stacks"] | None = "stacks",
    pool: StackPool | None = None,
    reuse: bool = True,
) -> LoraPlan:
    """The backend's plan (``backend`` None: ``auto`` for ``device``): the CuPy kernels' (``CudaLoraPlan``, which
    raises ``KernelError`` on a batch it cannot take: never a silent fall-back) or PyTorch's, whose stacks are
    ``pool``'s slots in ``dtype`` (None: the adapters' own) and whose long segments run in ``long_dtype``
    (``TorchLoraPlan``). The kernels read the adapters' own weights: the other arguments are the PyTorch plan's."""
    if (backend or resolve_backend("auto", device)) == "cupy":
        return CudaLoraPlan(row_adapters, config, device)
    return TorchLoraPlan(row_adapters, config, dtype, pool=pool, long_dtype=long_dtype, reuse=reuse)
