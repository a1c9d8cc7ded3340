"""Fast reading of a Part 10 header: File Meta and the data set up to Pixel Data.

Every received instance is read twice (validated by the receiver, indexed by the consumer),
and pydicom's general reader costs about half a millisecond per CT header. For the two
encodings nearly every file uses (explicit and implicit VR little endian, PS3.5 7.1) this
module walks the elements with ``struct`` over the bytes in memory and builds the same
``Dataset`` of raw elements that pydicom would, converted lazily by pydicom as usual.

It returns None -- and the caller falls back to pydicom, which then reports the exact
problem -- for anything unusual: no ``DICM`` prefix, big endian or deflated transfer
syntaxes, an implicit/explicit mismatch pydicom would have to guess at, a malformed or
truncated element, or a ``UN`` element of undefined length. Sequences of undefined length
(PS3.5 7.5.2) are skipped, items and delimiters included: the callers only read top-level
attributes; sequences of defined length stay raw, for pydicom to read if ever asked.
"""

from __future__ import annotations

import struct
from collections.abc import MutableMapping
from typing import IO, cast

import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag

_IMPLICIT_LE = "1.2.840.10008.1.2"
_NOT_FAST = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
             b"SV", b"UV"}  # 4-byte length after two reserved bytes (PS3.5 7.1.2)
_VRS = _LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                    b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                    b"US"}
#: Pixel Data, Float Pixel Data, Double Float Pixel Data (PS3.5 A.1)
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
#: Item and Sequence Delimitation Item tags (PS3.5 7.5)
ITEM, SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
#: Bytes read at once to find a header: nearly every header ends before this
HEAD_BYTES = 64 * 1024
_UNDEFINED = 0xFFFFFFFF
_ITEM_END = 0xFFFEE00D
_TAG_LENGTH = struct.Struct("<HHI")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_Elements = MutableMapping[BaseTag, DataElement | RawDataElement]


class _Unusual(Exception):
    """Leave this file to pydicom."""


