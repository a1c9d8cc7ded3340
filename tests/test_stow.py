"""STOW-RS end to end (PS3.18 10.5): dicomweb-client and raw HTTP against a real archive.

Response rules checked (PS3.18 10.5.3): 200 all stored, 202 some failed, 409 none stored,
each failure in FailedSOPSequence (0008,1198) with FailureReason (0008,1197), each stored
instance in ReferencedSOPSequence (0008,1199) with its RetrieveURL (0008,1190); 415 for a
media type we do not take, 400 for a malformed body, 413 over ``web.max_upload_bytes``.
A refused request leaves nothing: no index entry, no file in the layout, none in staging.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid

from tests.support import (
    Archive,
    find_instances,
    layout_snapshot,
    make_ct,
    multipart,
    part10_bytes,
    rounds_by_sop,
    staging_files,
    valid_testdata,
    value,
    wait_until,
)

DICOM_JSON = "application/dicom+json"
CANNOT_UNDERSTAND = 0xC000
DATA_SET_MISMATCH = 0xA900
GARBAGE = b"this is not a DICOM file, just some text sent as application/dicom\n" * 40


def _post(archive: Archive, body: bytes | Iterator[bytes], content_type: str,
          study: str | None = None) -> httpx.Response:
    url = f"{archive.url}/studies" + (f"/{study}" if study else "")
    return httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=60)


def _items(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(body.get(tag, {}).get("Value", []))


def _assert_left_nothing(archive: Archive, before: set[str], sop_uids: list[str]) -> None:
    """No new path around the archive, staging empty, no index entry for ``sop_uids``."""
    assert layout_snapshot(archive) - before == set()
    wait_until(lambda: not staging_files(archive), timeout=5, message="staging empty")
    assert all(rows == [] for rows in find_instances(archive, sop_uids).values())


def _wait_found(archive: Archive, sop_uids: list[str]) -> None:
    wait_until(lambda: all(len(r) == 1 for r in find_instances(archive, sop_uids).values()),
               timeout=30, message="instances indexed")


def test_dicomweb_client_store_references_every_instance_with_retrieve_url_and_qido_finds_each(
        archive: Archive) -> None:
    files = [f for f in rounds_by_sop(valid_testdata())[0] if f.path.stat().st_size < 1_000_000]
    assert len(files) >= 40
    datasets = [pydicom.dcmread(f.path) for f in files]

    response = DICOMwebClient(url=archive.url).store_instances(datasets=datasets)

    assert "FailedSOPSequence" not in response
    referenced = {str(item.ReferencedSOPInstanceUID): item
                  for item in response.ReferencedSOPSequence}
    assert len(response.ReferencedSOPSequence) == len(files)
    for f in files:
        item = referenced[f.sop_uid]
        assert item.ReferencedSOPClassUID == f.sop_class
        assert item.RetrieveURL == (f"{archive.url}/studies/{f.study_uid}/series/"
                                    f"{f.series_uid}/instances/{f.sop_uid}")
    _wait_found(archive, [f.sop_uid for f in files])


def test_all_stored_answers_200_with_content_type_dicom_json(archive: Archive) -> None:
    ds = make_ct()
    body, content_type = multipart([part10_bytes(ds)])
    response = _post(archive, body, content_type)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM_JSON
    assert [value(i, "00081155") for i in _items(response.json(), "00081199")] == \
        [ds.SOPInstanceUID]


def test_one_good_one_garbage_part_answers_202_garbage_failed_c000_good_referenced(
        archive: Archive) -> None:
    good = make_ct()
    body, content_type = multipart([part10_bytes(good), GARBAGE])
    response = _post(archive, body, content_type)

    assert response.status_code == 202, response.text
    assert response.headers["content-type"] == DICOM_JSON
    failed = _items(response.json(), "00081198")
    assert [value(i, "00081197") for i in failed] == [CANNOT_UNDERSTAND]
    referenced = _items(response.json(), "00081199")
    assert [value(i, "00081155") for i in referenced] == [good.SOPInstanceUID]
    assert value(referenced[0], "00081150") == good.SOPClassUID
    _wait_found(archive, [good.SOPInstanceUID])


def test_all_parts_bad_answers_409_with_every_failure_and_stores_nothing(
        archive: Archive) -> None:
    cut = make_ct(size=64)
    whole = part10_bytes(cut)
    before = layout_snapshot(archive)
    body, content_type = multipart([GARBAGE, whole[:len(whole) // 2], GARBAGE[:10]])
    response = _post(archive, body, content_type)

    assert response.status_code == 409, response.text
    assert response.headers["content-type"] == DICOM_JSON
    failed = _items(response.json(), "00081198")
    assert [value(i, "00081197") for i in failed] == [CANNOT_UNDERSTAND] * 3
    assert "00081199" not in response.json()
    _assert_left_nothing(archive, before, [cut.SOPInstanceUID])


def test_post_to_a_study_fails_an_instance_of_another_study_with_a900_and_stores_the_match(
        archive: Archive) -> None:
    study = generate_uid()
    inside, outside = make_ct(study), make_ct()
    before = layout_snapshot(archive)
    body, content_type = multipart([part10_bytes(inside), part10_bytes(outside)])
    response = _post(archive, body, content_type, study=study)

    assert response.status_code == 202, response.text
    failed = _items(response.json(), "00081198")
    assert [(value(i, "00081155"), value(i, "00081197")) for i in failed] == \
        [(outside.SOPInstanceUID, DATA_SET_MISMATCH)]
    assert [value(i, "00081155") for i in _items(response.json(), "00081199")] == \
        [inside.SOPInstanceUID]
    assert value(response.json(), "00081190") == f"{archive.url}/studies/{study}"
    _wait_found(archive, [inside.SOPInstanceUID])
    assert not archive.stored_path("default", outside.StudyInstanceUID,
                                   outside.SeriesInstanceUID, outside.SOPInstanceUID).exists()
    new_paths = layout_snapshot(archive) - before
    assert new_paths and all(inside.StudyInstanceUID in p for p in new_paths)
    assert find_instances(archive, [outside.SOPInstanceUID])[outside.SOPInstanceUID] == []


@pytest.mark.parametrize("content_type", [
    "application/dicom",
    'multipart/related; type="application/dicom+json"; boundary=dicomcloud-test-boundary',
    'multipart/related; type="application/dicom+xml"; boundary=dicomcloud-test-boundary',
    "multipart/form-data; boundary=dicomcloud-test-boundary",
])
def test_unsupported_content_type_answers_415_and_stores_nothing(
        archive: Archive, content_type: str) -> None:
    ds = make_ct()
    body, _ = multipart([part10_bytes(ds)])
    before = layout_snapshot(archive)
    response = _post(archive, body, content_type)
    assert response.status_code == 415, response.text
    _assert_left_nothing(archive, before, [ds.SOPInstanceUID])


def test_body_without_closing_boundary_answers_400_and_stores_nothing(
        archive: Archive) -> None:
    complete, cut = make_ct(), make_ct()
    body, content_type = multipart([part10_bytes(complete), part10_bytes(cut)], close=False)
    before = layout_snapshot(archive)
    response = _post(archive, body, content_type)
    assert response.status_code == 400, response.text
    _assert_left_nothing(archive, before, [complete.SOPInstanceUID, cut.SOPInstanceUID])


def test_upload_cap_answers_413_with_content_length_or_chunked_stores_nothing_takes_less(
        archive_factory: Any) -> None:
    capped = archive_factory("capped", env={"DICOMCLOUD_WEB__MAX_UPLOAD_BYTES": "200000"})
    large = [make_ct(size=160) for _ in range(3)]  # about 51 kB of pixels each
    body, content_type = multipart([part10_bytes(ds) for ds in large] * 2)
    assert len(body) > 200_000
    sops = [ds.SOPInstanceUID for ds in large]
    before = layout_snapshot(capped)

    declared = _post(capped, body, content_type)
    assert declared.status_code == 413, declared.text
    _assert_left_nothing(capped, before, sops)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 16384):
            yield body[start:start + 16384]

    chunked = _post(capped, chunks(), content_type)
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413, chunked.text
    _assert_left_nothing(capped, before, sops)

    small, small_type = multipart([part10_bytes(large[0])])
    assert len(small) < 200_000
    accepted = _post(capped, small, small_type)
    assert accepted.status_code == 200, accepted.text
    _wait_found(capped, [large[0].SOPInstanceUID])
