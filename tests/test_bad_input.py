"""Bad and odd DICOM over C-STORE (pynetdicom) and STOW-RS against one real archive process.

Bad input is refused with the PS3.4 B.2.3 status (C-STORE, with an Error Comment) or the
same value as STOW-RS FailureReason, and leaves no trace inside or outside the storage
layout. Odd but valid input (missing Study Date, empty Patient ID, names in ISO 2022,
GB18030, UTF-8 and 8-bit character sets, private tags) is accepted and indexed, names
decoded. The tests run in file order: the last one checks that the archive survived all
of it and that the file stored before the first bad input is unchanged.

C-STORE sends files chunked (see ``support.c_store``): pynetdicom streams the file's data
set bytes as they are, so broken data reaches the archive unchanged.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.config import disable_value_validation
from pydicom.data import get_charset_files
from pydicom.datadict import tag_for_keyword

from tests.support import (
    Archive,
    c_store,
    data_set_bytes,
    echo,
    find_instances,
    layout_snapshot,
    make_ct,
    multipart,
    sample_file,
    sha256,
    staging_files,
    value,
    wait_until,
    write_part10,
)

TRANSPORTS = ["c-store", "stow"]
CANNOT_UNDERSTAND = 0xC000
DATA_SET_MISMATCH = 0xA900
BAD_UIDS = {
    "letters": "1.2.abc",
    "path-traversal": "../../etc/passwd",
    "slash-dotdot": "1.2.3/../4",
    "65-chars": "1.2." + "3" * 61,
}
UID_ATTRIBUTES = ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
CHARSET_FILES = ["chrX1.dcm", "chrX2.dcm", "chrH31.dcm", "chrH32.dcm", "chrJapMulti.dcm",
                 "chrI2.dcm", "chrKoreanMulti.dcm", "chrRuss.dcm", "chrGreek.dcm",
                 "chrArab.dcm", "chrHbrw.dcm", "chrFren.dcm", "chrGerm.dcm"]
CT_SMALL_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"


@dataclass(frozen=True)
class Stored:
    path: Path
    sha256: str


@pytest.fixture(scope="module", autouse=True)
def stored_before(archive: Archive) -> Stored:
    """CT_small.dcm, stored and indexed before any bad input is sent; its hash then."""
    assert c_store(archive, [sample_file("CT_small.dcm")])[0].Status == 0
    wait_until(lambda: archive.count(CT_SMALL_STUDY) == 1, message="CT_small indexed")
    ds = pydicom.dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    path = archive.stored_path("default", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                               ds.SOPInstanceUID)
    return Stored(path, sha256(path))


def send(archive: Archive, transport: str, path: Path) -> tuple[int, str]:
    """Store one Part 10 file; the DIMSE status and Error Comment, or for STOW-RS the
    FailureReason and the archive's message (0 and "" when stored)."""
    if transport == "c-store":
        # the test process must be able to put an invalid UID into the C-STORE request
        with disable_value_validation():
            status = c_store(archive, [path])[0]
        return int(status.Status), str(status.get("ErrorComment", ""))
    body, content_type = multipart([path.read_bytes()])
    response = httpx.post(f"{archive.url}/studies", content=body,
                          headers={"Content-Type": content_type}, timeout=60)
    assert response.headers["content-type"] == "application/dicom+json"
    if response.status_code == 200:
        return 0, ""
    assert response.status_code == 409, response.text
    failed = response.json()["00081198"]["Value"]
    assert len(failed) == 1
    return int(value(failed[0], "00081197")), str(value(failed[0], "00091001") or "")


@contextlib.contextmanager
def leaves_no_trace(archive: Archive, sop_uid: str | None = None) -> Iterator[None]:
    """Nothing appears around the data dir, staging ends empty, ``sop_uid`` not indexed."""
    before = layout_snapshot(archive)
    yield
    assert layout_snapshot(archive) - before == set()
    wait_until(lambda: not staging_files(archive), timeout=5, message="staging empty")
    if sop_uid is not None:
        assert find_instances(archive, [sop_uid])[sop_uid] == []


def _refused(archive: Archive, transport: str, path: Path, expected: int,
             sop_uid: str | None) -> None:
    with leaves_no_trace(archive, sop_uid):
        status, comment = send(archive, transport, path)
    assert status == expected, comment
    assert comment.strip(), "a refusal says why"


