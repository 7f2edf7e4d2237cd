"""Tenants from ``--api-keys-file``: who may call, and which adapters (ids or globs) each key may use."""

from __future__ import annotations

import fnmatch
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("loraplex.router")


SHORT_KEY = 16  # characters; shorter keys are accepted with a warning


def _usable(key: str) -> bool:
    """A key a client can send in ``Authorization: Bearer <key>``: printable, no spaces."""
    return bool(key) and key.isprintable() and not any(c.isspace() for c in key)


class TenancyError(ValueError):
    """The API-keys file is missing or malformed."""


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: tuple[str, ...]
    base: bool = True

    def allows(self, adapter_id: str) -> bool:
        """May this tenant use ``adapter_id`` ("" is the base model)?"""
        if not adapter_id:
            return self.base
        return any(fnmatch.fnmatchcase(adapter_id, pattern) for pattern in self.adapters)


class Tenants:
    """Keys to tenants; ``None`` in place of a Tenants object means an open server (no keys file)."""

    def __init__(self, by_key: dict[str, Tenant]) -> None:
        self._by_key = by_key

    @classmethod
    def from_file(cls, path: Path) -> Tenants:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise TenancyError(f"cannot read --api-keys-file {str(path)!r}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise TenancyError(f"--api-keys-file {str(path)!r} is not valid YAML: {exc}") from exc
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str = "the API-keys file") -> Tenants:
        entries = raw.get("tenants") if isinstance(raw, dict) else None
        if not isinstance(entries, list) or not entries:
            raise TenancyError(f"{where} needs a non-empty `tenants` list")
        by_key: dict[str, Tenant] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise TenancyError(f"{where}: tenant {i} must be an object")
            name, keys, adapters = entry.get("name"), entry.get("keys"), entry.get("adapters", [])
            base = entry.get("base", True)
            if not isinstance(name, str) or not name:
                raise TenancyError(f"{where}: tenant {i} needs a `name`")
            # Any length is accepted (SPEC §7's own example keys are 7 characters); the router logs a warning
            # for keys shorter than SHORT_KEY, which a client could guess.
            if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and _usable(k) for k in keys):
                raise TenancyError(f"{where}: tenant {name!r} needs `keys`, non-empty strings without spaces")
            if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
                raise TenancyError(f"{where}: tenant {name!r}: `adapters` must be a list of ids or globs")
            if not isinstance(base, bool):
                raise TenancyError(f"{where}: tenant {name!r}: `base` must be true or false")
            tenant = Tenant(name, tuple(adapters), base)
            for key in keys:
                if key in by_key:
                    raise TenancyError(f"{where}: a key of tenant {name!r} is also given to {by_key[key].name!r}")
                by_key[key] = tenant
        short = sorted({t.name for k, t in by_key.items() if len(k) < SHORT_KEY})
        if short:
            log.warning("tenants with keys shorter than %d characters (guessable): %s", SHORT_KEY, ", ".join(short))
        return cls(by_key)

    def for_authorization(self, header: str | None) -> Tenant | None:
        """The tenant whose key is in an ``Authorization: Bearer <key>`` header, or None."""
        key = bearer(header)
        if key is None:
            return None
        found = None
        for candidate, tenant in self._by_key.items():  # compare every key: timing tells nothing
            if hmac.compare_digest(candidate.encode(), key.encode()):
                found = tenant
        return found


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def is_admin(header: str | None, admin_token: str) -> bool:
    key = bearer(header)
    return bool(admin_token) and key is not None and hmac.compare_digest(key.encode(), admin_token.encode())
