"""The metadata worker's build against a real embedded runtime."""

from __future__ import annotations

from pathlib import Path

import orjson

from dicomcloud.config import load_settings
from dicomcloud.model import utcnow
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
