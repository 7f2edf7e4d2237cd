"""The adapter store: adapters loaded by id, each load validated before it can affect anything served."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from shard.config import ModelConfig
from shard.lora.adapter import LoraAdapter, load_adapter
from shard.lora.config import AdapterError
from shard.parallel import TensorParallel

DEFAULT_MAX_LORA_RANK = 128


class AdapterStore:
    """Adapters by id; a failed load leaves every adapter already in the store untouched."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        max_rank: int = DEFAULT_MAX_LORA_RANK,
        tp: TensorParallel | None = None,
    ) -> None:
        self.tp = tp or TensorParallel()
        self.config = config  # the whole model's, not one rank's
        self.dtype = dtype
        self.device = device
        self.max_rank = max_rank
        self._adapters: dict[str, LoraAdapter] = {}
        self._lock = threading.Lock()

    def load(self, adapter_id: str, directory: Path) -> LoraAdapter:
        """Load (or reload) ``adapter_id`` from a local PEFT directory."""
        # Loading happens outside the lock: readers keep serving while the weights are read.
        adapter = load_adapter(
            adapter_id,
            directory,
            self.config,
            max_rank=self.max_rank,
            dtype=self.dtype,
            device=self.device,
            tp=self.tp,
        )
        with self._lock:
            self._adapters[adapter_id] = adapter
        return adapter

    def get(self, adapter_id: str) -> LoraAdapter:
        try:
            return self._adapters[adapter_id]
        except KeyError:
            raise AdapterError("not_found", f"adapter {adapter_id!r} is not loaded") from None

    def unload(self, adapter_id: str) -> None:
        with self._lock:
            if self._adapters.pop(adapter_id, None) is None:
                raise AdapterError("not_found", f"adapter {adapter_id!r} is not loaded")

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._adapters

    def ids(self) -> list[str]:
        return sorted(self._adapters)
