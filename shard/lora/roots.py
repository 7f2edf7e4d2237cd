"""Adapter roots: where an id that was not preloaded may be found, with nothing outside them reachable."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from loraplex.common.adapter_ids import adapter_id_problem
from loraplex.shard.hub import HubError, hub_snapshot
from loraplex.shard.lora.config import CONFIG_FILE, AdapterError
from loraplex.shard.lora.weights_file import WEIGHTS_FILE

# In --adapter-dirs, this entry lets an "owner/name" id resolve in the huggingface_hub cache.
HUB_CACHE = "hf-cache"


class AdapterRoots:
    """Directories under which ``<root>/<id>`` is an adapter; resolution never leaves the root."""

    def __init__(self, roots: list[Path], hub_cache: bool = False) -> None:
        self.roots = [r.expanduser().resolve() for r in roots]
        self.hub_cache = hub_cache

    @classmethod
    def parse(cls, spec: str) -> AdapterRoots:
        parts = [part.strip() for part in spec.split(",") if part.strip()]
        roots = [Path(part) for part in parts if part != HUB_CACHE]
        for root in roots:
            if not root.expanduser().is_dir():
                raise AdapterError("bad_config", f"adapter root {str(root)!r} is not a directory")
        return cls(roots, hub_cache=HUB_CACHE in parts)

    def find(self, adapter_id: str) -> Path:
        """The adapter's directory; any id that is not a plain relative name inside a root is not found."""
        problem = adapter_id_problem(adapter_id)
        if problem is None:
            for root in self.roots:
                found = self._inside(root, adapter_id)
                if found is not None:
                    return found
            if self.hub_cache and adapter_id.count("/") == 1:
                found = _in_hub_cache(adapter_id)
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


def _in_hub_cache(repo_id: str) -> Path | None:
    """The cached snapshot of hub repo ``repo_id``, never downloaded: a request must not make us fetch."""
    try:
        snapshot = hub_snapshot(repo_id, [CONFIG_FILE, WEIGHTS_FILE], local_only=True).resolve()
    except HubError:
        return None
    # The cache's snapshot files are symlinks into its blobs folder: both stay inside the cache.
    cache = snapshot.parent.parent.parent
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = snapshot / name
        if path.exists() and not (path.is_file() and path.resolve().is_relative_to(cache)):
            return None
    return snapshot if (snapshot / CONFIG_FILE).is_file() else None
