"""Role ``web``: DICOMweb (PS3.18) over HTTP, a starlette app served by hypercorn.

Routes under the configurable root (default ``/dicomweb``):

- ``POST /studies``, ``POST /studies/{study}``: STOW-RS (PS3.18 10.5)
- ``GET /studies``, ``/series``, ``/instances``, ``/studies/{study}/series``,
  ``/studies/{study}/instances``, ``/studies/{study}/series/{series}/instances``:
  QIDO-RS (PS3.18 10.6)
- ``GET /studies/{study}[/series/{series}[/instances/{sop}]]``: WADO-RS retrieve, and the
  same with ``/metadata``; ``.../instances/{sop}/frames/{list}`` and
  ``.../instances/{sop}/bulkdata/{tag}`` (PS3.18 10.4; see ``wado.py``)

and, outside the root, ``GET /healthz`` (the process serves) and ``GET /readyz`` (its
backends answer). Every ``DicomCloudError`` becomes its HTTP status with a JSON message;
anything else a 500 that shows no internals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import IO, Any, TypeVar
from wsgiref.handlers import format_date_time

import orjson
import pydicom
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from pydicom.uid import UID, ExplicitVRLittleEndian
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomcloud import rendered as render
from dicomcloud import wado
from dicomcloud.accesslog import AccessLog
from dicomcloud.auth import Authenticator
from dicomcloud.dicomjson import stored_documents
from dicomcloud.errors import (
    BackendError,
    BadRequest,
    ClientGone,
    DicomCloudError,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
)
from dicomcloud.header import PIXEL_TAGS
from dicomcloud.ingest import Origin
from dicomcloud.model import InstanceKey, InstanceRow
from dicomcloud.qido import to_json
from dicomcloud.query import Level, Query, parse_qido
from dicomcloud.runtime import Runtime
from dicomcloud.stow import StowReceiver, parse_content_type, response_body
from dicomcloud.uids import is_valid_uid
from dicomcloud.webguard import AccessRecorder, BearerGuard

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
_FEED_BYTES = 1 << 20  # hand the parser at least this much per thread hop
_QIDO_TTL = 60.0
_CHUNK = 256 * 1024  # WADO-RS: bytes read per thread hop while streaming a large file
_WHOLE = 4 * 1024 * 1024  # files up to this size are read in one piece
_T = TypeVar("_T")
_HOST_RE = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,255}")  # X-Forwarded-Host: a host[:port]
_BULK_PATH = re.compile(r"([0-9A-Fa-f]{8}/\d{1,6}/)*[0-9A-Fa-f]{8}")
_PREFIX_RE = re.compile(r"(/[A-Za-z0-9._~\-]+)*")  # X-Forwarded-Prefix: path segments


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
        """The DICOMweb root as the client reached it; behind a trusted proxy, as the
        proxy's X-Forwarded-Proto/-Host/-Prefix say (first value of each)."""
        base = str(request.base_url).rstrip("/")
        if self.settings.web.trust_forwarded_headers:
            headers = request.headers

            def first(name: str) -> str | None:
                value = headers.get(name)
                return value.split(",")[0].strip() if value else None

            proto = first("x-forwarded-proto") or request.url.scheme
            host = first("x-forwarded-host") or request.url.netloc
            prefix = (first("x-forwarded-prefix") or "").rstrip("/")
            if proto in ("http", "https") and _HOST_RE.fullmatch(host) and \
                    _PREFIX_RE.fullmatch(prefix):
                base = f"{proto}://{host}{prefix}"
        if "tenant" in request.path_params:  # a tenant's own root
            return f"{base}/tenants/{self.tenant(request)}{self.settings.web.root}"
        return base + self.settings.web.root

    def tenant(self, request: Request) -> str:
        """The tenant addressed: the default one at the DICOMweb root, any known tenant
        under ``/tenants/{tenant}{root}`` (404 for an unknown one)."""
        tenant = request.path_params.get("tenant")
        if tenant is None:
            return self.settings.default_tenant
        if tenant not in self.settings.tenants:
            raise NotFound(f"no tenant {tenant[:64]!r} here")
        return str(tenant)

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
                                boundary, study_uid, limit, max_parts=self.settings.web.max_parts,
                                max_part_bytes=self.settings.web.max_part_bytes)
        idle = self.settings.web.idle_timeout
        chunks = request.stream().__aiter__()
        try:
            pending: list[bytes] = []
            size = 0
            while True:
                try:
                    async with asyncio.timeout(idle):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise RequestTimeout(
                        f"no part of the request body arrived for {idle:g} s "
                        "(web.idle_timeout); nothing was stored, send it again") from None
                except ClientDisconnect:
                    raise ClientGone("the client went away before the end of the request "
                                     "body; nothing was stored") from None
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

    async def _cache_key(self, tenant: str, level: str, request: Request,
                         base: str) -> str | None:
        """The cache key of a QIDO-RS result; None (do not cache) when the cache cannot
        tell the tenant's generation."""
        generation = await self.runtime.generation(tenant)
        if generation is None:
            return None
        digest = hashlib.blake2b(
            f"{base}|{request.url.path}|{request.url.query}".encode(), digest_size=16
        ).hexdigest()
        return f"qido:{tenant}:{generation}:{level}:{digest}"

    # -- WADO-RS ------------------------------------------------------------------------
    @staticmethod
    def _path_uids(request: Request) -> tuple[str, str | None, str | None]:
        """Study, series and SOP Instance UIDs of the path; 400 for a malformed one."""
        params = request.path_params
        uids = [params.get(k) for k in ("study", "series", "sop")]
        for uid in uids:
            if uid is not None and not is_valid_uid(uid):
                raise BadRequest(f"invalid UID in the path: {uid[:70]!r}")
        study, series, sop = uids
        assert study is not None
        return study, series, sop

    async def _rows(self, request: Request) -> list[InstanceRow]:
        """Instances addressed by the path; 400 for a malformed UID, 404 for none."""
        study, series, sop = self._path_uids(request)
        rows = await self.runtime.index.instances(self.tenant(request), study, series, sop)
        if not rows:
            raise NotFound("no such " + ("instance" if sop else "series" if series
                                         else "study"))
        return rows

    async def _instance_work(self, request: Request, work: Callable[[str], _T]) -> _T:
        """Run ``work(file path)`` for the instance addressed by the path.

        The file work starts on the layout path (PS3.18 URLs name the UIDs it is built
        from) while the index is asked whether the instance exists and where its file is:
        the two overlap. The early result is used only when the index confirms that path.
        An index that looks up on a worker thread (SQLite) does the work on the same thread
        right after the lookup instead: one hand-off rather than two.
        """
        study, series, sop = self._path_uids(request)
        assert series is not None and sop is not None
        tenant = self.tenant(request)
        index = self.runtime.index
        if index.lookups_on_thread:  # the lookup's worker thread goes on with the work

            def after_lookup(row: InstanceRow | None) -> _T:
                if row is None:
                    raise NotFound("no such instance")
                return work(row.file_path)

            return await index.with_instance(tenant, study, series, sop, after_lookup)
        path = InstanceKey(tenant, study, series, sop).relative_path
        early = asyncio.ensure_future(asyncio.to_thread(work, path))
        early.add_done_callback(_consume)
        rows = await self.runtime.index.instances(tenant, study, series, sop)
        if not rows:
            raise NotFound("no such instance")
        if rows[0].file_path == path:
            return await early
        return await asyncio.to_thread(work, rows[0].file_path)

    def _open(self, path: str) -> IO[bytes]:
        """A stored file; 404 when it is indexed but missing (logged)."""
        try:
            return self.runtime.storage.open(path)
        except FileNotFoundError:
            log.error("WADO: %s is indexed but missing on disk", path)
            raise NotFound("the instance's file is missing; the archive logged it") from None

    def _read(self, path: str) -> bytes:
        with self._open(path) as fh:
            return fh.read()

    async def retrieve(self, request: Request) -> Response:
        """WADO-RS retrieve of a study, series or instance (PS3.18 10.4.1.1.1)."""
        single = "sop" in request.path_params
        ranges = wado.parse_accept(request.headers.get("accept"))
        if single:
            return await self._instance_work(
                request, lambda path: self._retrieve_one(path, ranges))
        rows = await self._rows(request)
        choice = wado.choose_dicom(ranges, single_allowed=single,
                                   stored=frozenset(r.transfer_syntax_uid for r in rows))
        boundary = wado.new_boundary()

        async def parts() -> AsyncIterator[bytes]:
            for row in rows:
                as_stored = choice.transfer_syntax in (wado.ANY, row.transfer_syntax_uid)
                try:  # the status is sent: an instance that fails is left out, and logged
                    if as_stored and row.file_size <= _WHOLE:  # one thread hop per file
                        data = await asyncio.to_thread(self._read, row.file_path)
                        yield wado.part_head(boundary, "application/dicom; transfer-syntax="
                                             + row.transfer_syntax_uid) + data
                    elif as_stored:  # large files in pieces: never a whole one in memory
                        fh = await asyncio.to_thread(self._open, row.file_path)
                        try:
                            yield wado.part_head(boundary, "application/dicom; transfer-syntax="
                                                 + row.transfer_syntax_uid)
                            while chunk := await asyncio.to_thread(fh.read, _CHUNK):
                                yield chunk
                        finally:
                            fh.close()
                    else:
                        data, syntax = await asyncio.to_thread(self._instance_bytes, row,
                                                               choice)
                        yield wado.part_head(boundary,
                                             f"application/dicom; transfer-syntax={syntax}")
                        yield data
                except DicomCloudError as exc:
                    log.error("WADO: %s left out of a retrieve: %s", row.file_path,
                              exc.message)
                    continue
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        return StreamingResponse(parts(), media_type=wado.multipart_type(
            boundary, "application/dicom", choice.transfer_syntax))

    def _retrieve_one(self, path: str, ranges: list[wado.MediaRange]) -> Response:
        """One instance, in one piece (single part or a one-part multipart)."""
        data = self._read(path)
        stored = wado.file_syntax(data)
        choice = wado.choose_dicom(ranges, single_allowed=True, stored=frozenset({stored}))
        syntax = stored
        if choice.transfer_syntax not in (wado.ANY, stored):
            data, syntax = wado.transcode(data, choice.transfer_syntax)
        content_type = f"application/dicom; transfer-syntax={syntax}"
        if not choice.multipart:
            return Response(data, media_type=content_type)
        return _multipart([(content_type, data)], choice.transfer_syntax)

    def _instance_bytes(self, row: InstanceRow, choice: wado.Choice) -> tuple[bytes, str]:
        """The file of ``row`` in the chosen transfer syntax, and that syntax."""
        data = self._read(row.file_path)
        if choice.transfer_syntax in (wado.ANY, row.transfer_syntax_uid):
            return data, row.transfer_syntax_uid
        return wado.transcode(data, choice.transfer_syntax)

    async def metadata(self, request: Request) -> Response:
        """WADO-RS metadata (PS3.18 10.4.1.1.2): pre-generated when current, else live."""
        if not any(wado._matches(r.mime, DICOM_JSON) or r.mime == "application/json"
                   for r in wado.parse_accept(request.headers.get("accept"))):
            raise NotAcceptable("metadata is served as application/dicom+json")
        rows = await self._rows(request)
        tenant, params = self.tenant(request), request.path_params
        body = None
        if "sop" not in params:
            study, series = params["study"], params.get("series")
            if await self.runtime.index.metadata_current(tenant, study, series):
                path = f"{tenant}/{study}/{series}.json" if series else f"{tenant}/{study}.json"
                body = await asyncio.to_thread(self.runtime.storage.read_metadata, path)
        if body is None:
            body = (await asyncio.to_thread(stored_documents, self.runtime.storage,
                                            [r.file_path for r in rows]))[0]
        base = self.base_url(request).encode()
        body = body.replace(b'"BulkDataURI":"studies/', b'"BulkDataURI":"' + base + b"/studies/")
        tag = wado.etag(body)
        coding = wado.content_coding(body, request.headers.get("accept-encoding"))
        # a compressed body is another representation: its validator is the weak form
        headers = {"ETag": f"W/{tag}" if coding else tag, "Cache-Control": "no-cache",
                   "Vary": "Accept-Encoding"}
        if wado.etag_matches(request.headers.get("if-none-match"), tag):
            return Response(status_code=304, headers=headers)  # nothing to compress
        if coding:
            body = await asyncio.to_thread(wado.encode, body, coding)
            headers["Content-Encoding"] = coding
        return Response(body, media_type=DICOM_JSON, headers=headers)

    async def frames(self, request: Request) -> Response:
        """WADO-RS frames (PS3.18 10.4.1.1.3), cut from the file by offset or fragment."""
        numbers = wado.parse_frame_list(request.path_params["frames"])
        ranges = wado.parse_accept(request.headers.get("accept"))
        study, series, sop = self._path_uids(request)
        assert series is not None and sop is not None

        def cut(row: InstanceRow | None) -> tuple[str, list[tuple[str, bytes]]]:
            if row is None:
                raise NotFound("no such instance")
            found = None
            if row.pixel_offset is not None and row.frame_size:  # found by the consumer
                found = self._native_frames(row, numbers, ranges)
            if found is None:  # compressed, bit-packed, or the file changed since indexing
                found = self._frames(row.file_path, numbers, ranges)
            return found

        syntax, parts = await self.runtime.index.with_instance(
            self.tenant(request), study, series, sop, cut)
        return _multipart(parts, syntax)

    def _native_frames(self, row: InstanceRow, numbers: list[int],
                       ranges: list[wado.MediaRange]
                       ) -> tuple[str, list[tuple[str, bytes]]] | None:
        """Frames of uncompressed little-endian pixel data at the offsets the index holds:
        as stored and as native they are the same bytes (PS3.18 8.7.3.5.2). None when
        the file is not the one indexed (re-sent and not yet re-indexed): same size and
        a Pixel Data element header right before the offset, or the header is read."""
        mode, syntax = _frame_mode(ranges, row.transfer_syntax_uid)
        wado.check_frames(numbers, row.number_of_frames)
        label = row.transfer_syntax_uid if mode == "stored" else syntax
        content_type = f"application/octet-stream; transfer-syntax={label}"
        assert row.pixel_offset is not None and row.frame_size is not None
        size, offset = row.frame_size, row.pixel_offset
        with self._open(row.file_path) as fh:
            if os.fstat(fh.fileno()).st_size != row.file_size or offset < 12:
                return None
            fh.seek(offset - 12)
            head = fh.read(12)
            if not (head[4:8] == b"\xe0\x7f\x10\x00" or head[:4] == b"\xe0\x7f\x10\x00"):
                return None  # (7FE0,0010) implicit (tag, length) or explicit (tag, VR, length)
            return syntax, [(content_type, wado.read_pieces(
                fh, [(offset + (n - 1) * size, size)])) for n in numbers]

    def _frames(self, path: str, numbers: list[int],
                ranges: list[wado.MediaRange]) -> tuple[str, list[tuple[str, bytes]]]:
        """The transfer syntax label and the parts (content type, bytes) of the frames."""
        with self._open(path) as fh:
            ds, at, fh = wado.read_file_header(fh)
            mode, syntax = _frame_mode(ranges, wado.stored_syntax(ds))
            layout = wado.pixel_layout(fh, ds, at)
            if layout is None:
                raise NotFound("the instance has no pixel data")
            stored = layout.syntax
            native_le = not layout.encapsulated and stored != "1.2.840.10008.1.2.2"
            if native_le and layout.frame_size is None:  # bit-packed, not byte aligned
                label = stored if mode == "stored" else syntax
                return syntax, [(f"application/octet-stream; transfer-syntax={label}", data)
                                for data in wado.bit_frames(fh, layout, numbers)]
            if mode == "stored" or native_le:
                pieces = wado.frame_ranges(fh, layout, numbers)
                if layout.encapsulated:
                    kind = wado.FRAME_MEDIA_TYPES.get(stored, "application/octet-stream")
                    content_type = f"{kind}; transfer-syntax={stored}"
                else:
                    label = stored if mode == "stored" else syntax
                    content_type = f"application/octet-stream; transfer-syntax={label}"
                return syntax, [(content_type, wado.read_pieces(fh, frame))
                                for frame in pieces]
            wado.check_frames(numbers, layout.frames)
            fh.seek(0)
            data = fh.read()
            bits = int(ds.get("BitsAllocated") or 8)
        content_type = f"application/octet-stream; transfer-syntax={syntax}"
        return syntax, [(content_type, wado.decode_frame(data, n, bits)) for n in numbers]

    async def bulkdata(self, request: Request) -> Response:
        """WADO-RS bulk data (PS3.18 10.4.1.1.4): the targets of our BulkDataURIs,
        ``{tag}`` or ``{sequence}/{item}/.../{tag}``. Uncompressed values come little
        endian (8.7.3.3.1); encapsulated Pixel Data comes one part per frame in its
        compressed media type."""
        path = request.path_params["tag"]
        if not _BULK_PATH.fullmatch(path):
            raise BadRequest(f"bulk data path {path[:60]!r}: expected 8 hexadecimal digits "
                             "(a tag), or sequence tag/item index/.../tag")
        steps = path.split("/")
        tags, items = [int(t, 16) for t in steps[0::2]], [int(i) for i in steps[1::2]]
        ranges = wado.parse_accept(request.headers.get("accept"))
        single = bool(ranges) and ranges[0].mime == "application/octet-stream"
        if not single and not any(r.mime in ("*/*", "multipart/*") or (
                r.mime == "multipart/related" and (
                    r.inner in (None, "application/octet-stream") or r.inner_any))
                for r in ranges):
            raise NotAcceptable('bulk data is served as multipart/related; '
                                'type="application/octet-stream" or application/octet-stream')
        parts = await self._instance_work(
            request, lambda path: self._bulk(path, tags, items, single))
        if single:
            if len(parts) != 1 or not parts[0][0].startswith("application/octet-stream"):
                raise NotAcceptable("this bulk data is compressed pixel data: ask for "
                                    'multipart/related; type="*/*"')
            return _ranged(parts[0][1], request.headers.get("range"))
        return _multipart(parts)

    def _bulk(self, path: str, tags: list[int], items: list[int],
              decode: bool) -> list[tuple[str, bytes]]:
        """The parts of a bulk data response; ``decode``: encapsulated Pixel Data is wanted
        as uncompressed little endian bytes (single part application/octet-stream)."""
        octet = "application/octet-stream"
        with self._open(path) as fh:
            ds, at, fh = wado.read_file_header(fh)
            big = wado.stored_syntax(ds) == "1.2.840.10008.1.2.2"
            if len(tags) == 1 and tags[0] in PIXEL_TAGS:
                layout = wado.pixel_layout(fh, ds, at)
                if layout is None:
                    raise NotFound("the instance has no pixel data")
                if layout.encapsulated and decode:
                    fh.seek(0)
                    data = fh.read()
                    return [(octet, b"".join(wado.decode_frame(data, n)
                                             for n in range(1, layout.frames + 1)))]
                if layout.encapsulated:
                    kind = wado.FRAME_MEDIA_TYPES.get(layout.syntax, octet)
                    frames = wado.frame_ranges(fh, layout, list(range(1, layout.frames + 1)))
                    return [(f"{kind}; transfer-syntax={layout.syntax}",
                             wado.read_pieces(fh, frame)) for frame in frames]
                if big:
                    fh.seek(0)
                    full = pydicom.dcmread(fh)
                    return [(octet, wado._little_endian_pixels(full))]
                fh.seek(layout.value_start)
                return [(octet, fh.read(layout.length))]
            fh.seek(0)  # elements after the pixel data (signatures) need the whole file
            node: Any = pydicom.dcmread(fh, stop_before_pixels=tags[0] < 0x7FE00010)
        try:
            for depth, tag in enumerate(tags):
                element = node[tag]
                if depth < len(items):
                    node = element.value[items[depth]]
        except (KeyError, IndexError, TypeError):
            raise NotFound(f"the instance has no bulk data at {'/'.join(map(str, tags))}"
                           ) from None
        if not isinstance(element.value, bytes):
            raise NotFound(f"element {tags[-1]:08X} holds no binary value")
        return [(octet, wado.little_endian_value(element.value, element.VR, big))]

    async def rendered_many(self, request: Request) -> Response:
        """Rendered study or series (PS3.18 10.4.1.1.3): ``multipart/related`` with one
        rendered image per image instance (frame 1 of a multi-frame one), streamed.
        Instances that cannot be rendered (no pixel data, say) are left out, and logged."""
        params = render.parse_params(list(request.query_params.multi_items()))
        media = render.choose_media(wado.parse_accept(request.headers.get("accept")),
                                    multipart=True)
        rows = await self._rows(request)
        boundary = wado.new_boundary()

        async def parts() -> AsyncIterator[bytes]:
            for row in rows:
                try:
                    data = await asyncio.to_thread(self._read, row.file_path)
                    image = await asyncio.to_thread(render.render, data, 1, params, media)
                except Exception as exc:  # the status is sent: skip this one, go on
                    log.warning("rendered: %s left out: %s", row.file_path, exc)
                    continue
                yield wado.part_head(boundary, media) + image + b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        return StreamingResponse(parts(), media_type=wado.multipart_type(boundary, media))

    async def rendered(self, request: Request) -> Response:
        """Rendered instance or frame, and thumbnails at every level (PS3.18 10.4.1.1.3,
        10.4.1.1.5); JPEG unless PNG is asked for."""
        params = render.parse_params(list(request.query_params.multi_items()))
        media = render.choose_media(wado.parse_accept(request.headers.get("accept")))
        frame = 1
        if "frames" in request.path_params:
            numbers = wado.parse_frame_list(request.path_params["frames"])
            if len(numbers) != 1:
                raise BadRequest("rendered and thumbnail frames: one frame per request")
            frame = numbers[0]
        if request.url.path.endswith("/thumbnail") and params.viewport is None:
            params = dataclasses.replace(
                params, viewport=(render.THUMBNAIL_SIZE, render.THUMBNAIL_SIZE))
        if "sop" in request.path_params:
            image = await self._instance_work(request, lambda path: render.render(
                self._read(path), frame, params, media))
            return Response(image, media_type=media)
        rows = await self._rows(request)  # a study or series thumbnail: a middle image
        images = [r for r in rows if "Image" in UID(r.sop_class_uid).name] or rows
        row = images[len(images) // 2]
        data = await asyncio.to_thread(self._read, row.file_path)
        image = await asyncio.to_thread(render.render, data, frame, params, media)
        return Response(image, media_type=media)

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


class _PiecesResponse(Response):
    """A response whose body is sent as the given pieces, in order, never joined: a
    512 KiB frame costs a copy per join, and the server writes each piece as it comes."""

    def __init__(self, pieces: list[bytes], media_type: str) -> None:
        self.pieces = pieces
        super().__init__(None, media_type=media_type,
                         headers={"Content-Length": str(sum(map(len, pieces)))})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        last = len(self.pieces) - 1
        for n, piece in enumerate(self.pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": n < last})


def _multipart(parts: list[tuple[str, bytes]], syntax: str | None = None) -> Response:
    """A ``multipart/related`` response of (content type, bytes) parts (PS3.18 8.6.1.2);
    its ``type`` is the first part's media type."""
    boundary = wado.new_boundary()
    pieces: list[bytes] = []
    lead = b""
    for content_type, data in parts:
        pieces += [lead + wado.part_head(boundary, content_type), data]
        lead = b"\r\n"
    pieces.append(lead + f"--{boundary}--\r\n".encode())
    return _PiecesResponse(pieces, wado.multipart_type(
        boundary, parts[0][0].split(";")[0], syntax))


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned early result's exception, so that asyncio does not log it."""
    if not future.cancelled():
        future.exception()


def _frame_mode(ranges: list[wado.MediaRange], stored: str) -> tuple[str, str]:
    """How to send frames (PS3.18 8.7.3, Table 8.7.3-3/-4): ``stored`` (as in the file)
    or ``native`` (uncompressed little endian), and the transfer syntax to label them."""
    stored_type = wado.FRAME_MEDIA_TYPES.get(stored)
    for r in ranges:
        syntax = r.transfer_syntax
        if r.mime == "multipart/related" and r.inner_any and syntax in (None, wado.ANY):
            return "stored", stored  # any part type: the frames as they are stored
        if r.mime in ("*/*", "multipart/*") or (
                r.mime == "multipart/related" and r.inner in (None, "application/octet-stream")):
            if syntax == wado.ANY:
                return "stored", stored
            if syntax in (None, ExplicitVRLittleEndian):
                return "native", ExplicitVRLittleEndian
        elif r.mime == "multipart/related" and stored_type and r.inner and \
                wado._matches(wado.MEDIA_ALIASES.get(r.inner, r.inner), stored_type) and \
                syntax in (None, wado.ANY, stored):
            return "stored", stored
    raise NotAcceptable('frames are served as multipart/related; type="application/'
                        'octet-stream" (uncompressed) or in their stored compressed type '
                        "with transfer-syntax=*")


def _ranged(data: bytes, header: str | None) -> Response:
    """A single-part bulk data response honouring one ``Range: bytes=a-b`` (RFC 9110 14)."""
    if not header:
        return Response(data, media_type="application/octet-stream",
                        headers={"Accept-Ranges": "bytes"})
    match = re.fullmatch(r"\s*bytes=(\d{0,18})-(\d{0,18})\s*", header)
    if not match or match.groups() == ("", ""):
        raise BadRequest(f"Range {header[:60]!r}: only one bytes=first-last range is served")
    first, last = match.groups()
    size = len(data)
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    return Response(data[start:end + 1], status_code=206, media_type="application/octet-stream",
                    headers={"Content-Range": f"bytes {start}-{end}/{size}",
                             "Accept-Ranges": "bytes"})


class FastLane:
    """Serves the requests a viewer sends by the thousand, WADO-RS frames and the retrieval
    of one instance (``GET``), without walking starlette's router: matching the path against
    the routes of each mount in turn, the exception middleware's wrapper and the per-route
    request wrapper cost more than the handler's own Python. One pattern recognises both
    paths; everything else, ``HEAD`` included, goes on to the router. The scope is filled
    in as the router fills it (``route``, ``path_params``, ``root_path``), so the access
    recorder and the handlers cannot tell the difference, and errors are answered by the
    application's own handlers."""

    def __init__(self, app: ASGIApp, *, root: str, routes: Sequence[BaseRoute],
                 on_error: Callable[[Request, Exception], Awaitable[Response]]) -> None:
        self.app = app
        self.root = root
        self.on_error = on_error
        by_path = {r.path: r for r in routes if isinstance(r, Route)}
        instance = "/studies/{study}/series/{series}/instances/{sop}"
        self.instance, self.frames = by_path[instance], by_path[instance + "/frames/{frames}"]
        # the segments starlette's {param} matches: anything but "/"
        self.pattern = re.compile(
            f"(?:/tenants/(?P<tenant>[^/]+))?{re.escape(root)}/studies/(?P<study>[^/]+)"
            "/series/(?P<series>[^/]+)/instances/(?P<sop>[^/]+)(?:/frames/(?P<frames>[^/]+))?")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            match = self.pattern.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        params = {k: v for k, v in match.groupdict().items() if v is not None}
        route = self.frames if "frames" in params else self.instance
        mount = self.root if "tenant" not in params else \
            f"/tenants/{params['tenant']}{self.root}"
        scope.update(route=route, path_params=params, app_root_path="", root_path=mount)
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as exc:  # as the application's exception handlers answer
            response = await self.on_error(request, exc)
        await response(scope, receive, send)


def create_app(runtime: Runtime, access_log: AccessLog | None = None) -> Starlette:
    """The starlette application of the web role; ``access_log`` (None: ``web.access_log``
    is off) records every DICOMweb request (``dicomcloud.accesslog``)."""
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
        Route("/studies/{study}", web.retrieve, methods=["GET"]),
        Route("/studies/{study}/metadata", web.metadata, methods=["GET"]),
        Route("/studies/{study}/series/{series}", web.retrieve, methods=["GET"]),
        Route("/studies/{study}/series/{series}/metadata", web.metadata, methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{sop}", web.retrieve,
              methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{sop}/metadata", web.metadata,
              methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}", web.frames,
              methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag:path}",
              web.bulkdata, methods=["GET"]),
        Route("/studies/{study}/thumbnail", web.rendered, methods=["GET"]),
        Route("/studies/{study}/rendered", web.rendered_many, methods=["GET"]),
        Route("/studies/{study}/series/{series}/rendered", web.rendered_many,
              methods=["GET"]),
        Route("/studies/{study}/series/{series}/thumbnail", web.rendered, methods=["GET"]),
    ]
    instance = "/studies/{study}/series/{series}/instances/{sop}"
    for suffix in ("/rendered", "/thumbnail", "/frames/{frames}/rendered",
                   "/frames/{frames}/thumbnail"):
        dicomweb.append(Route(instance + suffix, web.rendered, methods=["GET"]))
    routes = [
        Route("/healthz", web.healthz),
        Route("/readyz", web.readyz),
        Mount(runtime.settings.web.root, routes=dicomweb),
        # every tenant at a root of its own (the default one at both)
        Mount("/tenants/{tenant}" + runtime.settings.web.root, routes=dicomweb),
    ]

    async def dicom_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DicomCloudError)
        if exc.http_status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        if isinstance(exc, RequestTimeout):  # the rest of the body is not read: close
            log.info("%s %s: %s", request.method, request.url.path, exc.message)
            response = _error(exc.http_status, exc.message)
            response.headers["Connection"] = "close"
            return response
        return _error(exc.http_status, exc.message)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error; the archive logged the details")

    async def on_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, DicomCloudError):
            return await dicom_error(request, exc)
        return await unexpected(request, exc)

    settings = runtime.settings
    middleware = []
    middleware.append(Middleware(AccessRecorder, settings=settings, access_log=access_log,
                                 routes=routes))
    origins = list(runtime.settings.web.cors_origins)
    if origins:  # browsers (OHIF) on another origin; preflight answered by the middleware
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"], expose_headers=["ETag", "Warning", "Content-Location"],
            allow_credentials="*" not in origins, max_age=600))
    if settings.auth.enabled:
        middleware.append(Middleware(
            BearerGuard, settings=settings,
            authenticator=Authenticator(settings.auth, runtime.cache)))
    middleware.append(Middleware(FastLane, root=settings.web.root, routes=dicomweb,
                                 on_error=on_error))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={
        DicomCloudError: dicom_error, Exception: unexpected})


