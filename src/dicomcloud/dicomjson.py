"""DICOM JSON Model (PS3.18 Annex F) of stored instances.

Bulk data (Pixel Data, and binary values longer than ``BULK_THRESHOLD``) is never inlined:
it is referenced by a BulkDataURI (PS3.18 F.2.6). URIs are written relative to the DICOMweb
root (``studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}``, and
``.../bulkdata/{sequence tag}/{item index}/{tag}`` inside sequences) so that the same
pre-generated document serves every host name a proxy may present; the web role resolves
them against the request's base URL.
"""

from __future__ import annotations

import base64
import logging
import math
import struct
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

import orjson
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicomcloud.header import ITEM, SEQUENCE_END, read_open_file

if TYPE_CHECKING:
    from dicomcloud.ports import Storage

log = logging.getLogger(__name__)

#: Binary values whose base64 form is longer than this become BulkDataURIs.
BULK_THRESHOLD = 1024
_PIXEL_VR = {"PixelData": "OW", "FloatPixelData": "OF", "DoubleFloatPixelData": "OD"}


def instance_base(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Relative URI of an instance under the DICOMweb root."""
    return f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def instance_json(fp: IO[bytes]) -> dict[str, Any]:
    """DICOM JSON of one Part 10 file, read without its pixel data (by ``header.py`` when
    it can give every element, else by pydicom)."""
    ds, pixels_at = read_open_file(fp, sequences=True)
    fp.seek(pixels_at)
    base = instance_base(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                         str(ds.SOPInstanceUID))
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        fp.seek(0)  # the reader's position is inside the deflated stream: look at it whole
        full = pydicom.dcmread(fp)
        return dataset_json(ds, base, has_pixels=next((k for k in _PIXEL_VR if k in full),
                                                      None), trailing=_after_pixels(full))
    has_pixels = _has_pixels(fp)
    trailing = None
    if has_pixels and _bytes_after_pixels(fp, ds, pixels_at):
        fp.seek(0)  # rare (digital signatures, say): read the whole file for them
        try:
            trailing = _after_pixels(pydicom.dcmread(fp, force=True))
        except Exception as exc:  # bytes that are no elements: describe what came before
            log.warning("metadata of %s: ignoring unreadable bytes after the pixel data "
                        "(%s)", ds.get("SOPInstanceUID", "?"), exc)
    return dataset_json(ds, base, has_pixels=has_pixels, trailing=trailing)


def _after_pixels(full: Dataset) -> Dataset | None:
    """Elements stored after the pixel data (PS3.5 7.1: data sets are in tag order, so
    e.g. a Digital Signatures Sequence (FFFA,FFFA) follows it); Data Set Trailing Padding
    (FFFC,FFFC) carries no information and is left out."""
    found = Dataset()
    for element in full:
        if element.tag > 0x7FE00010 and element.tag != 0xFFFCFFFC:
            if pydicom.datadict.dictionary_has_tag(element.tag):
                found.add(element)
            else:  # an unknown tag after the pixels is garbage, not data
                log.warning("ignoring unknown element %s after the pixel data", element.tag)
    return found if len(found) else None


def _bytes_after_pixels(fp: IO[bytes], ds: Dataset, at: int) -> bool:
    """True when the file goes on after its pixel data element (little endian files)."""
    from dicomcloud.wado import pixel_layout

    layout = pixel_layout(fp, ds, at)
    if layout is None:
        return False
    end = layout.value_start + layout.length
    if layout.encapsulated:  # walk the items to the sequence delimiter
        end = layout.value_start
        while True:
            fp.seek(end)
            head = fp.read(8)
            if len(head) < 8:
                return False
            group, element, length = struct.unpack("<HHI", head)
            end += 8
            if (group << 16 | element) == SEQUENCE_END:
                break
            if (group << 16 | element) != ITEM:
                return False
            end += length
    fp.seek(0, 2)
    return fp.tell() >= end + 8  # room for at least one element header


def dataset_json(ds: Dataset, base: str, *, has_pixels: str | None,
                 trailing: Dataset | None = None) -> dict[str, Any]:
    """DICOM JSON of a header; ``has_pixels`` names the pixel data keyword if present,
    ``trailing`` holds the elements stored after it."""
    out: dict[str, Any] = {}
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        out["00020010"] = {"vr": "UI", "Value": [str(tsyntax)]}
    out.update(_items(ds, f"{base}/bulkdata/", fast_encoding(ds)))
    if has_pixels:
        tag = pydicom.datadict.tag_for_keyword(has_pixels)
        vr = _PIXEL_VR[has_pixels]
        if has_pixels == "PixelData" and (int(ds.get("BitsAllocated", 16)) <= 8 or
                                          UID(str(ds.file_meta.TransferSyntaxUID)).is_compressed):
            vr = "OB"
        out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{base}/bulkdata/{tag:08X}"}
    if trailing is not None:
        out.update(_items(trailing, f"{base}/bulkdata/", fast_encoding(ds)))
    return out


# -- fast path -------------------------------------------------------------------------
# pydicom's to_json_dict converts every element through its general value machinery
# (milliseconds per instance). Raw little-endian elements of the common VRs in a
# single-byte or UTF-8 character set are converted here directly instead; anything else
# (sequences are recursed, other VRs and character sets) falls back to pydicom, element by
# element. tests/test_dicomjson.py checks both agree on every valid test file.
_SPLIT_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UC", "UI"})
_WHOLE_TEXT = frozenset({"LT", "ST", "UT", "UR"})
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "SV": "q", "UV": "Q"}
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_FAST_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1",
                  "ISO_IR 192": "utf-8"}


def fast_encoding(ds: Dataset) -> str | None:
    """Python codec of a data set's character set if it is single-byte or UTF-8, else None."""
    raw = ds.get_item(0x00080005)
    if raw is None:
        return "latin-1"
    value = raw.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):  # multi-valued: code extensions (ISO 2022)
        return None
    return _FAST_CHARSETS.get(value.strip())


