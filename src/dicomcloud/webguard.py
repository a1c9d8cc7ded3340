"""ASGI middleware of the web role: the access log and the bearer-token guard.

Order, outermost first: ``AccessRecorder`` (sees every DICOMweb request, refused ones
included), CORS (so that a browser can read a 401), ``BearerGuard``, the routes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomcloud.accesslog import AccessEvent, AccessLog, clip
from dicomcloud.auth import READ, WRITE, Authenticator, Principal
from dicomcloud.config import Settings
from dicomcloud.errors import BackendError, Forbidden, Unauthorized

PRINCIPAL = "dicomcloud.principal"  # scope key: the verified token's Principal
_UNSAFE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')  # RFC 6750 3: error_description


def dicomweb_tenant(path: str, settings: Settings) -> str | None:
    """The tenant a path addresses (``{root}/...`` the default one, ``/tenants/{t}{root}/...``
    tenant ``t``), or None for a path outside DICOMweb (health probes)."""
    root = settings.web.root
    if path == root or path.startswith(root + "/"):
        return settings.default_tenant
    if path.startswith("/tenants/"):
        tenant, _, rest = path[9:].partition("/")
        rest = "/" + rest
        if tenant and (rest == root or rest.startswith(root + "/")):
            return tenant
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class BearerGuard:
    """Requires a valid bearer token (RFC 6750) on every path but the health probes and
    CORS preflights (OPTIONS); on DICOMweb paths also the right scope and tenant: read for
    GET/HEAD (QIDO-RS, WADO-RS), write for POST (STOW-RS). Paths that are not DICOMweb
    need a valid token too, so that no route added later is open by mistake."""

    OPEN = frozenset({"/healthz", "/readyz"})

    def __init__(self, app: ASGIApp, settings: Settings, authenticator: Authenticator) -> None:
        self.app = app
        self.settings = settings
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or \
                scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        tenant = dicomweb_tenant(scope["path"], self.settings)
        right = READ if scope["method"] in ("GET", "HEAD") else WRITE
        try:
            principal = await self.authenticator.authenticate(
                _header(scope, b"authorization"))
            if tenant is not None:
                principal.may(right, tenant, self.settings.auth)
        except Unauthorized as exc:  # 400 for a malformed request (RFC 6750 3.1)
            await self._refuse(send, 400 if exc.error == "invalid_request" else 401,
                               exc.message, exc.error)
            return
        except Forbidden as exc:
            await self._refuse(send, 403, exc.message, "insufficient_scope", exc.scope)
            return
        except BackendError as exc:  # the issuer's keys cannot be fetched
            await _json(send, 503, exc.message, [(b"retry-after", b"10")])
            return
        scope[PRINCIPAL] = principal
        await self.app(scope, receive, send)

    async def _refuse(self, send: Send, status: int, message: str, error: str,
                      scope: str = "") -> None:
        """401/403 with the RFC 6750 3 challenge."""
        challenge = f'Bearer realm="{self.settings.auth.realm}"'
        if error:
            challenge += f', error="{error}", error_description="{_UNSAFE.sub("", message)}"'
        if scope:
            challenge += f', scope="{scope}"'
        await _json(send, status, message, [(b"www-authenticate", challenge.encode())])


async def _json(send: Send, status: int, message: str,
                headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"status": status, "message": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})


class AccessRecorder:
    """Records one access event per DICOMweb request: who, tenant, route, UIDs, status,
    bytes each way, duration, client address. Also refuses, with 431 (RFC 6585 5), a request
    whose head is larger than ``web.max_header_bytes`` (the HTTP server checks only heads
    that arrive in several reads)."""

    def __init__(self, app: ASGIApp, settings: Settings, access_log: AccessLog | None,
                 routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.settings = settings
        self.access_log = access_log
        self.routes = routes  # to name the route of a request refused before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        app = self.app
        size = len(scope["raw_path"] or b"") + len(scope.get("query_string", b""))
        size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if size > self.settings.web.max_header_bytes:
            app = _too_large(size, self.settings.web.max_header_bytes)
        if scope["method"] == "OPTIONS" or self.access_log is None:
            await app(scope, receive, send)
            return
        tenant = dicomweb_tenant(scope["path"], self.settings)
        if tenant is None:
            await app(scope, receive, send)
            return
        if tenant not in self.settings.tenants:
            tenant = "(unknown)"  # a 404: what the client sent is not a tenant to record
        started = time.time()
        clock = time.perf_counter()
        counts = {"in": 0, "out": 0, "status": 500}

        async def receiving() -> Message:
            message = await receive()
            counts["in"] += len(message.get("body", b""))
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                counts["status"] = message["status"]
            elif message["type"] == "http.response.body":
                counts["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await app(scope, receiving, sending)
        finally:
            self.access_log.record(self._event(scope, tenant, counts, clock), started)

    def _event(self, scope: Scope, tenant: str, counts: dict[str, int],
               clock: float) -> AccessEvent:
        route = scope.get("route")
        template = str(getattr(route, "path", ""))
        params: dict[str, Any] = scope.get("path_params") or {}
        if not template:  # refused before routing (401/403), or no such route (404)
            template, params = _resolve(self.routes, scope)
        principal: Principal | None = scope.get(PRINCIPAL)
        client = scope.get("client")
        return AccessEvent(
            tenant_id=tenant, protocol="DICOMweb", service=_service(scope["method"], template),
            route=template, method=scope["method"], status=counts["status"],
            client_ip=client[0] if client else None,
            study_uid=_uid(params.get("study")), series_uid=_uid(params.get("series")),
            sop_uid=_uid(params.get("sop")),
            bytes_in=counts["in"], bytes_out=counts["out"],
            duration_ms=round((time.perf_counter() - clock) * 1000, 3),
            principal=clip(principal.subject) if principal else None,
            client_id=clip(principal.client_id) if principal else None,
            user_agent=clip(_header(scope, b"user-agent")))


def _too_large(size: int, limit: int) -> ASGIApp:
    """An app answering 431 Request Header Fields Too Large."""
    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await _json(send, 431, f"request line and headers of {size} bytes exceed the limit "
                    f"of {limit} bytes (web.max_header_bytes)", [(b"connection", b"close")])
    return refuse


def _resolve(routes: Sequence[BaseRoute], scope: Scope) -> tuple[str, dict[str, Any]]:
    """The route template and path parameters a request would have been routed to."""
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        if isinstance(route, Mount):
            return _resolve(route.routes, {**scope, **child})
        if isinstance(route, Route):
            return route.path, dict(child.get("path_params", {}))
    return "(no route)", {}


def _service(method: str, template: str) -> str:
    if method == "POST":
        return "STOW-RS"
    if template.endswith(("/studies", "/series", "/instances")):
        return "QIDO-RS"
    return "WADO-RS"


def _uid(value: Any) -> str | None:
    """A path UID as logged: at most 64 characters (a hostile one is cut, not trusted)."""
    return str(value)[:64] if value is not None else None
