"""The metadata worker's build against a real embedded runtime."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import psutil

from dicomcloud.config import load_settings
from dicomcloud.model import JsonTask, utcnow
from dicomcloud.roles.worker import MetadataBuilder
from dicomcloud.runtime import Runtime
from tests.contract.conftest import TENANT, make_instance
from tests.contract.test_index import FUTURE
from tests.factories import ct_dataset, new_uid
from tests.support import part10_bytes


async def _store(runtime: Runtime, study: str, series: str, sop: str) -> None:
    """File and index row of one CT instance, as the scp and consumer would leave them."""
    item = make_instance(study, series, sop)
    staged = runtime.storage.stage()
    staged.write(part10_bytes(ct_dataset(study, series, sop)))
    runtime.storage.commit(staged, item.event.key)
    await runtime.index.apply([item])


async def test_a_build_overtaken_by_a_newer_flag_writes_nothing(tmp_path: Path) -> None:
    """A slow worker must never overwrite the documents of a newer build: once the series
    is flagged again, the older task leaves the files alone and stays unfinished."""
    settings = load_settings(data_dir=tmp_path, roles=("worker",))
    async with Runtime(settings) as runtime:
        study, series = new_uid(), new_uid()
        await _store(runtime, study, series, new_uid())
        (old,) = await runtime.index.due_series(utcnow() + FUTURE, 5, 10)
        await _store(runtime, study, series, new_uid())  # flagged again meanwhile
        builder = MetadataBuilder(runtime)
        await builder.build(old)
        path = f"{TENANT}/{study}/{series}.json"
        assert runtime.storage.read_metadata(path) is None
        assert await runtime.index.finish_series(old, ok=True) is False

        (new,) = await runtime.index.due_series(utcnow() + FUTURE, 5, 10)
        assert await builder.build(new) == 2
        document = runtime.storage.read_metadata(path)
        assert document is not None and len(orjson.loads(document)) == 2
        assert await runtime.index.finish_series(new, ok=True) is True


async def test_the_low_priority_helper_builds_the_same_documents_as_the_worker_itself(
        tmp_path: Path) -> None:
    """``worker.builder_nice``: the files are read in a helper process at that nice value
    (lower priority than the archive's own processes), and the documents it builds are
    byte for byte those built in the worker's own process."""
    settings = load_settings(data_dir=tmp_path, roles=("worker",))
    async with Runtime(settings) as runtime:
        study, series = new_uid(), new_uid()
        for _ in range(3):
            await _store(runtime, study, series, new_uid())
        (task,) = await runtime.index.due_series(utcnow() + FUTURE, 5, 10)
        path = f"{TENANT}/{study}/{series}.json"
        here = MetadataBuilder(runtime, nice=0)
        assert await here.build(task) == 3
        in_process = runtime.storage.read_metadata(path)
        helper = MetadataBuilder(runtime, nice=settings.worker.builder_nice)
        try:
            runtime.storage.write_metadata(path, b"[]")
            assert await helper.build(task) == 3
            assert runtime.storage.read_metadata(path) == in_process
            pid = _helper_pid(helper)
            assert os.getpriority(os.PRIO_PROCESS, pid) == \
                os.getpriority(os.PRIO_PROCESS, 0) + settings.worker.builder_nice
        finally:
            await helper.close()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


@contextlib.asynccontextmanager
async def _helper_with_a_series(tmp_path: Path) -> AsyncIterator[tuple[MetadataBuilder, JsonTask]]:
    """A builder with a helper process (nice 5), and the task of a one-instance series."""
    settings = load_settings(data_dir=tmp_path, roles=("worker",))
    async with Runtime(settings) as runtime:
        await _store(runtime, new_uid(), new_uid(), new_uid())
        (task,) = await runtime.index.due_series(utcnow() + FUTURE, 5, 10)
        helper = MetadataBuilder(runtime, nice=5)
        try:
            yield helper, task
        finally:
            await helper.close()


def _helper_pid(builder: MetadataBuilder) -> int:
    assert builder._pool is not None
    (pid,) = builder._pool._processes
    return int(pid)


async def test_a_helper_that_died_is_replaced_and_the_build_succeeds(tmp_path: Path) -> None:
    """kill -9 of the helper between builds (the OOM killer, say): the next build starts
    another helper and succeeds; no series loses an attempt for it."""
    async with _helper_with_a_series(tmp_path) as (helper, task):
        assert await helper.build(task) == 1
        first = _helper_pid(helper)
        os.kill(first, signal.SIGKILL)
        psutil.Process(first).wait(10)
        assert await helper.build(task) == 1
        assert _helper_pid(helper) != first


async def test_a_helper_ignores_sigterm_to_its_process_group(tmp_path: Path) -> None:
    """systemd stops a service by SIGTERM to every process of it: the helper leaves its
    stopping to the worker (after the build in progress), so no build fails on the way."""
    async with _helper_with_a_series(tmp_path) as (helper, task):
        assert await helper.build(task) == 1
        pid = _helper_pid(helper)
        os.kill(pid, signal.SIGTERM)
        assert await helper.build(task) == 1
        assert _helper_pid(helper) == pid


async def test_an_idle_helper_stops_and_the_next_build_starts_another(tmp_path: Path) -> None:
    """The helper's memory goes back to the system when there is nothing to build."""
    async with _helper_with_a_series(tmp_path) as (helper, task):
        assert await helper.build(task) == 1
        await helper.rest(idle_seconds=60.0)  # used just now: stays
        first = _helper_pid(helper)
        await helper.rest(idle_seconds=0.0)
        assert helper._pool is None and not psutil.pid_exists(first)
        assert await helper.build(task) == 1
