"""Rendered and thumbnail resources (PS3.18 10.4.1.1.3 "Rendered", 10.4.1.1.5 "Thumbnail").

A frame is decoded with pydicom (only that frame when the codec allows), the Modality LUT
(rescale slope/intercept) and the VOI window applied (PS3.3 C.11.1, C.11.2.1.2), inverted
for MONOCHROME1, scaled to the viewport and encoded as JPEG (the default) or PNG.

Query parameters (PS3.18 8.3.5.1): ``window=center,width[,linear|linear-exact|sigmoid]``,
``viewport=vw,vh`` (the image is scaled to fit, aspect kept) or
``viewport=vw,vh,sx,sy,sw,sh`` (the source region first), ``quality=1..100`` (JPEG).
Malformed parameters give 400 naming the parameter.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomcloud.errors import BadRequest, NotAcceptable, NotFound
from dicomcloud.header import read_header
from dicomcloud.wado import MediaRange, _matches, check_frames

MEDIA_TYPES = ("image/jpeg", "image/png")
THUMBNAIL_SIZE = 128
_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


@dataclass(frozen=True)
class RenderParams:
    """Parsed rendering parameters."""

    window: tuple[float, float, str] | None = None
    viewport: tuple[int, ...] | None = None
    quality: int = 75


def parse_params(items: list[tuple[str, str]]) -> RenderParams:
    window = viewport = None
    quality = 75
    for name, value in items:
        if name == "window":
            parts = value.split(",")
            try:
                center, width = float(parts[0]), float(parts[1])
            except (IndexError, ValueError):
                raise BadRequest(f"window={value[:40]!r}: expected center,width[,function]")\
                    from None
            function = parts[2].strip().lower() if len(parts) > 2 else "linear"
            if function not in ("linear", "linear-exact", "sigmoid") or len(parts) > 3 or \
                    not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
                raise BadRequest(f"window={value[:40]!r}: width must be positive; function "
                                 "linear, linear-exact or sigmoid")
            window = (center, width, function)
        elif name == "viewport":
            try:
                numbers = tuple(int(p) for p in value.split(","))
            except ValueError:
                raise BadRequest(f"viewport={value[:40]!r}: expected vw,vh[,sx,sy,sw,sh]") \
                    from None
            if len(numbers) not in (2, 6) or not 0 < numbers[0] <= 4096 or \
                    not 0 < numbers[1] <= 4096 or any(n < 0 for n in numbers[2:]):
                raise BadRequest(f"viewport={value[:40]!r}: vw,vh between 1 and 4096, "
                                 "optionally followed by sx,sy,sw,sh")
            viewport = numbers
        elif name == "quality":
            if not (value.isascii() and value.isdigit()) or len(value) > 3 or \
                    not 1 <= int(value) <= 100:
                raise BadRequest(f"quality={value[:20]!r}: expected 1 to 100")
            quality = int(value)
        elif name not in ("annotation", "charset", "iccprofile"):
            raise BadRequest(f"unknown rendering parameter {name[:40]!r}")
    return RenderParams(window, viewport, quality)


def choose_media(ranges: list[MediaRange], *, multipart: bool = False) -> str:
    """JPEG unless the client prefers PNG (PS3.18 8.7.4: rendered media types).

    With ``multipart`` (a rendered study or series, one part per instance) the type may
    also be asked for as ``multipart/related; type="image/png"``."""
    for r in ranges:
        mime = r.mime
        if multipart and mime == "multipart/related":
            mime = r.inner or MEDIA_TYPES[0]
        for media in MEDIA_TYPES:
            if _matches(mime, media):
                return media
    raise NotAcceptable("rendered images are served as image/jpeg or image/png"
                        + (' (or multipart/related; type="image/jpeg")' if multipart else ""))


def render(data: bytes, frame: int, params: RenderParams, media: str) -> bytes:
    """Frame ``frame`` (1-based) of a Part 10 file as an encoded image."""
    fast = _native_grey(data, frame)
    if fast is not None:
        header, values = fast
        image = Image.fromarray(_windowed(values, header, params.window), "L")
    else:
        image = _decoded(data, frame, params)
    image = _viewport(image, params.viewport)
    out = io.BytesIO()
    if media == "image/png":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=params.quality)
    return out.getvalue()


def _native_grey(data: bytes, frame: int) -> tuple[Dataset, np.ndarray] | None:
    """Modality values of one frame of uncompressed little endian greyscale pixel data,
    read straight from the bytes; None when pydicom's general path is needed."""
    parsed = read_header(data)
    if parsed is None:
        return None
    header, at = parsed
    try:
        syntax = str(header.file_meta.TransferSyntaxUID)
        rows, columns = int(header.Rows), int(header.Columns)
        bits, stored = int(header.BitsAllocated), int(header.get("BitsStored") or 0)
        signed = int(header.get("PixelRepresentation") or 0) == 1
        frames = int(header.get("NumberOfFrames") or 1)
        samples = int(header.get("SamplesPerPixel") or 1)
        slope = float(header.get("RescaleSlope") or 1)
        intercept = float(header.get("RescaleIntercept") or 0)
    except (AttributeError, TypeError, ValueError):
        return None
    if (syntax not in _NATIVE_LE or samples != 1 or bits not in (8, 16)
            or (signed and stored != bits) or "ModalityLUTSequence" in header
            or data[at:at + 4] != b"\xe0\x7f\x10\x00"):
        return None
    check_frames([frame], frames)
    start = at + (8 if syntax == "1.2.840.10008.1.2" else 12)
    size = rows * columns * bits // 8
    offset = start + (frame - 1) * size
    if offset + size > len(data):
        return None
    dtype = {(8, False): "<u1", (8, True): "<i1", (16, False): "<u2", (16, True): "<i2"}
    pixels = np.frombuffer(data, dtype=dtype[bits, signed], count=rows * columns,
                           offset=offset).reshape(rows, columns)
    values = pixels.astype(np.float32)
    if slope != 1 or intercept != 0:
        values = values * np.float32(slope) + np.float32(intercept)
    return header, values


