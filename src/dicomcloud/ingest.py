"""Ingest: the one path by which an instance enters the archive (C-STORE, STOW-RS, import).

The rule (never lose an acknowledged instance):

1. the bytes are written to a staging file,
2. the header is parsed and validated; a refused object never reaches the layout,
3. the file is fsynced and renamed into ``{tenant}/{study}/{series}/{sop}.dcm``,
4. the storage event is published to ``storage_queue`` (durable) and to ``log_queue``,
5. only then is success returned to the sender.

The bytes are kept exactly as received (no re-encoding, PS3.4 B.4.1 level 2 storage): for
C-STORE the received data set is prefixed with a File Meta Information header (PS3.10 7.1).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import io
import logging
import struct
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from dicomcloud import __version__
from dicomcloud.errors import (
    CannotUnderstand,
    DataSetMismatch,
    DicomCloudError,
    InvalidInstance,
)
from dicomcloud.header import HEAD_BYTES, ITEM, PIXEL_TAGS, SEQUENCE_END, read_header
from dicomcloud.model import InstanceKey, StoredObject, body, fmt_datetime, utcnow
from dicomcloud.ports import Outgoing, Queue, StagedFile, Storage
from dicomcloud.uids import is_valid_uid, uid_hash

log = logging.getLogger(__name__)
_SYNC_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")

# A UUID-derived UID (PS3.5 B.2, root 2.25): needs no registration.
IMPLEMENTATION_CLASS_UID = UID("2.25.133501381975903227923581599138899895490")
IMPLEMENTATION_VERSION = f"DICOMCLOUD_{__version__}"[:16]


@dataclass(frozen=True)
class Origin:
    """Who sent an instance: tenant, calling AE title and address."""

    tenant_id: str
    source_ae: str | None = None
    source_ip: str | None = None


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length (PS3.5 7.1.2)."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def file_meta_bytes(transfer_syntax: str, sop_class: str, sop_instance: str,
                    source_ae: str | None) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1), encoded directly.

    Hand-encoded because this runs once per received instance and pydicom's general writer
    costs milliseconds; ``tests/test_ingest.py`` checks pydicom reads it back identically.
    """
    body = (
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
        + _element(0x00020002, b"UI", _ui(sop_class))
        + _element(0x00020003, b"UI", _ui(sop_instance))
        + _element(0x00020010, b"UI", _ui(transfer_syntax))
        + _element(0x00020012, b"UI", _ui(IMPLEMENTATION_CLASS_UID))
        + _element(0x00020013, b"SH", _text(IMPLEMENTATION_VERSION))
    )
    if source_ae:
        body += _element(0x00020016, b"AE", _text(source_ae[:16]))
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + length + body


def dimse_file_bytes(dataset: Sequence[bytes | memoryview], transfer_syntax: str,
                     sop_class: str, sop_instance: str, source_ae: str | None) -> bytes:
    """A Part 10 file (PS3.10 7.1) around a data set received over DIMSE (in the fragments
    it arrived in), bytes unchanged: one copy."""
    meta = file_meta_bytes(transfer_syntax, sop_class, sop_instance, source_ae)
    return b"".join([meta, *dataset])


def inspect(fp: IO[bytes], size: int, *, expect_sop_uid: str | None = None,
            head: bytes | None = None) -> Dataset:
    """``_inspect``, plus: every value the storage event carries can be read. A value that
    pydicom cannot convert (a wrong VR, say) refuses the instance (0xC000 / STOW-RS part
    failure) before anything is stored, never an internal error, and never after a
    re-sent instance's file already replaced the stored one."""
    try:
        ds = _inspect(fp, size, expect_sop_uid=expect_sop_uid, head=head)
        uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        stored_object(ds, InstanceKey("check", *uids), size, Origin("check"), "check")
        return ds
    except (DicomCloudError, OSError, MemoryError):
        raise
    except Exception as exc:
        raise CannotUnderstand(f"an attribute value cannot be read: {exc}"[:200]) from exc


