"""STOW-RS request handling (PS3.18 10.5), independent of the web framework.

The body (``multipart/related; type="application/dicom"``) is parsed as it streams in;
each part goes to a staging file, never whole into memory. Parts are validated as they
end. Only when the closing boundary has arrived are the accepted parts moved into the
layout and announced, so a body that is cut off, malformed or over the size cap leaves
nothing behind (all or nothing per request; per part, the FailedSOPSequence says why).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from dicomcloud.errors import (
    BadRequest,
    DataSetMismatch,
    InvalidInstance,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from dicomcloud.ingest import Ingestor, Origin
from dicomcloud.model import StoredObject
from dicomcloud.ports import StagedFile

_PARAM_RE = re.compile(r';\s*([a-zA-Z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]+)')
_PROCESSING_FAILURE = 0x0110  # PS3.7 C.4: Processing failure


def parse_content_type(header: str) -> bytes:
    """The boundary of a STOW-RS request, after checking its media type (PS3.18 10.5.1.2).

    Raises ``UnsupportedMediaType`` (415) for anything but multipart/related with
    ``type="application/dicom"`` (or no type), ``BadRequest`` for a missing boundary.
    """
    media = header.split(";", 1)[0].strip().lower()
    if media != "multipart/related":
        raise UnsupportedMediaType(
            f"Content-Type {media or '(none)'} is not supported: send "
            'multipart/related; type="application/dicom"; boundary=...')
    params = {k.lower(): v.strip('"') for k, v in _PARAM_RE.findall(header)}
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaType(
            f'type="{part_type}" is not supported; this server accepts type="application/dicom"')
    boundary = params.get("boundary")
    if not boundary or len(boundary) > 200:
        raise BadRequest("multipart/related Content-Type has no valid boundary parameter")
    return bytes(boundary.encode("latin-1"))


@dataclass
class PartResult:
    """Outcome of one part: stored, or failed with a PS3.18 FailureReason."""

    sop_class_uid: str | None = None
    sop_uid: str | None = None
    stored: StoredObject | None = None
    failure_reason: int | None = None
    message: str | None = None


@dataclass
class _Pending:
    staged: StagedFile
    ds: Dataset
    result: PartResult
    flushing: concurrent.futures.Future[None] | None


@dataclass
class StowReceiver:
    """Feeds a multipart body through staging and validation (blocking; run in a thread)."""

    ingestor: Ingestor
    origin: Origin
    boundary: bytes
    study_uid: str | None
    max_bytes: int
    max_parts: int = 10_000
    max_part_bytes: int = 2 * 1024**3
    results: list[PartResult] = field(default_factory=list)
    _pending: list[_Pending] = field(default_factory=list)
    _received: int = 0
    _ended: bool = False

    def __post_init__(self) -> None:
        self._staged: StagedFile | None = None
        self._header_name = b""
        self._header_value = b""
        self._part_type = ""
        self._parts = 0
        self._part_size = 0
        self._parser = MultipartParser(self.boundary, {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_cb,
            "on_header_end": self._header_end,
            "on_end": self._end,
        }, max_size=float("inf"))

    def feed(self, data: bytes) -> None:
        """Consume the next bytes of the body."""
        self._received += len(data)
        if self._received > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(
                f"request body exceeds the limit of {self.max_bytes} bytes "
                "(web.max_upload_bytes); send fewer instances per request")
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            self.abort()
            raise BadRequest(f"malformed multipart body: {exc}") from exc
        except PayloadTooLarge:  # raised by a callback: a part too many, or too large
            self.abort()
            raise

    def finish(self) -> list[PartResult]:
        """After the last byte: store accepted parts and return every part's outcome."""
        if not self._ended:
            self.abort()
            raise BadRequest("multipart body ended before its closing boundary")
        if not self.results:
            raise BadRequest("multipart body holds no part")
        try:
            for pending in self._pending:
                if pending.flushing is not None:
                    pending.flushing.result()
            stored = self.ingestor.commit_many(
                [(p.staged, p.ds) for p in self._pending], self.origin)
        except BaseException:
            self.abort()
            raise
        for pending, event in zip(self._pending, stored, strict=True):
            pending.result.stored = event
        self._pending.clear()
        return self.results

    def abort(self) -> None:
        """Discard every staged file of this request."""
        for pending in self._pending:
            if pending.flushing is not None:
                pending.flushing.cancel()
                with contextlib.suppress(Exception):
                    pending.flushing.result()
            self.ingestor.storage.discard(pending.staged)
        self._pending.clear()
        if self._staged is not None:
            self.ingestor.storage.discard(self._staged)
            self._staged = None

    # -- parser callbacks ---------------------------------------------------------------
    def _part_begin(self) -> None:
        self._part_type = "application/dicom"
        self._parts += 1
        self._part_size = 0
        if self._parts > self.max_parts:
            raise PayloadTooLarge(f"more than {self.max_parts} parts in one request "
                                  "(web.max_parts); send the instances in several requests")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-type":
            self._part_type = self._header_value.decode("latin-1").split(";")[0].strip().lower()
        self._header_name = self._header_value = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_type != "application/dicom":
            return
        self._part_size += end - start
        if self._part_size > self.max_part_bytes:
            raise PayloadTooLarge(f"part {self._parts} exceeds {self.max_part_bytes} bytes "
                                  "(web.max_part_bytes)")
        if self._staged is None:
            self._staged = self.ingestor.storage.stage()
        self._staged.write(data[start:end])

    def _part_end(self) -> None:
        staged, self._staged = self._staged, None
        if self._part_type != "application/dicom":
            self.results.append(PartResult(
                failure_reason=_PROCESSING_FAILURE,
                message=f"part of type {self._part_type} ignored: expected application/dicom"))
            if staged is not None:
                self.ingestor.storage.discard(staged)
            return
        if staged is None:
            self.results.append(PartResult(failure_reason=0xC000, message="empty part"))
            return
        self.results.append(self._check(staged))

    def _check(self, staged: StagedFile) -> PartResult:
        try:
            ds = self.ingestor.check(staged)
        except InvalidInstance as exc:
            return PartResult(failure_reason=exc.failure_reason, message=exc.message)
        result = PartResult(sop_class_uid=str(ds.SOPClassUID), sop_uid=str(ds.SOPInstanceUID))
        if self.study_uid is not None and str(ds.StudyInstanceUID) != self.study_uid:
            self.ingestor.storage.discard(staged)
            error = DataSetMismatch("StudyInstanceUID differs from the study in the URL")
            result.failure_reason, result.message = error.failure_reason, error.message
            return result
        # flush this part to disk while the next ones are received
        self._pending.append(_Pending(staged, ds, result, self.ingestor.sync_soon(staged)))
        return result

    def _end(self) -> None:
        self._ended = True


