"""Role ``worker``: pre-generates series and study metadata, and does housekeeping.

A series flagged in ``dicom_json_meta`` that has been quiet for ``worker.quiet_seconds``
gets its metadata regenerated (PS3.18 Annex F DICOM JSON, bulk data as BulkDataURI):

    metadata/{tenant}/{study}/{series}.json   every instance of the series
    metadata/{tenant}/{study}.json            every instance of the study

The row is marked done only if nobody flagged it again meanwhile (compare-and-set on
``flag_time``); a failure is retried after another quiet period, ``max_retries`` times.
Documents are written only if the series' flag is still the one the build started from,
so several worker nodes may run: at worst two build the same series, never does an older
build overwrite a newer one (a build takes far less than the quiet period).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime, timedelta
from typing import Any

from dicomcloud.accesslog import TOPIC as LOG_TOPIC
from dicomcloud.accesslog import access_rows
from dicomcloud.backends import backend_class
from dicomcloud.dicomjson import stored_documents
from dicomcloud.errors import BackendError
from dicomcloud.model import JsonTask
from dicomcloud.ports import Storage
from dicomcloud.processes import die_with_parent
from dicomcloud.runtime import Runtime

log = logging.getLogger(__name__)
_HOUSEKEEP_EVERY = 300.0
_HELPER_IDLE = 120.0  # seconds without a build before the metadata helper process stops


class MetadataBuilder:
    """Builds metadata documents from stored files.

    Reading the files, nearly all of the cost, runs in a helper process at a lower priority
    (``nice``, ``worker.builder_nice``): while the machine is busy, QIDO-RS and WADO-RS
    answers get the larger share of the CPU, and the reading never holds this process's
    interpreter lock while the consumer indexes. ``nice`` 0 reads on a worker thread of
    this process."""

    def __init__(self, runtime: Runtime, nice: int = 0) -> None:
        self.runtime = runtime
        self.nice = nice if hasattr(os, "nice") else 0  # no nice (Windows): in this process
        self._pool: ProcessPoolExecutor | None = None
        self._used = 0.0  # time.monotonic() of the helper's last build

    async def rest(self, idle_seconds: float = _HELPER_IDLE) -> None:
        """Stop the helper process once it has had nothing to build for ``idle_seconds``
        (its memory goes back to the system; the next build starts another)."""
        if self._pool is not None and time.monotonic() - self._used > idle_seconds:
            await self.close()

    async def close(self) -> None:
        """Stop the helper process (after the running build, if any)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)

    async def build(self, task: JsonTask) -> int:
        """Write series and study metadata of ``task``; returns the series' instance count."""
        rt = self.runtime
        rows = await rt.index.instances(task.tenant_id, task.study_uid, task.series_uid)
        series_doc, count = await self._documents([r.file_path for r in rows])
        if await rt.index.flag_time(task.tenant_id, task.study_uid,
                                    task.series_uid) != task.flag_time:
            # Flagged again while we read (or taken by another worker node that saw the
            # newer flag): a newer build follows or ran; never overwrite its documents.
            return count
        series_path = f"{task.tenant_id}/{task.study_uid}/{task.series_uid}.json"
        await asyncio.to_thread(rt.storage.write_metadata, series_path, series_doc)
        await self._write_study(task)
        return count

    async def _documents(self, paths: list[str]) -> tuple[bytes, int]:
        """The DICOM JSON array of the instances stored at ``paths`` (PS3.18 F.2), and how
        many it holds (a file missing on disk is logged and left out)."""
        if self.nice <= 0:
            return await asyncio.to_thread(stored_documents, self.runtime.storage, paths)
        self._used = time.monotonic()
        for attempt in (1, 2):  # a helper found dead (OOM killer, a signal) is replaced once
            if self._pool is None:
                settings = self.runtime.settings
                self._pool = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_helper_init, initargs=(
                        self.nice, os.getpid(), settings.log_level,
                        settings.resolved_storage_url))
            try:
                return await asyncio.wrap_future(
                    self._pool.submit(_documents_in_helper, paths))
            except BrokenProcessPool:
                self._pool = None
                log.warning("metadata: the helper process died (attempt %d); starting "
                            "another", attempt)
        raise BackendError("the metadata helper process died twice on this series; it is "
                           "retried later")

    async def _write_study(self, task: JsonTask) -> None:
        """The study document from the series documents. Another worker node may rewrite
        a series document while this one assembles the study: whoever writes the study
        last then finds a series document changed under it and assembles again, so the
        study document ends up made of the newest series documents."""
        rt = self.runtime
        for _ in range(5):
            rows = await rt.index.instances(task.tenant_id, task.study_uid)
            series = sorted({r.series_uid for r in rows})
            parts: list[bytes] = []
            used: dict[str, bytes] = {}
            for series_uid in series:
                path = f"{task.tenant_id}/{task.study_uid}/{series_uid}.json"
                doc = await asyncio.to_thread(rt.storage.read_metadata, path)
                if doc is None:  # not generated yet: its own task follows; build it now
                    doc, _ = await self._documents(
                        [r.file_path for r in rows if r.series_uid == series_uid])
                else:
                    used[path] = doc
                parts.append(doc[1:-1])
            study_doc = b"[" + b",".join(p for p in parts if p) + b"]"
            await asyncio.to_thread(rt.storage.write_metadata,
                                    f"{task.tenant_id}/{task.study_uid}.json", study_doc)
            now = {path: await asyncio.to_thread(rt.storage.read_metadata, path)
                   for path in used}
            if now == used:
                return
        log.warning("study %s: its series documents kept changing; the next change of the "
                    "study rebuilds its document", task.study_uid)


_helper_storage: Storage | None = None  # the metadata helper process's storage


