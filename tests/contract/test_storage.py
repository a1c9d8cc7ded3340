"""Contract of the ``Storage`` port: staged writes, atomic commit, safe paths."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomcloud.errors import BadRequest
from dicomcloud.model import InstanceKey
from dicomcloud.ports import Storage
from tests.contract.conftest import TENANT, instance_key
from tests.factories import new_uid


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def root_of(storage: Storage) -> Path:
    root = getattr(storage, "root", None)
    if root is None:
        pytest.fail(f"{type(storage).__name__} exposes no root to inspect")
    return Path(root)


def dead_pid() -> int:
    """The id of a process that has exited."""
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait()
    return gone.pid


def store(storage: Storage, key: InstanceKey, data: bytes) -> int:
    staged = storage.stage()
    staged.write(data[: len(data) // 2])
    staged.write(data[len(data) // 2:])
    assert staged.size == len(data)
    return storage.commit(staged, key)


async def test_stage_commit_open_round_trip(storage: Storage) -> None:
    key = instance_key()
    data = bytes(range(256)) * 1000
    assert store(storage, key, data) == len(data)
    with storage.open(key.relative_path) as fh:
        assert fh.read() == data
    assert key.relative_path == f"{TENANT}/{key.study_uid}/{key.series_uid}/{key.sop_uid}.dcm"
    staging = [p for p in files_under(root_of(storage)) if ".staging" in p.parts]
    assert staging == []


async def test_staged_file_is_invisible_until_committed(storage: Storage) -> None:
    key = instance_key()
    staged = storage.stage()
    staged.write(b"partial")
    with pytest.raises(FileNotFoundError):
        storage.open(key.relative_path)
    storage.commit(staged, key)
    with storage.open(key.relative_path) as fh:
        assert fh.read() == b"partial"


async def test_commit_replaces_atomically(storage: Storage) -> None:
    key = instance_key()
    old, new = b"old" * 100_000, b"new" * 50_000
    store(storage, key, old)
    reader = storage.open(key.relative_path)
    try:
        assert reader.read(3) == b"old"
        assert store(storage, key, new) == len(new)
        # a reader that had the old file keeps reading the whole old file, never a mix
        assert b"old" + reader.read() == old
    finally:
        reader.close()
    with storage.open(key.relative_path) as fh:
        assert fh.read() == new
    instance_files = [p for p in files_under(root_of(storage)) if p.suffix == ".dcm"]
    assert len(instance_files) == 1


async def test_discard_leaves_nothing(storage: Storage) -> None:
    root = root_of(storage)
    before = files_under(root)
    staged = storage.stage()
    staged.write(b"x" * 10_000)
    storage.discard(staged)
    assert files_under(root) == before


@pytest.mark.parametrize("field, value", [
    ("study_uid", "1.2.abc"),
    ("series_uid", "../../etc"),
    ("sop_uid", "1.2.3/../../4"),
    ("sop_uid", ""),
    ("sop_uid", "1." + "2" * 70),
    ("tenant_id", ".."),
    ("tenant_id", "../escape"),
])
async def test_invalid_key_is_refused_and_creates_nothing(storage: Storage, field: str,
                                                          value: str) -> None:
    root = root_of(storage)
    before = files_under(root)
    dirs_before = sorted(p for p in root.parent.rglob("*") if p.is_dir())
    fields = {"tenant_id": TENANT, "study_uid": new_uid(), "series_uid": new_uid(),
              "sop_uid": new_uid(), field: value}
    staged = storage.stage()
    staged.write(b"payload")
    with pytest.raises(BadRequest):
        storage.commit(staged, InstanceKey(**fields))
    assert files_under(root) == before
    assert sorted(p for p in root.parent.rglob("*") if p.is_dir()) == dirs_before


@pytest.mark.parametrize("path", [
    "../outside.dcm", "default/../../outside", "/etc/passwd", "a//b", "a/./b", "",
    "default/1.2/3.4/..", "default/1.2/3 4.dcm",
])
async def test_paths_that_could_escape_are_refused(storage: Storage, path: str) -> None:
    root = root_of(storage)
    before = files_under(root.parent)
    with pytest.raises(BadRequest):
        storage.open(path)
    with pytest.raises(BadRequest):
        storage.remove(path)
    with pytest.raises(BadRequest):
        storage.write_metadata(path, b"[]")
    with pytest.raises(BadRequest):
        storage.read_metadata(path)
    assert files_under(root.parent) == before


async def test_metadata_write_read(storage: Storage) -> None:
    study, series = new_uid(), new_uid()
    series_path = f"{TENANT}/{study}/{series}.json"
    assert storage.read_metadata(series_path) is None
    storage.write_metadata(series_path, b'[{"00080018": {"vr": "UI"}}]')
    assert storage.read_metadata(series_path) == b'[{"00080018": {"vr": "UI"}}]'
    storage.write_metadata(series_path, b"[]")
    assert storage.read_metadata(series_path) == b"[]"
    storage.write_metadata(f"{TENANT}/{study}.json", "[\"ü\"]".encode())
    assert storage.read_metadata(f"{TENANT}/{study}.json") == "[\"ü\"]".encode()
    leftovers = [p for p in files_under(root_of(storage)) if p.name.endswith(".part")]
    assert leftovers == []
    # metadata does not appear as an instance and vice versa
    with pytest.raises(FileNotFoundError):
        storage.open(series_path)


async def test_remove(storage: Storage) -> None:
    key = instance_key()
    store(storage, key, b"data")
    storage.remove(key.relative_path)
    with pytest.raises(FileNotFoundError):
        storage.open(key.relative_path)
    storage.remove(key.relative_path)  # absent: not an error


async def test_open_sweeps_leftover_staging_files(
        storage_opener: Callable[[], Storage]) -> None:
    async with storage_opener() as storage:
        root = root_of(storage)
        key = instance_key()
        store(storage, key, b"kept")
    # what kill -9 leaves behind: receives and a metadata write never committed, loose or
    # in the staging folder of a process that is gone
    dead = root / ".staging" / f"{socket.gethostname()}-{dead_pid()}"
    dead.mkdir(parents=True, exist_ok=True)
    (dead / "0123abcd.part").write_bytes(b"half an instance")
    (root / ".staging" / "4567cdef.meta.part").write_bytes(b"half a metadata document")
    assert len(files_under(root / ".staging")) == 2
    async with storage_opener() as reopened:
        assert files_under(root / ".staging") == []
        with reopened.open(key.relative_path) as fh:
            assert fh.read() == b"kept"
