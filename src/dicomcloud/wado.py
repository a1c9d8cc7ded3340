"""WADO-RS (PS3.18 10.4): retrieve instances, metadata, frames and bulk data.

- Instances of a study, series or one instance: ``multipart/related;
  type="application/dicom"`` (PS3.18 10.4.1.1.1), streamed file by file, never a whole
  study in memory.
- Metadata of a study, series or instance (PS3.18 10.4.1.1.2): the worker's pre-generated
  documents when they are current, else built from the files; ``ETag`` with
  ``If-None-Match`` (304) and Brotli or gzip by ``Accept-Encoding``.
- Frames (PS3.18 10.4.1.1.3): read from the file by offset (native pixel data) or by
  fragment (encapsulated), never by decoding the whole data set.
- Bulk data (PS3.18 10.4.1.1.4): the values our BulkDataURIs point at, with ``Range``.

Transfer syntax negotiation follows PS3.18 8.7.3: ``transfer-syntax=*`` sends what is
stored; no parameter means the default of the media type (Explicit VR Little Endian for
``application/dicom`` and ``application/octet-stream``, Table 8.7.3-2/-3); another syntax
is produced by transcoding with pydicom when it is uncompressed or lossless (RLE, JPEG-LS,
JPEG 2000 lossless; a compressed original is decoded first); lossy targets are refused.
Media ranges are tried in order of their q-values; 406 when none can be produced.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import IO, Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomcloud.errors import BadRequest, NotAcceptable, NotFound
from dicomcloud.header import ITEM, PIXEL_TAGS, SEQUENCE_END, read_open_file
from dicomcloud.ingest import file_meta_bytes

ANY = "*"
_CHUNK = 256 * 1024
_UNCOMPRESSED = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
#: Lossless compressed syntaxes produced on request: RLE, JPEG-LS and JPEG 2000 lossless.
LOSSLESS_TARGETS = {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}

#: Media type of a frame stored in each compressed transfer syntax (PS3.18 Table 8.7.3-4).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/dicom-rle",
}
#: Names older clients use for the same media types.
MEDIA_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}


# -- Accept ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header (RFC 9110 12.5.1) with its parameters."""

    mime: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def inner(self) -> str | None:
        """The ``type`` parameter of a multipart range, lower case; None when absent."""
        value = self.params.get("type")
        return value.lower() if value else None

    @property
    def inner_any(self) -> bool:
        """``multipart/related; type="*/*"``: any part type (dicomweb-client's default)."""
        return self.inner in ("*/*", "*")

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


_MAX_ACCEPT = 4096
_SPLIT = re.compile(r',(?=(?:[^"]*"[^"]*")*[^"]*$)')
_PARAM = re.compile(r';(?=(?:[^"]*"[^"]*")*[^"]*$)')


def parse_accept(value: str | None) -> list[MediaRange]:
    """Media ranges of ``Accept``, best first (stable for equal q); ``*/*`` when absent."""
    if value is None or not value.strip():
        return [MediaRange("*/*")]
    if len(value) > _MAX_ACCEPT:
        raise BadRequest(f"Accept header of {len(value)} characters; at most {_MAX_ACCEPT}")
    ranges = []
    for part in _SPLIT.split(value):
        if not part.strip():
            continue
        pieces = _PARAM.split(part)
        mime = pieces[0].strip().lower()
        if mime.count("/") != 1 or " " in mime:
            raise BadRequest(f"Accept: {part.strip()[:80]!r} is not a media range")
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, raw = piece.partition("=")
            params[name.strip().lower()] = raw.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            raise BadRequest(f"Accept: bad q-value in {part.strip()[:80]!r}") from None
        if not 0 <= q <= 1:
            raise BadRequest(f"Accept: q-value out of range in {part.strip()[:80]!r}")
        ranges.append(MediaRange(mime, params, q))
    return sorted((r for r in ranges if r.q > 0), key=lambda r: -r.q)


