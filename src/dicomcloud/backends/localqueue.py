"""Embedded durable queue (``local:///path/queue.db``): Kafka semantics on one SQLite file.

Topics are rows of one table ordered by an increasing id; a consumer group's committed
position is a row of ``offsets``. ``publish`` returns after the rows are committed with
``synchronous=FULL`` (fsync of the WAL), so an acknowledged instance's storage event
survives ``kill -9`` and power loss.

All writes go through one writer thread that commits every request waiting at that moment
in one transaction (group commit): with several associations storing at once, one fsync
covers many events. One consumer per group per queue file (the embedded mode runs one
process); distributed deployments use Kafka.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue as thread_queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dicomcloud.errors import BackendError
from dicomcloud.ports import Message, Outgoing

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT NOT NULL,
    key     TEXT NOT NULL,
    body    TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_messages_topic ON messages (topic, id);
CREATE TABLE IF NOT EXISTS offsets (
    topic   TEXT NOT NULL,
    grp     TEXT NOT NULL,
    last_id INTEGER NOT NULL,
    PRIMARY KEY (topic, grp)
);
"""
_POLL_SECONDS = 0.05  # picks up messages published by other processes (DIMSE listeners)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=60000")
    return conn


_Request = tuple[str, Any, concurrent.futures.Future[None]]


class LocalQueue:
    """``Queue`` port on SQLite with a group-committing writer thread."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "local" or not parts.path:
            raise BackendError(f"queue URL {url!r}: expected local:///path/to/queue.db")
        self.path = Path(unquote(parts.path))
        self._requests: thread_queue.SimpleQueue[_Request | None] = thread_queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._positions: dict[tuple[str, str], int] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> LocalQueue:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path)
            conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise BackendError(f"embedded queue {self.path} unavailable: {exc}") from exc
        self._loop = asyncio.get_running_loop()
        self._reader = _connect(self.path)
        self._writer = threading.Thread(target=self._write_loop, args=(conn,),
                                        name="queue-writer", daemon=True)
        self._writer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._requests.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        if messages:
            await asyncio.wrap_future(self._publish(messages))

    def publish_blocking(self, messages: Sequence[Outgoing], timeout: float) -> None:
        """``publish`` for a caller in a worker thread: blocks until durable."""
        if messages:
            self._publish(messages).result(timeout)

    def _publish(self, messages: Sequence[Outgoing]) -> concurrent.futures.Future[Any]:
        now = time.time()
        rows = [(topic, key, json.dumps(body, separators=(",", ":"), ensure_ascii=False), now)
                for topic, key, body in messages]
        future = self._request("publish", rows)
        topics = {m[0] for m in messages}
        future.add_done_callback(lambda _: self._wake_threadsafe(topics))
        return future

    async def commit(self, group: str, messages: Sequence[Message]) -> None:
        last: dict[str, int] = {}
        for m in messages:
            last[m.topic] = max(last.get(m.topic, 0), m.offset)
        if last:
            await self._submit("commit", [(t, group, i) for t, i in last.items()])

    async def fetch(
        self, topic: str, group: str, max_messages: int, timeout: float
    ) -> list[Message]:
        deadline = time.monotonic() + timeout
        event = self._waiters.setdefault(topic, asyncio.Event())
        while True:
            event.clear()
            found = await asyncio.to_thread(self._read, topic, group, max_messages)
            if found:
                self._positions[(topic, group)] = found[-1].offset
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, _POLL_SECONDS))

    async def housekeep(self, retention_seconds: float) -> int:
        """Drop messages every group has consumed, and unconsumed ones past retention."""
        return int(await self._submit("prune", time.time() - retention_seconds))

    async def rewind(self, topic: str, group: str) -> None:
        """Forget uncommitted fetches: the next fetch restarts at the committed position."""
        self._positions.pop((topic, group), None)

    def _wake_threadsafe(self, topics: set[str]) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        for topic in topics:
            event = self._waiters.get(topic)
            if event is not None:
                self._loop.call_soon_threadsafe(event.set)

    def _request(self, kind: str, payload: Any) -> concurrent.futures.Future[Any]:
        if self._writer is None:
            raise BackendError("embedded queue is closed")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._requests.put((kind, payload, future))
        return future

    async def _submit(self, kind: str, payload: Any) -> Any:
        return await asyncio.wrap_future(self._request(kind, payload))

    def _read(self, topic: str, group: str, limit: int) -> list[Message]:
        assert self._reader is not None
        with self._read_lock:
            position = self._positions.get((topic, group))
            if position is None:
                row = self._reader.execute(
                    "SELECT last_id FROM offsets WHERE topic=? AND grp=?", (topic, group)
                ).fetchone()
                position = row[0] if row else 0
                self._positions[(topic, group)] = position
            rows = self._reader.execute(
                "SELECT id, key, body FROM messages WHERE topic=? AND id>? ORDER BY id LIMIT ?",
                (topic, position, limit),
            ).fetchall()
        return [Message(topic, 0, i, k, json.loads(b)) for i, k, b in rows]

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._requests.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while True:
                    try:
                        item = self._requests.get_nowait()
                    except thread_queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._write_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _write_batch(self, conn: sqlite3.Connection, batch: list[_Request]) -> None:
        results: list[Any] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for kind, payload, _ in batch:
                results.append(self._apply(conn, kind, payload))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = BackendError(f"embedded queue write failed: {exc}")
            for _, _, future in batch:
                future.set_exception(error)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            future.set_result(result)

    @staticmethod
    def _apply(conn: sqlite3.Connection, kind: str, payload: Any) -> Any:
        if kind == "publish":
            conn.executemany(
                "INSERT INTO messages (topic, key, body, created) VALUES (?, ?, ?, ?)", payload)
            return None
        if kind == "commit":
            conn.executemany(
                "INSERT INTO offsets (topic, grp, last_id) VALUES (?, ?, ?) "
                "ON CONFLICT (topic, grp) DO UPDATE SET last_id=max(last_id, excluded.last_id)",
                payload)
            return None
        cutoff = float(payload)
        consumed = conn.execute(
            "DELETE FROM messages WHERE id <= (SELECT min(last_id) FROM offsets o "
            "WHERE o.topic = messages.topic)").rowcount
        expired = conn.execute(
            "DELETE FROM messages WHERE created < ? AND topic NOT IN "
            "(SELECT topic FROM offsets)", (cutoff,)).rowcount
        return consumed + expired
