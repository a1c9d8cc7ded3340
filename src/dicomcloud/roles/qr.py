"""Query/Retrieve SCP (PS3.4 Annex C): C-FIND, C-MOVE and C-GET for workstations.

Patient Root and Study Root information models at PATIENT, STUDY, SERIES and IMAGE level.
C-FIND uses the matching engine of QIDO-RS (``query.py``): single value, UID list,
wildcard, date/time range and universal matching (PS3.4 C.2.2.2); keys the index cannot
match on are returned empty rather than refused (PS3.4 C.2.2.1.3). C-MOVE sends to the
destinations of ``scp.move_destinations``; C-GET sends back over the same association
(the requestor negotiated the SCP role for the storage classes, PS3.4 C.4.3.1). Both report
pending/completed/failed/warning counts and honour C-CANCEL (PS3.4 C.4.2.3).

pynetdicom runs these handlers in its association thread; index queries run on the role's
asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.presentation import build_context

from dicomcloud.errors import BadRequest, DicomCloudError
from dicomcloud.model import InstanceRow
from dicomcloud.qido import to_json
from dicomcloud.query import ATTRIBUTES, Level, Query, parse_qido
from dicomcloud.runtime import Runtime

log = logging.getLogger(__name__)

# Patient Root and Study Root Query/Retrieve Information Models (PS3.4 C.6.1, C.6.2)
FIND = ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1")
MOVE = ("1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.2.2")
GET = ("1.2.840.10008.5.1.4.1.2.1.3", "1.2.840.10008.5.1.4.1.2.2.3")
_LEVELS: dict[str, Level] = {"PATIENT": "study", "STUDY": "study", "SERIES": "series",
                             "IMAGE": "instance"}
_PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_SKIP = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}
_PENDING, _CANCELLED = 0xFF00, 0xFE00
_UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
                "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
_IDENTIFIER_MISMATCH = 0xA900  # Identifier does not match SOP Class (PS3.4 C.4.1.1.4)
_UNABLE = 0xC000  # Unable to process
_MOVE_UNKNOWN = 0xA801  # Refused: Move Destination unknown (PS3.4 C.4.2.1.5)
_TIMEOUT = 120.0
_AHEAD = 4  # responses queued for pynetdicom's DUL thread before the next is made
_SEND_WAIT = 30.0  # ... waiting at most this long for it to send them


def _cancelled(event: evt.Event) -> bool:
    """Whether the requestor sent a C-CANCEL for this operation (PS3.7 9.3.2.3, 9.3.3.3,
    9.3.4.3); asked before each response.

    pynetdicom's DUL thread reads an incoming PDU only in a pass with nothing queued to send.
    Responses made faster than it sends them would keep that queue full, and a C-CANCEL
    would wait unread until every match had gone. So the next response waits until at
    most ``_AHEAD`` are queued (which also bounds the memory of a large answer), and, when
    data from the peer is waiting on the socket, until the DUL has read it (at most 0.2 s).
    pynetdicom forgets a C-CANCEL once ``is_cancelled`` has reported it: it is asked once
    per pass."""
    dul = event.assoc.dul
    deadline = time.monotonic() + _SEND_WAIT
    while dul.to_provider_queue.qsize() > _AHEAD and time.monotonic() < deadline \
            and dul.is_alive():
        time.sleep(0.0002)
    sock = dul.socket
    deadline = time.monotonic() + 0.2
    while True:
        if event.is_cancelled:
            return True
        if sock is None or not sock.ready or time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


class QueryRetrieve:
    """C-FIND, C-MOVE and C-GET handlers bound to one runtime."""

    def __init__(self, runtime: Runtime, loop: asyncio.AbstractEventLoop,
                 tenant_of: Any) -> None:
        self.runtime = runtime
        self.loop = loop
        self.tenant_of = tenant_of  # event -> tenant (from the called AE title)

    def handlers(self) -> list[evt.EventHandlerType]:
        return [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_MOVE, self.on_move),
                (evt.EVT_C_GET, self.on_get)]

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(_TIMEOUT)

    # -- C-FIND -------------------------------------------------------------------------
    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND SCP (PS3.4 C.4.1): one pending response per match, then success."""
        identifier = event.identifier
        limit = self.runtime.settings.scp.max_find_results
        try:
            query, qr_level = self._query(event, identifier, limit)
            rows = self._run(self.runtime.index.search(query))
        except DicomCloudError as exc:
            log.warning("C-FIND refused: %s", exc.message)
            yield (_IDENTIFIER_MISMATCH if exc.http_status == 400 else _UNABLE), None
            return
        if len(rows) >= limit:
            log.warning("C-FIND from %s: more than %d matches, only the first %d returned "
                        "(scp.max_find_results)", event.assoc.requestor.ae_title, limit, limit)
        retrieve_ae = self._retrieve_ae(event)
        if qr_level == "PATIENT":
            rows = list({(r.get("patient_id"), r.get("patient_name")): r
                         for r in rows}.values())
        requested = [e for e in identifier if e.keyword not in _SKIP and e.VR != "SQ"]
        for row in rows:
            if _cancelled(event):
                yield _CANCELLED, None
                return
            yield _PENDING, self._answer(query, row, requested, qr_level, retrieve_ae)

    def _query(self, event: evt.Event, identifier: Dataset,
               limit: int) -> tuple[Query, str]:
        qr_level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        if qr_level not in _LEVELS:
            raise BadRequest(f"Query/Retrieve Level {qr_level or '(missing)'!r} is not one of "
                            "PATIENT, STUDY, SERIES, IMAGE")
        model = str(getattr(event.request, "AffectedSOPClassUID", "") or "")
        if qr_level == "PATIENT" and model.startswith("1.2.840.10008.5.1.4.1.2.2."):
            raise BadRequest("the Study Root model has no PATIENT level (PS3.4 C.6.2)")
        params: list[tuple[str, str]] = []
        for element in identifier:
            keyword = element.keyword
            if keyword in _SKIP or element.VR == "SQ" or keyword not in ATTRIBUTES:
                continue  # return keys only (the index does not match on them)
            text = _text(element.value)
            if text:
                params.append((keyword, text))
        query, _ = parse_qido(self.tenant_of(event), _LEVELS[qr_level], params,
                              default_limit=limit, max_limit=limit)
        return query, qr_level

    def _retrieve_ae(self, event: evt.Event) -> str:
        """The AE title to retrieve from: the called one when it selects a tenant."""
        called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip()
        settings = self.runtime.settings
        return called if called.upper() in settings.scp.ae_tenants else settings.scp.ae_title

    def _answer(self, query: Query, row: dict[str, Any], requested: list[Any],
                qr_level: str, retrieve_ae: str) -> Dataset:
        values = to_json(query, row, "")
        out = Dataset()
        out.SpecificCharacterSet = "ISO_IR 192"  # index values are Unicode
        out.QueryRetrieveLevel = qr_level
        for element in requested:
            key = f"{int(element.tag):08X}"
            found = values.get(key)
            if found is not None and "Value" in found:
                try:
                    out.update(Dataset.from_json({key: found}))
                    continue
                except (ValueError, TypeError, KeyError):
                    pass
            out.add_new(element.tag, element.VR or dictionary_VR(element.tag), None)
        out.RetrieveAETitle = retrieve_ae
        return out

    # -- C-MOVE / C-GET -----------------------------------------------------------------
    def _instances(self, event: evt.Event) -> list[InstanceRow]:
        """Instances an identifier asks to retrieve. The unique key of the retrieve level
        must be given, without wildcards (PS3.4 C.4.2.2.1, C.4.3.2.1); a list of UIDs is
        allowed."""
        identifier = event.identifier
        query, qr_level = self._query(event, identifier, 1_000_000)
        key = _UNIQUE_KEYS[qr_level]
        value = _text(identifier.get(key))
        if not value or "*" in value or "?" in value:
            raise BadRequest(f"{key} is required, without wildcards, to retrieve at "
                            f"{qr_level} level")
        found = self._run(self.runtime.index.search(query))
        rows: list[InstanceRow] = []
        seen: set[str] = set()
        for match in found:
            study, series = match.get("study_uid"), match.get("series_uid")
            rows_of = self.runtime.index.instances(
                query.tenant_id, study, series if query.level != "study" else None,
                match.get("sop_uid") if query.level == "instance" else None)
            for row in self._run(rows_of):
                if row.sop_uid not in seen:
                    seen.add(row.sop_uid)
                    rows.append(row)
        return rows

    def _datasets(self, event: evt.Event, rows: list[InstanceRow]) -> Iterator[
            tuple[int, Dataset | None]]:
        for row in rows:
            if _cancelled(event):
                yield _CANCELLED, None
                return
            try:
                with self.runtime.storage.open(row.file_path) as fh:
                    ds = pydicom.dcmread(fh)
            except Exception as exc:  # unreadable, corrupt: this sub-operation fails
                log.error("retrieve: cannot read %s: %s", row.file_path, exc)
                # pynetdicom counts a pending result that is not a data set as one failed
                # sub-operation and goes on with the others (a failure status would end all)
                yield _PENDING, f"unreadable {row.sop_uid}"  # type: ignore[misc]
                continue
            yield _PENDING, ds

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE SCP (PS3.4 C.4.2): destination, sub-operation count, then datasets."""
        destination = event.move_destination
        title = (destination.decode("ascii", "replace") if isinstance(destination, bytes)
                 else str(destination)).strip()
        address = self.runtime.settings.scp.move_destinations.get(title.upper())
        if address is None:
            log.warning("C-MOVE to unknown destination %r (add it to scp.move_destinations)",
                        title)
            yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
            return
        try:
            rows = self._instances(event)
        except DicomCloudError as exc:
            # raised before the first yield: pynetdicom answers with a failure status
            # (Unable to process), not "move destination unknown"
            log.warning("C-MOVE refused: %s", exc.message)
            raise
        host, _, port = address.rpartition(":")
        yield host, int(port), {"contexts": _contexts(rows), "ae_title": title}
        yield len(rows)
        yield from self._datasets(event, rows)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET SCP (PS3.4 C.4.3): sub-operation count, then datasets on this association."""
        try:
            rows = self._instances(event)
        except DicomCloudError as exc:
            log.warning("C-GET refused: %s", exc.message)
            raise  # before the first yield: pynetdicom answers a failure status
        yield len(rows)
        yield from self._datasets(event, rows)


def _text(value: Any) -> str:
    """A C-FIND key value in QIDO's textual form (UID lists comma-separated)."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return ",".join(str(v) for v in value)
    return str(value).strip()


def _contexts(rows: list[InstanceRow]) -> list[Any]:
    """Presentation contexts for a C-MOVE sub-association: each SOP class with its stored
    transfer syntax, uncompressed ones offered as both (at most 128, PS3.8 9.3.2.2)."""
    wanted: dict[str, set[str]] = {}
    for row in rows:
        syntaxes = wanted.setdefault(row.sop_class_uid, set())
        if row.transfer_syntax_uid in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
            syntaxes.update((ExplicitVRLittleEndian, ImplicitVRLittleEndian))
        else:
            syntaxes.add(row.transfer_syntax_uid)
    contexts = []
    for sop_class, syntaxes in sorted(wanted.items()):
        for syntax in sorted(syntaxes):
            contexts.append(build_context(sop_class, [syntax]))
    return contexts[:128]
