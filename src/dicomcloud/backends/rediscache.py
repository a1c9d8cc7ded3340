"""``Cache`` port on Redis through redis.asyncio.

URL: ``redis://[:password@]host:port/db[?prefix=...]`` (``rediss://`` for TLS). Every key
is stored as ``{prefix}{key}`` so that several archives or test runs share one server.

The cache is best effort: when Redis is unreachable, reads miss and writes are dropped,
and for one second after a failure it is not even asked (requests are not slowed by a
connect timeout each). Because a write lost while Redis was away could be an
invalidation (``incr`` of a generation), the first successful call after an outage
deletes every key under the prefix before anything else: a miss is allowed, a stale hit
never (the port's contract).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from dicomcloud.errors import ConfigError

log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: Seconds Redis is left alone after a failure.
_BACKOFF = 1.0


class RedisCache:
    """``Cache`` port on Redis."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ConfigError(f"cache_url {url.split('@')[-1]!r}: expected redis://host:port/db")
        query = parse_qsl(parts.query)
        self.prefix = next((v for k, v in query if k == "prefix"), "dicomcloud:")
        rest = urlencode([(k, v) for k, v in query if k != "prefix"])
        self.url = urlunsplit(parts._replace(query=rest))
        self._where = f"{parts.hostname}:{parts.port or 6379}"
        self._redis: aioredis.Redis | None = None
        self._down_until = 0.0
        self._dirty = False

    async def __aenter__(self) -> RedisCache:
        self._redis = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=0.5, socket_timeout=2.0,
            health_check_interval=15, retry_on_timeout=False)
        # Whatever happened while this process was away (it may have missed nothing, or
        # a restart may have cut an invalidation short): start from a clean prefix only
        # if Redis is reachable; else the first call after it comes back does it.
        self._dirty = True
        await self._call(lambda r: r.ping())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _call(self, op: Callable[[aioredis.Redis], Awaitable[_T]]) -> _T | None:
        """``op`` on Redis, or None when Redis is (recently found) unavailable."""
        if self._redis is None or time.monotonic() < self._down_until:
            self._dirty = True
            return None
        try:
            if self._dirty:
                await self._flush_prefix(self._redis)
                self._dirty = False
            return await op(self._redis)
        except (RedisError, OSError) as exc:
            if not self._dirty:
                log.warning("Redis at %s unavailable (%s); caching is off until it answers",
                            self._where, exc)
            self._down_until = time.monotonic() + _BACKOFF
            self._dirty = True
            return None

    async def _flush_prefix(self, r: aioredis.Redis) -> None:
        deleted = 0
        async for batch in _batches(r.scan_iter(match=_glob(self.prefix) + "*", count=1000)):
            deleted += int(await r.unlink(*batch))
        if deleted:
            log.info("Redis at %s: dropped %d cached entr%s that may be stale", self._where,
                     deleted, "y" if deleted == 1 else "ies")

    async def get(self, key: str) -> bytes | None:
        value = await self._call(lambda r: r.get(self.prefix + key))
        if isinstance(value, str):  # only with decode_responses, which is not set
            return value.encode()
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        if ttl is None:
            await self._call(lambda r: r.set(self.prefix + key, value))
        else:
            await self._call(lambda r: r.set(self.prefix + key, value,
                                             px=max(int(ttl * 1000), 1)))

    async def delete(self, *keys: str) -> None:
        if keys:
            await self._call(lambda r: r.delete(*(self.prefix + k for k in keys)))

    async def incr(self, key: str) -> int:
        value = await self._call(lambda r: r.incr(self.prefix + key))
        return int(value) if value is not None else 0


async def _batches(keys: AsyncIterator[bytes], size: int = 500
                   ) -> AsyncIterator[list[bytes]]:
    batch: list[bytes] = []
    async for key in keys:
        batch.append(key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _glob(text: str) -> str:
    """``text`` with Redis glob characters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
