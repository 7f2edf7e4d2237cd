"""An ASGI guard: request bodies over a byte limit get 413 before anyone parses them."""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Refuse bodies over ``max_bytes``: by Content-Length at once, or as soon as a streamed body passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, send)
            return
        # Read the whole body before the app runs: then an oversized one is refused before anything parses
        # it, whatever middleware or task group would otherwise wrap an error raised mid-read.
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send)
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects are still seen

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        message = f"request body larger than {self.max_bytes} bytes"
        if str(scope.get("path", "")).startswith("/v1/"):
            payload: dict[str, Any] = {
                "error": {"message": message, "type": "invalid_request_error", "code": "too_large"}
            }
        else:
            payload = {"error": message, "error_type": "validation"}
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
