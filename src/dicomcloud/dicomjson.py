"""DICOM JSON Model (PS3.18 Annex F) of stored instances.

Bulk data (Pixel Data, and binary values longer than ``BULK_THRESHOLD``) is never inlined:
it is referenced by a BulkDataURI (PS3.18 F.2.6). URIs are written relative to the DICOMweb
root (``studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}``) so that the same
pre-generated document serves every host name a proxy may present; the web role resolves
them against the request's base URL.
"""

from __future__ import annotations

from typing import IO, Any

import orjson
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

BULK_THRESHOLD = 1024
_PIXEL_VR = {"PixelData": "OW", "FloatPixelData": "OF", "DoubleFloatPixelData": "OD"}


def instance_base(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Relative URI of an instance under the DICOMweb root."""
    return f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def instance_json(fp: IO[bytes]) -> dict[str, Any]:
    """DICOM JSON of one Part 10 file, read without its pixel data."""
    ds = pydicom.dcmread(fp, stop_before_pixels=True)
    base = instance_base(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                         str(ds.SOPInstanceUID))
    return dataset_json(ds, base, has_pixels=_has_pixels(fp))


def dataset_json(ds: Dataset, base: str, *, has_pixels: str | None) -> dict[str, Any]:
    """DICOM JSON of a header; ``has_pixels`` names the pixel data keyword if present."""

    def bulk(element: DataElement) -> str:
        return f"{base}/bulkdata/{element.tag:08X}"

    out: dict[str, Any] = {}
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        out["00020010"] = {"vr": "UI", "Value": [str(tsyntax)]}
    out.update(ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD,
                               bulk_data_element_handler=bulk, suppress_invalid_tags=True))
    if has_pixels:
        tag = pydicom.datadict.tag_for_keyword(has_pixels)
        vr = _PIXEL_VR[has_pixels]
        if has_pixels == "PixelData" and (int(ds.get("BitsAllocated", 16)) <= 8 or
                                          UID(str(ds.file_meta.TransferSyntaxUID)).is_compressed):
            vr = "OB"
        out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{base}/bulkdata/{tag:08X}"}
    return out


def _has_pixels(fp: IO[bytes]) -> str | None:
    """Keyword of the pixel data element the reader stopped at, if any."""
    head = fp.read(4)
    if len(head) < 4:
        return None
    tags = {b"\xe0\x7f\x10\x00": "PixelData", b"\xe0\x7f\x08\x00": "FloatPixelData",
            b"\xe0\x7f\x09\x00": "DoubleFloatPixelData", b"\x7f\xe0\x00\x10": "PixelData"}
    return tags.get(head)


def dumps(documents: list[dict[str, Any]]) -> bytes:
    """Serialise a metadata response body (a JSON array of instances)."""
    return orjson.dumps(documents)