def _inspect(fp: IO[bytes], size: int, *, expect_sop_uid: str | None = None,
             head: bytes | None = None) -> Dataset:
    """Parse and validate the header of a Part 10 file; raise ``InvalidInstance`` if refused.

    Checks (PS3.4 B.2.3 statuses): readable Part 10 encoding of a data set that has at
    least one of the four identifying UIDs (0xC000); valid Study, Series
    and SOP Instance UIDs (PS3.5 9.1) and a SOP Class UID (0xA900); the SOP Instance UID of
    the C-STORE request matches the data set (0xA900); image storage SOP classes carry
    complete pixel data (0xA900 when missing or short, 0xC000 when the file is truncated).
    ``head``, when given, holds the first bytes of the file (all of them, or a prefix that
    ``fp`` also reads): the header is then read by ``header.read_header``, pydicom taking
    over when that declines.
    """
    try:
        fast = read_header(head, whole=len(head) >= size) if head is not None else None
        if fast is not None:
            ds, pixel_at = fast
        else:
            fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            pixel_at = fp.tell()
        if "TransferSyntaxUID" not in ds.file_meta:
            raise CannotUnderstand("file meta information has no Transfer Syntax UID")
        uids = {k: ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                       "SOPInstanceUID", "SOPClassUID")}
    except InvalidInstance:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError,
            AttributeError, struct.error, NotImplementedError, zlib.error) as exc:
        raise CannotUnderstand(f"not a readable DICOM file: {exc}") from exc
    if all(value is None for value in uids.values()):
        # pydicom parses nearly any bytes as elements; bytes holding none of the four
        # identifying attributes are not a DICOM data set at all (or not in this encoding)
        raise CannotUnderstand("no DICOM data set found: no SOP Class, SOP Instance, Study "
                               "or Series Instance UID (not DICOM, or another encoding)")
    for keyword, value in uids.items():
        if not is_valid_uid(str(value) if value is not None else None):
            shown = "missing" if value is None else repr(str(value)[:70])
            raise DataSetMismatch(f"{keyword} is {shown}: not a valid UID (PS3.5 9.1)")
    if expect_sop_uid is not None and ds.SOPInstanceUID != expect_sop_uid:
        raise DataSetMismatch("SOP Instance UID of the data set differs from the request's")
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        _check_deflated(fp, ds)
    else:
        _check_pixel_data(fp, size, pixel_at, ds)
    return ds


