"""Backends of the four ports, chosen by URL scheme through a lazy import table.

Only the chosen backend is imported, so an embedded node needs none of the distributed
drivers. A missing driver gives an error naming the pip extra to install.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from dicomcloud.errors import ConfigError

# port -> scheme -> ("module:Class", pip extra that provides the driver or None)
BACKENDS: dict[str, dict[str, tuple[str, str | None]]] = {
    "index": {
        "sqlite+aiosqlite": ("dicomcloud.backends.sqlindex:SqlIndex", None),
        "postgresql+asyncpg": ("dicomcloud.backends.sqlindex:SqlIndex", "postgres"),
    },
    "queue": {
        "local": ("dicomcloud.backends.localqueue:LocalQueue", None),
        "kafka": ("dicomcloud.backends.kafkaqueue:KafkaQueue", "kafka"),
    },
    "cache": {
        "memory": ("dicomcloud.backends.memcache:MemoryCache", None),
        "redis": ("dicomcloud.backends.rediscache:RedisCache", "redis"),
    },
    "storage": {
        "file": ("dicomcloud.backends.filestorage:FileStorage", None),
    },
}
_DRIVERS = {"postgres": "asyncpg", "kafka": "aiokafka", "redis": "redis"}


def backend_class(port: str, url: str) -> Any:
    """The backend class serving ``url`` for ``port`` (imported now)."""
    scheme = urlsplit(url).scheme
    table = BACKENDS[port]
    if scheme not in table:
        raise ConfigError(
            f"{port}_url {url.split('@')[-1]!r}: unsupported scheme {scheme!r}; "
            f"use one of {', '.join(s + '://' for s in table)}"
        )
    target, extra = table[scheme]
    if extra is not None:
        try:
            importlib.import_module(_DRIVERS[extra])
        except ImportError as exc:
            raise ConfigError(
                f"{port}_url uses {scheme}:// but its driver is not installed; "
                f"run: pip install 'dicomcloud[{extra}]'"
            ) from exc
    module, _, name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{port} backend {scheme}:// is not available in this build") from exc
    return cls
