"""Contract of the ``Cache`` port: a miss is always allowed, a stale hit never."""

from __future__ import annotations

import asyncio

from dicomcloud.ports import Cache


async def test_miss_is_none(cache: Cache, key_prefix: str) -> None:
    assert await cache.get(key_prefix + "absent") is None


async def test_set_then_get(cache: Cache, key_prefix: str) -> None:
    key = key_prefix + "k"
    await cache.set(key, b"value")
    assert await cache.get(key) == b"value"
    await cache.set(key, b"replaced \x00\xff")
    assert await cache.get(key) == b"replaced \x00\xff"
    await cache.set(key + "empty", b"")
    assert await cache.get(key + "empty") == b""


async def test_delete(cache: Cache, key_prefix: str) -> None:
    a, b, c = (key_prefix + n for n in "abc")
    for key in (a, b, c):
        await cache.set(key, key.encode())
    await cache.delete(a, b, key_prefix + "never-set")
    assert await cache.get(a) is None
    assert await cache.get(b) is None
    assert await cache.get(c) == c.encode()
    await cache.delete()
    await cache.delete(a)


async def test_incr(cache: Cache, key_prefix: str) -> None:
    key = key_prefix + "counter"
    assert await cache.incr(key) == 1
    assert await cache.incr(key) == 2
    assert await cache.get(key) == b"2"
    await cache.set(key, b"41")
    assert await cache.incr(key) == 42
    await cache.delete(key)
    assert await cache.incr(key) == 1


async def test_concurrent_incr_is_atomic(cache: Cache, key_prefix: str) -> None:
    key = key_prefix + "counter"
    results = await asyncio.gather(*(cache.incr(key) for _ in range(50)))
    assert sorted(results) == list(range(1, 51))
    assert await cache.get(key) == b"50"


async def test_ttl_expiry(cache: Cache, key_prefix: str) -> None:
    short, forever = key_prefix + "short", key_prefix + "forever"
    await cache.set(short, b"x", ttl=0.3)
    await cache.set(forever, b"y")
    assert await cache.get(short) == b"x"
    await asyncio.sleep(1.1)  # beyond the TTL even for servers with second resolution
    assert await cache.get(short) is None
    assert await cache.get(forever) == b"y"


async def test_set_without_ttl_clears_an_earlier_ttl(cache: Cache, key_prefix: str) -> None:
    key = key_prefix + "k"
    await cache.set(key, b"old", ttl=0.3)
    await cache.set(key, b"new")
    await asyncio.sleep(1.1)
    assert await cache.get(key) == b"new"
