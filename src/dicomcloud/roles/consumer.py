"""Role ``consumer``: indexes ``storage_queue`` and feeds the analytics topics.

For each batch: read the stored files' headers, upsert the index in one transaction, publish
``DicomStateMeta`` (per touched series) and ``DicomImageMeta`` (per instance), and only then
commit the queue position. A crash anywhere redelivers the batch; the upserts make that
harmless, so every acknowledged instance is indexed exactly once.

A message that keeps failing (its file unreadable, say) is retried ``max_attempts`` times
and then parked on ``storage_queue.dlq`` with the error, so it never blocks the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from dicomcloud.errors import BackendError
from dicomcloud.extract import indexed_instance, state_body
from dicomcloud.header import read_open_file
from dicomcloud.model import IndexedInstance, StoredObject, body
from dicomcloud.ports import Message, Outgoing
from dicomcloud.runtime import Runtime
from dicomcloud.wado import native_frames

log = logging.getLogger(__name__)
TOPIC = "storage_queue"
DEAD_LETTER = "storage_queue.dlq"
_FETCH_WAIT = 0.5


class Consumer:
    """The consumer loop of one process."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings.consumer
        self._failures: dict[tuple[int, int], int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        queue, group = self.runtime.queue, self.settings.group
        backoff = 0.5
        while not stop.is_set():
            try:
                messages = await self._fetch_batch()
                if not messages:
                    continue
                await self.process(messages)
                await queue.commit(group, messages)
            except BackendError as exc:  # the index or the queue is away: wait, go on
                log.error("consumer: %s; retrying in %.1f s (uncommitted messages are "
                          "delivered again)", exc.message, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                with contextlib.suppress(BackendError):
                    await queue.rewind(TOPIC, group)
                continue
            backoff = 0.5

    async def _fetch_batch(self) -> list[Message]:
        """A batch: after the first message, wait ``linger_seconds`` for more (like Kafka's
        fetch.max.wait) so that a steady trickle is indexed in few transactions."""
        queue, group, size = self.runtime.queue, self.settings.group, self.settings.batch_size
        messages = await queue.fetch(TOPIC, group, size, _FETCH_WAIT)
        if messages and len(messages) < size and self.settings.linger_seconds > 0:
            await asyncio.sleep(self.settings.linger_seconds)
            messages += await queue.fetch(TOPIC, group, size - len(messages), 0)
        return messages

    async def process(self, messages: list[Message]) -> None:
        """Index one batch and publish its analytics messages (not committed here)."""
        items, parked = await asyncio.to_thread(self._read_all, messages)
        rt = self.runtime
        if items:
            touched, orphans = await rt.index.apply(items)
            states = await rt.index.series_state(touched)
            out: list[Outgoing] = [
                ("dicom_state_queue", row["study_uid"], state_body(row)) for row in states]
            out += [("dicom_image_queue", i.event.study_uid, body(i.image)) for i in items]
            out += parked
            await rt.queue.publish(out)
            for tenant in {i.event.tenant_id for i in items}:
                await rt.bump_generation(tenant)
            # An instance re-sent under another study/series leaves its old file behind. It
            # is kept, not deleted: a later event may have written that path again (A, B,
            # then A), and deleting could lose an acknowledged instance.
            for path in orphans:
                log.warning("instance re-sent under another series; old file kept: %s", path)
        elif parked:
            await rt.queue.publish(parked)
        log.debug("indexed %d instance(s), parked %d", len(items), len(parked))

    def _read_all(self, messages: list[Message]) -> tuple[list[IndexedInstance], list[Outgoing]]:
        items: list[IndexedInstance] = []
        parked: list[Outgoing] = []
        for message in messages:
            try:
                items.append(self._read(message))
                self._failures.pop((message.partition, message.offset), None)
            except Exception as exc:
                key = (message.partition, message.offset)
                attempts = self._failures.get(key, 0) + 1
                if attempts < self.settings.max_attempts:
                    self._failures[key] = attempts
                    raise BackendError(
                        f"message {message.offset} failed (attempt {attempts}): {exc}"
                    ) from exc
                self._failures.pop(key, None)
                log.error("parking storage event %s after %d attempts: %s",
                          message.body.get("file_path"), attempts, exc)
                parked.append((DEAD_LETTER, message.key,
                               {"error": str(exc)[:1000], "message": dict(message.body)}))
        return items, parked

    def _read(self, message: Message) -> IndexedInstance:
        event = StoredObject(**_fields(message.body))
        with self.runtime.storage.open(event.file_path) as fh:
            ds, at = read_open_file(fh)  # the header only: no need for the pixels
            try:  # an optimisation for frame requests: never a reason to park an instance
                frames = native_frames(fh, ds, at, event.file_size)
            except Exception:
                frames = None
        item = indexed_instance(ds, event)
        if frames is None:
            return item
        return dataclasses.replace(item, pixel_offset=frames[0], frame_size=frames[1])


def _fields(raw: Any) -> dict[str, Any]:
    names = StoredObject.__dataclass_fields__
    missing = set(names) - set(raw)
    if missing:
        raise ValueError(f"storage event lacks {', '.join(sorted(missing))}")
    return {k: raw[k] for k in names}


async def run(runtime: Runtime, stop: asyncio.Event) -> None:
    """Consume until ``stop``; the batch in hand is finished first."""
    log.info("consumer indexing %s as group %s", TOPIC, runtime.settings.consumer.group)
    await Consumer(runtime).run(stop)
