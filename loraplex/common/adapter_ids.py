"""Adapter ids are network input: the one syntax that may ever become a path under an adapter root."""

from __future__ import annotations

import re

MAX_ADAPTER_ID_LENGTH = 200
# ASCII only (no look-alike or normalising unicode), segments start with a letter or digit (no ".", "..",
# hidden files or leading "-"), "/" only between segments (no absolute paths, no "//"), no "\\" or ":"
# (no Windows paths, drive letters or URL schemes).
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ID = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT}){{0,7}}")


def adapter_id_problem(adapter_id: str) -> str | None:
    """Why ``adapter_id`` can never name an adapter, or None when its syntax is acceptable."""
    if not adapter_id:
        return "the adapter id is empty"
    if len(adapter_id) > MAX_ADAPTER_ID_LENGTH:
        return f"the adapter id is longer than {MAX_ADAPTER_ID_LENGTH} characters"
    if not _ID.fullmatch(adapter_id):
        return "the adapter id must be letters, digits, '.', '_' and '-' in '/'-separated segments"
    if any(part.strip(".") == "" or part.endswith(".") for part in adapter_id.split("/")):
        return "an adapter id segment may not end with '.'"
    return None