def _helper_init(nice: int, parent: int, log_level: str, storage_url: str) -> None:
    """Start of the metadata helper process: low priority, gone with its parent."""
    global _helper_storage
    die_with_parent(parent)
    # Ctrl+C, or SIGTERM to the whole process group (systemd): the parent winds it down
    # after the build in progress, and the kernel kills it if the parent dies
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(nice)
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s")
    _helper_storage = backend_class("storage", storage_url)(storage_url, fsync=False)


def _documents_in_helper(paths: list[str]) -> tuple[bytes, int]:
    assert _helper_storage is not None
    return stored_documents(_helper_storage, paths)


ACCESS_GROUP = "dicomcloud-access-log"


async def load_access_log(runtime: Runtime, stop: asyncio.Event) -> None:
    """Copy the access events of ``log_queue`` into the index's ``access_log`` table (the
    embedded stand-in for Doris' ``dicom_access_log``) until ``stop``. Offsets are
    committed after the rows are; a redelivered event is skipped by its ``trace_id``."""
    while not stop.is_set():
        try:
            messages = await runtime.queue.fetch(LOG_TOPIC, ACCESS_GROUP, 2000, 1.0)
            if messages:
                await _record_access(runtime, access_rows(m.body for m in messages))
                await runtime.queue.commit(ACCESS_GROUP, messages)
        except Exception as exc:  # the loader never dies: it retries (rows skip by trace_id)
            log.warning("access log table: %s; retrying",
                        exc.message if isinstance(exc, BackendError) else repr(exc))
            with contextlib.suppress(Exception):
                await runtime.queue.rewind(LOG_TOPIC, ACCESS_GROUP)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def _record_access(runtime: Runtime, rows: list[dict[str, Any]]) -> None:
    """Insert a batch; if the batch fails, row by row. A row the index refuses while it
    answers otherwise (a poison event) is skipped with a warning; when the index does not
    answer at all, BackendError: the batch is retried later."""
    try:
        await runtime.index.record_access(rows)
        return
    except BackendError:
        pass
    refused: list[str] = []
    for row in rows:
        try:
            await runtime.index.record_access([row])
        except BackendError as exc:
            refused.append(exc.message)
    if refused:
        await runtime.index.recent_access(limit=1)  # raises when the index is away
        log.warning("access log table: %d event(s) skipped, the index refused them: %s",
                    len(refused), refused[-1][:300])


async def run(runtime: Runtime, stop: asyncio.Event) -> None:
    """Scan for due series until ``stop``; load the access log table beside it."""
    if runtime.settings.access_log_table:
        loader = asyncio.create_task(load_access_log(runtime, stop), name="access-log-table")
        try:
            await _scan(runtime, stop)
        finally:
            if not stop.is_set():  # the scan failed: the loader goes too (redelivery is safe)
                loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
    else:
        await _scan(runtime, stop)


async def _scan(runtime: Runtime, stop: asyncio.Event) -> None:
    settings = runtime.settings.worker
    builder = MetadataBuilder(runtime, settings.builder_nice)
    try:
        await _scan_with(runtime, stop, builder)
    finally:
        await builder.close()


async def _scan_with(runtime: Runtime, stop: asyncio.Event, builder: MetadataBuilder) -> None:
    settings = runtime.settings.worker
    last_housekeeping = 0.0
    log.info("worker regenerating metadata after %.0f s quiet", settings.quiet_seconds)
    while not stop.is_set():
        cutoff = _now() - timedelta(seconds=settings.quiet_seconds)
        tasks = await runtime.index.due_series(cutoff, settings.max_retries,
                                               settings.batch_size)
        for task in tasks:
            if stop.is_set():
                break
            await _run_task(runtime, builder, task)
        if time.monotonic() - last_housekeeping > _HOUSEKEEP_EVERY:
            last_housekeeping = time.monotonic()
            dropped = await runtime.queue.housekeep(settings.queue_retention_days * 86400)
            if dropped:
                log.info("housekeeping: dropped %d consumed queue message(s)", dropped)
            if runtime.settings.access_log_table:
                pruned = await runtime.index.prune_access(
                    _now() - timedelta(days=settings.access_log_days))
                if pruned:
                    log.info("housekeeping: deleted %d access log row(s) older than %g days",
                             pruned, settings.access_log_days)
        if not tasks:
            await builder.rest()
        if len(tasks) < settings.batch_size:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), await _idle_seconds(runtime))


def _now() -> datetime:
    """UTC now with microseconds, as ``flag_time`` is stored."""
    return datetime.now(UTC).replace(tzinfo=None)


async def _idle_seconds(runtime: Runtime) -> float:
    """Time until the next scan: when the oldest waiting series falls quiet, but at most
    ``scan_interval_seconds`` (series flagged meanwhile by other processes are found then)."""
    settings = runtime.settings.worker
    oldest = await runtime.index.next_due(settings.max_retries)
    if oldest is None:
        return settings.scan_interval_seconds
    due = oldest + timedelta(seconds=settings.quiet_seconds) - _now()
    return min(max(due.total_seconds(), 0.05), settings.scan_interval_seconds)


async def _run_task(runtime: Runtime, builder: MetadataBuilder, task: JsonTask) -> None:
    try:
        count = await builder.build(task)
    except Exception as exc:
        log.error("metadata of series %s failed (attempt %d): %s", task.series_uid,
                  task.retry_times + 1, exc)
        # back off: 5 s, 10 s, 20 s, ... so that a storage hiccup does not use up the retries
        await runtime.index.finish_series(task, ok=False,
                                          retry_in=min(5.0 * 2 ** task.retry_times, 300.0))
        return
    if await runtime.index.finish_series(task, ok=True):
        log.debug("metadata of series %s: %d instance(s)", task.series_uid, count)
