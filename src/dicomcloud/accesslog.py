"""Access log: one event per DICOMweb request and one per DICOM association.

Events are published to ``log_queue`` (DESIGN.md) beside the object rows, told apart by
``log_type`` (``"object"`` or ``"access"``); Doris loads them into ``dicom_access_log``
(``migrations/doris``), and on one node the worker loads them into the index's
``access_log`` table (``dicomcloud access-log`` shows it).

Recording never slows or fails a request: events are buffered in memory and published in
batches every ``FLUSH_SECONDS``; if the queue is away the batch is kept (up to
``MAX_BUFFER`` events, then the oldest are dropped and counted in the log). A process killed
with ``kill -9`` loses at most the last fraction of a second of access events, never an
acknowledged instance (those travel on ``storage_queue`` before the sender's answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from dicomcloud.errors import DicomCloudError
from dicomcloud.ports import Outgoing, Queue

log = logging.getLogger(__name__)
TOPIC = "log_queue"
FLUSH_SECONDS = 0.5
MAX_BUFFER = 100_000
_TEXT = 256  # longest free text kept (user agent, principal)


@dataclasses.dataclass
class AccessEvent:
    """One row of the access log (``dicom_access_log`` in Doris, ``access_log`` locally).

    For DICOMweb: ``service`` is QIDO-RS, WADO-RS or STOW-RS, ``route`` the URL template,
    ``status`` the HTTP status. For an association: ``protocol`` DIMSE, ``service`` the
    DIMSE services used (``C-ECHO,C-STORE``), ``route`` ``association``, ``status`` 0 when
    every operation succeeded, else the last failure status (PS3.7 Annex C), and
    ``operations`` the number of DIMSE requests.
    """

    tenant_id: str
    protocol: str
    service: str
    route: str
    status: int
    client_ip: str | None
    method: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    duration_ms: float = 0.0
    principal: str | None = None
    client_id: str | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    user_agent: str | None = None
    operations: int = 1
    event_time: str = ""
    trace_id: str = ""
    worker_node_id: str = ""
    log_type: str = "access"

    def body(self) -> dict[str, Any]:
        """The ``log_queue`` message body (flat: a copy of the fields, no deep copy)."""
        return dict(vars(self))

    def clip(self) -> None:
        """Cut every text to its column (``LIMITS``, characters) and replace control
        characters (PostgreSQL refuses NUL in text): a hostile request (a 200-character
        method, ``%00`` in a UID, a megabyte of User-Agent) still makes a row that loads."""
        for name, size in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, str):
                if len(value) > size:
                    value = value[:size]
                if not value.isprintable():
                    value = value.translate(_CONTROLS)
                setattr(self, name, value)


_CONTROLS = {code: "?" for code in (*range(0x20), 0x7F)}

#: Longest text kept per field, in characters; the columns of the index's access_log and of
#: Doris' dicom_access_log (bytes: up to 4 per character) hold these.
LIMITS = {"tenant_id": 64, "protocol": 16, "service": 128, "route": 256, "method": 16,
          "study_uid": 64, "series_uid": 64, "sop_uid": 64, "client_ip": 64,
          "principal": 256, "client_id": 256, "calling_ae": 16, "called_ae": 16,
          "user_agent": 256, "worker_node_id": 128}


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def event_time(epoch: float) -> str:
    """``YYYY-MM-DD HH:MM:SS.mmm`` in UTC (Doris DATETIME(3))."""
    global _second
    whole = int(epoch)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((epoch - whole) * 1000):03d}"


def clip(value: str | None, size: int = _TEXT) -> str | None:
    """Free text from a client, cut to ``size`` characters (None stays None)."""
    return None if value is None else value[:size]


class AccessLog:
    """Buffers access events of one process and publishes them in batches."""

    def __init__(self, queue: Queue, node_id: str) -> None:
        self.queue = queue
        self.node_id = node_id
        self._buffer: deque[AccessEvent] = deque()
        self._dropped = 0
        self._wake = asyncio.Event()

    def record(self, event: AccessEvent, started: float | None = None) -> None:
        """Queue an event for publishing (never blocks, never raises)."""
        if not event.event_time:
            event.event_time = event_time(started if started is not None else time.time())
        event.trace_id = event.trace_id or os.urandom(16).hex()  # as uuid4().hex, faster
        event.worker_node_id = self.node_id
        event.clip()
        if len(self._buffer) >= MAX_BUFFER:
            self._buffer.popleft()
            self._dropped += 1
        self._buffer.append(event)

    async def flush(self) -> None:
        """Publish what is buffered; on a queue error keep it for the next try."""
        if self._dropped:
            log.warning("access log: %d event(s) dropped while the queue was away",
                        self._dropped)
            self._dropped = 0
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), 5000))]
            messages: list[Outgoing] = [
                (TOPIC, e.study_uid or e.tenant_id, e.body()) for e in batch]
            try:
                await self.queue.publish(messages)
            except Exception as exc:  # never let the flusher die: keep the batch, try later
                self._buffer.extendleft(reversed(batch))
                log.warning("access log: cannot publish %d event(s) yet: %s", len(batch),
                            exc.message if isinstance(exc, DicomCloudError) else repr(exc))
                return

    async def _run(self, stop: asyncio.Event) -> None:
        """Flush every ``FLUSH_SECONDS`` until ``stop``, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FLUSH_SECONDS)
            await self.flush()
        await self.flush()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[AccessLog]:
        """Flush in the background while the block runs; at its end, once more."""
        stop = asyncio.Event()
        flusher = asyncio.create_task(self._run(stop), name="access-log")
        try:
            yield self
        finally:
            stop.set()
            await flusher


def access_rows(bodies: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The access events among ``log_queue`` bodies, as ``access_log`` rows."""
    names = {f.name for f in dataclasses.fields(AccessEvent)} - {"log_type"}
    rows = []
    for body in bodies:
        if body.get("log_type") != "access":
            continue
        row = {name: body.get(name) for name in names}
        try:
            row["event_time"] = dt.datetime.fromisoformat(str(row["event_time"]))
        except ValueError:
            continue  # not ours: skip rather than stop the loader
        rows.append(row)
    return rows
