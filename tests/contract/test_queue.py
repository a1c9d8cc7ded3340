"""Contract of the ``Queue`` port (Kafka semantics, at least once)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from dicomcloud.ports import Message, Queue

GROUP = "contract-group"


def bodies(messages: list[Message]) -> list[Any]:
    return [dict(m.body) for m in messages]


async def fetch_all(queue: Queue, topic: str, group: str = GROUP, expect: int | None = None,
                    timeout: float = 5.0) -> list[Message]:
    """Fetch until ``expect`` messages arrived (or, without ``expect``, the topic is dry)."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await queue.fetch(topic, group, 100, 0.2)
        out += got
        if (expect is None and not got) or (expect is not None and len(out) >= expect):
            break
    return out


async def test_publish_then_fetch_in_order_with_bodies_intact(queue: Queue, topic: str) -> None:
    sent = [
        {"n": 1, "text": "plain"},
        {"n": 2, "text": "Ünïcödé 山田^太郎 — ✓ 😀", "nested": {"list": [1, 2.5, None, True]}},
        {"n": 3, "text": "quotes \" and \\ backslash\nnewline\x00nul"},
        {"n": 4, "empty": {}, "none": None},
    ]
    await queue.publish([(topic, "study-1", body) for body in sent])
    got = await fetch_all(queue, topic, expect=4)
    assert bodies(got) == sent
    assert [m.key for m in got] == ["study-1"] * 4
    assert {m.topic for m in got} == {topic}
    offsets = [m.offset for m in got]
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == 4


async def test_one_key_keeps_its_order_across_publishes(queue: Queue, topic: str) -> None:
    for n in range(20):
        await queue.publish([(topic, "k", {"n": n}), (topic, "other", {"n": n})])
    got = await fetch_all(queue, topic, expect=40)
    assert [m.body["n"] for m in got if m.key == "k"] == list(range(20))
    assert [m.body["n"] for m in got if m.key == "other"] == list(range(20))


async def test_fetch_respects_max_messages(queue: Queue, topic: str) -> None:
    await queue.publish([(topic, "k", {"n": n}) for n in range(10)])
    first = await queue.fetch(topic, GROUP, 3, 2.0)
    assert 1 <= len(first) <= 3
    rest = await fetch_all(queue, topic, expect=10 - len(first))
    assert [m.body["n"] for m in first + rest] == list(range(10))


async def test_empty_fetch_waits_for_the_timeout(queue: Queue, topic: str) -> None:
    """Once the group has joined (a Kafka group's first fetch includes the join), a fetch
    with nothing to deliver returns after about its timeout."""
    assert await queue.fetch(topic, GROUP, 10, 0.1) == []
    started = time.monotonic()
    assert await queue.fetch(topic, GROUP, 10, 0.6) == []
    waited = time.monotonic() - started
    assert 0.5 <= waited < 3.0
    started = time.monotonic()
    assert await queue.fetch(topic, GROUP, 10, 0) == []
    assert time.monotonic() - started < 1.0


async def test_fetch_wakes_up_when_a_message_arrives(queue: Queue, topic: str) -> None:
    async def later() -> None:
        await asyncio.sleep(0.2)
        await queue.publish([(topic, "k", {"late": True})])

    publisher = asyncio.create_task(later())
    started = time.monotonic()
    got = await queue.fetch(topic, GROUP, 10, 10.0)
    await publisher
    assert bodies(got) == [{"late": True}]
    assert time.monotonic() - started < 5.0


async def test_commit_survives_a_restart(queue_opener: Callable[[], Queue], topic: str) -> None:
    async with queue_opener() as queue:
        await queue.publish([(topic, "k", {"n": n}) for n in range(6)])
        got = await fetch_all(queue, topic, expect=6)
        await queue.commit(GROUP, got[:4])
    async with queue_opener() as reopened:
        rest = await fetch_all(reopened, topic)
        assert [m.body["n"] for m in rest] == [4, 5]


async def test_uncommitted_messages_are_redelivered_after_a_restart(
        queue_opener: Callable[[], Queue], topic: str) -> None:
    async with queue_opener() as queue:
        await queue.publish([(topic, "k", {"n": n}) for n in range(3)])
        assert len(await fetch_all(queue, topic, expect=3)) == 3
        # fetched, never committed: a consumer that died mid-batch
    async with queue_opener() as reopened:
        again = await fetch_all(reopened, topic)
        assert [m.body["n"] for m in again] == [0, 1, 2]


async def test_commit_of_a_later_message_covers_the_earlier_ones(
        queue_opener: Callable[[], Queue], topic: str) -> None:
    async with queue_opener() as queue:
        await queue.publish([(topic, "k", {"n": n}) for n in range(5)])
        got = await fetch_all(queue, topic, expect=5)
        await queue.commit(GROUP, [got[2]])
        await queue.commit(GROUP, [got[1]])  # an older position never moves it back
    async with queue_opener() as reopened:
        assert [m.body["n"] for m in await fetch_all(reopened, topic)] == [3, 4]


