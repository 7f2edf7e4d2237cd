"""A loaded LoRA adapter: per-projection A and B stacked over layers, scaling folded into B."""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.config import AdapterError, LoraConfig, read_config
from loraplex.shard.parallel import TensorParallel
from loraplex.shard.projections import PROJECTIONS, Projection

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
_SERIALS = itertools.count(1)


@dataclass
class ProjectionWeights:
    """One projection's LoRA over all layers; layers the adapter leaves alone hold zeros."""

    a: torch.Tensor  # [num_layers, in_features, rank]
    b: torch.Tensor  # [num_layers, rank, out_features], already multiplied by the scaling
    ranks: dict[int, int]  # layer -> rank actually trained there
    # On CUDA, A transposed and contiguous ([num_layers, rank, in_features]) for the kernels; ``a`` is then
    # a view of it, so the weights are held once.
    a_t: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[-1]


@dataclass
class LoraAdapter:
    """An adapter ready for batching: weights in the model's dtype and on its device."""

    adapter_id: str
    projections: dict[str, ProjectionWeights]
    weight_bytes: int
    source: str = ""
    # Unique for the life of the process (unlike id()), so a cached batch plan never outlives its weights.
    serial: int = field(default_factory=lambda: next(_SERIALS))

    @property
    def rank(self) -> int:
        return max(p.rank for p in self.projections.values())

    @property
    def targets(self) -> list[str]:
        return [name for name in PROJECTIONS if name in self.projections]

    @property
    def memory_bytes(self) -> int:
        return sum(p.a.nbytes + p.b.nbytes for p in self.projections.values())

    def to(self, device: torch.device | str) -> LoraAdapter:
        """The same adapter with its weights on ``device`` (itself when they already are there)."""
        first = next(iter(self.projections.values())).a
        if first.device == torch.device(device):
            return self
        moved = {}
        for name, p in self.projections.items():
            b = p.b.to(device, non_blocking=True)
            if torch.device(device).type == "cuda":
                a_t = p.a.transpose(1, 2).contiguous().to(device, non_blocking=True)
                moved[name] = ProjectionWeights(a_t.transpose(1, 2), b, p.ranks, a_t)
            else:
                moved[name] = ProjectionWeights(p.a.to(device, non_blocking=True), b, p.ranks)
        return LoraAdapter(self.adapter_id, moved, self.weight_bytes, self.source)


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        pickles = [name for name in _PICKLE_FILES if (directory / name).exists()]
        if pickles:
            raise AdapterError(
                "pickle_weights",
                f"adapter ships only pickle weights ({pickles[0]}); pickle is never loaded, "
                f"convert it to {WEIGHTS_FILE}",
            )
        raise AdapterError("not_found", f"adapter has no {WEIGHTS_FILE}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError("corrupt", f"{WEIGHTS_FILE} is corrupt or truncated: {exc}") from exc


def _parse_keys(
    tensors: dict[str, torch.Tensor], config: ModelConfig
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            if "lora_magnitude_vector" in key:
                raise AdapterError("dora", f"DoRA weights ({key}) are not supported")
            if key.endswith(".bias"):
                raise AdapterError("bias", f"trained bias {key} is not supported")
            raise AdapterError(
                "unsupported_target",
                f"weight {key} is not the lora_A/lora_B matrix of a layer projection "
                "(base_model.model.model.layers.<n>.<self_attn|mlp>.<proj>.lora_<A|B>.weight)",
            )
        layer, parent, proj, half = int(match[1]), match[2], match[3], match[4]
        if proj not in PROJECTIONS or PROJECTIONS[proj].module != parent:
            raise AdapterError(
                "unsupported_target", f"weight {key} targets {parent}.{proj}, absent in this architecture"
            )
        if layer >= config.num_layers:
            raise AdapterError(
                "shape_mismatch",
                f"weight {key} is for layer {layer}; the base model has {config.num_layers} layers",
            )
        found.setdefault((layer, proj), {})[half] = tensor
    if not found:
        raise AdapterError("corrupt", f"{WEIGHTS_FILE} holds no LoRA weights")
    return found


PIECE_BYTES = 8 << 20  # source weights stacked in one piece of a load: a few milliseconds of work
Pace = Callable[[Callable[[], Any]], Any]
"""Runs one piece of an adapter load and returns its result (the shard: on the model thread, between steps)."""


def _inline(piece: Callable[[], Any]) -> Any:
    return piece()


def load_adapter(
    adapter_id: str,
    directory: Path,
    config: ModelConfig,
    *,
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    tp: TensorParallel | None = None,
    pace: Pace | None = None,
) -> LoraAdapter:
    """Read, validate and lay out one PEFT LoRA adapter; raises ``AdapterError`` naming the problem.

    ``config`` is the whole model's; under tensor parallelism each rank keeps the slice that matches its
    base layer: B's output rows for column-parallel projections, A's input columns for row-parallel ones
    (the rank-r partial products then sum with the base layer's partial outputs in its all-reduce).

    The work is done in pieces (the read, then projections up to ``PIECE_BYTES`` at a time), each run by ``pace``: the
    shard runs them on its model thread between forward steps, delaying each by one piece, instead of
    competing with a step for the cores and stretching it by the whole load.
    """
    tp = tp or TensorParallel()
    run = pace or _inline
    if not directory.is_dir():
        raise AdapterError("not_found", f"adapter directory {directory.name!r} does not exist")
    lora = read_config(directory)
    found = run(lambda: _parse_keys(_read_tensors(directory), config))
    per_proj: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    weight_bytes = 0
    for (layer, proj), halves in sorted(found.items()):
        if not lora.transforms_layer(layer):
            continue  # PEFT creates no module there, so it never reads these weights either
        module = f"model.layers.{layer}.{PROJECTIONS[proj].module}.{proj}"
        if set(halves) != {"A", "B"}:
            raise AdapterError("corrupt", f"{module} has lora_{next(iter(halves))} but not its other half")
        a, b = halves["A"], halves["B"]
        _, scale = _checked_rank(lora, module, a, b, PROJECTIONS[proj].shape(config), max_rank)
        weight_bytes += a.numel() * a.element_size() + b.numel() * b.element_size()
        per_proj.setdefault(proj, {})[layer] = (a, b, scale)
    if not per_proj:
        raise AdapterError("corrupt", "no LoRA weights fall in the layers named by layers_to_transform")

    def stack_piece(group: list[str]) -> dict[str, ProjectionWeights]:
        return {p: _stack(per_proj[p], config, PROJECTIONS[p], dtype, device, tp) for p in group}

    projections: dict[str, ProjectionWeights] = {}
    for group in _pieces(per_proj):
        projections.update(run(functools.partial(stack_piece, group)))
    return LoraAdapter(adapter_id, projections, weight_bytes, source=str(directory))


def _pieces(per_proj: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]]) -> list[list[str]]:
    """Projections grouped into pieces of about ``PIECE_BYTES`` of source weights (a projection is never split).

    Each piece waits for a turn between two forward steps, and the adapter's requests wait for the whole
    load: a small adapter goes in one or two turns rather than one per projection, while a big one still
    goes about one projection a turn, so no step is delayed by much.
    """
    pieces: list[list[str]] = []
    size = 0
    for proj, layers in per_proj.items():
        nbytes = sum(a.nbytes + b.nbytes for a, b, _ in layers.values())
        if not pieces or size + nbytes > PIECE_BYTES:
            pieces.append([])
            size = 0
        pieces[-1].append(proj)
        size += nbytes
    return pieces