def read_header(data: bytes, *, whole: bool = True,
                sequences: bool = False) -> tuple[FileDataset, int] | None:
    """The header as pydicom's ``dcmread(..., stop_before_pixels=True)`` would give it
    (sequences of undefined length left out), and the offset where Pixel Data (or the end)
    begins; None to fall back to pydicom.

    ``whole=False``: ``data`` is only the beginning of the file, so a header that does not
    reach Pixel Data within it may be incomplete: None then too. ``sequences=True``: the
    caller needs every element (DICOM JSON), so a sequence of undefined length, which
    this reader would skip, means None as well.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    try:
        meta, position = _elements(data, 132, implicit=False, meta=True)
        syntax_raw = meta.get(BaseTag(0x00020010))
        if syntax_raw is None or syntax_raw.value is None:
            return None
        syntax = syntax_raw.value.rstrip(b"\x00 ").decode("ascii")
        if syntax in _NOT_FAST:
            return None
        implicit = syntax == _IMPLICIT_LE
        if position + 6 <= len(data) and (data[position + 4:position + 6] in _VRS) == implicit:
            return None  # encoded otherwise than the syntax says: pydicom's heuristics
        elements, position = _elements(data, position, implicit=implicit, meta=False,
                                       sequences=sequences)
        if not whole and position >= len(data):
            return None
        charset = elements.get(BaseTag(0x00080005))
        encoding = convert_encodings(convert_raw_data_element(charset).value) \
            if charset is not None else "iso8859"
    except Exception:  # malformed in a way pydicom reports better (e.g. the character set)
        return None
    ds = FileDataset("", Dataset(cast(_Elements, elements)), preamble=data[:128],
                     file_meta=FileMetaDataset(cast(_Elements, meta)), is_implicit_VR=implicit,
                     is_little_endian=True)
    ds.set_original_encoding(implicit, True, encoding)
    return ds, position


def read_open_file(fh: IO[bytes], *, sequences: bool = False) -> tuple[Dataset, int]:
    """The header of an open Part 10 file and the offset where its Pixel Data (or end)
    begins: its first ``HEAD_BYTES`` by ``read_header``, else the file by pydicom."""
    head = fh.read(HEAD_BYTES)
    fast = read_header(head, whole=len(head) < HEAD_BYTES, sequences=sequences)
    if fast is not None:
        return fast
    fh.seek(0)
    ds = pydicom.dcmread(fh, stop_before_pixels=True)
    return ds, fh.tell()


def _elements(data: bytes, position: int, *, implicit: bool, meta: bool,
              sequences: bool = False) -> tuple[dict[BaseTag, RawDataElement], int]:
    """Top-level elements from ``position``: the File Meta group (``meta``), or the data
    set up to Pixel Data or the end."""
    out: dict[BaseTag, RawDataElement] = {}
    end = len(data)
    unpack, unpack_short = _TAG_LENGTH.unpack_from, _EXPLICIT_SHORT.unpack_from
    long_vrs, vrs, pixel_tags = _LONG_VRS, _VRS, PIXEL_TAGS
    while position < end:
        if position + 8 > end:
            raise _Unusual("element header cut short")
        group, element, length = unpack(data, position)
        tag = group << 16 | element
        if meta:
            if group != 2:
                break
        elif tag in pixel_tags:
            break
        if implicit:
            vr, start = None, position + 8
        else:
            vr_raw = data[position + 4:position + 6]
            if vr_raw in long_vrs:
                if position + 12 > end:
                    raise _Unusual("element header cut short")
                length = unpack(data, position + 4)[2]
                start = position + 12
            elif vr_raw in vrs:
                length = unpack_short(data, position)[3]
                start = position + 8
            else:
                raise _Unusual("unknown VR")
            vr = vr_raw.decode("ascii")
        if length == _UNDEFINED:
            if vr not in (None, "SQ") or sequences:
                raise _Unusual(f"{vr} of undefined length")
            position = _skip_items(data, start, implicit)
            continue
        position = start + length
        if position > end:
            raise _Unusual("value runs past the end")
        if group != 0xFFFE:
            key = BaseTag(tag)
            out[key] = RawDataElement(key, vr, length, data[start:position], start, implicit,
                                      True)
    return out, position


def _skip_items(buf: bytes, position: int, implicit: bool) -> int:
    """Skip a sequence of undefined length; the offset after its delimiter (PS3.5 7.5.2)."""
    end = len(buf)
    while position + 8 <= end:
        group, element, length = _TAG_LENGTH.unpack_from(buf, position)
        tag = group << 16 | element
        position += 8
        if tag == SEQUENCE_END:
            return position
        if tag != ITEM:
            raise _Unusual("sequence holds something other than items")
        if length == _UNDEFINED:
            position = _skip_item_elements(buf, position, implicit)
        else:
            position += length
    raise _Unusual("sequence has no end")


def _skip_item_elements(buf: bytes, position: int, implicit: bool) -> int:
    """Skip the elements of an item of undefined length, and its delimiter."""
    end = len(buf)
    while position + 8 <= end:
        group, element, length = _TAG_LENGTH.unpack_from(buf, position)
        if group << 16 | element == _ITEM_END:
            return position + 8
        header = 8
        if not implicit:
            vr_raw = buf[position + 4:position + 6]
            if vr_raw in _LONG_VRS:
                if position + 12 > end:
                    break
                length, header = _TAG_LENGTH.unpack_from(buf, position + 4)[2], 12
            elif vr_raw in _VRS:
                length = _EXPLICIT_SHORT.unpack_from(buf, position)[3]
            else:
                raise _Unusual("unknown VR inside a sequence")
            if length == _UNDEFINED and vr_raw != b"SQ":
                raise _Unusual("undefined length inside a sequence")
        position += header
        if length == _UNDEFINED:
            position = _skip_items(buf, position, implicit)
        else:
            position += length
    raise _Unusual("item has no end")
