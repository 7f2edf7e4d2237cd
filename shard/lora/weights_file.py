"""An adapter's safetensors file read as untrusted input: the header first, then only the accepted tensors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from loraplex.shard.lora.config import AdapterError

WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
MAX_HEADER_BYTES = 16 << 20  # ~100 bytes a tensor: far above any adapter's header, far below a memory problem
# Floating-point safetensors dtypes and their sizes; anything else is refused from the header.
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the safetensors header declares it; nothing of its data has been read."""

    dtype: str
    shape: tuple[int, ...]
    end: int  # where its data ends, counted from the start of the data area


def weights_path(directory: Path) -> Path:
    """The adapter's safetensors file; pickle-only weights and a missing file are refused by name."""
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
    return path


def corrupt(reason: str) -> AdapterError:
    """The one error for a weights file that cannot be what it claims."""
    return AdapterError("corrupt", f"{WEIGHTS_FILE} is corrupt or truncated: {reason}")


def read_header(path: Path) -> tuple[dict[str, TensorEntry], int]:
    """The tensors the file declares and the size of its data area, from the header alone: shapes are checked
    before a byte of weights is read (a hostile file cannot make us read or allocate what it claims)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise corrupt(f"header length {length} does not fit a file of {size} bytes")
            raw = f.read(length)
    except OSError as exc:
        raise corrupt(str(exc)) from exc
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise corrupt(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or not isinstance(dtype, str) or begin > end:
            raise corrupt(f"header entry {key!r} is malformed")
        if dtype in FLOAT_DTYPES and end - begin != math.prod(shape) * FLOAT_DTYPES[dtype]:
            raise corrupt(f"{key} declares {end - begin} bytes for shape {list(shape)} of {dtype}")
        entries[key] = TensorEntry(dtype, shape, end)
    return entries, size - 8 - length


def read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors (those the checks accepted), each read at its offset."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise corrupt(str(exc)) from exc
