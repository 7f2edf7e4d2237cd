"""A loaded LoRA adapter: per-projection A and B stacked over layers, scaling folded into B."""

from __future__ import annotations

import functools
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.config import AdapterError, read_config
from loraplex.shard.lora.patterns import PATTERN_SECONDS
from loraplex.shard.lora.weights_file import (
    FLOAT_DTYPES,
    WEIGHTS_FILE,
    TensorEntry,
    corrupt,
    read_header,
    read_tensors,
    weights_path,
)
from loraplex.shard.parallel import TensorParallel
from loraplex.shard.projections import PROJECTIONS, SITES, Projection

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_SERIALS = itertools.count(1)


@dataclass
class ProjectionWeights:
    """One projection's LoRA over all layers; layers the adapter leaves alone hold zeros."""

    a: torch.Tensor  # [num_layers, in_features, rank]
    b: torch.Tensor  # [num_layers, rank, out_features], already multiplied by the scaling
    ranks: dict[int, int]  # layer -> rank actually trained there
    # Non-zero in a compact host copy (a CUDA shard's, whose plans only see device copies): ``a`` and ``b``
    # then hold only the trained layers (``sorted(ranks)``) of ``compact_of``, and ``to`` lays them out in full.
    compact_of: int = 0

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def full_bytes(self) -> int:
        """Bytes of the full layout (every layer), as on the device."""
        layers = self.compact_of or self.a.shape[0]
        return layers * (self.a[0].nbytes + self.b[0].nbytes) if self.a.shape[0] else 0

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``a`` and ``b`` over every layer (zeros where untrained); themselves when already so."""
        if not self.compact_of:
            return self.a, self.b
        index = torch.tensor(sorted(self.ranks))
        a = self.a.new_zeros((self.compact_of, *self.a.shape[1:]))
        b = self.b.new_zeros((self.compact_of, *self.b.shape[1:]))
        a[index], b[index] = self.a, self.b
        return a, b


@dataclass
class LoraAdapter:
    """An adapter ready for batching: weights in the model's dtype and on its device."""

    adapter_id: str
    projections: dict[str, ProjectionWeights]
    weight_bytes: int
    source: str = ""
    # Unique for the life of the process (unlike id()), so a cached batch plan never outlives its weights.
    serial: int = field(default_factory=lambda: next(_SERIALS))
    # On CUDA, the kernels' layout: per site (shard/projections.py), the A^T of its projections side by side,
    # ``[num_layers, sum of their ranks, in_features]`` contiguous, in the site's order; each projection's ``a``
    # is a view of it, so the weights are held once and one shrink serves q, k and v (gate and up).
    site_a_t: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(p.rank for p in self.projections.values())

    @property
    def targets(self) -> list[str]:
        return [name for name in PROJECTIONS if name in self.projections]

    @property
    def memory_bytes(self) -> int:
        """Bytes its tensors hold (a compact host copy: only the trained layers)."""
        return sum(p.a.nbytes + p.b.nbytes for p in self.projections.values())

    @property
    def device_bytes(self) -> int:
        """Bytes of its device copy: every layer of every projection."""
        return sum(p.full_bytes() for p in self.projections.values())

    def to(self, device: torch.device | str) -> LoraAdapter:
        """The same adapter with its weights on ``device`` in full layout (itself when already so there)."""
        first = next(iter(self.projections.values())).a
        compact = any(p.compact_of for p in self.projections.values())
        kernels = torch.device(device).type == "cuda"  # the kernels' layout too (with_site_shrinks)
        if first.device == torch.device(device) and not compact and (self.site_a_t or not kernels):
            return self
        moved = {}
        for name, p in self.projections.items():
            full_a, full_b = p.expanded()
            moved[name] = ProjectionWeights(
                full_a.to(device, non_blocking=True), full_b.to(device, non_blocking=True), p.ranks
            )
        adapter = LoraAdapter(self.adapter_id, moved, self.weight_bytes, self.source)
        return adapter.with_site_shrinks() if kernels else adapter

    def with_site_shrinks(self) -> LoraAdapter:
        """The same adapter (same serial) in the kernels' layout: ``site_a_t`` filled, each ``a`` a view of it."""
        site_a_t, projections = {}, dict(self.projections)
        for site, projs in SITES.items():
            present = [p.name for p in projs if p.name in projections]
            if not present:
                continue
            fused = torch.cat([projections[n].a.transpose(1, 2) for n in present], dim=1).contiguous()
            site_a_t[site] = fused
            col = 0
            for n in present:
                w = projections[n]
                projections[n] = ProjectionWeights(fused[:, col : col + w.rank].transpose(1, 2), w.b, w.ranks)
                col += w.rank
        return LoraAdapter(self.adapter_id, projections, self.weight_bytes, self.source, self.serial, site_a_t)