def _items(ds: Dataset, bulk: str, encoding: str | None) -> dict[str, Any]:
    """Elements of ``ds``; ``bulk`` prefixes their BulkDataURIs: ``.../bulkdata/`` at the
    top, ``.../bulkdata/{sequence}/{item}/`` inside sequences (one URI per value)."""
    out: dict[str, Any] = {}
    for tag, element in ds._dict.items():
        key = f"{int(tag):08X}"
        fast = None
        if encoding is not None and isinstance(element, RawDataElement):
            fast = _raw(element, key, bulk, encoding)
        if fast is None:
            fast = _slow(ds, int(tag), key, bulk, encoding)
        if fast is not None:
            out[key] = fast
    return out


def _slow(ds: Dataset, tag: int, key: str, bulk: str,
          encoding: str | None) -> dict[str, Any] | None:
    try:
        element = ds[tag]
    except Exception:
        return None
    if element.VR == "SQ":
        return {"vr": "SQ", "Value": [
            _items(item, f"{bulk}{key}/{index}/",
                   fast_encoding(item) if 0x00080005 in item else encoding)
            for index, item in enumerate(element.value)]}
    try:
        return element.to_json_dict(lambda e: f"{bulk}{key}", BULK_THRESHOLD)
    except Exception:
        return None


def _raw(element: RawDataElement, key: str, bulk: str, encoding: str) -> dict[str, Any] | None:
    vr, value = element.VR, element.value
    if (not element.is_little_endian or element.is_buffered or vr is None or value is None
            or vr == "SQ"):
        return None
    if not value:
        return {"vr": vr}
    if vr in _SPLIT_TEXT or vr in _WHOLE_TEXT or vr in ("IS", "DS", "PN"):
        try:
            text = value.decode(encoding)
        except UnicodeDecodeError:
            return None
        if vr == "UI":
            text = text.rstrip("\x00 ")
        if vr in _WHOLE_TEXT:
            text = text.rstrip(" \x00")
            return {"vr": vr, "Value": [text]} if text else {"vr": vr}
        parts = text.rstrip(" \x00").split("\\")  # as pydicom: trailing padding only
        if vr == "PN":
            return {"vr": vr, "Value": [_person(p) for p in parts]}
        if vr in ("IS", "DS"):
            try:
                numbers = [(int(p) if vr == "IS" else float(p)) if p.strip() else None
                           for p in parts]
            except ValueError:
                return None
            if any(n is not None and not math.isfinite(n) for n in numbers):
                return None
            return {"vr": vr, "Value": numbers} if any(n is not None for n in numbers) \
                else {"vr": vr}
        if parts == [""]:
            return {"vr": vr}
        return {"vr": vr, "Value": parts}
    if vr in _NUMBERS:
        code = _NUMBERS[vr]
        size = struct.calcsize(code)
        if len(value) % size:
            return None
        return {"vr": vr, "Value": list(struct.unpack(f"<{len(value) // size}{code}", value))}
    if vr in ("FL", "FD"):
        size = 4 if vr == "FL" else 8
        if len(value) % size:
            return None
        floats = list(struct.unpack(f"<{len(value) // size}{'f' if size == 4 else 'd'}", value))
        return {"vr": vr, "Value": floats} if all(map(math.isfinite, floats)) else None
    if vr == "AT":
        if len(value) % 4:
            return None
        pairs = struct.unpack(f"<{len(value) // 2}H", value)
        return {"vr": vr, "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}"
                                    for i in range(0, len(pairs), 2)]}
    if vr in _BINARY:
        if len(value) > (BULK_THRESHOLD // 4) * 3:  # the threshold is on the base64 size
            return {"vr": vr, "BulkDataURI": f"{bulk}{key}"}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    return None


def _person(text: str) -> dict[str, str]:
    groups = text.split("=")
    names = zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False)
    return {k: v for k, v in names if v}


def _has_pixels(fp: IO[bytes]) -> str | None:
    """Keyword of the pixel data element the reader stopped at, if any."""
    head = fp.read(4)
    if len(head) < 4:
        return None
    tags = {b"\xe0\x7f\x10\x00": "PixelData", b"\xe0\x7f\x08\x00": "FloatPixelData",
            b"\xe0\x7f\x09\x00": "DoubleFloatPixelData", b"\x7f\xe0\x00\x10": "PixelData"}
    return tags.get(head)


def stored_documents(storage: Storage, paths: Iterable[str]) -> tuple[bytes, int]:
    """The metadata body of the instances stored at ``paths`` (PS3.18 F.2: a JSON array
    of instances), and how many it holds: a file indexed but missing on disk is logged and
    left out, the others are still described."""
    docs = []
    for path in paths:
        try:
            with storage.open(path) as fh:
                docs.append(instance_json(fh))
        except FileNotFoundError:
            log.error("metadata: %s is indexed but missing on disk", path)
    return orjson.dumps(docs), len(docs)
