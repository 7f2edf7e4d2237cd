"""Adapter roots: where an id that was not preloaded may be found, with nothing outside them reachable."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from loraplex.adapter_ids import adapter_id_problem
from shard.lora.adapter import WEIGHTS_FILE
from shard.lora.config import AdapterError

CONFIG_FILE = "adapter_config.json"


class AdapterRoots:
    """Directories under which ``<root>/<id>`` is an adapter; resolution never leaves the root."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [r.expanduser().resolve() for r in roots]

    @classmethod
    def parse(cls, spec: str) -> AdapterRoots:
        roots = [Path(part.strip()) for part in spec.split(",") if part.strip()]
        for root in roots:
            if not root.expanduser().is_dir():
                raise AdapterError("bad_config", f"adapter root {str(root)!r} is not a directory")
        return cls(roots)

    def find(self, adapter_id: str) -> Path:
        """The adapter's directory; any id that is not a plain relative name inside a root is not found."""
        problem = adapter_id_problem(adapter_id)
        if problem is None:
            for root in self.roots:
                found = self._inside(root, adapter_id)
                if found is not None:
                    return found
        # One message for every refusal: a caller learns nothing about the file system from it.
        raise AdapterError("not_found", f"adapter {adapter_id[:200]!r} not found")

    @staticmethod
    def _inside(root: Path, adapter_id: str) -> Path | None:
        candidate = root / adapter_id
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            return None
        if not resolved.is_relative_to(root) or not resolved.is_dir():
            return None
        # The files themselves must be regular files inside the root: a symlinked weight file pointing
        # elsewhere would otherwise be read.
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            path = resolved / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                return None
            if path.exists() and not path.is_file():
                return None
        if not (resolved / CONFIG_FILE).is_file():
            return None
        return resolved

    def discover(self, limit: int = 10_000) -> Iterator[str]:
        """Ids of the adapters present under the roots (folders holding an adapter_config.json).

        Symlinked folders are not walked (they may still be loaded by id when they stay inside the root).
        """
        seen = 0
        for root in self.roots:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                if CONFIG_FILE in filenames:
                    adapter_id = Path(dirpath).relative_to(root).as_posix()
                    if adapter_id != "." and adapter_id_problem(adapter_id) is None:
                        yield adapter_id
                        seen += 1
                        if seen >= limit:
                            return