def _matches(pattern: str, mime: str) -> bool:
    kind, _, sub = pattern.partition("/")
    return pattern == "*/*" or pattern == mime or (sub == "*" and mime.startswith(kind + "/"))


@dataclass(frozen=True)
class Choice:
    """What to send: multipart or a single part, and the transfer syntax (``*``: stored)."""

    multipart: bool
    transfer_syntax: str
    media_type: str


def choose_dicom(ranges: list[MediaRange], *, single_allowed: bool,
                 stored: frozenset[str] = frozenset()) -> Choice:
    """Negotiate a DICOM retrieve (PS3.18 8.7.3.3.2, Table 8.7.3-2); ``stored``: the
    transfer syntaxes the instances are kept in (always producible as they are)."""
    for r in ranges:
        syntax = r.transfer_syntax or ExplicitVRLittleEndian
        producible = _producible(syntax) or (bool(stored) and stored == {syntax})
        if r.mime in ("*/*", "multipart/*") or (r.mime == "multipart/related" and (
                r.inner in (None, "application/dicom") or r.inner_any)):
            if producible:
                return Choice(True, syntax, "application/dicom")
        elif r.mime == "application/dicom" and single_allowed and producible:
            return Choice(False, syntax, "application/dicom")
    raise NotAcceptable(
        'none of the accepted media types can be produced; ask for multipart/related; '
        'type="application/dicom" with transfer-syntax=* (as stored), an uncompressed '
        "syntax, or RLE, JPEG-LS or JPEG 2000 lossless")


def _producible(syntax: str) -> bool:
    return syntax == ANY or syntax in _UNCOMPRESSED or syntax in LOSSLESS_TARGETS


# -- files -----------------------------------------------------------------------------
def read_file_header(fh: IO[bytes]) -> tuple[Dataset, int, IO[bytes]]:
    """Header of an open Part 10 file, the offset of its pixel data (or end), and the file
    to read pixels from: ``fh`` itself, or for a deflated file (PS3.5 A.5) an inflated copy
    in memory, relabelled Explicit VR Little Endian."""
    ds, at = read_open_file(fh)
    if stored_syntax(ds) != DeflatedExplicitVRLittleEndian:
        return ds, at, fh
    fh.seek(0)
    raw = fh.read()
    meta_length = struct.unpack("<I", raw[140:144])[0] if raw[132:136] == b"\x02\x00\x00\x00" \
        else None
    if meta_length is None:
        raise NotAcceptable("deflated file without a File Meta group length")
    inflated = zlib.decompress(raw[144 + meta_length:], -zlib.MAX_WBITS)
    rebuilt = file_meta_bytes(ExplicitVRLittleEndian, str(ds.file_meta.MediaStorageSOPClassUID),
                              str(ds.file_meta.MediaStorageSOPInstanceUID), None) + inflated
    buffer = io.BytesIO(rebuilt)
    ds, at = read_open_file(buffer)
    return ds, at, buffer


def file_syntax(data: bytes) -> str:
    """Transfer Syntax UID of a Part 10 file in memory, from its File Meta group."""
    position = 132
    while position + 8 <= len(data):
        group, element, vr = struct.unpack_from("<HH2s", data, position)
        if group != 2:
            break
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
            length, header = struct.unpack_from("<I", data, position + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, position + 6)[0], 8
        if element == 0x0010:
            start = position + header
            return data[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        position += header + length
    return ImplicitVRLittleEndian


def stored_syntax(ds: Dataset) -> str:
    return str(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))