def response_body(results: list[PartResult], base_url: str,
                  study_uid: str | None) -> tuple[int, dict[str, Any]]:
    """HTTP status and DICOM JSON response of a STOW-RS request (PS3.18 10.5.3).

    200: all stored; 202: some stored, some failed; 409: none stored.
    """
    referenced, failed = [], []
    for r in results:
        item: dict[str, Any] = {}
        if r.sop_class_uid:
            item["00081150"] = {"vr": "UI", "Value": [r.sop_class_uid]}
        if r.sop_uid:
            item["00081155"] = {"vr": "UI", "Value": [r.sop_uid]}
        if r.stored is not None:
            s = r.stored
            url = f"{base_url}/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_uid}"
            item["00081190"] = {"vr": "UR", "Value": [url]}
            referenced.append(item)
        else:
            item["00081197"] = {"vr": "US", "Value": [r.failure_reason or _PROCESSING_FAILURE]}
            if r.message:
                item["00090010"] = {"vr": "LO", "Value": ["DICOMCLOUD"]}
                item["00091001"] = {"vr": "LT", "Value": [r.message[:1024]]}
            failed.append(item)
    body: dict[str, Any] = {}
    stored_studies = {r.stored.study_uid for r in results if r.stored is not None}
    study = study_uid or (stored_studies.pop() if len(stored_studies) == 1 else None)
    if study:
        body["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{study}"]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    status = 200 if not failed else (202 if referenced else 409)
    return status, body
