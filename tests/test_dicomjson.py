"""DICOM JSON (PS3.18 Annex F) of stored instances: the fast converter agrees with
pydicom's reference conversion on every valid test file, in every character set."""

from __future__ import annotations

from typing import Any

import pydicom
import pytest

from dicomcloud.dicomjson import BULK_THRESHOLD, instance_json
from tests.support import SampleFile, valid_testdata


def _reference(path: Any) -> dict[str, Any]:
    """pydicom's own to_json_dict with the same BulkDataURI rule: ``.../bulkdata/{tag}``
    at the top, ``.../bulkdata/{sequence}/{item}/{tag}`` inside sequences."""
    ds = pydicom.dcmread(path)
    for tag in (0x7FE00008, 0x7FE00009, 0x7FE00010, 0xFFFCFFFC):  # ours, or no information
        if tag in ds:
            del ds[tag]
    base = (f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/bulkdata/")
    doc = dict(ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD,
                               bulk_data_element_handler=lambda e: "placeholder",
                               suppress_invalid_tags=True))
    _place_uris(doc, base)
    return doc


def _place_uris(doc: dict[str, Any], prefix: str) -> None:
    for key, value in doc.items():
        if "BulkDataURI" in value:
            value["BulkDataURI"] = f"{prefix}{key}"
        if value.get("vr") == "SQ":
            for index, item in enumerate(value.get("Value", [])):
                _place_uris(item, f"{prefix}{key}/{index}/")


def _without_ours(doc: dict[str, Any]) -> dict[str, Any]:
    """Drop what only we add: the transfer syntax and the pixel data BulkDataURI."""
    return {k: v for k, v in doc.items() if k not in {"00020010", "7FE00010", "7FE00008",
                                                       "7FE00009"}}


def _charset_files() -> list[Any]:
    """pydicom's character set samples that could be archived (they carry the UIDs)."""
    from pathlib import Path

    folder = Path(pydicom.__file__).parent / "data" / "charset_files"
    keep = []
    for path in sorted(folder.glob("chr*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if all(k in ds for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
            keep.append(path)
    assert len(keep) >= 15, "the character set samples are missing"
    return keep


@pytest.mark.parametrize("sample", valid_testdata(), ids=lambda s: s.path.name)
def test_fast_json_equals_pydicom_reference(sample: SampleFile) -> None:
    with open(sample.path, "rb") as fh:
        ours = instance_json(fh)
    assert _without_ours(ours) == _reference(sample.path)


@pytest.mark.parametrize("path", _charset_files(), ids=lambda p: p.name)
def test_fast_json_decodes_every_character_set_like_pydicom(path: Any) -> None:
    with open(path, "rb") as fh:
        ours = instance_json(fh)
    assert _without_ours(ours) == _reference(path)


def test_pixel_data_is_a_bulk_data_uri_never_inline() -> None:
    sample = next(s for s in valid_testdata() if s.path.name == "CT_small.dcm")
    with open(sample.path, "rb") as fh:
        doc = instance_json(fh)
    pixel = doc["7FE00010"]
    assert set(pixel) == {"vr", "BulkDataURI"}
    assert pixel["BulkDataURI"].endswith("/bulkdata/7FE00010")
    assert doc["00020010"] == {"vr": "UI", "Value": [str(sample.transfer_syntax)]}


def test_elements_after_the_pixel_data_are_described_and_trailing_padding_is_not(
        tmp_path: Any) -> None:
    """PS3.5 7.1: elements are in tag order, so a Digital Signatures Sequence (FFFA,FFFA)
    follows the pixel data; it belongs in the metadata. (FFFC,FFFC) padding does not."""
    from pydicom.dataset import Dataset

    from tests.support import make_ct, write_part10

    ds = make_ct()
    signature = Dataset()
    signature.MACIDNumber = 1
    signature.DigitalSignatureUID = "1.2.3.4.5"
    signature.Signature = b"\x01\x02" * 64
    ds.DigitalSignaturesSequence = [signature]
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 32)
    path = write_part10(ds, tmp_path / "signed.dcm")
    with open(path, "rb") as fh:
        doc = instance_json(fh)
    assert doc["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")
    (item,) = doc["FFFAFFFA"]["Value"]
    assert item["04000005"] == {"vr": "US", "Value": [1]}
    assert item["04000100"] == {"vr": "UI", "Value": ["1.2.3.4.5"]}
    assert item["04000120"]["vr"] == "OB" and "InlineBinary" in item["04000120"]
    assert "FFFCFFFC" not in doc
    assert list(doc).index("FFFAFFFA") > list(doc).index("7FE00010")


@pytest.mark.parametrize("tail", [b"\x13\x37" * 40, bytes(range(7, 250)), b"\xff" * 9,
                                  b"\x09\x00\x10\x00LO\x04\x00ABCD"])  # a private LO
def test_garbage_after_the_pixel_data_is_ignored_not_an_error(tmp_path: Any,
                                                              tail: bytes) -> None:
    """Bytes after the pixel data that are no elements (accepted at ingest as they are)
    must not break the metadata: the elements before them are described."""
    from tests.support import make_ct, write_part10

    path = write_part10(make_ct(), tmp_path / "tail.dcm")
    with open(path, "ab") as fh:
        fh.write(tail)
    with open(path, "rb") as fh:
        doc = instance_json(fh)
    assert doc["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")
    assert doc["00100010"]["Value"] == [{"Alphabetic": "Test^Patient"}]
    assert all(key <= "7FE00010" for key in doc)