def _parse_keys(entries: Iterable[str], config: ModelConfig) -> dict[tuple[int, str], dict[str, str]]:
    """``(layer, projection) -> {"A": key, "B": key}``; any other tensor is refused by name."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    for key in entries:
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
        found.setdefault((layer, proj), {})[half] = key
    if not found:
        raise AdapterError("corrupt", f"{WEIGHTS_FILE} holds no LoRA weights")
    return found


PIECE_BYTES = 8 << 20  # source weights stacked in one piece of a load: a few milliseconds of work
Pace = Callable[[Callable[[], Any]], Any]
"""Runs one piece of an adapter load and returns its result (the shard: on the model thread, between steps)."""


def _inline(piece: Callable[[], Any]) -> Any:
    return piece()


@dataclass(frozen=True)
class _Module:
    key_a: str
    key_b: str
    rank: int
    scale: float
    nbytes: int  # of the two source tensors in the file


@dataclass(frozen=True)
class AdapterPlan:
    """An adapter checked from its config and its weights' header alone: what will be read, and the bytes
    its weights will take once laid out (``memory_bytes``, host and device copy alike)."""

    adapter_id: str
    directory: Path
    path: Path
    modules: dict[str, dict[int, _Module]]  # projection -> layer -> module
    memory_bytes: int  # every layer, as on the device (and in a CPU shard's host copy, which is its device copy)
    weight_bytes: int
    compact_bytes: int  # the trained layers only, as in a compact host copy (``read_adapter(compact=True)``)


def load_timeout_error() -> AdapterError:
    return AdapterError("load_timeout", "loading took longer than the shard's --adapter-load-timeout; nothing was kept")


def check_deadline(deadline: float | None) -> None:
    """Refuse the rest of a load once its deadline (``time.monotonic()``) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise load_timeout_error()