def transcode(data: bytes, target: str) -> tuple[bytes, str]:
    """A Part 10 file re-encoded in ``target``: uncompressed, or RLE / JPEG-LS / JPEG 2000
    lossless (decoding a compressed original first). Never lossy: pixel values are
    unchanged, only their encoding differs, and the SOP Instance UID stays. Returns the file
    and its transfer syntax: an instance without pixel data asked for in a compressed
    syntax comes in Explicit VR Little Endian (compression applies to pixel data only)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    source = UID(stored_syntax(ds))
    try:
        if source.is_compressed:
            # decoders return full-resolution colour: as RGB, consistently labelled
            ds.decompress(as_rgb=True, generate_instance_uid=False)
        elif not source.is_little_endian and "PixelData" in ds:
            ds.PixelData = _little_endian_pixels(ds)
        if target in LOSSLESS_TARGETS and "PixelData" not in ds:
            target = ExplicitVRLittleEndian
        elif target in LOSSLESS_TARGETS:
            ds.compress(target, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = UID(target)
        out = io.BytesIO()
        if source.is_little_endian:
            pydicom.dcmwrite(out, ds, enforce_file_format=True,
                             implicit_vr=target == ImplicitVRLittleEndian, little_endian=True)
        else:  # pydicom re-encodes big endian only when forced (the pixels are swapped above)
            pydicom.dcmwrite(out, ds, force_encoding=True,
                             implicit_vr=target == ImplicitVRLittleEndian, little_endian=True)
    except Exception as exc:
        raise NotAcceptable(f"cannot transcode {source.name} to {UID(target).name} ({exc}); "
                            "ask for transfer-syntax=*") from exc
    return out.getvalue(), target


_SWAP = {"OW": 2, "US": 2, "SS": 2, "OF": 4, "OL": 4, "FL": 4, "UL": 4, "SL": 4, "AT": 2,
         "OD": 8, "FD": 8, "OV": 8, "SV": 8, "UV": 8}


def little_endian_value(value: bytes, vr: str, big_endian: bool) -> bytes:
    """Bulk data as PS3.18 8.7.3.3.1 wants it (little endian): swapped by the VR's width."""
    width = _SWAP.get(vr, 1)
    if not big_endian or width == 1 or len(value) % width:
        return value
    import numpy as np

    return np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()


def _little_endian_pixels(ds: Dataset) -> bytes:
    """Native pixel data of a big endian data set as little endian bytes (colour samples
    interleaved: ``PlanarConfiguration`` is set to 0 to match)."""
    from pydicom.pixels.utils import pixel_array

    array = pixel_array(ds, raw=True)
    if "PlanarConfiguration" in ds:
        ds.PlanarConfiguration = 0
    return _little_endian_bytes(array)


def _little_endian_bytes(array: Any) -> bytes:
    """A decoded pixel array as little endian bytes, whatever the machine's byte order."""
    return bytes(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


# -- multipart -------------------------------------------------------------------------
def new_boundary() -> str:
    """A fresh random boundary per response (RFC 2046 5.1.1: it must not occur in the
    parts; 128 random bits make that, and guessing it to forge parts, hopeless)."""
    return "dicomcloud-" + os.urandom(16).hex()


def part_head(boundary: str, content_type: str, extra: str = "") -> bytes:
    return (f"--{boundary}\r\nContent-Type: {content_type}\r\n{extra}\r\n").encode()


def multipart_type(boundary: str, inner: str, syntax: str | None = None) -> str:
    value = f'multipart/related; type="{inner}"; boundary={boundary}'
    return value + (f"; transfer-syntax={syntax}" if syntax and syntax != ANY else "")


# -- pixel data ------------------------------------------------------------------------
@dataclass
class PixelLayout:
    """Where the pixel data of a file lies."""

    syntax: str
    frames: int
    value_start: int  # first byte of the value (native) or of the first item (encapsulated)
    length: int  # value length, 0xFFFFFFFF when encapsulated
    frame_size: int | None  # bytes per native frame (None when not byte aligned)
    frame_bits: int | None = None  # bits per native frame (bit-packed 1-bit data)

    @property
    def encapsulated(self) -> bool:
        return self.length == 0xFFFFFFFF


def pixel_layout(fh: IO[bytes], ds: Dataset, at: int) -> PixelLayout | None:
    """The pixel data element at ``at`` (the header's end), None without pixel data."""
    syntax = stored_syntax(ds)
    fh.seek(at)
    head = fh.read(12)
    if len(head) < 8:
        return None
    big = syntax == "1.2.840.10008.1.2.2"
    endian = ">" if big else "<"
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group << 16 | element) not in PIXEL_TAGS:
        return None
    if syntax == ImplicitVRLittleEndian:
        length, start = struct.unpack("<I", head[4:8])[0], at + 8
    else:
        length, start = struct.unpack(endian + "I", head[8:12])[0], at + 12
    try:
        frames = max(int(ds.get("NumberOfFrames") or 1), 1)
        bits = int(ds.BitsAllocated)
        values = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
        frame_bits = values * bits
        frame_size = frame_bits // 8 if frame_bits % 8 == 0 else None
        if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422" and \
                frame_size:
            frame_size = frame_size // 3 * 2
    except (AttributeError, TypeError, ValueError):
        frames, frame_size, frame_bits = 1, None, None
    return PixelLayout(syntax, frames, start, length, frame_size, frame_bits)


