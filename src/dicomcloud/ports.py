"""The four ports: index, queue, cache and storage.

Each is a small ``Protocol``; backends live in ``dicomcloud.backends`` and are chosen by
URL scheme. Every backend is an async context manager owned by the runtime. One contract
suite per port (``tests/contract/``) runs against every backend.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from dicomcloud.model import IndexedInstance, InstanceKey, InstanceRow, JsonTask, SeriesRef
from dicomcloud.query import Query

_T = TypeVar("_T")

TOPICS = ("storage_queue", "log_queue", "dicom_state_queue", "dicom_image_queue")


#: A message to publish: topic, key (the StudyInstanceUID), JSON body.
Outgoing = tuple[str, str, Mapping[str, Any]]


@dataclass(frozen=True)
class Message:
    """A message fetched from a topic; ``offset`` orders it within its partition."""

    topic: str
    partition: int
    offset: int
    key: str
    body: Mapping[str, Any]


class Queue(AbstractAsyncContextManager["Queue"], Protocol):
    """Durable topics with consumer groups (Kafka semantics, at least once)."""

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Append ``(topic, key, body)`` messages; all are durable once this returns.

        Messages of one topic with one key keep their order (one partition per key).
        """

    async def fetch(
        self, topic: str, group: str, max_messages: int, timeout: float
    ) -> list[Message]:
        """Next messages after the group's committed position; waits up to ``timeout``."""

    async def commit(self, group: str, messages: Sequence[Message]) -> None:
        """Mark ``messages`` (and everything before them) consumed by ``group``."""

    async def rewind(self, topic: str, group: str) -> None:
        """Drop fetched but uncommitted messages: the next fetch redelivers them."""

    async def housekeep(self, retention_seconds: float) -> int:
        """Drop consumed messages and unconsumed ones older than the retention."""


class Cache(AbstractAsyncContextManager["Cache"], Protocol):
    """A best-effort key/value cache: a miss is always allowed, a stale hit never."""

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired."""

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (None: until evicted)."""

    async def delete(self, *keys: str) -> None:
        """Remove keys; absent keys are ignored."""

    async def incr(self, key: str) -> int:
        """Atomically add one to an integer key and return the new value."""


class StagedFile(Protocol):
    """A file being received; invisible to readers until committed."""

    path: Path

    def write(self, data: bytes) -> None:
        """Append bytes."""

    def sync(self) -> None:
        """Make the bytes written so far durable now (``commit`` then skips it)."""

    def flush(self) -> None:
        """Hand the bytes written so far to the OS, so that ``path`` reads them back."""

    @property
    def size(self) -> int:
        """Bytes written so far."""


class Storage(AbstractAsyncContextManager["Storage"], Protocol):
    """Instance and metadata files.

    Methods are blocking (file I/O); async callers run them in a worker thread.
    """

    def stage(self) -> StagedFile:
        """Start receiving a file in a private staging area."""

    def commit(self, staged: StagedFile, key: InstanceKey) -> int:
        """fsync ``staged`` and rename it atomically to the key's layout path.

        Replaces an existing instance with the same key. Returns the file size.
        """

    def commit_many(self, items: Sequence[tuple[StagedFile, InstanceKey]]) -> list[int]:
        """``commit`` for several files at once (one directory sync per directory)."""

    def discard(self, staged: StagedFile) -> None:
        """Delete a staged file that will not be committed."""

    def open(self, relative_path: str) -> IO[bytes]:
        """Open a stored file for reading (``FileNotFoundError`` if absent)."""

    def remove(self, relative_path: str) -> None:
        """Delete a stored file; an absent one is not an error."""

    def write_metadata(self, relative_path: str, data: bytes) -> None:
        """Write a metadata document atomically under ``metadata/``."""

    def read_metadata(self, relative_path: str) -> bytes | None:
        """A metadata document, or None when it does not exist."""


class Index(AbstractAsyncContextManager["Index"], Protocol):
    """The relational index: DESIGN.md tables plus ``dicom_instance``."""

    async def apply(
        self, items: Sequence[IndexedInstance]
    ) -> tuple[list[SeriesRef], list[str]]:
        """Upsert instances, their series rows and metadata flags in one transaction.

        Idempotent: applying the same items again changes nothing but ``updated_time``.
        Returns the series touched (``series_related_instances`` already recounted) and
        the file paths no longer referenced (an instance re-sent under another series).
        """

    async def series_state(self, refs: Iterable[SeriesRef]) -> list[dict[str, Any]]:
        """``dicom_state_meta`` rows of ``refs`` as column -> value."""

    async def search(self, query: Query) -> list[dict[str, Any]]:
        """QIDO/C-FIND matches at ``query.level`` (PS3.18 10.6, PS3.4 C.2.2)."""

    async def instances(
        self, tenant_id: str, study_uid: str, series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[InstanceRow]:
        """Instances of a study (or one series, or the one instance ``sop_uid`` of it),
        ordered by series then instance number."""

    async def with_instance(
        self, tenant_id: str, study_uid: str, series_uid: str, sop_uid: str,
        work: Callable[[InstanceRow | None], _T],
    ) -> _T:
        """``work(row)`` for one instance (``None`` when it is not indexed), run on a worker
        thread: the file work that follows the lookup. An index whose lookups run on a
        worker thread anyway (SQLite) does both in one hand-off."""

    @property
    def lookups_on_thread(self) -> bool:
        """Whether lookups run on a worker thread (SQLite) rather than on the event loop."""

    async def previous_path(self, tenant_id: str, sop_uid: str) -> str | None:
        """File path currently indexed for a SOP Instance UID."""

    async def metadata_current(self, tenant_id: str, study_uid: str,
                               series_uid: str | None = None) -> bool:
        """True when the pre-generated metadata of the series (or of every series of the
        study) is done and nothing changed since; False when pending, failed or unknown."""

    async def due_series(self, flagged_before: dt.datetime, max_retries: int,
                         limit: int) -> list[JsonTask]:
        """Series whose metadata is pending (or failed, under ``max_retries``) and quiet."""

    async def flag_time(self, tenant_id: str, study_uid: str,
                        series_uid: str) -> dt.datetime | None:
        """The series' current ``flag_time`` (None when the series is gone)."""

    async def next_due(self, max_retries: int) -> dt.datetime | None:
        """The oldest ``flag_time`` among series waiting for metadata, or None."""

    async def finish_series(self, task: JsonTask, ok: bool, retry_in: float = 0.0) -> bool:
        """Mark metadata of ``task`` done or failed; False if it was flagged again since.
        A failed series is due again ``retry_in`` seconds (plus the quiet period) later."""

    async def record_access(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert access-log rows; a ``trace_id`` already present is skipped."""

    async def recent_access(self, tenant_id: str | None = None,
                            limit: int = 100) -> list[dict[str, Any]]:
        """The newest access-log rows, newest first."""

    async def prune_access(self, before: dt.datetime) -> int:
        """Delete access-log rows older than ``before``."""

    async def count_instances(self, tenant_id: str | None = None) -> int:
        """Number of indexed instances."""
