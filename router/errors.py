"""Errors every public API shares, with their HTTP status and TGI ``error_type``."""

from __future__ import annotations


class ApiError(Exception):
    """An error with its HTTP status and TGI ``error_type``; gRPC maps the status to a status code."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def adapter_not_found(adapter_id: str) -> ApiError:
    """One answer for missing, forbidden and malformed ids alike: none of them tells anything apart."""
    shown = adapter_id if len(adapter_id) <= 200 else adapter_id[:200] + "…"
    return ApiError(404, "adapter_not_found", f"adapter {shown!r} not found")