def inspect_adapter(
    adapter_id: str,
    directory: Path,
    config: ModelConfig,
    *,
    max_rank: int,
    dtype: torch.dtype,
    tp: TensorParallel | None = None,
    deadline: float | None = None,
) -> AdapterPlan:
    """Every check that needs no tensor data: config, patterns (bounded time), names, shapes, ranks, dtypes
    and offsets from the safetensors header. Raises ``AdapterError`` naming the problem."""
    tp = tp or TensorParallel()
    if not directory.is_dir():
        raise AdapterError("not_found", f"adapter directory {directory.name!r} does not exist")
    lora = read_config(directory)
    path = weights_path(directory)
    entries, data_bytes = read_header(path)
    found = _parse_keys(entries, config)
    timeout = PATTERN_SECONDS if deadline is None else min(PATTERN_SECONDS, deadline - time.monotonic())
    targeted = lora.resolve(config.num_layers, timeout=timeout)
    modules: dict[str, dict[int, _Module]] = {}
    for (layer, proj), halves in sorted(found.items()):
        if (layer, proj) not in targeted:
            continue  # PEFT creates no module there, so it never reads these weights either
        module = f"model.layers.{layer}.{PROJECTIONS[proj].module}.{proj}"
        if set(halves) != {"A", "B"}:
            raise AdapterError("corrupt", f"{module} has lora_{next(iter(halves))} but not its other half")
        a, b = entries[halves["A"]], entries[halves["B"]]
        rank, scale = targeted[(layer, proj)]
        _check_shapes(module, rank, a, b, PROJECTIONS[proj].shape(config), max_rank)
        for half in (a, b):
            if half.end > data_bytes:  # checked after the shapes: a wrong shape is the more useful error
                raise corrupt(f"{module}'s data ends at byte {half.end} of a data area of {data_bytes} bytes")
        nbytes = (math.prod(a.shape) + math.prod(b.shape)) * FLOAT_DTYPES[a.dtype]
        modules.setdefault(proj, {})[layer] = _Module(halves["A"], halves["B"], rank, scale, nbytes)
    if not modules:
        raise AdapterError(
            "corrupt", "no LoRA weights fall in the modules named by target_modules and layers_to_transform"
        )
    local = tp.local_config(config)
    item = torch.empty(0, dtype=dtype).element_size()
    memory = compact = 0
    for proj, layers in modules.items():  # as ``_stack`` lays them out: at the largest rank
        in_features, out_features = PROJECTIONS[proj].shape(local)
        per_layer = max(m.rank for m in layers.values()) * (in_features + out_features) * item
        memory += config.num_layers * per_layer
        compact += len(layers) * per_layer
    weight = sum(m.nbytes for layers in modules.values() for m in layers.values())
    return AdapterPlan(adapter_id, directory, path, modules, memory, weight, compact)


def read_adapter(
    plan: AdapterPlan,
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    tp: TensorParallel | None = None,
    pace: Pace | None = None,
    deadline: float | None = None,
    compact: bool = False,
) -> LoraAdapter:
    """Read the tensors ``plan`` accepted (no other) and lay them out, in pieces run by ``pace``; each piece
    first checks ``deadline``. ``compact``: store only the trained layers (a host copy that plans never
    use directly; ``LoraAdapter.to`` lays it out in full)."""
    tp = tp or TensorParallel()
    step = pace or _inline

    def run(piece: Callable[[], Any]) -> Any:
        def timed() -> Any:
            check_deadline(deadline)  # on the model thread: also counts the wait for a turn between steps
            return piece()

        return step(timed)

    keys = [k for layers in plan.modules.values() for m in layers.values() for k in (m.key_a, m.key_b)]
    tensors: dict[str, torch.Tensor] = run(lambda: read_tensors(plan.path, keys))
    per_proj = {
        proj: {layer: (tensors[m.key_a], tensors[m.key_b], m.scale) for layer, m in layers.items()}
        for proj, layers in plan.modules.items()
    }
    for proj, layers in per_proj.items():  # the data must be what the header declared
        for layer, (a, b, _) in layers.items():
            m = plan.modules[proj][layer]
            if not (a.is_floating_point() and b.is_floating_point()) or a.shape[0] != m.rank:
                raise corrupt(f"layer {layer} {proj}: data does not match the header")

    def stack_piece(group: list[str]) -> dict[str, ProjectionWeights]:
        return {p: _stack(per_proj[p], config, PROJECTIONS[p], dtype, device, tp, compact) for p in group}

    projections: dict[str, ProjectionWeights] = {}
    for group in _pieces(plan.modules):
        projections.update(run(functools.partial(stack_piece, group)))
    check_deadline(deadline)
    return LoraAdapter(plan.adapter_id, projections, plan.weight_bytes, source=str(plan.directory))


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
    deadline: float | None = None,
) -> LoraAdapter:
    """Read, validate and lay out one PEFT LoRA adapter; raises ``AdapterError`` naming the problem.

    ``config`` is the whole model's; under tensor parallelism each rank keeps the slice that matches its
    base layer: B's output rows for column-parallel projections, A's input columns for row-parallel ones
    (the rank-r partial products then sum with the base layer's partial outputs in its all-reduce).

    Everything that can be checked from the config and the safetensors header is checked first
    (``inspect_adapter``); then the work is done in pieces (the read, then projections up to ``PIECE_BYTES``
    at a time), each run by ``pace``: the shard runs them on its model thread between forward steps,
    delaying each by one piece, instead of competing with a step for the cores and stretching it by the
    whole load. Past ``deadline`` (``time.monotonic()``) the load is refused (``load_timeout``).
    """
    plan = inspect_adapter(adapter_id, directory, config, max_rank=max_rank, dtype=dtype, tp=tp, deadline=deadline)
    return read_adapter(plan, config, dtype=dtype, device=device, tp=tp, pace=pace, deadline=deadline)


