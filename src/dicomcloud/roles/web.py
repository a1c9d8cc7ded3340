"""Role ``web``: DICOMweb (PS3.18) over HTTP, a starlette app served by hypercorn.

Routes under the configurable root (default ``/dicomweb``):

- ``POST /studies``, ``POST /studies/{study}``: STOW-RS (PS3.18 10.5)
- ``GET /studies``, ``/series``, ``/instances``, ``/studies/{study}/series``,
  ``/studies/{study}/instances``, ``/studies/{study}/series/{series}/instances``:
  QIDO-RS (PS3.18 10.6)

and, outside the root, ``GET /healthz`` (the process serves) and ``GET /readyz`` (its
backends answer). Every ``DicomCloudError`` becomes its HTTP status with a JSON message;
anything else a 500 that shows no internals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import socket
from typing import Any

import orjson
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from dicomcloud.errors import BackendError, BadRequest, DicomCloudError, PayloadTooLarge
from dicomcloud.ingest import Origin
from dicomcloud.qido import to_json
from dicomcloud.query import Level, Query, parse_qido
from dicomcloud.runtime import Runtime
from dicomcloud.stow import StowReceiver, parse_content_type, response_body
from dicomcloud.uids import is_valid_uid

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
_FEED_BYTES = 1 << 20  # hand the parser at least this much per thread hop
_QIDO_TTL = 60.0


def _error(status: int, message: str) -> Response:
    return JSONResponse({"status": status, "message": message}, status_code=status)


class DicomWeb:
    """Request handlers bound to a runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        # Cached QIDO results are invalidated by the consumer: only a cache it shares
        # (Redis, or the in-process one when the consumer runs in this process) is safe.
        self.cache_qido = runtime.cache_shared or "consumer" in runtime.settings.roles

    def base_url(self, request: Request) -> str:
        return str(request.base_url).rstrip("/") + self.settings.web.root

    def tenant(self, request: Request) -> str:
        return self.settings.default_tenant

    # -- STOW-RS ------------------------------------------------------------------------
    async def stow(self, request: Request) -> Response:
        study_uid = request.path_params.get("study")
        limit = self.settings.web.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of "
                                  f"{limit} bytes (web.max_upload_bytes)")
        boundary = parse_content_type(request.headers.get("content-type", ""))
        if study_uid is not None and not is_valid_uid(study_uid):
            raise BadRequest(f"invalid study UID in the path: {study_uid[:70]!r}")
        client = request.client.host if request.client else None
        receiver = StowReceiver(self.runtime.ingestor, Origin(self.tenant(request), None, client),
                                boundary, study_uid, limit)
        try:
            pending: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                pending.append(chunk)
                size += len(chunk)
                if size >= _FEED_BYTES:
                    await asyncio.to_thread(receiver.feed, b"".join(pending))
                    pending, size = [], 0
            if pending:
                await asyncio.to_thread(receiver.feed, b"".join(pending))
            results = await asyncio.to_thread(receiver.finish)
        except BaseException:
            await asyncio.to_thread(receiver.abort)
            raise
        stored = [r.stored for r in results if r.stored is not None]
        await self.runtime.ingestor.announce(stored)
        status, body = response_body(results, self.base_url(request), study_uid)
        return Response(orjson.dumps(body), status_code=status, media_type=DICOM_JSON)

    # -- QIDO-RS ------------------------------------------------------------------------
    async def search(self, request: Request, level: Level) -> Response:
        """QIDO-RS (PS3.18 10.6). No match is 200 with an empty array (CP-2473)."""
        tenant = self.tenant(request)
        web = self.settings.web
        query, warnings = parse_qido(
            tenant, level, request.query_params.multi_items(),
            study_uid=request.path_params.get("study"),
            series_uid=request.path_params.get("series"),
            default_limit=web.qido_default_limit, max_limit=web.qido_max_limit)
        base = self.base_url(request)
        key = await self._cache_key(tenant, level, request, base) if self.cache_qido else None
        cached = await self.runtime.cache.get(key) if key else None
        if cached is not None:
            more, body = cached[:1] == b"1", cached[1:]
        else:
            probe = dataclasses.replace(query, limit=query.limit + 1)
            rows = await self.runtime.index.search(probe)
            more = len(rows) > query.limit
            body = orjson.dumps([to_json(query, r, base) for r in rows[:query.limit]])
            if key:
                await self.runtime.cache.set(key, (b"1" if more else b"0") + body, _QIDO_TTL)
        headers = {}
        if more:
            warnings.append('299 dicomcloud "There are additional results that can be '
                            'requested with offset"')
        if warnings:
            headers["Warning"] = ", ".join(warnings)
        return Response(body, media_type=DICOM_JSON, headers=headers)

    async def _cache_key(self, tenant: str, level: str, request: Request, base: str) -> str:
        generation = await self.runtime.generation(tenant)
        digest = hashlib.blake2b(
            f"{base}|{request.url.path}|{request.url.query}".encode(), digest_size=16
        ).hexdigest()
        return f"qido:{tenant}:{generation}:{level}:{digest}"

    # -- health -------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            await self.runtime.index.search(
                Query(self.settings.default_tenant, "study", limit=1))
        except DicomCloudError as exc:
            return _error(503, f"index not ready: {exc.message}")
        if reasons := self.runtime.not_ready():
            return _error(503, "not ready: " + "; ".join(reasons))
        return JSONResponse({"status": "ready", "roles": list(self.settings.roles)})


def create_app(runtime: Runtime) -> Starlette:
    """The starlette application of the web role."""
    web = DicomWeb(runtime)

    def level(name: Level) -> Any:
        async def endpoint(request: Request) -> Response:
            return await web.search(request, name)
        return endpoint

    dicomweb = [
        Route("/studies", web.stow, methods=["POST"]),
        Route("/studies/{study}", web.stow, methods=["POST"]),
        Route("/studies", level("study"), methods=["GET"]),
        Route("/series", level("series"), methods=["GET"]),
        Route("/instances", level("instance"), methods=["GET"]),
        Route("/studies/{study}/series", level("series"), methods=["GET"]),
        Route("/studies/{study}/instances", level("instance"), methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances", level("instance"),
              methods=["GET"]),
    ]
    routes = [
        Route("/healthz", web.healthz),
        Route("/readyz", web.readyz),
        Mount(runtime.settings.web.root, routes=dicomweb),
    ]

    async def dicom_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DicomCloudError)
        if exc.http_status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return _error(exc.http_status, exc.message)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error; the archive logged the details")

    return Starlette(routes=routes, exception_handlers={
        DicomCloudError: dicom_error, Exception: unexpected})


def hypercorn_config(runtime: Runtime) -> HypercornConfig:
    """Hypercorn settings of the web role."""
    s = runtime.settings.web
    config = HypercornConfig()
    config.graceful_timeout = s.graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.include_server_header = False
    return config


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    """The listening socket, bound here so that readiness is known (hypercorn takes the fd)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise BackendError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror}; "
                           "is another server using the port? (web.port / --http-port)") from exc
    sock.listen(1024)
    return sock


async def run(runtime: Runtime, stop: asyncio.Event) -> None:
    """Serve HTTP until ``stop``; in-flight requests finish (``graceful_timeout``)."""
    s = runtime.settings.web
    config = hypercorn_config(runtime)
    sock = _listen(s.host, s.port, s.reuse_port)
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the descriptor from here
    log.info("DICOMweb on http://%s:%d%s", s.host, s.port, s.root)
    runtime.mark_listening()
    await hypercorn_serve(create_app(runtime), config,  # type: ignore[arg-type]
                          shutdown_trigger=stop.wait)