class _Config(HypercornConfig):
    """Hypercorn's settings, with the ``Date`` header (RFC 9110 6.6.1: one-second
    resolution) formatted once a second instead of once a response."""

    _date: tuple[int, bytes] = (0, b"")

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        if self.include_server_header or self.alt_svc_headers or \
                getattr(self, "_quic_addresses", None):  # HTTP/3 adverts: hypercorn's own
            return super().response_headers(protocol)
        if not self.include_date_header:
            return []
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, format_date_time(now).encode("ascii"))
        return [(b"date", self._date[1])]


def hypercorn_config(runtime: Runtime) -> HypercornConfig:
    """Hypercorn settings of the web role."""
    s = runtime.settings.web
    config = _Config()
    config.graceful_timeout = s.graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # A connection without a request in progress, a head still arriving included (slowloris),
    # is closed after idle_timeout. (Not hypercorn's read_timeout: it also runs while a long
    # response is sent, when the client has nothing to send, and would cut downloads off.)
    # A STOW-RS body that stalls is timed by DicomWeb.stow; a client that stops reading by
    # TCP_USER_TIMEOUT (_listen).
    config.keep_alive_timeout = s.idle_timeout
    config.h11_max_incomplete_size = s.max_header_bytes
    config.h2_max_header_list_size = s.max_header_bytes
    config.include_server_header = False
    if s.tls_certfile:  # HTTPS, HTTP/2 by ALPN (RFC 9113); checked by config._check
        config.certfile, config.keyfile = s.tls_certfile, s.tls_keyfile
    return config


def _listen(host: str, port: int, reuse_port: bool, send_timeout: float) -> socket.socket:
    """The listening socket, bound here so that readiness is known (hypercorn takes the fd).

    TCP_USER_TIMEOUT (RFC 5482; inherited by accepted connections on Linux) makes the kernel
    drop a connection whose sent data stays unacknowledged, or whose receive window stays
    shut, for ``send_timeout``: a client that stops reading its response frees its request,
    its socket and the kernel's send buffer then, while a slow client that keeps reading is
    never cut off."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT") and send_timeout > 0:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send_timeout * 1000))
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
    sock = _listen(s.host, s.port, s.reuse_port, s.send_timeout)
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the descriptor from here
    log.info("DICOMweb on %s://%s:%d%s", "https" if config.ssl_enabled else "http",
             s.host, s.port, s.root)
    if runtime.settings.auth.enabled:
        log.info("DICOMweb requires bearer tokens of %s", runtime.settings.auth.issuer)
    runtime.mark_listening()
    async with AccessLog(runtime.queue, runtime.settings.node_id).running() as access_log:
        app = create_app(runtime, access_log if s.access_log else None)
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
