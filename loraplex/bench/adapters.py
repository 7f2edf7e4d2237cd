"""Random PEFT LoRA adapters for a workload, written under an adapter root, and their sizes."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex.shard.config import ModelConfig
from loraplex.shard.projections import PROJECTIONS

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = tuple(PROJECTIONS)
TARGET_SETS = {"attention": ATTENTION, "all": ALL_PROJECTIONS}


@dataclass(frozen=True)
class AdapterSpec:
    """Adapters ``<namespace>/<i>``: rank ``rank`` on ``targets`` of every layer."""

    namespace: str
    rank: int
    targets: tuple[str, ...]

    def adapter_id(self, index: int) -> str:
        return f"{self.namespace}/{index}"


def parse_targets(value: str) -> tuple[str, ...]:
    """``attention``, ``all`` or a comma list of projections."""
    if value in TARGET_SETS:
        return TARGET_SETS[value]
    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise ValueError(f"unknown projections {unknown}; use attention, all or names from {list(PROJECTIONS)}")
    return targets


def write_adapter(
    directory: Path,
    config: ModelConfig,
    rank: int,
    targets: Sequence[str],
    seed: int,
    alpha: float | None = None,
    std: float | None = None,
) -> Path:
    """A PEFT LoRA directory (config + safetensors) with random A and B on every layer; alpha 2 × rank
    unless given.

    By default the deltas are small, like a trained adapter's (A ~ N(0, 1/in), B ~ N(0, 0.01²)); ``std``
    draws both halves from N(0, std²) instead, large enough that every adapter visibly changes the output
    (what tests want).
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for proj in targets:
            in_f, out_f = PROJECTIONS[proj].shape(config)
            prefix = f"base_model.model.model.layers.{layer}.{PROJECTIONS[proj].module}.{proj}"
            a_scale, b_scale = (std, std) if std is not None else (in_f**-0.5, 0.01)
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * a_scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * b_scale
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2.0 * rank if alpha is None else alpha,
        "target_modules": list(targets),
        "bias": "none",
    }
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory


def ensure_adapters(root: Path, model_dir: Path, spec: AdapterSpec, indices: Iterable[int]) -> list[str]:
    """Write the adapters of ``spec`` with these indices under ``root`` (those not there yet); returns their ids.

    Only adapters a workload requests are written: the server reads an adapter root on demand, so one that is
    never requested costs nothing whether or not it is on disk.
    """
    config = ModelConfig.from_dir(model_dir)
    ids = []
    for index in sorted(set(indices)):
        adapter_id = spec.adapter_id(index)
        directory = root / adapter_id
        if not (directory / "adapter_model.safetensors").is_file():
            write_adapter(directory, config, spec.rank, spec.targets, seed=zlib.crc32(adapter_id.encode()))
        ids.append(adapter_id)
    return ids


def adapter_numel(model_dir: Path, rank: int, targets: Sequence[str]) -> int:
    """Elements of one adapter's A and B over all layers."""
    config = ModelConfig.from_dir(model_dir)
    per_layer = sum(rank * sum(PROJECTIONS[p].shape(config)) for p in targets)
    return per_layer * config.num_layers
