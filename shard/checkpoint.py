"""Checkpoints: a model id resolved to a local directory of safetensors, whose tensors are read by name."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loraplex.shard.hub import HubError, hub_snapshot

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """The model cannot be found or read; the message says which and why."""


def resolve_model_dir(model_id: str) -> Path:
    """A local directory as given, else a hub id through ``huggingface_hub`` (its cache and offline mode)."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or model_id.startswith((".", "~")):
        raise CheckpointError(f"model directory {model_id} does not exist")
    try:
        return hub_snapshot(model_id, ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"])
    except HubError as exc:
        raise CheckpointError(
            f"model {model_id!r} is neither a local directory nor reachable on the hub: {exc}"
        ) from exc


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors shards; pickle-only checkpoints are refused, never loaded."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return sorted({directory / name for name in weight_map.values()})
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    if any(p.suffix in _PICKLE_SUFFIXES for p in directory.iterdir()):
        raise CheckpointError(f"{directory} holds only pickle weights; loraplex loads safetensors only")
    raise CheckpointError(f"{directory} holds no .safetensors weights")


class TensorReader:
    """Reads tensors by name across a checkpoint's shards without loading the rest."""

    def __init__(self, directory: Path) -> None:
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        try:
            for path in safetensors_files(directory):
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    self._where[name] = handle
        except (SafetensorError, OSError) as exc:
            self._stack.close()
            raise CheckpointError(f"cannot read the weights in {directory}: {exc}") from exc

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"the checkpoint lacks tensor {name}")
        return self._where[name].get_tensor(name)

    def get_part(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Only the asked slice of a 1-D or 2-D tensor is read from disk (how each rank loads its shard)."""
        if rows is None and cols is None:
            return self.get(name)
        if name not in self._where:
            raise CheckpointError(f"the checkpoint lacks tensor {name}")
        part = self._where[name].get_slice(name)
        if cols is None:
            return part[rows]
        return part[rows if rows is not None else slice(None), cols]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
