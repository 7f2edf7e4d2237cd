"""An ASGI guard: the admin token for adapter admin, a tenant's API key everywhere else but the probes."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from loraplex.router.admin_api import ADMIN_PREFIXES
from loraplex.router.settings import RouterSettings
from loraplex.router.tenancy import Tenants, is_admin

# Probes and scrapers carry no key.
OPEN_PATHS = ("/health", "/metrics")


def is_admin_path(path: str) -> bool:
    """The adapter admin API (SPEC §4 ``/adapters``, its alias ``/admin/adapters``) and anything else under
    ``/admin``: whole path segments only, so that a route named ``/adapters-x`` would not be caught."""
    return (
        path == "/admin"
        or path.startswith("/admin/")
        or any(path == prefix or path.startswith(prefix + "/") for prefix in ADMIN_PREFIXES)
    )


def refusal(path: str, status: int, error_type: str, message: str) -> JSONResponse:
    """An error in the shape of the API that ``path`` belongs to (OpenAI's under /v1/, TGI's elsewhere)."""
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": error_type, "param": None, "code": error_type}}
        return JSONResponse(body, status_code=status)
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status)


class Authenticate:
    """Checks the ``Authorization`` header before any route runs and puts the caller's tenant in
    ``request.state.tenant``.

    Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: that one re-streams every response body
    through a memory channel and a task, which costs the router CPU on each streamed token (on a 2-core
    machine every core-millisecond taken from the shard's OpenMP team costs it about two).
    """

    def __init__(self, app: ASGIApp, settings: RouterSettings, tenants: Tenants | None) -> None:
        self.app = app
        self.settings = settings
        self.tenants = tenants

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        header = Headers(scope=scope).get("authorization")  # the first one, as ``request.headers`` gives it
        refused = None
        admin_path = is_admin_path(path)
        # SPEC §4: a tenant key may list the adapters (its own only), as /v1/models does; the admin token lists all.
        listing = admin_path and scope.get("method") in ("GET", "HEAD") and path in ADMIN_PREFIXES
        if admin_path and is_admin(header, self.settings.admin_token):
            pass
        elif admin_path and not listing:
            if not self.settings.admin_token:
                refused = refusal(path, 403, "forbidden", "the admin API is off: start the router with --admin-token")
            else:
                refused = refusal(path, 401, "unauthorized", "the admin token is required (Authorization: Bearer)")
        elif self.tenants is not None and path not in OPEN_PATHS:
            tenant = self.tenants.for_authorization(header)
            if tenant is None:
                refused = refusal(path, 401, "unauthorized", "a valid API key is required (Authorization: Bearer)")
            else:
                scope.setdefault("state", {})["tenant"] = tenant
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)
