"""The adapter store: adapters by id in three tiers (disk, host, device), loaded on demand, freed for real."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter, Pace, inspect_adapter, load_timeout_error, read_adapter
from loraplex.shard.lora.config import AdapterError
from loraplex.shard.lora.roots import AdapterRoots
from loraplex.shard.parallel import TensorParallel
from loraplex.shard.settings import DEFAULT_MAX_LORA_RANK


@dataclass
class AdapterRecord:
    """What the store knows of one adapter; ``host`` and ``device`` are None when it is not loaded there."""

    adapter_id: str
    source: Path | None = None  # set for adapters named at start-up or by path; others resolve under the roots
    host: LoraAdapter | None = None
    device: LoraAdapter | None = None
    requests: int = 0
    load_seconds: float = 0.0
    last_used: float = 0.0
    rank: int = 0
    targets: list[str] = field(default_factory=list)
    bytes: int = 0  # of its device copy (every layer)
    host_bytes: int = 0  # of its host copy: the same, or only the trained layers on a CUDA shard

    @property
    def tier(self) -> str:
        return "device" if self.device is not None else "host" if self.host is not None else "disk"


class AdapterStore:
    """Adapters by id. Loading reads disk into host memory outside any model lock; ``acquire`` (called by
    the batch owner, under its lock) puts a batch's adapters on the device, demoting the least recently
    used device adapter that no cached batch uses when the device tier is full.

    Limits: at most ``max_active`` adapters on the device and ``max_active + max_host`` loaded at all, and
    in bytes (0: no byte limit) ``max_host_bytes`` of weights loaded at all (every loaded adapter keeps its
    host copy; on a CPU shard that copy is also the device one) and ``max_device_bytes`` on the device.
    A load past a limit is refused (``capacity``), never made room for silently: what to evict from the
    host is the router's policy, since only it knows which adapters queued requests are waiting for. The
    refusal comes only after the id resolved and the adapter passed every check that needs no tensor data,
    so a missing or broken adapter never makes anything leave. An adapter larger than a whole byte budget
    is refused for good (``too_large``). Every load has a deadline (``load_timeout`` seconds, pattern
    matching and the waits for a turn on the model thread included): past it the load fails alone
    (``load_timeout``) and keeps nothing.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        max_rank: int = DEFAULT_MAX_LORA_RANK,
        tp: TensorParallel | None = None,
        roots: AdapterRoots | None = None,
        max_active: int = 64,
        max_host: int = 256,
        max_host_bytes: int = 0,
        max_device_bytes: int = 0,
        load_timeout: float = 60.0,
        on_evict: Callable[[], None] | None = None,
        pace: Pace | None = None,
    ) -> None:
        self.tp = tp or TensorParallel()
        self.config = config  # the whole model's, not one rank's
        self.dtype = dtype
        self.device = device
        self.max_rank = max_rank
        self.roots = roots or AdapterRoots([])
        self.max_active = max_active
        self.max_host = max_host
        self.max_host_bytes = max_host_bytes
        self.max_device_bytes = max_device_bytes
        self.load_timeout = load_timeout
        self.on_evict = on_evict
        # Runs each piece of a load; the shard passes its model thread's, so loads fit between steps.
        self.pace = pace
        self._records: dict[str, AdapterRecord] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._reserved: dict[str, int] = {}  # bytes of the loads past their room check, not yet stored
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.max_active + self.max_host

    def load(self, adapter_id: str, directory: Path | None = None) -> LoraAdapter:
        """Load ``adapter_id`` into host memory (from ``directory``, its known source, or the roots).

        Loading again what is loaded is a no-op, unless ``directory`` names a (new) source: then the
        adapter is replaced. A failed load leaves everything already in the store untouched.
        """
        deadline = time.monotonic() + self.load_timeout
        with self._lock:
            rec = self._records.get(adapter_id)
            if rec is not None and rec.host is not None and directory is None:
                return rec.host
            per_id = self._loading.setdefault(adapter_id, threading.Lock())
        try:
            # One reader per adapter; a second request for it waits and shares the result (within its deadline).
            if not per_id.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise load_timeout_error()
            try:
                return self._load_locked(adapter_id, directory, deadline)
            finally:
                per_id.release()
        finally:
            with self._lock:
                if adapter_id not in self:  # failed loads (hostile ids included) leave nothing behind
                    self._loading.pop(adapter_id, None)

    def _load_locked(self, adapter_id: str, directory: Path | None, deadline: float) -> LoraAdapter:
        with self._lock:
            rec = self._records.get(adapter_id)
            if rec is not None and rec.host is not None and directory is None:
                return rec.host
            # Existence first (a stat under the roots): an id that is not there is refused before any limit.
            source = directory or (rec.source if rec is not None else None) or self.roots.find(adapter_id)
            replacing = rec is not None and rec.host is not None
        started = time.perf_counter()
        # Then everything checkable without reading tensors, which also tells the bytes the adapter will take.
        plan = inspect_adapter(
            adapter_id, source, self.config, max_rank=self.max_rank, dtype=self.dtype, tp=self.tp, deadline=deadline
        )
        # A CUDA shard's host copy is never used by a plan, so it holds only the trained layers (a one-layer
        # file costs one layer there); on a CPU shard it is also the device copy, laid out in full.
        compact = torch.device(self.device).type != "cpu"
        host_bytes = plan.compact_bytes if compact else plan.memory_bytes
        with self._lock:
            self._check_room(adapter_id, host_bytes, plan.memory_bytes, replacing)
            self._reserved[adapter_id] = host_bytes
        try:
            adapter = read_adapter(
                plan,
                self.config,
                dtype=self.dtype,
                device="cpu",
                tp=self.tp,
                pace=self.pace,
                deadline=deadline,
                compact=compact,
            )
        finally:
            with self._lock:
                self._reserved.pop(adapter_id, None)
        elapsed = time.perf_counter() - started
        with self._lock:
            rec = self._records.setdefault(adapter_id, AdapterRecord(adapter_id))
            if directory is not None:
                rec.source = directory
            rec.host, rec.device = adapter, None
            rec.load_seconds, rec.last_used = elapsed, time.monotonic()
            rec.rank, rec.targets = adapter.rank, adapter.targets
            rec.bytes, rec.host_bytes = adapter.device_bytes, adapter.memory_bytes
        if replacing and self.on_evict is not None:
            self.on_evict()
        return adapter

    def _check_room(self, adapter_id: str, nbytes: int, device_bytes: int, replacing: bool) -> None:
        """Refuse a load that does not fit the limits now (``capacity``) or ever (``too_large``)."""
        for budget, flag, need in (
            (self.max_host_bytes, "--max-cpu-adapter-bytes", nbytes),
            (self.max_device_bytes, "--max-device-adapter-bytes", device_bytes),
        ):
            if budget and need > budget:
                raise AdapterError(
                    "too_large", f"its weights take {need} bytes, more than the shard's {flag} ({budget})"
                )
        others = [r for r in self._records.values() if r.host is not None and r.adapter_id != adapter_id]
        pending = {k: v for k, v in self._reserved.items() if k != adapter_id}
        if not replacing and len(others) + len(pending) >= self.capacity:
            raise AdapterError(
                "capacity",
                f"{self.capacity} adapters are loaded (--max-active-adapters + --max-cpu-adapters); unload one first",
            )
        used = sum(r.host_bytes for r in others) + sum(pending.values())
        if self.max_host_bytes and used + nbytes > self.max_host_bytes:
            raise AdapterError(
                "capacity",
                f"loaded adapters take {used} of --max-cpu-adapter-bytes ({self.max_host_bytes}) and this one "
                f"needs {nbytes}; unload one first",
            )

    def acquire(self, adapter_ids: Iterable[str], pinned: set[str]) -> dict[str, LoraAdapter]:
        """Device copies of the given (loaded) adapters; call under the lock of whoever owns ``pinned``.

        ``pinned`` are the adapters cached batches use: they are never demoted.
        """
        wanted = list(dict.fromkeys(adapter_ids))
        out: dict[str, LoraAdapter] = {}
        with self._lock:
            for adapter_id in wanted:
                rec = self._records.get(adapter_id)
                if rec is None or rec.host is None:
                    raise AdapterError("not_found", f"adapter {adapter_id!r} is not loaded")
            now = time.monotonic()
            for adapter_id in wanted:
                rec = self._records[adapter_id]
                if rec.device is None:
                    self._make_device_room(pinned | set(wanted), rec.bytes)
                    assert rec.host is not None
                    rec.device = rec.host.to(self.device)
                rec.last_used = now
                out[adapter_id] = rec.device
        return out

    def count_requests(self, adapter_ids: Iterable[str]) -> None:
        with self._lock:
            for adapter_id in adapter_ids:
                if adapter_id in self._records:
                    self._records[adapter_id].requests += 1

    def _make_device_room(self, keep: set[str], nbytes: int) -> None:
        """Demote least recently used device adapters outside ``keep`` until one more of ``nbytes`` fits."""
        active = [r for r in self._records.values() if r.device is not None]
        candidates = sorted((r for r in active if r.adapter_id not in keep), key=lambda r: r.last_used)
        while len(active) >= self.max_active or (
            self.max_device_bytes and sum(r.bytes for r in active) + nbytes > self.max_device_bytes
        ):
            if not candidates:
                raise AdapterError(
                    "capacity",
                    f"a batch would need more than --max-active-adapters ({self.max_active}) adapters or "
                    f"--max-device-adapter-bytes ({self.max_device_bytes}) bytes of adapters on the device",
                )
            victim = candidates.pop(0)
            victim.device = None
            active.remove(victim)
            if self.on_evict is not None:
                self.on_evict()

    def used_bytes(self) -> tuple[int, int]:
        """Bytes of adapter weights loaded at all, and on the device."""
        with self._lock:
            loaded = [r for r in self._records.values() if r.host is not None]
            return sum(r.host_bytes for r in loaded), sum(r.bytes for r in loaded if r.device is not None)

    def unload(self, adapter_id: str, pinned: set[str] | None = None) -> None:
        """Drop the adapter's host and device tensors; refused while a cached batch uses it.

        The caller then runs ``release_freed_memory`` (outside any model lock) to give the pages back.
        """
        with self._lock:
            rec = self._records.get(adapter_id)
            if rec is None or rec.host is None:
                raise AdapterError("not_found", f"adapter {adapter_id!r} is not loaded")
            if pinned and adapter_id in pinned:
                raise AdapterError("in_use", f"adapter {adapter_id!r} is used by running requests")
            rec.host = rec.device = None
            if rec.source is None:  # found under a root: discovery lists it again as a disk-tier adapter
                del self._records[adapter_id]
            self._loading.pop(adapter_id, None)
        if self.on_evict is not None:
            self.on_evict()

    def get(self, adapter_id: str) -> LoraAdapter:
        """The loaded adapter (its device copy when it has one)."""
        rec = self._records.get(adapter_id)
        if rec is None or rec.host is None:
            raise AdapterError("not_found", f"adapter {adapter_id!r} is not loaded")
        return rec.device or rec.host

    def record(self, adapter_id: str) -> AdapterRecord:
        with self._lock:
            rec = self._records.get(adapter_id)
        if rec is None:
            raise AdapterError("not_found", f"adapter {adapter_id!r} is not known")
        return rec

    def __contains__(self, adapter_id: object) -> bool:
        rec = self._records.get(adapter_id) if isinstance(adapter_id, str) else None
        return rec is not None and rec.host is not None

    def ids(self) -> list[str]:
        """Ids of the loaded adapters."""
        return sorted(i for i, r in self._records.items() if r.host is not None)

    def records(self, discover: bool = True) -> list[AdapterRecord]:
        """Every adapter the store knows: loaded ones, those named at start-up, and those under the roots."""
        with self._lock:
            known = dict(self._records)
        if discover:
            for adapter_id in self.roots.discover():
                known.setdefault(adapter_id, AdapterRecord(adapter_id))
        return [known[i] for i in sorted(known)]