def _checked_rank(
    lora: LoraConfig,
    module: str,
    a: torch.Tensor,
    b: torch.Tensor,
    shape: tuple[int, int],
    max_rank: int,
) -> tuple[int, float]:
    rank, scale = lora.rank_and_scale(module)
    in_features, out_features = shape
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterError("shape_mismatch", f"{module}: LoRA weights must be matrices")
    if a.shape[0] > max_rank or b.shape[1] > max_rank or rank > max_rank:
        raise AdapterError(
            "rank_too_large", f"{module} has rank {max(a.shape[0], rank)}, above the limit of {max_rank}"
        )
    if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
        raise AdapterError(
            "shape_mismatch",
            f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit rank {rank} on a "
            f"{in_features}->{out_features} projection of the base model",
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AdapterError("corrupt", f"{module}: LoRA weights must be floating point")
    return rank, scale


def _stack(
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, float]],
    config: ModelConfig,
    proj: Projection,
    dtype: torch.dtype,
    device: torch.device | str,
    tp: TensorParallel,
) -> ProjectionWeights:
    in_features, out_features = proj.shape(tp.local_config(config))
    rows, cols = tp.weight_part(proj, config)
    rank = max(a.shape[0] for a, _, _ in layers.values())
    a_all = torch.zeros(config.num_layers, in_features, rank, dtype=dtype, device=device)
    b_all = torch.zeros(config.num_layers, rank, out_features, dtype=dtype, device=device)
    for layer, (a, b, scale) in layers.items():
        # B ([out, rank]) holds the output rows, A ([rank, in]) the input columns: each keeps the base's part.
        if rows is not None:
            b = b[rows]
        if cols is not None:
            a = a[:, cols]
        r = a.shape[0]
        a_all[layer, :, :r] = a.t().to(dtype)
        # Scaling is folded into B in float32 so that bfloat16 storage rounds once, not twice.
        b_all[layer, :r, :] = (b.t().float() * scale).to(dtype)
    return ProjectionWeights(a_all, b_all, {layer: a.shape[0] for layer, (a, _, _) in layers.items()})
