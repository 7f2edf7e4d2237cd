"""The obviously correct per-row LoRA loop, in float64: the oracle for every batched path."""

from __future__ import annotations

import torch


def lora_naive(
    x: torch.Tensor,
    keys: list[int],
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """``x[t] · A_k · B_k`` for each row t of key k (negative: none), ``A_k`` ``[in, r]``, ``B_k`` ``[r, out]``."""
    out_dim = next(iter(weights.values()))[1].shape[-1] if weights else 0
    y = torch.zeros(x.shape[0], out_dim, dtype=torch.float64)
    for row, key in enumerate(keys):
        if key >= 0:
            a, b = weights[key]
            y[row] = (x[row].double() @ a.double()) @ b.double()
    return y
