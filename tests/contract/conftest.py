"""Fixtures of the port contract suites: every port fixture is parametrized over every
backend, so one suite runs against each (the embedded backend is the reference fake).

Adding a backend (Kafka, Redis, ...) means adding an entry to its ``*_BACKENDS`` table: an
opener that builds a fresh, unopened backend object on the store of the test. Opening a
second object on the same store is how the suites simulate a restart.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dicomcloud.backends.filestorage import FileStorage
from dicomcloud.backends.kafkaqueue import KafkaQueue
from dicomcloud.backends.localqueue import LocalQueue
from dicomcloud.backends.memcache import MemoryCache
from dicomcloud.backends.rediscache import RedisCache
from dicomcloud.backends.sqlindex import SqlIndex
from dicomcloud.extract import indexed_instance
from dicomcloud.ingest import Origin, stored_object
from dicomcloud.model import IndexedInstance, InstanceKey
from dicomcloud.ports import Cache, Queue, Storage
from tests.factories import ct_dataset, new_uid

TENANT = "default"


# -- index ------------------------------------------------------------------------------
def _sqlite_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'index.db'}"


def _postgres_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url: str = request.getfixturevalue("postgres_url")  # session database, cleaned per test
    return url


INDEX_BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "sqlite": _sqlite_url,
    "postgresql": _postgres_url,
}


@pytest.fixture(params=sorted(INDEX_BACKENDS))
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an index database for this test (sync: the PostgreSQL fixture is sync)."""
    return INDEX_BACKENDS[request.param](request, tmp_path)


@pytest.fixture
async def index(index_url: str) -> AsyncIterator[SqlIndex]:
    """An opened (migrated) index with empty tables."""
    async with SqlIndex(index_url) as opened:
        if opened.dialect == "postgresql":  # shared by the session: start from empty
            async with opened.engine.begin() as conn:
                await conn.execute(sa.text(
                    "TRUNCATE dicom_instance, dicom_state_meta, dicom_json_meta, access_log"))
        yield opened


def make_instance(study_uid: str, series_uid: str, sop_uid: str | None = None, *,
                  tenant: str = TENANT, **attrs: Any) -> IndexedInstance:
    """What the consumer would index for a generated CT instance (real extract path)."""
    ds = ct_dataset(study_uid, series_uid, sop_uid, **attrs)
    key = InstanceKey(tenant, study_uid, series_uid, str(ds.SOPInstanceUID))
    event = stored_object(ds, key, 1000 + len(ds.PixelData), Origin(tenant, "TEST", None),
                          "test-node")
    return indexed_instance(ds, event)


# -- queue ------------------------------------------------------------------------------
def _local_queue(tmp_path: Path) -> Callable[[], Queue]:
    url = f"local://{tmp_path / 'queue.db'}"
    return lambda: LocalQueue(url)  # type: ignore[return-value]


def _kafka_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Queue]:
    broker: str = request.getfixturevalue("kafka_broker")  # one broker per test run
    # a short session: Tansu answers a group join after half of it
    url = (f"kafka://{broker}?prefix=t{uuid.uuid4().hex[:8]}.&partitions=3"
           "&session_timeout_ms=2000")
    return lambda: KafkaQueue(url)  # type: ignore[return-value]


QUEUE_BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Callable[[], Queue]]] = {
    "local": lambda request, tmp_path: _local_queue(tmp_path),
    "kafka": _kafka_queue,
}


@pytest.fixture(params=sorted(QUEUE_BACKENDS))
def queue_opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Queue]:
    """Builds unopened queue objects on this test's store; a second one is a restart."""
    return QUEUE_BACKENDS[request.param](request, tmp_path)


@pytest.fixture
def local_queue_opener(tmp_path: Path) -> Callable[[], Queue]:
    """The embedded queue only: housekeeping is its own (Kafka leaves it to retention)."""
    return _local_queue(tmp_path)


@pytest.fixture
async def queue(queue_opener: Callable[[], Queue]) -> AsyncIterator[Queue]:
    async with queue_opener() as opened:
        yield opened


@pytest.fixture
def topic() -> str:
    """A topic name of this test only (a shared broker keeps topics between tests)."""
    return f"contract-{uuid.uuid4().hex[:12]}"


# -- cache ------------------------------------------------------------------------------
def _redis_cache(request: pytest.FixtureRequest) -> Cache:
    url: str = request.getfixturevalue("redis_url")
    return RedisCache(url)  # type: ignore[return-value]


CACHE_BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Cache]] = {
    "memory": lambda request: MemoryCache("memory://"),  # type: ignore[return-value]
    "redis": _redis_cache,
}


@pytest.fixture(params=sorted(CACHE_BACKENDS))
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    async with CACHE_BACKENDS[request.param](request) as opened:
        yield opened


@pytest.fixture
def key_prefix() -> str:
    """Keys of this test only (a shared cache server keeps keys between tests)."""
    return f"contract:{uuid.uuid4().hex[:12]}:"


# -- storage ----------------------------------------------------------------------------
def _file_storage(tmp_path: Path) -> Callable[[], Storage]:
    url = f"file://{tmp_path / 'storage'}"
    return lambda: FileStorage(url, fsync=True)  # type: ignore[return-value]


STORAGE_BACKENDS: dict[str, Callable[[Path], Callable[[], Storage]]] = {
    "file": _file_storage,
}


@pytest.fixture(params=sorted(STORAGE_BACKENDS))
def storage_opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Storage]:
    return STORAGE_BACKENDS[request.param](tmp_path)


@pytest.fixture
async def storage(storage_opener: Callable[[], Storage]) -> AsyncIterator[Storage]:
    async with storage_opener() as opened:
        yield opened


def instance_key(tenant: str = TENANT) -> InstanceKey:
    return InstanceKey(tenant, new_uid(), new_uid(), new_uid())