async def test_rewind_redelivers_uncommitted(queue: Queue, topic: str) -> None:
    await queue.publish([(topic, "k", {"n": n}) for n in range(5)])
    got = await fetch_all(queue, topic, expect=5)
    await queue.commit(GROUP, got[:2])
    assert await queue.fetch(topic, GROUP, 10, 0.2) == []
    await queue.rewind(topic, GROUP)
    again = await fetch_all(queue, topic, expect=3)
    assert [m.body["n"] for m in again] == [2, 3, 4]
    assert [m.offset for m in again] == [m.offset for m in got[2:]]


async def test_groups_read_independently(queue_opener: Callable[[], Queue],
                                         topic: str) -> None:
    async with queue_opener() as queue:
        await queue.publish([(topic, "k", {"n": n}) for n in range(4)])
        a = await fetch_all(queue, topic, "group-a", expect=4)
        await queue.commit("group-a", a)
        b = await fetch_all(queue, topic, "group-b", expect=4)
        assert bodies(a) == bodies(b)
        await queue.commit("group-b", b[:1])
    async with queue_opener() as reopened:
        assert await fetch_all(reopened, topic, "group-a") == []
        assert [m.body["n"] for m in await fetch_all(reopened, topic, "group-b")] == [1, 2, 3]
        fresh = await fetch_all(reopened, topic, "group-c")
        assert [m.body["n"] for m in fresh] == [0, 1, 2, 3]


async def test_topics_are_separate(queue: Queue, topic: str) -> None:
    other = f"{topic}-other"
    await queue.publish([(topic, "k", {"t": 1}), (other, "k", {"t": 2})])
    assert bodies(await fetch_all(queue, topic, expect=1)) == [{"t": 1}]
    assert bodies(await fetch_all(queue, other, expect=1)) == [{"t": 2}]


async def test_housekeep_drops_consumed_and_keeps_unconsumed(
        local_queue_opener: Callable[[], Queue], topic: str) -> None:
    """The embedded queue keeps its file small itself; Kafka leaves this to retention."""
    analytics = f"{topic}-analytics"  # a topic nobody consumes
    async with local_queue_opener() as queue:
        await queue.publish([(topic, "k", {"n": n}) for n in range(5)])
        await queue.publish([(analytics, "k", {"a": n}) for n in range(3)])
        got = await fetch_all(queue, topic, expect=5)
        await queue.commit(GROUP, got[:3])
        assert await queue.housekeep(3600) == 3
        assert await queue.housekeep(3600) == 0
        # the consumer still gets what it had not committed
        await queue.rewind(topic, GROUP)
        assert [m.body["n"] for m in await fetch_all(queue, topic)] == [3, 4]
    async with local_queue_opener() as reopened:
        # consumed messages are gone even for a group starting from the beginning
        assert [m.body["n"] for m in await fetch_all(reopened, topic, "late")] == [3, 4]
        # unconsumed messages within the retention stay
        assert [m.body["a"] for m in await fetch_all(reopened, analytics, "probe")] == [0, 1, 2]


async def test_housekeep_drops_unconsumed_past_retention(
        local_queue_opener: Callable[[], Queue], topic: str) -> None:
    async with local_queue_opener() as queue:
        await queue.publish([(topic, "k", {"n": n}) for n in range(3)])
        await asyncio.sleep(0.05)
        assert await queue.housekeep(0) == 3
        assert await fetch_all(queue, topic, "probe") == []


async def test_publish_is_durable_once_it_returns(queue_opener: Callable[[], Queue],
                                                  topic: str) -> None:
    async with queue_opener() as writer:
        await writer.publish([(topic, "k", {"durable": n}) for n in range(3)])
        # another process (a restarted one) sees them while the writer is still open
        async with queue_opener() as reader:
            got = await fetch_all(reader, topic, expect=3)
        assert bodies(got) == [{"durable": n} for n in range(3)]


async def test_empty_publish_and_commit_are_no_ops(queue: Queue, topic: str) -> None:
    await queue.publish([])
    await queue.commit(GROUP, [])
    assert await queue.fetch(topic, GROUP, 10, 0.1) == []


async def test_concurrent_publishes_all_land(queue: Queue, topic: str) -> None:
    """Many tasks and threads publishing at once (group commit): nothing lost, per-key order."""
    loop = asyncio.get_running_loop()
    tasks, threads, each = 16, 4, 15

    async def from_task(n: int) -> None:
        for i in range(each):
            await queue.publish([(topic, f"task-{n}", {"src": f"task-{n}", "i": i})])

    errors: list[BaseException] = []

    def from_thread(n: int) -> None:
        try:
            for i in range(each):
                asyncio.run_coroutine_threadsafe(queue.publish(
                    [(topic, f"thread-{n}", {"src": f"thread-{n}", "i": i})]), loop).result(30)
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=from_thread, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    await asyncio.gather(*(from_task(n) for n in range(tasks)))
    await asyncio.gather(*(asyncio.to_thread(worker.join, 60) for worker in workers))
    assert errors == []
    total = (tasks + threads) * each
    got = await fetch_all(queue, topic, expect=total, timeout=20)
    assert len(got) == total
    by_source: dict[str, list[int]] = {}
    for m in got:
        by_source.setdefault(m.body["src"], []).append(m.body["i"])
        assert m.key == m.body["src"]
    assert len(by_source) == tasks + threads
    assert all(seq == list(range(each)) for seq in by_source.values())