def _pieces(modules: dict[str, dict[int, _Module]]) -> list[list[str]]:
    """Projections grouped into pieces of about ``PIECE_BYTES`` of source weights (a projection is never split).

    Each piece waits for a turn between two forward steps, and the adapter's requests wait for the whole
    load: a small adapter goes in one or two turns rather than one per projection, while a big one still
    goes about one projection a turn, so no step is delayed by much.
    """
    pieces: list[list[str]] = []
    size = 0
    for proj, layers in modules.items():
        nbytes = sum(m.nbytes for m in layers.values())
        if not pieces or size + nbytes > PIECE_BYTES:
            pieces.append([])
            size = 0
        pieces[-1].append(proj)
        size += nbytes
    return pieces


def _check_shapes(
    module: str, rank: int, a: TensorEntry, b: TensorEntry, shape: tuple[int, int], max_rank: int
) -> None:
    in_features, out_features = shape
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise AdapterError("shape_mismatch", f"{module}: LoRA weights must be matrices")
    if a.shape[0] > max_rank or b.shape[1] > max_rank or rank > max_rank:
        raise AdapterError(
            "rank_too_large", f"{module} has rank {max(a.shape[0], rank)}, above the limit of {max_rank}"
        )
    if a.shape != (rank, in_features) or b.shape != (out_features, rank):
        raise AdapterError(
            "shape_mismatch",
            f"{module}: lora_A {a.shape} and lora_B {b.shape} do not fit rank {rank} on a "
            f"{in_features}->{out_features} projection of the base model",
        )
    if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
        raise AdapterError("corrupt", f"{module}: LoRA weights must be floating point, not {a.dtype}/{b.dtype}")


def _stack(
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, float]],
    config: ModelConfig,
    proj: Projection,
    dtype: torch.dtype,
    device: torch.device | str,
    tp: TensorParallel,
    compact: bool = False,
) -> ProjectionWeights:
    in_features, out_features = proj.shape(tp.local_config(config))
    rows, cols = tp.weight_part(proj, config)
    rank = max(a.shape[0] for a, _, _ in layers.values())
    compact = compact and len(layers) < config.num_layers
    slots = {layer: i for i, layer in enumerate(sorted(layers))} if compact else {i: i for i in layers}
    count = len(layers) if compact else config.num_layers
    a_all = torch.zeros(count, in_features, rank, dtype=dtype, device=device)
    b_all = torch.zeros(count, rank, out_features, dtype=dtype, device=device)
    for layer, (a, b, scale) in layers.items():
        # B ([out, rank]) holds the output rows, A ([rank, in]) the input columns: each keeps the base's part.
        if rows is not None:
            b = b[rows]
        if cols is not None:
            a = a[:, cols]
        r = a.shape[0]
        a_all[slots[layer], :, :r] = a.t().to(dtype)
        # Scaling is folded into B in float32 so that bfloat16 storage rounds once, not twice.
        b_all[slots[layer], :r, :] = (b.t().float() * scale).to(dtype)
    ranks = {layer: a.shape[0] for layer, (a, _, _) in layers.items()}
    return ProjectionWeights(a_all, b_all, ranks, compact_of=config.num_layers if compact else 0)