def native_frames(fh: IO[bytes], ds: Dataset, at: int, file_size: int
                  ) -> tuple[int, int] | None:
    """(offset of frame 1, bytes per frame) when the frames can be cut by offset alone:
    uncompressed little endian, byte aligned, every frame inside the file. The consumer
    records them in the index so that frame requests need not read the header."""
    layout = pixel_layout(fh, ds, at)
    if (layout is None or layout.encapsulated or layout.frame_size is None
            or layout.syntax == "1.2.840.10008.1.2.2" or layout.frame_size <= 0):
        return None
    end = layout.value_start + layout.frames * layout.frame_size
    if end > layout.value_start + layout.length or end > file_size:
        return None
    return layout.value_start, layout.frame_size


def fragments(fh: IO[bytes], layout: PixelLayout) -> tuple[list[int], list[tuple[int, int]]]:
    """Basic Offset Table and (offset, length) of each fragment (PS3.5 A.4), headers only."""
    position = layout.value_start
    table: list[int] = []
    found: list[tuple[int, int]] = []
    first = True
    while True:
        fh.seek(position)
        head = fh.read(8)
        if len(head) < 8:
            raise NotFound("encapsulated pixel data has no end")
        group, element, length = struct.unpack("<HHI", head)
        tag = group << 16 | element
        if tag == SEQUENCE_END:
            return table, found
        if tag != ITEM:
            raise NotFound("corrupt encapsulated pixel data")
        if first:
            raw = fh.read(length)
            usable = len(raw) - len(raw) % 4  # a malformed table: its whole entries only
            table = list(struct.unpack(f"<{usable // 4}I", raw[:usable])) if usable else []
            first = False
        else:
            found.append((position + 8, length))
        position += 8 + length


def check_frames(numbers: list[int], frames: int) -> None:
    """404 for a frame number beyond the instance's ``frames`` (PS3.18 10.4.1.1.3)."""
    for n in numbers:
        if not 1 <= n <= frames:
            raise NotFound(f"frame {n} does not exist: the instance has {frames}")


def frame_ranges(fh: IO[bytes], layout: PixelLayout, numbers: list[int]) -> list[
        list[tuple[int, int]]]:
    """For each 1-based frame number, the (offset, length) pieces that make it up."""
    check_frames(numbers, layout.frames)
    if not layout.encapsulated:
        if layout.frame_size is None:
            raise NotAcceptable("frames of bit-packed pixel data cannot be cut by offset; "
                                "see bit_frames")
        return [[(layout.value_start + (n - 1) * layout.frame_size, layout.frame_size)]
                for n in numbers]
    table, found = fragments(fh, layout)
    if len(found) == layout.frames:
        return [[found[n - 1]] for n in numbers]
    if layout.frames == 1:
        return [found]
    if table and len(table) == layout.frames:
        first_item = found[0][0] - 8 if found else 0
        starts = [first_item + offset for offset in table] + [2**63]
        return [[f for f in found if starts[n - 1] <= f[0] - 8 < starts[n]] for n in numbers]
    raise NotAcceptable("fragments cannot be matched to frames (no Basic Offset Table)")


