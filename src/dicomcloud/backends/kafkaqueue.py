"""``Queue`` port on Apache Kafka (or any Kafka-protocol broker) through aiokafka.

URL: ``kafka://host:port[,host:port...][?prefix=&partitions=6&replication=1&session_timeout_ms=10000]``

- Topics are ``{prefix}{name}``: several archives (or test runs) can share one cluster.
  The DESIGN.md topics and the dead-letter topic are created on start when missing, with
  ``partitions`` partitions and ``replication`` replicas; any other topic on first use.
- Publishing waits for ``acks=all``: a message is durable on every in-sync replica when
  ``publish`` returns. Keys are the StudyInstanceUID, so one study stays in one partition
  and in order. (No idempotent producer: a retried send may duplicate a message, which
  at-least-once consumers absorb anyway.)
- Each (topic, group) gets one consumer in the Kafka consumer group
  ``{prefix}{group}.{topic}``: processes of one role share that topic's partitions, and a
  member joining for one topic never rebalances another. A process that dies is noticed
  after ``session_timeout_ms``; its partitions then go to the others. Offsets are
  committed only by ``commit``, which the consumer calls after its index transaction
  committed; a message fetched and never committed is delivered again, to this process
  (``rewind``) or to whichever process owns the partition after a restart or rebalance.
- ``housekeep`` has nothing to do: the broker's retention removes old messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    TopicAlreadyExistsError,
)
from aiokafka.structs import OffsetAndMetadata

from dicomcloud.errors import BackendError, ConfigError
from dicomcloud.ports import TOPICS, Message, Outgoing

log = logging.getLogger(__name__)

#: Topics created on start besides DESIGN.md's (the consumer parks poison messages here).
EXTRA_TOPICS = ("storage_queue.dlq",)
#: How long a first fetch waits for the group to assign partitions before its own timeout.
_JOIN_TIMEOUT = 30.0


class _Joined(ConsumerRebalanceListener):  # type: ignore[misc]
    """Sets ``event`` once the group has assigned this consumer its partitions (maybe
    none), and forgets positions of partitions taken away."""

    def __init__(self, queue: KafkaQueue, group: str) -> None:
        self.event = asyncio.Event()
        self.queue = queue
        self.group = group

    async def on_partitions_revoked(self, revoked: Any) -> None:
        for tp in revoked:
            self.queue._committed.pop((self.group, tp), None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.event.set()


class KafkaQueue:
    """``Queue`` port on Kafka."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if not parts.netloc:
            raise ConfigError(f"queue_url {url!r}: expected kafka://host:port[,host:port]")
        self.bootstrap = parts.netloc
        query = parse_qs(parts.query)
        try:
            self.prefix = query.get("prefix", [""])[0]
            self.partitions = int(query.get("partitions", ["6"])[0])
            self.replication = int(query.get("replication", ["1"])[0])
            self.session_timeout_ms = int(query.get("session_timeout_ms", ["10000"])[0])
        except ValueError as exc:
            raise ConfigError(f"queue_url {url!r}: partitions and replication are numbers"
                              ) from exc
        self.client_id = f"dicomcloud-{socket.gethostname()}"
        self._producer: AIOKafkaProducer | None = None
        self._consumers: dict[tuple[str, str], tuple[AIOKafkaConsumer, _Joined]] = {}
        self._consumer_lock = asyncio.Lock()
        self._known_topics: set[str] = set()
        self._topic_lock = asyncio.Lock()
        #: Highest offset committed per (group, partition) by this process: a commit of
        #: an older message never moves the group back.
        self._committed: dict[tuple[str, TopicPartition], int] = {}

    async def __aenter__(self) -> KafkaQueue:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all",
            enable_idempotence=False, linger_ms=0, request_timeout_ms=30000,
            max_request_size=8 * 1024 * 1024)
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise BackendError(f"Kafka at {self.bootstrap} unavailable: {exc}; is the broker "
                               "running and queue_url right?") from exc
        self._producer = producer
        await self._ensure_topics([*TOPICS, *EXTRA_TOPICS])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for consumer, _ in self._consumers.values():
            with contextlib.suppress(Exception):
                await consumer.stop()
        self._consumers.clear()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None

    # -- topics -------------------------------------------------------------------------
    async def _ensure_topics(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self._known_topics]
        if not missing:
            return
        async with self._topic_lock:
            missing = [n for n in missing if n not in self._known_topics]
            if not missing:
                return
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap,
                                        client_id=self.client_id)
            try:
                await admin.start()
                existing = set(await admin.list_topics())
                new = [NewTopic(self.prefix + n, self.partitions, self.replication)
                       for n in missing if self.prefix + n not in existing]
                if new:
                    response = await admin.create_topics(new)
                    failed = [(e[0], e[1], e[2] if len(e) > 2 else None)  # v0 has no text
                              for e in getattr(response, "topic_errors", [])
                              if e[1] not in (0, TopicAlreadyExistsError.errno)]
                    if failed:  # 36 (already exists): a node starting at the same time
                        raise BackendError("cannot create Kafka topic(s): " + "; ".join(
                            f"{name}: error {code} {message or ''}".strip()
                            for name, code, message in failed)
                            + " (check partitions= and replication= of queue_url)")
                    log.info("created Kafka topic(s) %s with %d partition(s)",
                             ", ".join(t.name for t in new), self.partitions)
            except (KafkaError, OSError) as exc:
                raise BackendError(f"cannot create Kafka topics at {self.bootstrap}: {exc}"
                                   ) from exc
            finally:
                with contextlib.suppress(Exception):
                    await admin.close()
            self._known_topics.update(missing)

    # -- publish ------------------------------------------------------------------------
    async def publish(self, messages: Sequence[Outgoing]) -> None:
        if not messages:
            return
        if self._producer is None:
            raise BackendError("queue used before it was opened")
        await self._ensure_topics(sorted({topic for topic, _, _ in messages}))
        try:
            sent = [await self._producer.send(self.prefix + topic, orjson.dumps(dict(body)),
                                              key=key.encode())
                    for topic, key, body in messages]
            await asyncio.gather(*sent)
        except (KafkaError, OSError) as exc:
            raise BackendError(f"publishing to Kafka at {self.bootstrap} failed: {exc}"
                               ) from exc

    # -- consume ------------------------------------------------------------------------
    async def _consumer(self, topic: str, group: str) -> tuple[AIOKafkaConsumer, _Joined]:
        key = (topic, group)
        if key in self._consumers:
            return self._consumers[key]
        async with self._consumer_lock:
            if key in self._consumers:
                return self._consumers[key]
            await self._ensure_topics([topic])
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, client_id=self.client_id,
                group_id=f"{self.prefix}{group}.{topic}", enable_auto_commit=False,
                auto_offset_reset="earliest", fetch_max_wait_ms=100,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=max(self.session_timeout_ms // 4, 100),
                metadata_max_age_ms=30000, max_partition_fetch_bytes=4 * 1024 * 1024)
            joined = _Joined(self, group)
            consumer.subscribe([self.prefix + topic], listener=joined)
            try:
                await consumer.start()
            except (KafkaError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                raise BackendError(f"Kafka consumer for {topic} unavailable: {exc}") from exc
            self._consumers[key] = (consumer, joined)
            return consumer, joined

    async def fetch(
        self, topic: str, group: str, max_messages: int, timeout: float
    ) -> list[Message]:
        consumer, joined = await self._consumer(topic, group)
        if not joined.event.is_set():  # the first fetch: the group join comes first
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(joined.event.wait(), _JOIN_TIMEOUT)
        try:
            batches = await consumer.getmany(timeout_ms=int(timeout * 1000),
                                             max_records=max(max_messages, 1))
        except KafkaError as exc:
            raise BackendError(f"fetching {topic} from Kafka failed: {exc}") from exc
        out = []
        for tp in sorted(batches, key=lambda t: t.partition):
            for record in batches[tp]:
                out.append(Message(topic, tp.partition, record.offset,
                                   (record.key or b"").decode("utf-8", "replace"),
                                   _body(record.value)))
        return out

    async def commit(self, group: str, messages: Sequence[Message]) -> None:
        positions: dict[tuple[str, int], int] = {}
        for m in messages:
            positions[(m.topic, m.partition)] = max(positions.get((m.topic, m.partition), -1),
                                                    m.offset + 1)
        by_topic: dict[str, dict[TopicPartition, OffsetAndMetadata]] = {}
        for (topic, partition), offset in positions.items():
            tp = TopicPartition(self.prefix + topic, partition)
            if offset <= self._committed.get((group, tp), -1):
                continue  # an older position never moves the group back
            by_topic.setdefault(topic, {})[tp] = OffsetAndMetadata(offset, "")
        for topic, offsets in by_topic.items():
            consumer, _ = await self._consumer(topic, group)
            # Partitions taken away by a rebalance since the fetch: their new owner starts
            # from the last committed offset and indexes those messages again (harmless:
            # indexing is idempotent). Committing them from here would fail.
            assigned = consumer.assignment()
            offsets = {tp: meta for tp, meta in offsets.items() if tp in assigned}
            if not offsets:
                continue
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:  # rebalanced meanwhile
                log.warning("offset commit on %s lost to a rebalance (%s); the messages "
                            "will be delivered again", topic, exc)
                continue
            except KafkaError as exc:
                raise BackendError(f"committing offsets on {topic} failed: {exc}") from exc
            for tp, meta in offsets.items():
                self._committed[(group, tp)] = meta.offset

    async def rewind(self, topic: str, group: str) -> None:
        consumer, _ = await self._consumer(topic, group)
        try:
            for tp in consumer.assignment():
                committed = await consumer.committed(tp)
                if committed is None or committed < 0:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, committed)
        except KafkaError as exc:
            raise BackendError(f"rewinding {topic} failed: {exc}") from exc

    async def housekeep(self, retention_seconds: float) -> int:
        return 0  # the broker's retention.ms does it


def _body(value: bytes | None) -> Mapping[str, Any]:
    """A message body; a value that is not a JSON object comes back as ``{"raw": ...}``
    so that the consumer parks it instead of crashing on it."""
    try:
        body = orjson.loads(value or b"null")
    except orjson.JSONDecodeError:
        return {"raw": (value or b"")[:1000].decode("utf-8", "replace")}
    return body if isinstance(body, dict) else {"raw": body}
