"""In-process cache (``memory://``): an LRU dictionary with per-key expiry."""

from __future__ import annotations

import time
from collections import OrderedDict

_MAX_BYTES_DEFAULT = 256 * 1024 * 1024


class MemoryCache:
    """``Cache`` port in process memory, bounded by total value size."""

    def __init__(self, url: str = "memory://", max_bytes: int = _MAX_BYTES_DEFAULT) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._bytes = 0

    async def __aenter__(self) -> MemoryCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._items.clear()
        self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        if len(value) > self.max_bytes:
            return
        self._drop(key)
        expires = None if ttl is None else time.monotonic() + ttl
        self._items[key] = (value, expires)
        self._bytes += len(value)
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._drop(key)

    async def incr(self, key: str) -> int:
        current = await self.get(key)
        value = int(current or b"0") + 1
        self._drop(key)
        self._items[key] = (str(value).encode(), None)
        self._bytes += len(self._items[key][0])
        return value

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= len(item[0])