def bit_frames(fh: IO[bytes], layout: PixelLayout, numbers: list[int]) -> list[bytes]:
    """Frames of bit-packed (1-bit) little-endian pixel data whose frames do not start on
    a byte boundary (PS3.5 8.1.1: frames follow each other bit by bit, first pixel in the
    least significant bit): each is returned packed the same way from bit 0, padded with
    zero bits to a whole byte."""
    import numpy as np

    bits = layout.frame_bits
    if not bits:
        raise NotAcceptable("the frame layout of this pixel data is unknown")
    check_frames(numbers, layout.frames)
    out = []
    for n in numbers:
        start = (n - 1) * bits
        shift = start % 8
        fh.seek(layout.value_start + start // 8)
        raw = np.frombuffer(fh.read((shift + bits + 7) // 8), np.uint8)
        if raw.size * 8 < shift + bits:
            raise NotFound(f"frame {n} is cut short in the stored file")
        values = np.unpackbits(raw, bitorder="little")[shift:shift + bits]
        out.append(np.packbits(values, bitorder="little").tobytes())
    return out


def read_pieces(fh: IO[bytes], pieces: list[tuple[int, int]]) -> bytes:
    """The bytes of (offset, length) pieces of a file, joined: one frame."""
    if len(pieces) == 1:  # the usual case: read straight into the result
        fh.seek(pieces[0][0])
        return fh.read(pieces[0][1])
    out = bytearray()
    for offset, length in pieces:
        fh.seek(offset)
        out += fh.read(length)
    return bytes(out)


def parse_frame_list(text: str) -> list[int]:
    try:
        numbers = [int(p) for p in text.split(",")]
    except ValueError:
        raise BadRequest(f"frame list {text[:60]!r}: expected numbers like 1,3,5") from None
    if not numbers or any(n < 1 for n in numbers):
        raise BadRequest("frame numbers start at 1")
    return list(dict.fromkeys(numbers))  # each frame once, in the order asked


def decode_frame(data: bytes, number: int, bits_allocated: int = 8) -> bytes:
    """One frame of a compressed or big endian file as native little endian pixel bytes;
    1-bit data packed again, eight pixels a byte, first in the least significant bit."""
    import numpy as np
    from pydicom.pixels.utils import pixel_array

    try:
        array = pixel_array(io.BytesIO(data), index=number - 1, raw=True)
    except Exception as exc:
        raise NotAcceptable("cannot decode this frame; ask for transfer-syntax=*") from exc
    if bits_allocated == 1:
        return np.packbits(array.ravel().astype(np.uint8), bitorder="little").tobytes()
    return _little_endian_bytes(array)


# -- metadata --------------------------------------------------------------------------
def etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def etag_matches(header: str | None, tag: str) -> bool:
    """``If-None-Match`` against ``tag`` with the weak comparison of RFC 9110 13.1.2."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(candidate.strip().removeprefix("W/") == tag for candidate in header.split(","))


#: Content codings we produce, best first when the client weighs them equally.
CODINGS = ("br", "gzip")


def content_coding(body: bytes, accept_encoding: str | None) -> str | None:
    """``br``, ``gzip`` or None (identity) for ``body`` by ``Accept-Encoding`` (RFC 9110
    12.5.3): the client's highest q-value wins, Brotli on a tie; ``q=0`` refuses a coding,
    ``*`` stands for any coding not named. Bodies of 1 KiB or less are sent as they are."""
    if len(body) <= 1024 or not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for item in accept_encoding[:1024].lower().split(","):
        name, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        weights[name.strip()] = q
    best, best_q = None, 0.0
    for coding in CODINGS:
        q = weights.get(coding, weights.get("*", 0.0))
        if q > best_q:
            best, best_q = coding, q
    return best


def encode(body: bytes, coding: str) -> bytes:
    """``body`` compressed with ``coding`` (levels chosen for speed: metadata is large)."""
    if coding == "br":
        import brotli

        return bytes(brotli.compress(body, quality=4))
    return gzip.compress(body, 4)