# -- refused ---------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_truncated_mr_truncated_dcm_is_refused_c000_with_a_reason_leaving_no_trace(
        archive: Archive, transport: str) -> None:
    path = sample_file("MR_truncated.dcm")
    sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    _refused(archive, transport, path, CANNOT_UNDERSTAND, sop)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ct_cut_in_half_is_refused_c000_with_a_reason_and_keeps_the_stored_one(
        archive: Archive, transport: str, tmp_path: Path, stored_before: Stored) -> None:
    whole = sample_file("CT_small.dcm").read_bytes()
    path = tmp_path / "half.dcm"
    path.write_bytes(whole[:len(whole) // 2])
    _refused(archive, transport, path, CANNOT_UNDERSTAND, None)
    assert sha256(stored_before.path) == stored_before.sha256


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_non_dicom_garbage_is_refused_c000_with_a_reason_leaving_no_trace(
        archive: Archive, transport: str, tmp_path: Path) -> None:
    """Over STOW-RS the whole part is garbage; over C-STORE the data set is (a C-STORE
    always carries a command set naming SOP class and instance)."""
    garbage = b"this is not DICOM at all, only text sent where a data set belongs\n" * 60
    ds = make_ct()
    path = write_part10(ds, tmp_path / "garbage.dcm")
    if transport == "c-store":
        path.write_bytes(path.read_bytes()[:-len(data_set_bytes(path))] + garbage)
    else:
        path.write_bytes(garbage)
    _refused(archive, transport, path, CANNOT_UNDERSTAND, ds.SOPInstanceUID)


@pytest.mark.parametrize("attribute", UID_ATTRIBUTES)
@pytest.mark.parametrize("bad", list(BAD_UIDS.values()), ids=list(BAD_UIDS))
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_invalid_uid_is_refused_a900_with_a_reason_creating_nothing_in_or_out_of_storage(
        archive: Archive, transport: str, bad: str, attribute: str, tmp_path: Path) -> None:
    ds = make_ct()
    path = tmp_path / "bad-uid.dcm"
    with disable_value_validation():  # new elements, so that they do not validate either
        ds.add_new(tag_for_keyword(attribute), "UI", bad)
        if attribute == "SOPInstanceUID" and len(bad) <= 64:  # the C-STORE request too
            ds.file_meta.add_new(tag_for_keyword("MediaStorageSOPInstanceUID"), "UI", bad)
        # written as set: enforce_file_format would copy a 65-character SOP Instance UID
        # into the file meta, and pynetdicom cannot put that into a C-STORE request
        ds.preamble = b"\0" * 128
        ds.save_as(path, enforce_file_format=False)
    sop = None if attribute == "SOPInstanceUID" else ds.SOPInstanceUID
    _refused(archive, transport, path, DATA_SET_MISMATCH, sop)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ct_image_without_pixel_data_is_refused_a900_with_a_reason_leaving_no_trace(
        archive: Archive, transport: str, tmp_path: Path) -> None:
    ds = make_ct()
    del ds.PixelData
    path = write_part10(ds, tmp_path / "no-pixels.dcm")
    _refused(archive, transport, path, DATA_SET_MISMATCH, ds.SOPInstanceUID)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ct_pixel_data_shorter_than_rows_columns_bits_is_refused_a900_leaving_no_trace(
        archive: Archive, transport: str, tmp_path: Path) -> None:
    ds = make_ct(size=32)
    ds.PixelData = ds.PixelData[:len(ds.PixelData) // 2]
    path = write_part10(ds, tmp_path / "short-pixels.dcm")
    _refused(archive, transport, path, DATA_SET_MISMATCH, ds.SOPInstanceUID)


# -- odd but valid: accepted and indexed -------------------------------------------------
def _study_row(archive: Archive, study: str) -> dict[str, Any]:
    rows = wait_until(lambda: archive.qido("/studies", StudyInstanceUID=study),
                      message="study indexed")
    assert len(rows) == 1
    return rows[0]


def _stored_ok(archive: Archive, transport: str, ds: Any, path: Path) -> None:
    """Accepted, and stored as sent (the data set bytes; over STOW-RS the whole file)."""
    status, comment = send(archive, transport, path)
    assert status == 0, comment
    stored = archive.stored_path("default", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                 ds.SOPInstanceUID)
    if transport == "stow":
        assert stored.read_bytes() == path.read_bytes()
    else:
        assert data_set_bytes(stored) == data_set_bytes(path)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_missing_study_date_is_accepted_and_indexed_without_a_study_date(
        archive: Archive, transport: str, tmp_path: Path) -> None:
    ds = make_ct()
    del ds.StudyDate
    path = write_part10(ds, tmp_path / "no-date.dcm")
    _stored_ok(archive, transport, ds, path)
    row = _study_row(archive, ds.StudyInstanceUID)
    assert row["00080020"] == {"vr": "DA"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_empty_patient_id_is_accepted_and_indexed_with_an_empty_patient_id(
        archive: Archive, transport: str, tmp_path: Path) -> None:
    ds = make_ct(PatientID="")
    path = write_part10(ds, tmp_path / "empty-id.dcm")
    _stored_ok(archive, transport, ds, path)
    row = _study_row(archive, ds.StudyInstanceUID)
    assert row["00100020"] == {"vr": "LO"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_private_tags_are_accepted_indexed_and_stored_unchanged(
        archive: Archive, transport: str, tmp_path: Path) -> None:
    ds = make_ct()
    block = ds.private_block(0x0019, "DICOMCLOUD TEST", create=True)
    block.add_new(0x10, "LO", "a private value")
    block.add_new(0x11, "UN", b"\x01\x02\x03\x04")
    nested = pydicom.Dataset()
    nested.add_new(0x00290010, "LO", "OTHER CREATOR")
    nested.add_new(0x00291001, "DS", "1.5")
    block.add_new(0x12, "SQ", [nested])
    path = write_part10(ds, tmp_path / "private.dcm")
    _stored_ok(archive, transport, ds, path)
    rows = wait_until(lambda: find_instances(archive, [ds.SOPInstanceUID])[ds.SOPInstanceUID],
                      message="instance indexed")
    assert len(rows) == 1


def _charset_file(name: str) -> Path:
    found = [Path(p) for p in get_charset_files(name)]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def _components(name: Any) -> dict[str, str]:
    parts = {"Alphabetic": name.alphabetic, "Ideographic": name.ideographic,
             "Phonetic": name.phonetic}
    return {k: v for k, v in parts.items() if v}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("charset_file", CHARSET_FILES)
def test_patient_name_in_its_character_set_is_indexed_decoded_and_found_by_wildcard(
        archive: Archive, transport: str, charset_file: str, tmp_path: Path) -> None:
    """The name and Specific Character Set of one of pydicom's charset files, in a new,
    complete CT instance (the originals lack pixel data or valid UIDs)."""
    source = pydicom.dcmread(_charset_file(charset_file), stop_before_pixels=True)
    expected = _components(source.PatientName)
    found_run = re.search(r"[^\x00-\x7f]{1,2}", str(source.PatientName))
    assert found_run, "the name has non-ASCII characters"
    snippet = found_run.group()
    ds = make_ct(SpecificCharacterSet=source.SpecificCharacterSet,
                 PatientName=source.PatientName)
    path = write_part10(ds, tmp_path / "charset.dcm")
    assert pydicom.dcmread(path).PatientName == source.PatientName  # encoded as the source

    _stored_ok(archive, transport, ds, path)
    row = _study_row(archive, ds.StudyInstanceUID)
    assert row["00100010"]["Value"] == [expected]
    found = archive.qido("/studies", PatientName=f"*{snippet}*", limit="1000")
    assert ds.StudyInstanceUID in [value(r, "0020000D") for r in found], snippet


# -- afterwards ------------------------------------------------------------------------
def test_after_all_bad_input_process_alive_c_echo_works_earlier_file_byte_identical(
        archive: Archive, stored_before: Stored) -> None:
    assert archive.alive(), archive.log()
    assert echo(archive)
    assert sha256(stored_before.path) == stored_before.sha256


# -- found by tests/test_fuzz.py -----------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("keyword", ["StudyDate", "PatientID"])
def test_resent_instance_with_an_unreadable_value_is_refused_and_the_stored_one_kept(
        archive: Archive, transport: str, keyword: str, tmp_path: Path) -> None:
    """A value pydicom cannot convert (here its VR bytes changed to one that does not
    exist) is a refusal (0xC000), decided before the stored instance is touched."""
    ds = make_ct(StudyDate="20240102", PatientID="FUZZ-1")
    original = write_part10(ds, tmp_path / "original.dcm")
    assert send(archive, transport, original) == (0, "")
    stored = archive.stored_path("default", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                 ds.SOPInstanceUID)
    before = sha256(stored)
    data = bytearray(original.read_bytes())
    group, element = divmod(tag_for_keyword(keyword), 0x10000)
    at = data.index(group.to_bytes(2, "little") + element.to_bytes(2, "little"), 132)
    data[at + 4:at + 6] = b"AA"  # no such VR
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(bytes(data))
    status, comment = send(archive, transport, broken)
    assert status == CANNOT_UNDERSTAND, comment
    assert sha256(stored) == before


@pytest.mark.parametrize("query", ["offset=9223372036854775808", "limit=%C2%B2",
                                   "limit=" + "9" * 4301, "offset=-1"])
def test_qido_paging_numbers_that_are_no_64_bit_integers_are_400(archive: Archive,
                                                                query: str) -> None:
    response = httpx.get(f"{archive.url}/studies?{query}", timeout=30)
    assert response.status_code == 400
    assert query.split("=")[0] in response.json()["message"]


@pytest.mark.parametrize("query", ["PatientBirthDate=20241301", "SeriesDate=20240230-20240301",
                                   "StudyDate=20240000", "StudyDate=-20231232",
                                   "PatientBirthDate=00000101", "StudyDate=2024010%D9%A2",
                                   "StudyDate=20240102%0A", "StudyTime=1015%0A"])
def test_qido_dates_of_the_right_form_but_no_calendar_day_are_400(archive: Archive,
                                                                 query: str) -> None:
    """PS3.5 6.2 DA: YYYYMMDD in ASCII digits is a date of the calendar; month 13,
    30 February, an Arabic-Indic digit or a trailing newline is a client's error naming
    the parameter, never a 500 from the date conversion."""
    response = httpx.get(f"{archive.url}/studies?{query}", timeout=30)
    assert response.status_code == 400, response.text
    assert query.split("=")[0] in response.json()["message"]


@pytest.mark.parametrize("quality", ["%C2%B2", "9" * 4301])
def test_rendered_quality_that_is_no_small_integer_is_400(archive: Archive,
                                                          quality: str) -> None:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    url = (f"{archive.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
           f"instances/{ds.SOPInstanceUID}/rendered?quality={quality}")
    assert httpx.get(url, timeout=30).status_code == 400
