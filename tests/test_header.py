"""The fast header reader gives what pydicom gives, or declines (never a different answer)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomcloud.header import read_header
from tests import support
from tests.factories import ct_dataset, new_uid, write_part10


def _reference(data: bytes) -> tuple[Dataset, int] | None:
    """pydicom's header and pixel offset, or None if pydicom cannot read the file."""
    fp = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            ds.file_meta.TransferSyntaxUID  # noqa: B018
    except Exception:
        return None
    return ds, fp.tell()


def _same(fast: Dataset, ref: Dataset) -> None:
    fast_tags, ref_tags = set(fast.keys()), set(ref.keys())
    assert fast_tags <= ref_tags
    # only sequences of undefined length are left out
    assert all(ref[t].VR == "SQ" for t in ref_tags - fast_tags)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag in fast_tags:
            if ref[tag].VR != "SQ":
                assert fast[tag].value == ref[tag].value, tag
                assert fast[tag].VR == ref[tag].VR, tag
        for tag in ref.file_meta.keys():  # noqa: SIM118 - iterating a Dataset yields elements
            assert fast.file_meta[tag].value == ref.file_meta[tag].value, tag
    assert fast.original_encoding == ref.original_encoding
    assert fast._character_set == ref._character_set


def test_every_readable_test_file_reads_as_pydicom_reads_it_or_is_declined() -> None:
    fast_count = declined = 0
    for path in support.testdata_paths():
        data = path.read_bytes()
        reference = _reference(data)
        result = read_header(data)
        if reference is None:
            continue  # pydicom refuses it; what read_header says is checked below
        if result is None:
            declined += 1
            continue
        fast_count += 1
        ds, position = result
        ref, ref_position = reference
        assert position == ref_position, path
        _same(ds, ref)
    assert fast_count > 100  # the fast path covers nearly all of them ...
    assert declined < fast_count // 4  # ... declining only unusual encodings


def test_files_pydicom_cannot_read_are_declined_not_misread() -> None:
    for path in support.testdata_paths():
        data = path.read_bytes()
        if _reference(data) is None:
            assert read_header(data) is None, path


def _file(syntax: str, **attributes: object) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "Doe^Jane"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True,
               implicit_vr=syntax == ImplicitVRLittleEndian,
               little_endian=syntax != ExplicitVRBigEndian)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_big_endian_and_deflated_files_are_left_to_pydicom(syntax: str) -> None:
    data = _file(syntax)
    assert _reference(data) is not None
    assert read_header(data) is None


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_file_cut_inside_an_element_is_declined(syntax: str) -> None:
    data = _file(syntax, ImageComments="x" * 100)
    cut = data.index(b"x" * 100) + 50
    assert read_header(data[:cut]) is None


def test_without_dicm_prefix_it_is_declined() -> None:
    data = _file(ExplicitVRLittleEndian)
    assert read_header(data[132:]) is None
    assert read_header(b"\x00" * 128 + b"NOPE" + data[132:]) is None


def test_a_prefix_that_ends_before_pixel_data_is_declined_when_not_whole() -> None:
    data = _file(ExplicitVRLittleEndian, Rows=1, Columns=2, BitsAllocated=8,
                 PixelData=b"\x00\x01")
    at = data.index(b"\xe0\x7f\x10\x00")
    assert read_header(data, whole=False) is not None  # pixel data lies inside: complete
    assert read_header(data[:at], whole=False) is None  # may be cut before more elements
    result = read_header(data[:at], whole=True)
    assert result is not None and result[1] == at


def test_undefined_length_sequences_are_skipped_and_later_elements_still_read() -> None:
    item = Dataset()
    item.CodeValue = "T-D0050"
    inner = Dataset()
    inner.CodeMeaning = "nested"
    item.ConceptCodeSequence = [inner]
    data = _file(ExplicitVRLittleEndian, AnatomicRegionSequence=[item, item],
                 PatientID="after the sequence")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds["AnatomicRegionSequence"].is_undefined_length = True  # (0008,2218) < (0010,0020)
    for sequence_item in ds.AnatomicRegionSequence:
        sequence_item["ConceptCodeSequence"].is_undefined_length = True
        sequence_item.is_undefined_length_sequence_item = True
    buffer = io.BytesIO()
    ds.save_as(buffer)
    undefined = buffer.getvalue()
    assert b"\xfe\xff\xdd\xe0" in undefined  # sequence delimitation item present
    result = read_header(undefined)
    assert result is not None
    header, _ = result
    assert header.PatientID == "after the sequence"
    assert "AnatomicRegionSequence" not in header


def test_generated_ct_header_reads_the_same(tmp_path: Path) -> None:
    ds = ct_dataset(new_uid(), new_uid(), patient_name="Müller^Jürgen")
    ds.SpecificCharacterSet = "ISO_IR 192"
    data = write_part10(ds, tmp_path / "ct.dcm").read_bytes()
    result = read_header(data)
    reference = _reference(data)
    assert result is not None and reference is not None
    assert result[1] == reference[1]
    _same(result[0], reference[0])


def test_a_malformed_character_set_is_left_to_pydicom_never_an_unexpected_error() -> None:
    from dicomcloud.errors import InvalidInstance
    from dicomcloud.ingest import inspect

    data = _file(ExplicitVRLittleEndian)
    at = data.index(b"\x08\x00\x16\x00")  # (0008,0016) SOP Class UID, the first element
    bad = data[:at] + b"\x08\x00\x05\x00US\x02\x00\x01\x00" + data[at:]  # (0008,0005) as US
    assert read_header(bad) is None  # declined, not raised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns and falls back to the default set
        try:
            ds = inspect(io.BytesIO(bad), len(bad), head=bad)
        except InvalidInstance:
            return  # refused with a DIMSE status: fine
    assert ds.SOPInstanceUID == "1.2.3.4"  # or accepted, read by pydicom
