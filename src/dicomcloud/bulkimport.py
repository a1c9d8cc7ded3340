"""Bulk import of files through the ingest path (``dicomcloud import``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dicomcloud.config import Settings, validate_tenant
from dicomcloud.errors import InvalidInstance
from dicomcloud.ingest import Origin
from dicomcloud.model import StoredObject
from dicomcloud.runtime import Runtime

_ANNOUNCE_EVERY = 64
_CHUNK = 1 << 20


@dataclass
class ImportReport:
    """What an import did."""

    accepted: int = 0
    #: (file, reason class such as "0xC000 CannotUnderstand", the precise message)
    rejected: list[tuple[Path, str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _read(path: Path) -> list[bytes]:
    chunks = []
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            chunks.append(chunk)
    return chunks


def _reason(exc: InvalidInstance) -> str:
    return f"0x{exc.dimse_status:04X} {type(exc).__name__}"


async def import_files(settings: Settings, files: list[Path], tenant: str | None,
                       advance: Callable[[int, float], None]) -> ImportReport:
    """Store ``files`` and queue them for indexing; ``advance(done, rate)`` reports progress."""
    origin = Origin(validate_tenant(tenant or settings.default_tenant), "IMPORT", None)
    report = ImportReport()
    started = time.monotonic()
    async with Runtime(settings) as runtime:
        pending: list[StoredObject] = []
        for done, path in enumerate(files, 1):
            try:
                chunks = await asyncio.to_thread(_read, path)
                stored = await asyncio.to_thread(runtime.ingestor.store_chunks, chunks, origin)
                pending.append(stored)
            except InvalidInstance as exc:
                report.rejected.append((path, _reason(exc), exc.message))
            except OSError as exc:
                report.rejected.append((path, "unreadable", str(exc.strerror or exc)))
            if len(pending) >= _ANNOUNCE_EVERY:
                await runtime.ingestor.announce(pending)
                report.accepted += len(pending)
                pending = []
            advance(done, done / max(time.monotonic() - started, 1e-6))
        await runtime.ingestor.announce(pending)
        report.accepted += len(pending)
    report.seconds = time.monotonic() - started
    return report