def _is_image_class(ds: Dataset) -> bool:
    return "Image Storage" in UID(str(ds.SOPClassUID)).name


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = int(ds.BitsAllocated)
        values = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * frames
    except (AttributeError, TypeError, ValueError):
        return None
    if bits == 1:
        return (values + 7) // 8
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        values = values // 3 * 2  # chroma subsampled 2:1 horizontally (PS3.3 C.7.6.3.1.2)
    return values * (bits // 8)


def _check_pixel_data(fp: IO[bytes], size: int, at: int, ds: Dataset) -> None:
    """Verify the pixel data element is complete, by reading element headers only."""
    tsyntax = UID(str(ds.file_meta.TransferSyntaxUID))
    endian = ">" if tsyntax == ExplicitVRBigEndian else "<"
    fp.seek(at)
    head = fp.read(12)
    tag = _tag(head, endian) if len(head) >= 8 else None
    if tag not in PIXEL_TAGS:
        if _is_image_class(ds):
            raise DataSetMismatch(f"{UID(str(ds.SOPClassUID)).name} without Pixel Data")
        return
    implicit = tsyntax.is_implicit_VR
    if implicit:
        length, header = struct.unpack(endian + "I", head[4:8])[0], 8
    elif len(head) < 12:
        raise CannotUnderstand("file ends inside the Pixel Data element header")
    else:
        length, header = struct.unpack(endian + "I", head[8:12])[0], 12
    start = at + header
    if length == 0xFFFFFFFF:
        _walk_fragments(fp, start, size, endian)
        return
    if start + length > size:
        raise CannotUnderstand(
            f"truncated: Pixel Data needs {length} bytes, the file holds {size - start}")
    expected = _expected_pixel_bytes(ds)
    if tag == 0x7FE00010 and expected is not None and length < expected:
        raise DataSetMismatch(
            f"Pixel Data holds {length} bytes but Rows x Columns x Samples x Frames x Bits "
            f"needs {expected}")


def _walk_fragments(fp: IO[bytes], position: int, size: int, endian: str) -> None:
    """Follow encapsulated fragments (PS3.5 A.4) to the sequence delimiter."""
    fragments = 0
    while True:
        fp.seek(position)
        head = fp.read(8)
        if len(head) < 8:
            raise CannotUnderstand("truncated: encapsulated Pixel Data has no end delimiter")
        tag = _tag(head, endian)
        length = struct.unpack(endian + "I", head[4:8])[0]
        if tag == SEQUENCE_END:
            if fragments < 2:  # the Basic Offset Table item plus at least one fragment
                raise DataSetMismatch("encapsulated Pixel Data holds no fragment")
            return
        if tag != ITEM or position + 8 + length > size:
            raise CannotUnderstand("truncated or corrupt encapsulated Pixel Data")
        fragments += 1
        position += 8 + length


def _check_deflated(fp: IO[bytes], ds: Dataset) -> None:
    fp.seek(0)
    try:
        full = pydicom.dcmread(fp)
        pixels = full.get("PixelData")
    except (EOFError, OSError, ValueError, zlib.error, struct.error) as exc:
        raise CannotUnderstand(f"corrupt deflated data set: {exc}") from exc
    if pixels is None:
        if _is_image_class(ds):
            raise DataSetMismatch(f"{UID(str(ds.SOPClassUID)).name} without Pixel Data")
        return
    expected = _expected_pixel_bytes(full)
    if expected is not None and len(pixels) < expected:
        raise DataSetMismatch("deflated Pixel Data is shorter than the image needs")


def _tag(head: bytes, endian: str) -> int:
    group, element = struct.unpack(endian + "HH", head[:4])
    return int((group << 16) | element)


def study_date_of(ds: Dataset, received: dt.datetime) -> str:
    """``study_date`` (DESIGN.md, required): StudyDate, else the first valid of SeriesDate,
    AcquisitionDate, ContentDate, else the day received. The raw value is kept apart in
    ``study_date_origin``, so QIDO still answers with what the image says."""
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        text = str(ds.get(keyword) or "").strip()
        if parsed := parse_da(text):
            return parsed
    return received.strftime("%Y-%m-%d")


def parse_da(text: str) -> str | None:
    """A DA value (``YYYYMMDD``, or the old ``YYYY.MM.DD``) as ``YYYY-MM-DD``; None if invalid."""
    digits = text.replace(".", "").strip()
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        return None


def stored_object(ds: Dataset, key: InstanceKey, size: int, origin: Origin,
                  node_id: str) -> StoredObject:
    """The ``storage_queue`` body for a stored instance."""
    now = utcnow()
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    accession = str(ds.get("AccessionNumber") or "").strip() or None
    return StoredObject(
        trace_id=uuid.uuid4().hex,
        worker_node_id=node_id,
        tenant_id=key.tenant_id,
        patient_id=str(ds.get("PatientID") or "").strip(),
        study_uid=key.study_uid,
        series_uid=key.series_uid,
        sop_uid=key.sop_uid,
        file_size=size,
        file_path=key.relative_path,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        number_of_frames=max(frames, 1),
        created_time=fmt_datetime(now),
        series_uid_hash=uid_hash(key.series_uid),
        study_uid_hash=uid_hash(key.study_uid),
        accession_number=accession,
        target_ts=None,
        study_date=study_date_of(ds, now),
        transfer_status="original",
        source_ip=origin.source_ip,
        source_ae=origin.source_ae,
    )


class Ingestor:
    """Validates, stores and announces instances; shared by every entry point."""

    def __init__(self, storage: Storage, queue: Queue, node_id: str) -> None:
        self.storage = storage
        self.queue = queue
        self.node_id = node_id
        self.storage_sync = bool(getattr(storage, "fsync", True))

    def store_bytes(self, data: bytes, origin: Origin, *,
                    expect_sop_uid: str | None = None) -> StoredObject:
        """Validate and durably store one Part 10 file held in memory (blocking)."""
        staged, ds = self._stage(data, expect_sop_uid)
        return self.commit(staged, ds, origin)

    def _stage(self, data: bytes, expect_sop_uid: str | None) -> tuple[StagedFile, Dataset]:
        """Write ``data`` to staging and validate it; refused data is discarded.

        The file is flushed to disk (fsync, in a helper thread) while the header is parsed:
        the two overlap, which shortens every C-STORE round trip.
        """
        staged = self.storage.stage()
        try:
            staged.write(data)
            if self.storage_sync:
                flushing = _SYNC_POOL.submit(staged.sync)
            try:
                ds = inspect(io.BytesIO(data), len(data), expect_sop_uid=expect_sop_uid,
                             head=data)
            finally:
                if self.storage_sync:
                    flushing.result()
        except BaseException:
            self.storage.discard(staged)
            raise
        return staged, ds

    def check(self, staged: StagedFile) -> Dataset:
        """Validate a staged file; on refusal it is discarded and the error raised."""
        try:
            staged.flush()  # the tail may still sit in the write buffer
            with open(staged.path, "rb") as fh:
                return inspect(fh, staged.size, head=fh.read(HEAD_BYTES))
        except BaseException:
            self.storage.discard(staged)
            raise

    def store_staged(self, staged: StagedFile, origin: Origin) -> StoredObject:
        """Validate and durably store a file already written to staging (blocking)."""
        return self.commit(staged, self.check(staged), origin)

    def store_chunks(self, chunks: Iterable[bytes], origin: Origin) -> StoredObject:
        """Stage ``chunks`` then validate and store them (blocking; used by import)."""
        staged = self.storage.stage()
        try:
            for chunk in chunks:
                staged.write(chunk)
        except BaseException:
            self.storage.discard(staged)
            raise
        return self.store_staged(staged, origin)

    def commit(self, staged: StagedFile, ds: Dataset, origin: Origin) -> StoredObject:
        """Move a validated staged file into the layout (fsync, rename); blocking."""
        return self.commit_many([(staged, ds)], origin)[0]

    def commit_many(self, items: list[tuple[StagedFile, Dataset]],
                    origin: Origin) -> list[StoredObject]:
        """``commit`` for several files (STOW-RS): directories are synced once each."""
        keys = [_key(ds, origin) for _, ds in items]
        # The events are made before any file moves (``inspect`` checked they can be):
        # nothing replaces a stored file unless its event exists.
        events = [stored_object(ds, key, staged.size, origin, self.node_id)
                  for (staged, ds), key in zip(items, keys, strict=True)]
        sizes = self.storage.commit_many([(s, k) for (s, _), k in zip(items, keys, strict=True)])
        return [dataclasses.replace(event, file_size=size) if event.file_size != size
                else event for event, size in zip(events, sizes, strict=True)]

    def sync_soon(self, staged: StagedFile) -> concurrent.futures.Future[None] | None:
        """Start flushing a staged file to disk in the background (None if fsync is off)."""
        return _SYNC_POOL.submit(staged.sync) if self.storage_sync else None

    async def announce(self, events: list[StoredObject]) -> None:
        """Publish storage events (durable); after this the sender may be told success."""
        await self.queue.publish(_messages(events))

    def announce_from_thread(self, events: list[StoredObject],
                             loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """``announce`` for a caller in a worker thread (the DIMSE handlers); blocks.

        A queue with ``publish_blocking`` (the embedded one) is called directly, sparing
        two hops through the event loop per instance; others run on ``loop``.
        """
        blocking = getattr(self.queue, "publish_blocking", None)
        if blocking is not None:
            blocking(_messages(events), timeout)
        else:
            asyncio.run_coroutine_threadsafe(self.announce(events), loop).result(timeout)


def _key(ds: Dataset, origin: Origin) -> InstanceKey:
    return InstanceKey(origin.tenant_id, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                       str(ds.SOPInstanceUID))


def _messages(events: list[StoredObject]) -> list[Outgoing]:
    messages: list[Outgoing] = []
    for event in events:
        payload = body(event)
        messages.append(("storage_queue", event.study_uid, payload))
        # log_queue also carries access events (dicomcloud.accesslog): log_type tells them apart
        messages.append(("log_queue", event.study_uid, {**payload, "log_type": "object"}))
    return messages
