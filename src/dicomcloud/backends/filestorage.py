"""Filesystem storage (``file:///path``): local disk or a shared NAS/NFS mount.

Layout (DESIGN.md)::

    {root}/{tenant_id}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm
    {root}/metadata/{tenant_id}/{StudyInstanceUID}/{SeriesInstanceUID}.json
    {root}/metadata/{tenant_id}/{StudyInstanceUID}.json
    {root}/.staging/{host}-{pid}/    files being received, one folder per process

A file is written under ``.staging``, fsynced, renamed into place (atomic on POSIX, so a
reader sees the old or the new file, never half of one) and its directory fsynced: after
``commit`` returns, the instance survives ``kill -9`` and power loss.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from dicomcloud.errors import BackendError, BadRequest
from dicomcloud.model import InstanceKey
from dicomcloud.uids import is_valid_uid

log = logging.getLogger(__name__)
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]{1,80}$")


class FileStaged:
    """A file under ``.staging`` being written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[bytes] | None = open(path, "xb")  # noqa: SIM115 - closed in close()
        self._size = 0
        self._synced = False

    def write(self, data: bytes) -> None:
        assert self._fh is not None, "write after close"
        try:
            self._fh.write(data)
        except OSError as exc:  # ENOSPC, EIO, ...: the caller answers "out of resources"
            raise BackendError(f"storage write failed: {exc.strerror or exc}") from exc
        self._size += len(data)
        self._synced = False

    def flush(self) -> None:
        assert self._fh is not None, "flush after close"
        self._fh.flush()

    def sync(self) -> None:
        assert self._fh is not None, "sync after close"
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise BackendError(f"storage flush failed: {exc.strerror or exc}") from exc
        self._synced = True

    @property
    def size(self) -> int:
        return self._size

    def close(self, fsync: bool) -> None:
        if self._fh is None:
            return
        try:
            self._fh.flush()
            if fsync and not self._synced:
                os.fsync(self._fh.fileno())
        finally:
            self._fh.close()
            self._fh = None


class FileStorage:
    """``Storage`` port on a POSIX filesystem."""

    def __init__(self, url: str, *, fsync: bool = True) -> None:
        parts = urlsplit(url)
        if parts.scheme != "file" or not parts.path:
            raise BackendError(f"storage URL {url!r}: expected file:///absolute/path")
        self.root = Path(unquote(parts.path))
        self.fsync = fsync
        self._staging_root = self.root / ".staging"
        self._staging = self._staging_root / f"{socket.gethostname()}-{os.getpid()}"
        self._known_dirs: set[Path] = set()

    async def __aenter__(self) -> FileStorage:
        try:
            self._staging.mkdir(parents=True, exist_ok=True)
            (self.root / "metadata").mkdir(exist_ok=True)
        except OSError as exc:
            raise BackendError(f"storage root {self.root} is not writable: {exc}") from exc
        self._sweep_staging()
        return self

    async def __aexit__(self, *exc: object) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)  # nothing in it was acknowledged

    def _sweep_staging(self) -> None:
        """Remove what dead processes of this host left mid-receive (never acknowledged).

        Several processes (and, on shared storage, several hosts) stage side by side;
        a folder is removed only when it is this host's and its process is gone.
        """
        prefix = f"{socket.gethostname()}-"
        stale = 0
        for path in self._staging_root.iterdir():
            pid = path.name[len(prefix):] if path.name.startswith(prefix) else ""
            if path.is_dir() and pid.isdigit() and path != self._staging and not _alive(int(pid)):
                stale += sum(1 for _ in path.iterdir())
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file() and path.name.endswith(".part"):
                path.unlink(missing_ok=True)
                stale += 1
        if stale:
            log.info("removed %d unacknowledged partial file(s) from %s", stale,
                     self._staging_root)

    def stage(self) -> FileStaged:
        try:
            return FileStaged(self._staging / f"{uuid.uuid4().hex}.part")
        except OSError as exc:
            raise BackendError(f"cannot create a file in {self._staging}: {exc}") from exc

    def commit(self, staged: FileStaged, key: InstanceKey) -> int:
        return self.commit_many([(staged, key)])[0]

    def commit_many(self, items: Sequence[tuple[FileStaged, InstanceKey]]) -> list[int]:
        """Commit several staged files; each directory is fsynced once for all of them."""
        try:
            targets = [self._instance_path(key) for _, key in items]
        except BadRequest:  # refused: leave nothing behind, not even the staged files
            for staged, _ in items:
                self.discard(staged)
            raise
        try:
            for (staged, _), target in zip(items, targets, strict=True):
                staged.close(self.fsync)
                self._ensure_dir(target.parent)
                try:
                    os.replace(staged.path, target)
                except FileNotFoundError:  # directory removed behind our back: make it again
                    self._known_dirs.discard(target.parent)
                    self._ensure_dir(target.parent)
                    os.replace(staged.path, target)
            if self.fsync:
                for directory in dict.fromkeys(t.parent for t in targets):
                    _fsync_dir(directory)
        except OSError as exc:
            for staged, _ in items:
                self.discard(staged)
            raise BackendError(f"cannot store {len(items)} instance(s): {exc}") from exc
        return [staged.size for staged, _ in items]

    def discard(self, staged: FileStaged) -> None:
        try:
            staged.close(fsync=False)
        finally:
            staged.path.unlink(missing_ok=True)

    def open(self, relative_path: str) -> IO[bytes]:
        return open(self._resolve(relative_path), "rb")

    def remove(self, relative_path: str) -> None:
        self._resolve(relative_path).unlink(missing_ok=True)

    def write_metadata(self, relative_path: str, data: bytes) -> None:
        target = self._resolve(f"metadata/{relative_path}")
        tmp = self._staging / f"{uuid.uuid4().hex}.meta.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            self._ensure_dir(target.parent)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise BackendError(f"cannot write metadata {relative_path}: {exc}") from exc

    def read_metadata(self, relative_path: str) -> bytes | None:
        try:
            return self._resolve(f"metadata/{relative_path}").read_bytes()
        except FileNotFoundError:
            return None

    def _instance_path(self, key: InstanceKey) -> Path:
        for uid in (key.study_uid, key.series_uid, key.sop_uid):
            if not is_valid_uid(uid):
                raise BadRequest(f"refusing to build a path from invalid UID {uid[:70]!r}")
        return self._resolve(key.relative_path)

    def _resolve(self, relative_path: str) -> Path:
        """Join a layout path to the root, refusing anything that could escape it."""
        segments = relative_path.split("/")
        if not all(_SEGMENT_RE.match(s) and s not in (".", "..") for s in segments):
            raise BadRequest(f"invalid storage path {relative_path[:120]!r}")
        return self.root.joinpath(*segments)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        missing = []
        probe = directory
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        directory.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            for created in reversed(missing):
                _fsync_dir(created.parent)
        if len(self._known_dirs) > 100_000:
            self._known_dirs.clear()
        self._known_dirs.add(directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
