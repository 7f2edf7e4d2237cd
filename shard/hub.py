"""Hugging Face hub snapshots through ``huggingface_hub``'s cache (offline mode honoured), errors in one type."""

from __future__ import annotations

from pathlib import Path


class HubError(Exception):
    """The snapshot is neither in the cache nor downloadable; the message is the hub's own."""


def hub_snapshot(
    repo_id: str, allow_patterns: list[str], *, revision: str | None = None, local_only: bool = False
) -> Path:
    """The local snapshot of ``repo_id`` (the files matching ``allow_patterns``); ``local_only`` never fetches."""
    # Imported here: only hub ids need it, and it is slow to import.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=local_only)
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise HubError(str(exc)) from exc