def _decoded(data: bytes, frame: int, params: RenderParams) -> Image.Image:
    """Any frame pydicom can decode (compressed, colour, big endian, ...)."""
    from pydicom.pixels.processing import apply_modality_lut
    from pydicom.pixels.utils import pixel_array

    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    if "Rows" not in header:
        raise NotFound("the instance has no image to render")
    frames = int(header.get("NumberOfFrames") or 1)
    check_frames([frame], frames)
    try:
        pixels = pixel_array(io.BytesIO(data), index=frame - 1)
    except Exception as exc:
        raise NotAcceptable(f"this image cannot be decoded for rendering ({exc})") from exc
    samples = int(header.get("SamplesPerPixel") or 1)
    if samples == 1:
        values = np.asarray(apply_modality_lut(pixels, header), dtype=np.float32)
        return Image.fromarray(_windowed(values, header, params.window), "L")
    rgb = pixels if pixels.dtype == np.uint8 else _to_byte(pixels.astype(np.float32))
    return Image.fromarray(np.ascontiguousarray(rgb[..., :3]), "RGB")


def _windowed(values: np.ndarray, header: pydicom.Dataset,
              window: tuple[float, float, str] | None) -> np.ndarray:
    """VOI windowing to 8 bits (PS3.3 C.11.2.1.2.1 linear, C.11.2.1.3.1 sigmoid)."""
    if window is None:
        center, width = _first(header.get("WindowCenter")), _first(header.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            window = (center, width, "linear")
    if window is None:  # no window in the header: the full range of the values
        low, high = float(values.min()), float(values.max())
        out = _to_byte(values) if high > low else np.zeros(values.shape, np.uint8)
    else:
        center, width, function = window
        if function == "sigmoid":
            out = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        elif function == "linear-exact":
            out = ((values - center) / width + 0.5) * 255.0
        else:
            if width < 1:
                width = 1.0
            out = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
        out = np.clip(out, 0, 255).astype(np.uint8)
    if str(header.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 255 - out
    return out


def _to_byte(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return ((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _first(value: Any) -> float | None:
    if value is None:
        return None
    try:
        first = value[0] if isinstance(value, MultiValue | list | tuple) else value
        number = float(first)
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def _viewport(image: Image.Image, viewport: tuple[int, ...] | None) -> Image.Image:
    if viewport is None:
        return image
    if len(viewport) == 6:
        sx, sy, sw, sh = viewport[2:]
        # the source region, clipped to the image (it may not reach outside it)
        right, bottom = min(sx + sw, image.width), min(sy + sh, image.height)
        if sw > 0 and sh > 0 and sx < right and sy < bottom:
            image = image.crop((sx, sy, right, bottom))
    vw, vh = viewport[:2]
    scale = min(vw / image.width, vh / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else
                        Image.Resampling.BICUBIC)
