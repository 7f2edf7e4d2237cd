"""Random PEFT-format LoRA adapters written to disk, for benchmarks that need many of them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from shard.config import ModelConfig
from shard.lora.config import PROJECTIONS

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = tuple(PROJECTIONS)


def write_adapter(
    directory: Path,
    config: ModelConfig,
    rank: int,
    targets: Sequence[str],
    seed: int,
    alpha: float = 16.0,
    std: float | None = None,
) -> Path:
    """A PEFT LoRA directory (config + safetensors) with random A and B on every layer.

    By default the deltas are small, like a trained adapter's; ``std`` draws both halves from N(0, std²)
    instead, large enough that every adapter visibly changes the output (what tests want).
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for proj in targets:
            in_f, out_f = config.projection_shape(proj)
            prefix = f"base_model.model.model.layers.{layer}.{PROJECTIONS[proj]}.{proj}"
            a_scale, b_scale = (std, std) if std is not None else (in_f**-0.5, 0.01)
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * a_scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * b_scale
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
    }
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory
