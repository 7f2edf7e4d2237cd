"""Where preloaded adapters come from: ``name=/dir``, ``/dir`` (name = folder name) or ``hub/id[@revision]``."""

from __future__ import annotations

from pathlib import Path

from loraplex.shard.hub import HubError, hub_snapshot
from loraplex.shard.lora.config import CONFIG_FILE, AdapterError
from loraplex.shard.lora.weights_file import WEIGHTS_FILE


def parse_adapter_specs(spec: str) -> list[tuple[str, str]]:
    """``--lora-adapters`` as (name, source) pairs, in order; names must be unique."""
    out: list[tuple[str, str]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if "=" in item:
            name, source = (x.strip() for x in item.split("=", 1))
        elif item.startswith(("/", ".", "~")):
            source = item
            name = Path(item).expanduser().name
        else:
            source = item
            name = item.split("@", 1)[0]
        if not name or not source:
            raise AdapterError("bad_config", f"cannot read adapter spec {item!r}; use name=/dir, /dir or hub/id")
        if name in (n for n, _ in out):
            raise AdapterError("bad_config", f"adapter name {name!r} is given twice")
        out.append((name, source))
    return out


def resolve_adapter_source(source: str) -> Path:
    """A local directory, else a hub id fetched through the ``huggingface_hub`` cache (offline honoured)."""
    local = Path(source).expanduser()
    if local.is_dir() or source.startswith(("/", ".", "~")):
        return local
    repo, _, revision = source.partition("@")
    try:
        return hub_snapshot(repo, [CONFIG_FILE, WEIGHTS_FILE], revision=revision or None)
    except HubError as exc:
        raise AdapterError(
            "not_found", f"adapter {source!r} is neither a local directory nor on the hub: {exc}"
        ) from exc
