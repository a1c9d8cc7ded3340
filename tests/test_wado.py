"""WADO-RS end to end (PS3.18 10.4): dicomweb-client and raw HTTP against a real archive.

One archive serves the module (worker ``quiet_seconds`` 1 so pre-generated metadata
appears quickly). It holds real files of pydicom's test data, sent by pynetdicom in their
own transfer syntax so that the stored data set is the file's, byte for byte. Files that
share a SOP Instance UID with another one we need (``emri_small*``) are sent as copies
with fresh UIDs (``_relabel``): same encoding, same pixel data.

Checked against pydicom, the reference: retrieved data sets (as stored: the original
bytes; default Accept: Explicit VR Little Endian with the original's decoded pixels),
frames (``pixel_array`` per frame; ``generate_frames`` for the stored fragments), metadata
(the archive's own generator run on the original file, and the data set rebuilt from
metadata plus bulk data), bulk data values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import email.utils
import gzip
import http.client
import io
import os
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import brotli
import httpx
import numpy as np
import orjson
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicomcloud.dicomjson import instance_json
from tests.support import (
    Archive,
    SampleFile,
    c_store,
    find_instances,
    sample_file,
    valid_testdata,
    wait_until,
)

TENANT = "default"
DICOM_JSON = "application/dicom+json"
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DEFAULT_DICOM = 'multipart/related; type="application/dicom"'
#: dicomweb-client media types: the stored syntax; no transfer-syntax parameter (default).
ANY_SYNTAX = (("application/dicom", "*"),)
NO_SYNTAX = ("application/dicom",)
NATIVE_FRAMES = (("application/octet-stream", ExplicitVRLittleEndian),)
MARKER = {"vr": "PN", "Value": [{"Alphabetic": "PREGENERATED^MARKER"}]}

#: Original files, stored unchanged (distinct SOP Instance UIDs).
ORIGINALS = (
    "CT_small.dcm",  # Explicit VR LE, private OB of 2 KiB (bulk data)
    "MR_small_implicit.dcm",  # Implicit VR LE
    "ExplVR_BigEnd.dcm",  # Explicit VR Big Endian, RGB
    "image_dfl.dcm",  # Deflated Explicit VR LE
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 lossless, YBR_RCT
    "693_J2KR.dcm",  # JPEG 2000 lossless, 16 bit
    "J2K_pixelrep_mismatch.dcm",  # JPEG 2000 lossless, signedness in the codestream differs
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless SV1
    "emri_small.dcm",  # native, 10 frames
    "gdcm-US-ALOKA-16.dcm",  # Implicit VR LE, header over 64 KiB (segmented palettes)
    "examples_overlay.dcm",  # overlay data (bulk), icon image sequence with pixel data
    "waveform_ecg.dcm",  # two WaveformData in a sequence
    "test-SR.dcm",  # no pixel data
    # one series of one study, mixed transfer syntaxes
    "SC_rgb_rle_2frame.dcm",  # RLE lossless, 2 frames
    "SC_rgb_small_odd.dcm",  # Explicit VR LE, 3x3
    "SC_rgb_small_odd_jpeg.dcm",  # JPEG baseline (lossy)
    "SC_rgb_gdcm_KY.dcm",  # JPEG 2000 (lossy)
    "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG baseline (lossy), RGB
    "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422
    # a study of two series, native
    "6293", "6924", "2062", "2392", "2693", "3023", "3353",
)
#: Copies with fresh UIDs: label -> original file.
RELABELED = {
    "emri_rle": "emri_small_RLE.dcm",
    "emri_j2k": "emri_small_jpeg_2k_lossless.dcm",
    "emri_jls": "emri_small_jpeg_ls_lossless.dcm",
    "emri_be": "emri_small_big_endian.dcm",
    "ybr422_jpeg": "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline, YBR_FULL_422
}
#: Uncompressed or lossless originals: the default Accept must give the same pixels.
LOSSLESS = ("CT_small.dcm", "MR_small_implicit.dcm", "image_dfl.dcm", "GDCMJ2K_TextGBR.dcm",
            "693_J2KR.dcm", "J2K_pixelrep_mismatch.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
            "emri_small.dcm", "SC_rgb_rle_2frame.dcm", "emri_rle", "emri_j2k", "emri_jls")
SC_SERIES = ("SC_rgb_rle_2frame.dcm", "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_jpeg.dcm",
             "SC_rgb_gdcm_KY.dcm", "SC_rgb_dcmtk_+eb+cr.dcm",
             "SC_ybr_full_422_uncompressed.dcm")
STUDY_16302 = ("6293", "6924", "2062", "2392", "2693", "3023", "3353")
#: Files for the pre-generated metadata test: a fresh study of one series.
WORKER_FILES = ("4467", "4528", "4558", "4588")


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    instance = Archive(tmp_path_factory.mktemp("wado") / "data",
                       env={"DICOMCLOUD_WORKER__QUIET_SECONDS": "1"}).start()
    yield instance
    if instance.alive():
        instance.stop()


@pytest.fixture(scope="module")
def testdata() -> dict[str, SampleFile]:
    return {s.name: s for s in valid_testdata()}


@pytest.fixture(scope="module")
def files(archive: Archive, testdata: dict[str, SampleFile],
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, SampleFile]:
    """Everything of ORIGINALS and RELABELED, stored by C-STORE and indexed."""
    copies = tmp_path_factory.mktemp("copies")
    out = {name: testdata[name] for name in ORIGINALS}
    for label, name in RELABELED.items():
        out[label] = _relabel(testdata[name], copies)
    assert len({f.sop_uid for f in out.values()}) == len(out)
    statuses = c_store(archive, [f.path for f in out.values()])
    assert [s.Status for s in statuses] == [0] * len(out)
    _wait_indexed(archive, list(out.values()))
    return out


class _HostWithPort(requests.Session):
    """dicomweb-client (0.61) sets ``Host`` to the host name alone on every non-streamed
    GET, dropping the port; the archive rightly builds BulkDataURIs from ``Host``, which
    would then point at port 80. This session leaves ``Host`` to requests (host:port)."""

    def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        headers = {k: v for k, v in (kwargs.pop("headers", None) or {}).items()
                   if k.lower() != "host"}
        return super().request(method, url, *args, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def client(archive: Archive) -> DICOMwebClient:
    return DICOMwebClient(url=archive.url, session=_HostWithPort())


# -- helpers -----------------------------------------------------------------------------
def _relabel(sample: SampleFile, directory: Path, study: str | None = None,
             series: str | None = None) -> SampleFile:
    """A copy of ``sample`` with new UIDs, in the same transfer syntax."""
    ds = pydicom.dcmread(sample.path)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = directory / f"{sample.path.name}-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return dataclasses.replace(sample, path=path, study_uid=ds.StudyInstanceUID,
                               series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID)


def _sample(ds: Dataset, path: Path) -> SampleFile:
    """The ``SampleFile`` of a data set this module wrote to ``path``."""
    return SampleFile(
        path=path, sop_class=str(ds.SOPClassUID), sop_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        frames=int(ds.get("NumberOfFrames") or 1), rows=ds.get("Rows"),
        columns=ds.get("Columns"), bits_allocated=ds.get("BitsAllocated"),
        photometric=ds.get("PhotometricInterpretation"))


def _wait_indexed(archive: Archive, items: list[SampleFile]) -> None:
    wait_until(lambda: all(len(rows) == 1 for rows in
                           find_instances(archive, [i.sop_uid for i in items]).values()),
               timeout=30, message="instances indexed")


def resolve_bulk(document: Any, base: str) -> Any:
    """The relative BulkDataURIs of a stored metadata document made absolute (in place):
    what the archive answers for a request whose DICOMweb root is ``base``."""
    if isinstance(document, list):
        for item in document:
            resolve_bulk(item, base)
    elif isinstance(document, dict):
        for value in document.values():
            if isinstance(value, dict):
                uri = value.get("BulkDataURI")
                if isinstance(uri, str) and not uri.startswith(("http://", "https://")):
                    value["BulkDataURI"] = f"{base}/{uri}"
                for item in value.get("Value", ()) if value.get("vr") == "SQ" else ():
                    resolve_bulk(item, base)
    return document


def _url(archive: Archive, f: SampleFile, level: str = "instance") -> str:
    url = f"{archive.url}/studies/{f.study_uid}"
    if level in ("series", "instance"):
        url += f"/series/{f.series_uid}"
    if level == "instance":
        url += f"/instances/{f.sop_uid}"
    return url


def _get(url: str, accept: str | None = None, **headers: str) -> httpx.Response:
    if accept is not None:
        headers["Accept"] = accept
    return httpx.get(url, headers=headers, timeout=60)


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """Content-Type and body of each part of a multipart/related response (RFC 2046)."""
    media, *params = [p.strip() for p in response.headers["content-type"].split(";")]
    assert media == "multipart/related"
    boundary = next(p.partition("=")[2].strip('"') for p in params
                    if p.lower().startswith("boundary="))
    pieces = (b"\r\n" + response.content).split(b"\r\n--" + boundary.encode())
    assert pieces[0] == b"" and pieces[-1].startswith(b"--"), "bad multipart framing"
    out = []
    for piece in pieces[1:-1]:
        head, _, body = piece.partition(b"\r\n\r\n")
        fields = dict(line.split(":", 1) for line in head.decode().split("\r\n")[1:])
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        out.append((fields["content-type"], body))
    return out


def _data_set(part10: bytes) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information."""
    fp = io.BytesIO(part10)
    read_preamble(fp, False)
    read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                 stop_when=lambda tag, vr, length: tag.group != 2)
    return part10[fp.tell():]


def _frame_bytes(ds: Dataset, number: int) -> bytes:
    """Frame ``number`` (1-based) of pydicom's ``pixel_array``, little endian."""
    array = ds.pixel_array
    frame = array[number - 1] if int(ds.get("NumberOfFrames") or 1) > 1 else array
    return frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes()


def _live(archive: Archive, f: SampleFile) -> dict[str, Any]:
    """The archive's own metadata generator run on the original file, URIs absolute."""
    with open(f.path, "rb") as fh:
        return dict(resolve_bulk(instance_json(fh), archive.url))


def _bulk_uris(document: Any) -> list[str]:
    found: list[str] = []
    if isinstance(document, list):
        for item in document:
            found += _bulk_uris(item)
    elif isinstance(document, dict):
        for element in document.values():
            if isinstance(element, dict):
                if "BulkDataURI" in element:
                    found.append(element["BulkDataURI"])
                if element.get("vr") == "SQ":
                    found += _bulk_uris(element.get("Value", []))
    return found


def _fetcher(client: DICOMwebClient, fetched: list[str]) -> Callable[[str], bytes]:
    """A BulkDataURI handler for ``Dataset.from_json``: retrieve_bulkdata, noting the URI."""
    def fetch(uri: str) -> bytes:
        fetched.append(uri)
        [value] = client.retrieve_bulkdata(uri)
        return bytes(value)

    return fetch


def _sop(document: dict[str, Any]) -> str:
    return str(document["00080018"]["Value"][0])


def _without_pixels(ds: Dataset) -> dict[Any, Any]:
    """Top-level elements but those a decompression legitimately rewrites."""
    changed = {"PixelData", "PhotometricInterpretation", "PlanarConfiguration"}
    return {e.tag: e.value for e in ds if e.keyword not in changed}


# -- retrieve ------------------------------------------------------------------------------
def test_retrieve_instance_as_stored_returns_the_original_data_set_byte_for_byte(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    for name, f in files.items():
        response = _get(_url(archive, f), AS_STORED)
        assert response.status_code == 200, (name, response.text)
        parts = _parts(response)
        assert len(parts) == 1, name
        content_type, body = parts[0]
        assert content_type == f"application/dicom; transfer-syntax={f.transfer_syntax}", name
        assert _data_set(body) == _data_set(f.path.read_bytes()), name
        assert pydicom.dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID == \
            f.transfer_syntax

        ds = client.retrieve_instance(f.study_uid, f.series_uid, f.sop_uid,
                                      media_types=ANY_SYNTAX)
        assert ds.file_meta.TransferSyntaxUID == f.transfer_syntax, name
        assert ds == pydicom.dcmread(f.path), name


@pytest.mark.parametrize("name", LOSSLESS)
def test_retrieve_instance_with_default_accept_is_explicit_vr_little_endian_with_original_pixels(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient,
        name: str) -> None:
    """No transfer-syntax parameter: Explicit VR Little Endian (PS3.18 Table 8.7.3-2),
    decoded from a compressed original; the pixels are unchanged."""
    f = files[name]
    ds = client.retrieve_instance(f.study_uid, f.series_uid, f.sop_uid, media_types=NO_SYNTAX)
    original = pydicom.dcmread(f.path)

    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not ds["PixelData"].is_undefined_length
    assert np.array_equal(ds.pixel_array, original.pixel_array)

    response = _get(_url(archive, f), DEFAULT_DICOM)
    [(content_type, body)] = _parts(response)
    assert content_type == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    assert pydicom.dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID == \
        ExplicitVRLittleEndian


def test_retrieve_series_as_stored_returns_every_instance_once_unchanged(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    members = {files[n].sop_uid: files[n] for n in SC_SERIES}
    first = files[SC_SERIES[0]]
    assert len({f.series_uid for f in members.values()}) == 1
    assert len({f.transfer_syntax for f in members.values()}) == 4

    stored = client.retrieve_series(first.study_uid, first.series_uid, media_types=ANY_SYNTAX)
    assert sorted(str(ds.SOPInstanceUID) for ds in stored) == sorted(members)
    for ds in stored:
        original = pydicom.dcmread(members[ds.SOPInstanceUID].path)
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert ds == original


def test_retrieve_series_with_default_accept_returns_each_instance_once_as_explicit_little_endian(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    """Mixed syntaxes (native, RLE, JPEG, JPEG 2000): each comes back once, decoded. The
    instances are told apart by their pixels (each decodes as pydicom decodes the stored
    file, lossy ones included)."""
    members = [files[n] for n in SC_SERIES]
    first = members[0]
    arrays = [pydicom.dcmread(f.path).pixel_array for f in members]

    transcoded = client.retrieve_series(first.study_uid, first.series_uid,
                                        media_types=NO_SYNTAX)
    assert len(transcoded) == len(members)
    matches = []
    for ds in transcoded:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        pixels = ds.pixel_array
        matches.append([i for i, a in enumerate(arrays)
                        if a.shape == pixels.shape and np.array_equal(a, pixels)])
    assert sorted(m[0] for m in matches if len(m) == 1) == list(range(len(members))), matches


def test_transcoded_instances_keep_their_sop_instance_uid_and_other_attributes(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    f = files["emri_rle"]
    ds = client.retrieve_instance(f.study_uid, f.series_uid, f.sop_uid, media_types=NO_SYNTAX)
    assert ds.SOPInstanceUID == f.sop_uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == f.sop_uid
    assert _without_pixels(ds) == _without_pixels(pydicom.dcmread(f.path))

    members = {files[n].sop_uid: files[n] for n in SC_SERIES}
    transcoded = client.retrieve_series(f"{files[SC_SERIES[0]].study_uid}",
                                        files[SC_SERIES[0]].series_uid, media_types=NO_SYNTAX)
    assert sorted(str(ds.SOPInstanceUID) for ds in transcoded) == sorted(members)


def test_retrieve_series_and_study_of_native_files_return_each_instance_once_byte_for_byte(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    study = {files[n].sop_uid: files[n] for n in STUDY_16302}
    first = files[STUDY_16302[0]]
    assert len({f.study_uid for f in study.values()}) == 1
    assert len({f.series_uid for f in study.values()}) == 2

    for media_types in (ANY_SYNTAX, NO_SYNTAX):  # stored as Explicit VR LE: the same
        retrieved = client.retrieve_study(first.study_uid, media_types=media_types)
        assert sorted(str(ds.SOPInstanceUID) for ds in retrieved) == sorted(study)
        for ds in retrieved:
            assert ds == pydicom.dcmread(study[ds.SOPInstanceUID].path)

    for series_uid in {f.series_uid for f in study.values()}:
        members = {s: f for s, f in study.items() if f.series_uid == series_uid}
        some = next(iter(members.values()))
        response = _get(_url(archive, some, "series"), AS_STORED)
        parts = _parts(response)
        assert len(parts) == len(members)
        by_sop = {str(pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID): body
                  for _, body in parts}
        assert by_sop.keys() == members.keys()
        for sop, body in by_sop.items():
            assert _data_set(body) == _data_set(members[sop].path.read_bytes())


def test_study_retrieve_parts_are_the_stored_data_sets_labelled_with_their_transfer_syntax(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    first = files[SC_SERIES[0]]
    members = {files[n].sop_uid: files[n] for n in SC_SERIES}

    response = _get(_url(archive, first, "study"), AS_STORED)
    assert response.status_code == 200
    media = [p.strip() for p in response.headers["content-type"].split(";")]
    assert media[0] == "multipart/related" and 'type="application/dicom"' in media
    parts = _parts(response)
    assert len(parts) == len(members)
    for content_type, body in parts:
        sop = str(pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID)
        assert content_type == \
            f"application/dicom; transfer-syntax={members[sop].transfer_syntax}"
        assert _data_set(body) == _data_set(members[sop].path.read_bytes())

    response = _get(_url(archive, first, "study"), DEFAULT_DICOM)
    assert f"transfer-syntax={ExplicitVRLittleEndian}" in response.headers["content-type"]
    assert [c for c, _ in _parts(response)] == \
        [f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"] * len(members)


def test_single_part_application_dicom_instance_retrieve_is_the_stored_file(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["SC_rgb_rle_2frame.dcm"]
    response = _get(_url(archive, f), "application/dicom; transfer-syntax=*")
    assert response.status_code == 200
    assert response.headers["content-type"] == \
        f"application/dicom; transfer-syntax={f.transfer_syntax}"
    assert _data_set(response.content) == _data_set(f.path.read_bytes())


def test_retrieve_big_endian_instance_with_default_accept_is_explicit_vr_little_endian(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    for name in ("ExplVR_BigEnd.dcm", "emri_be"):
        f = files[name]
        response = _get(_url(archive, f), "application/dicom")
        assert response.status_code == 200, response.text
        ds = client.retrieve_instance(f.study_uid, f.series_uid, f.sop_uid,
                                      media_types=NO_SYNTAX)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(f.path).pixel_array)


def test_retrieve_ybr_full_422_jpeg_with_default_accept_gives_a_consistent_data_set(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    f = files["ybr422_jpeg"]
    ds = client.retrieve_instance(f.study_uid, f.series_uid, f.sop_uid, media_types=NO_SYNTAX)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.pixel_array.shape == pydicom.dcmread(f.path).pixel_array.shape


def test_retrieve_requesting_implicit_vr_little_endian_transcodes_to_it(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    for name in ("CT_small.dcm", "emri_rle"):
        f = files[name]
        response = _get(_url(archive, f), 'multipart/related; type="application/dicom"; '
                        "transfer-syntax=1.2.840.10008.1.2")
        assert response.status_code == 200
        [(content_type, body)] = _parts(response)
        assert content_type == "application/dicom; transfer-syntax=1.2.840.10008.1.2"
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        assert ds.original_encoding == (True, True)  # implicit VR, little endian
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(f.path).pixel_array)


def test_retrieve_requesting_the_stored_compressed_syntax_returns_the_stored_instance(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    f = files["emri_j2k"]
    ds = client.retrieve_instance(f.study_uid, f.series_uid, f.sop_uid,
                                  media_types=(("application/dicom", f.transfer_syntax),))
    assert ds.file_meta.TransferSyntaxUID == f.transfer_syntax
    assert ds == pydicom.dcmread(f.path)


# -- metadata ------------------------------------------------------------------------------
def test_instance_metadata_equals_live_generation_with_absolute_resolvable_bulk_data_uris(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "emri_small.dcm", "emri_rle",
                 "examples_overlay.dcm", "test-SR.dcm", "gdcm-US-ALOKA-16.dcm"):
        f = files[name]
        document = client.retrieve_instance_metadata(f.study_uid, f.series_uid, f.sop_uid)
        assert document == _live(archive, f), name
        uris = _bulk_uris(document)
        assert all(u.startswith(f"{archive.url}/studies/") for u in uris), (name, uris)


def test_metadata_plus_bulk_data_rebuild_the_original_data_set(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    """Every BulkDataURI resolves (retrieve_bulkdata) to the exact value of its element:
    Pixel Data of native files, the 2 KiB private OB of CT_small, the overlay data."""
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "emri_small.dcm",
                 "gdcm-US-ALOKA-16.dcm"):
        f = files[name]
        document = client.retrieve_instance_metadata(f.study_uid, f.series_uid, f.sop_uid)
        fetched: list[str] = []
        fetch = _fetcher(client, fetched)
        with warnings.catch_warnings():  # gdcm-US-ALOKA-16: ImageType 'ABDOM/RAD' (CS)
            warnings.filterwarnings("ignore", "Invalid value for VR", UserWarning)
            rebuilt = Dataset.from_json(document, bulk_data_uri_handler=fetch)
        original = pydicom.dcmread(f.path)
        assert fetched == _bulk_uris(document), name
        assert "PixelData" in rebuilt and fetched, name
        for element in original:
            if element.tag != 0xFFFCFFFC:  # Data Set Trailing Padding: no meaning (PS3.5 7.2)
                assert rebuilt[element.tag].value == element.value, (name, element.tag)

    overlay = files["examples_overlay.dcm"]
    original = pydicom.dcmread(overlay.path)
    document = client.retrieve_instance_metadata(
        overlay.study_uid, overlay.series_uid, overlay.sop_uid)
    for tag in ("60003000", "00291110", "7FE00010"):
        [value] = client.retrieve_bulkdata(document[tag]["BulkDataURI"])
        assert value == original[int(tag, 16)].value, tag


def test_nested_bulk_data_uris_are_distinct_and_resolve_to_their_own_values(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    for name in ("waveform_ecg.dcm", "examples_overlay.dcm"):
        f = files[name]
        original = pydicom.dcmread(f.path)
        document = client.retrieve_instance_metadata(f.study_uid, f.series_uid, f.sop_uid)
        uris = _bulk_uris(document)
        assert len(set(uris)) == len(uris), (name, uris)
        rebuilt = Dataset.from_json(
            document, bulk_data_uri_handler=lambda uri: bytes(client.retrieve_bulkdata(uri)[0]))
        for seq in (e for e in original if e.VR == "SQ"):
            assert rebuilt[seq.tag].value == seq.value, (name, seq.keyword)


def test_series_and_study_metadata_equal_live_generation(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    study = [files[n] for n in STUDY_16302]
    first = study[0]
    documents = client.retrieve_study_metadata(first.study_uid)
    assert sorted(map(_sop, documents)) == sorted(f.sop_uid for f in study)
    assert {_sop(d): d for d in documents} == {f.sop_uid: _live(archive, f) for f in study}
    for series_uid in {f.series_uid for f in study}:
        members = [f for f in study if f.series_uid == series_uid]
        documents = client.retrieve_series_metadata(first.study_uid, series_uid)
        assert sorted(map(_sop, documents)) == sorted(f.sop_uid for f in members)
        assert {_sop(d): d for d in documents} == {f.sop_uid: _live(archive, f)
                                                   for f in members}


def test_pregenerated_metadata_is_served_when_current_and_bypassed_once_the_series_changes(
        archive: Archive, testdata: dict[str, SampleFile], client: DICOMwebClient,
        tmp_path: Path) -> None:
    """The worker's documents (relative BulkDataURIs) are what the web role serves once
    current (shown by a marker written into them); a new instance in the series makes them
    stale: the next response includes it at once; then the worker writes them again."""
    study_uid, series_uid = generate_uid(), generate_uid()
    first, *others, late = [_relabel(testdata[n], tmp_path, study_uid, series_uid)
                            for n in WORKER_FILES]
    initial = [first, *others]
    assert [s.Status for s in c_store(archive, [f.path for f in initial])] == [0] * 3
    _wait_indexed(archive, initial)

    root = archive.data_dir / "storage" / "metadata" / TENANT / study_uid
    series_doc, study_doc = root / f"{series_uid}.json", root.parent / f"{study_uid}.json"
    wait_until(lambda: series_doc.exists() and study_doc.exists(), timeout=30,
               message="pre-generated series and study metadata")
    expected = {f.sop_uid: _live(archive, f) for f in initial}
    for path in (series_doc, study_doc):
        stored = orjson.loads(path.read_bytes())
        uris = _bulk_uris(stored)
        assert uris and not any(u.startswith("http") for u in uris)
        assert {_sop(d): d for d in resolve_bulk(stored, archive.url)} == expected
        for document in stored:
            document["00100010"] = MARKER
        temporary = path.parent / f"{path.name}.tmp"
        temporary.write_bytes(orjson.dumps(stored))
        os.replace(temporary, path)

    def marked(documents: list[dict[str, Any]]) -> bool:
        return len(documents) == 3 and all(d.get("00100010") == MARKER for d in documents)

    wait_until(lambda: marked(client.retrieve_series_metadata(study_uid, series_uid)),
               timeout=30, message="series metadata served from the pre-generated document")
    wait_until(lambda: marked(client.retrieve_study_metadata(study_uid)),
               timeout=30, message="study metadata served from the pre-generated document")
    served = client.retrieve_series_metadata(study_uid, series_uid)
    assert served == resolve_bulk(orjson.loads(series_doc.read_bytes()), archive.url)

    assert [s.Status for s in c_store(archive, [late.path])] == [0]
    _wait_indexed(archive, [late])
    expected[late.sop_uid] = _live(archive, late)
    for documents in (client.retrieve_series_metadata(study_uid, series_uid),
                      client.retrieve_study_metadata(study_uid)):
        assert {_sop(d): d for d in documents} == expected
        assert len(documents) == 4

    def regenerated() -> bool:
        return len(orjson.loads(series_doc.read_bytes())) == 4 and \
            len(orjson.loads(study_doc.read_bytes())) == 4

    wait_until(regenerated, timeout=30, message="metadata regenerated by the worker")
    for path in (series_doc, study_doc):
        stored = resolve_bulk(orjson.loads(path.read_bytes()), archive.url)
        assert {_sop(d): d for d in stored} == expected


def test_metadata_etag_with_if_none_match_gives_304(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["2062"]
    for url in (_url(archive, f) + "/metadata", _url(archive, f, "series") + "/metadata",
                _url(archive, f, "study") + "/metadata"):
        first = _get(url, DICOM_JSON)
        assert first.status_code == 200
        tag = first.headers["etag"]
        # httpx accepts gzip: the gzipped representation carries the weak form (RFC 9110)
        assert tag.removeprefix("W/").startswith('"') and tag.endswith('"')
        again = _get(url, DICOM_JSON, **{"If-None-Match": tag})
        assert again.status_code == 304
        assert again.content == b""
        assert again.headers["etag"] == tag
        other = _get(url, DICOM_JSON, **{"If-None-Match": '"something-else"'})
        assert other.status_code == 200
        assert other.content == first.content


def test_metadata_gzip_when_accepted_decompresses_to_the_plain_body(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    url = _url(archive, files["2062"], "study") + "/metadata"
    plain = _get(url, DICOM_JSON, **{"Accept-Encoding": "identity"})
    assert plain.status_code == 200
    assert "content-encoding" not in plain.headers
    assert len(plain.content) > 1024
    with httpx.stream("GET", url, headers={"Accept": DICOM_JSON,
                                           "Accept-Encoding": "gzip"}) as response:
        raw = b"".join(response.iter_raw())
        assert response.status_code == 200
        assert response.headers["content-encoding"] == "gzip"
        assert "accept-encoding" in response.headers["vary"].lower()
    assert raw != plain.content
    assert gzip.decompress(raw) == plain.content
    assert orjson.loads(plain.content)


@pytest.mark.parametrize(("accept_encoding", "coding"), [
    ("gzip, br", "br"), ("br;q=0.5, gzip", "gzip"), ("*", "br"), ("gzip;q=0, br;q=0", None),
    ("identity", None), ("*;q=0, gzip", "gzip"), ("br;q=abc, gzip;q=0.1", "gzip"),
    ("deflate", None)])
def test_metadata_content_coding_follows_accept_encoding_weights(
        archive: Archive, files: dict[str, SampleFile], accept_encoding: str,
        coding: str | None) -> None:
    """RFC 9110 12.5.3: highest q-value wins (Brotli on a tie), q=0 refuses, ``*`` is any
    other coding; every coding decodes to the identity body."""
    url = _url(archive, files["2062"], "study") + "/metadata"
    plain = _get(url, DICOM_JSON, **{"Accept-Encoding": "identity"}).content
    with httpx.stream("GET", url, headers={"Accept": DICOM_JSON,
                                           "Accept-Encoding": accept_encoding}) as response:
        raw = b"".join(response.iter_raw())
        assert response.status_code == 200
        assert response.headers.get("content-encoding") == coding
    decoded = {None: lambda b: b, "gzip": gzip.decompress, "br": brotli.decompress}[coding]
    assert decoded(raw) == plain


def test_metadata_accepting_only_dicom_xml_is_406(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["2062"]
    for url in (_url(archive, f) + "/metadata", _url(archive, f, "study") + "/metadata"):
        assert _get(url, "application/dicom+xml").status_code == 406
        assert _get(url, DICOM_JSON).status_code == 200
        assert _get(url, "application/dicom+xml, application/dicom+json;q=0.5"
                    ).status_code == 200


# -- frames --------------------------------------------------------------------------------
FRAME_CASES = [("emri_small.dcm", [1]), ("emri_small.dcm", [1, 3, 5]),
               ("emri_small.dcm", list(range(1, 11))), ("emri_small.dcm", [7, 2]),
               ("CT_small.dcm", [1]), ("MR_small_implicit.dcm", [1]),
               ("gdcm-US-ALOKA-16.dcm", [1]), ("examples_overlay.dcm", [1]),
               ("emri_be", [1, 3, 5]), ("emri_rle", [1]), ("emri_rle", [1, 3, 5]),
               ("emri_rle", list(range(1, 11))), ("emri_j2k", [1, 3, 5]),
               ("emri_jls", list(range(1, 11))), ("SC_rgb_rle_2frame.dcm", [1, 2]),
               ("GDCMJ2K_TextGBR.dcm", [1]), ("JPGLosslessP14SV1_1s_1f_8b.dcm", [1])]


@pytest.mark.parametrize(("name", "numbers"), FRAME_CASES)
def test_frames_as_octet_stream_are_the_uncompressed_little_endian_frames(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient, name: str,
        numbers: list[int]) -> None:
    f = files[name]
    original = pydicom.dcmread(f.path)
    frames = client.retrieve_instance_frames(f.study_uid, f.series_uid, f.sop_uid, numbers,
                                             media_types=NATIVE_FRAMES)
    assert [bytes(b) for b in frames] == [_frame_bytes(original, n) for n in numbers]

    response = _get(f"{_url(archive, f)}/frames/{','.join(map(str, numbers))}",
                    'multipart/related; type="application/octet-stream"')
    assert response.status_code == 200
    assert [c for c, _ in _parts(response)] == [
        f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"] * len(numbers)


@pytest.mark.parametrize(("name", "numbers"), FRAME_CASES)
def test_frames_with_any_transfer_syntax_are_the_stored_bytes(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient, name: str,
        numbers: list[int]) -> None:
    """``type="*/*"`` (dicomweb-client's default) and ``transfer-syntax=*``: native frames
    cut from the stored Pixel Data, encapsulated ones are their fragments."""
    f = files[name]
    original = pydicom.dcmread(f.path)
    count = int(original.get("NumberOfFrames") or 1)
    syntax = UID(f.transfer_syntax)
    if syntax.is_encapsulated:
        stored = list(generate_frames(original.PixelData, number_of_frames=count))
    else:
        size = len(original.PixelData) // count
        stored = [original.PixelData[i * size:(i + 1) * size] for i in range(count)]
    expected = [stored[n - 1] for n in numbers]

    frames = client.retrieve_instance_frames(f.study_uid, f.series_uid, f.sop_uid, numbers)
    assert [bytes(b) for b in frames] == expected

    response = _get(f"{_url(archive, f)}/frames/{','.join(map(str, numbers))}",
                    'multipart/related; type="application/octet-stream"; transfer-syntax=*')
    assert response.status_code == 200
    parts = _parts(response)
    assert [body for _, body in parts] == expected
    for content_type, _ in parts:
        assert content_type.endswith(f"; transfer-syntax={syntax}")
        assert content_type.startswith("image/" if syntax.is_encapsulated
                                       else "application/octet-stream;")


def _frame_offsets(archive: Archive, sop_uids: list[str]) -> dict[str, tuple[Any, Any]]:
    with contextlib.closing(sqlite3.connect(archive.data_dir / "index.db")) as db:
        marks = ",".join("?" * len(sop_uids))
        return {sop: (offset, size) for sop, offset, size in db.execute(
            f"SELECT sop_uid, pixel_offset, frame_size FROM dicom_instance "
            f"WHERE sop_uid IN ({marks})", sop_uids)}


def test_consumer_records_frame_offsets_only_for_native_little_endian_pixel_data(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    native = ("CT_small.dcm", "MR_small_implicit.dcm", "emri_small.dcm")
    other = ("emri_be", "emri_rle", "emri_j2k", "image_dfl.dcm", "waveform_ecg.dcm")
    offsets = _frame_offsets(archive, [files[n].sop_uid for n in native + other])
    for name in native:
        original = pydicom.dcmread(files[name].path)
        offset, size = offsets[files[name].sop_uid]
        frames = int(original.get("NumberOfFrames") or 1)
        assert size == len(original.PixelData) // frames, name
        f = files[name]
        stored = archive.stored_path("default", f.study_uid, f.series_uid, f.sop_uid
                                     ).read_bytes()
        assert stored[offset:offset + size * frames] == original.PixelData, name
    for name in other:
        assert offsets[files[name].sop_uid] == (None, None), name


def test_frames_of_instances_indexed_without_offsets_are_read_through_the_header(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    """Rows indexed before frame offsets were recorded (migration 0002) are served the
    slower way, with the same bytes and content types."""
    names = ("emri_small.dcm", "CT_small.dcm")
    accept = 'multipart/related; type="application/octet-stream"'
    urls = [f"{_url(archive, files[n])}/frames/1,3" if n == "emri_small.dcm"
            else f"{_url(archive, files[n])}/frames/1" for n in names]
    fast = [_parts(_get(url, accept)) for url in urls]
    sops = [files[n].sop_uid for n in names]
    saved = _frame_offsets(archive, sops)
    with contextlib.closing(sqlite3.connect(archive.data_dir / "index.db")) as db:
        db.executemany("UPDATE dicom_instance SET pixel_offset = NULL, frame_size = NULL "
                       "WHERE sop_uid = ?", [(sop,) for sop in sops])
        db.commit()
        try:
            assert _frame_offsets(archive, sops) == {sop: (None, None) for sop in sops}
            assert [_parts(_get(url, accept)) for url in urls] == fast
        finally:
            db.executemany("UPDATE dicom_instance SET pixel_offset = ?, frame_size = ? "
                           "WHERE sop_uid = ?", [(*saved[sop], sop) for sop in sops])
            db.commit()


def _one_bit_multiframe(rows: int, columns: int, frames: int) -> Dataset:
    """A 1-bit multi-frame Secondary Capture whose frames (``rows * columns`` bits) do
    not start on byte boundaries unless that product is a multiple of 8."""
    from pydicom.dataset import FileMetaDataset

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 2, size=(frames, rows, columns), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BITS", "Bits^One", "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = ds.PixelRepresentation = 0
    packed = np.packbits(pixels.ravel(), bitorder="little").tobytes()
    ds.PixelData = packed + b"\x00" * (len(packed) % 2)
    ds["PixelData"].VR = "OB"
    return ds


def test_frames_of_one_bit_pixel_data_are_each_packed_from_bit_zero(
        archive: Archive, files: dict[str, SampleFile], tmp_path: Path) -> None:
    """1-bit frames (PS3.5 8.1.1), byte aligned or not, little or big endian: each frame
    comes packed eight pixels a byte from its first pixel, as pydicom unpacks it."""
    originals = [_one_bit_multiframe(5, 3, 4)] + [
        pydicom.dcmread(sample_file(name)) for name in ("liver.dcm", "liver_expb.dcm")]
    samples = []
    for index, ds in enumerate(originals):  # new UIDs: the two liver files share theirs
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        samples.append(_sample(ds, path))
    assert [s.Status for s in c_store(archive, [f.path for f in samples])] == [0, 0, 0]
    _wait_indexed(archive, samples)
    originals = [pydicom.dcmread(f.path) for f in samples]
    for f, ds in zip(samples, originals, strict=True):
        count = int(ds.NumberOfFrames)
        numbers = [count, 1] if count > 1 else [1]
        expected = [np.packbits(ds.pixel_array[n - 1].ravel(), bitorder="little").tobytes()
                    for n in numbers]
        response = _get(f"{_url(archive, f)}/frames/{','.join(map(str, numbers))}",
                        'multipart/related; type="application/octet-stream"')
        assert response.status_code == 200, (f.path.name, response.text)
        assert [body for _, body in _parts(response)] == expected, f.path.name
    assert _get(f"{_url(archive, samples[0])}/frames/5",
                'multipart/related; type="application/octet-stream"').status_code == 404


def test_frames_of_a_file_replaced_before_re_indexing_come_from_the_new_file(
        archive: Archive, tmp_path: Path) -> None:
    """The index's frame offsets describe the file as indexed; a file replaced since (a
    re-send not yet re-indexed, here with a longer header and other pixels) is detected
    and its frames are read through its own header, never at the stale offsets."""
    from tests.support import make_ct, write_part10

    ds = make_ct(size=32)
    path = write_part10(ds, tmp_path / "first.dcm")
    assert [s.Status for s in c_store(archive, [path])] == [0]
    f = _sample(ds, path)
    _wait_indexed(archive, [f])
    assert _frame_offsets(archive, [f.sop_uid])[f.sop_uid][0] is not None
    ds.PatientName = "A^Much^Longer^Name^Than^Before"
    ds.PixelData = bytes(reversed(ds.PixelData))
    stored = archive.stored_path("default", f.study_uid, f.series_uid, f.sop_uid)
    write_part10(ds, tmp_path / "second.dcm").replace(stored)
    response = _get(f"{_url(archive, f)}/frames/1",
                    'multipart/related; type="application/octet-stream"')
    assert response.status_code == 200
    assert [body for _, body in _parts(response)] == [ds.PixelData]


def test_head_of_an_instance_or_a_frame_has_the_headers_of_get_and_no_body(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["CT_small.dcm"]
    for suffix, accept in (("", 'multipart/related; type="application/dicom"'),
                           ("/frames/1", 'multipart/related; type="application/octet-stream"')):
        url = f"{_url(archive, f)}{suffix}"
        get = _get(url, accept)
        head = httpx.head(url, headers={"Accept": accept}, timeout=60)
        assert (head.status_code, get.status_code) == (200, 200), suffix
        assert head.content == b""
        assert head.headers["content-length"] == get.headers["content-length"]
        assert head.headers["content-type"].split("boundary=")[0] == \
            get.headers["content-type"].split("boundary=")[0]
        # RFC 9110 6.6.1: the Date of the response, formatted once a second by the server
        sent = email.utils.parsedate_to_datetime(get.headers["date"])
        assert abs((sent - datetime.datetime.now(datetime.UTC)).total_seconds()) < 60


def test_a_stored_file_that_cannot_be_read_is_500_with_a_message_and_others_are_served(
        archive: Archive, files: dict[str, SampleFile], tmp_path: Path) -> None:
    """A storage fault (here a directory where the file should be) is the server's
    error: 500 with a message that shows no internals, for frames and retrieval alike,
    and the archive goes on serving every other instance."""
    from tests.support import make_ct, write_part10

    ds = make_ct(size=16)
    path = write_part10(ds, tmp_path / "broken.dcm")
    assert [s.Status for s in c_store(archive, [path])] == [0]
    f = _sample(ds, path)
    _wait_indexed(archive, [f])
    stored = archive.stored_path("default", f.study_uid, f.series_uid, f.sop_uid)
    aside = stored.with_name(stored.name + ".aside")
    stored.rename(aside)
    stored.mkdir()
    try:
        for suffix, accept in (("", 'multipart/related; type="application/dicom"'),
                               ("/frames/1", 'multipart/related; type="application/octet-stream"')):
            response = _get(f"{_url(archive, f)}{suffix}", accept)
            assert response.status_code == 500, (suffix, response.text)
            assert response.json() == {"status": 500, "message": "internal error; the "
                                       "archive logged the details"}
        other = files["CT_small.dcm"]
        assert _get(f"{_url(archive, other)}/frames/1",
                    'multipart/related; type="application/octet-stream"').status_code == 200
    finally:
        stored.rmdir()
        aside.rename(stored)


def test_frames_requested_in_their_stored_image_media_type_are_the_fragments(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    for name, media_type in (("emri_j2k", "image/jp2"), ("emri_jls", "image/jls"),
                             ("JPGLosslessP14SV1_1s_1f_8b.dcm", "image/jpeg")):
        f = files[name]
        original = pydicom.dcmread(f.path)
        count = int(original.get("NumberOfFrames") or 1)
        stored = list(generate_frames(original.PixelData, number_of_frames=count))
        frames = client.retrieve_instance_frames(
            f.study_uid, f.series_uid, f.sop_uid, [1],
            media_types=((media_type, f.transfer_syntax),))
        assert [bytes(b) for b in frames] == stored[:1], name


def test_rle_frames_requested_as_image_dicom_rle_are_the_fragments(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["emri_rle"]
    original = pydicom.dcmread(f.path)
    stored = list(generate_frames(original.PixelData, number_of_frames=10))
    response = _get(f"{_url(archive, f)}/frames/2", 'multipart/related; type="image/dicom-rle"')
    assert response.status_code == 200
    [(content_type, body)] = _parts(response)
    assert content_type.startswith("image/dicom-rle")
    assert body == stored[1]


def test_deflated_instance_has_pixel_data_metadata_frames_and_bulk_data(
        archive: Archive, files: dict[str, SampleFile], client: DICOMwebClient) -> None:
    f = files["image_dfl.dcm"]
    original = pydicom.dcmread(f.path)
    document = client.retrieve_instance_metadata(f.study_uid, f.series_uid, f.sop_uid)
    assert "7FE00010" in document
    frames = client.retrieve_instance_frames(f.study_uid, f.series_uid, f.sop_uid, [1],
                                             media_types=NATIVE_FRAMES)
    assert frames == [_frame_bytes(original, 1)]
    [value] = client.retrieve_bulkdata(document["7FE00010"]["BulkDataURI"])
    assert value == original.PixelData


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_rle"])
def test_frame_number_zero_or_not_a_number_is_400_and_beyond_the_last_is_404(
        archive: Archive, files: dict[str, SampleFile], name: str) -> None:
    url = f"{_url(archive, files[name])}/frames"
    accept = 'multipart/related; type="application/octet-stream"'
    for bad in ("0", "1,0", "abc", "1,x", "-1", ",", "1.5"):
        response = _get(f"{url}/{bad}", accept)
        assert response.status_code == 400, bad
    for beyond in ("11", "1,11", "99999"):
        response = _get(f"{url}/{beyond}", accept)
        assert response.status_code == 404, beyond
        assert response.json()["status"] == 404
    for any_syntax in ('multipart/related; type="application/octet-stream"; transfer-syntax=*',
                       'multipart/related; type="*/*"'):
        assert _get(f"{url}/11", any_syntax).status_code == 404


def test_frames_accepting_only_png_are_406(archive: Archive,
                                           files: dict[str, SampleFile]) -> None:
    for name in ("emri_small.dcm", "emri_rle"):
        url = f"{_url(archive, files[name])}/frames/1"
        assert _get(url, "image/png").status_code == 406, name
        assert _get(url, 'multipart/related; type="image/png"').status_code == 406, name


def test_frames_of_an_instance_without_pixel_data_are_404(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    response = _get(f"{_url(archive, files['test-SR.dcm'])}/frames/1",
                    'multipart/related; type="application/octet-stream"')
    assert response.status_code == 404


# -- bulk data -----------------------------------------------------------------------------
def test_bulk_data_range_gives_206_with_content_range_and_the_bytes(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["CT_small.dcm"]
    original = pydicom.dcmread(f.path)
    for tag in ("7FE00010", "00431029"):
        value = original[int(tag, 16)].value
        size = len(value)
        url = f"{_url(archive, f)}/bulkdata/{tag}"
        whole = _get(url, "application/octet-stream")
        assert whole.status_code == 200
        assert whole.content == value
        for header, start, end in (("bytes=100-199", 100, 199), ("bytes=0-0", 0, 0),
                                   (f"bytes={size - 10}-", size - 10, size - 1),
                                   ("bytes=-16", size - 16, size - 1),
                                   (f"bytes=5-{size + 1000}", 5, size - 1)):
            response = _get(url, "application/octet-stream", Range=header)
            assert response.status_code == 206, header
            assert response.headers["content-range"] == f"bytes {start}-{end}/{size}", header
            assert response.content == value[start:end + 1], header
        response = _get(url, "application/octet-stream", Range=f"bytes={size}-")
        assert response.status_code == 416
        assert response.headers["content-range"] == f"bytes */{size}"


def test_bulk_data_multipart_is_one_octet_stream_part(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["CT_small.dcm"]
    response = _get(f"{_url(archive, f)}/bulkdata/00431029",
                    'multipart/related; type="application/octet-stream"')
    assert response.status_code == 200
    [(content_type, body)] = _parts(response)
    assert content_type == "application/octet-stream"
    assert body == pydicom.dcmread(f.path)[0x00431029].value


def test_bulk_data_after_the_pixel_data_resolves(archive: Archive, tmp_path: Path) -> None:
    """A large value stored after the pixel data (a certificate in the Digital Signatures
    Sequence) is a BulkDataURI in the metadata, and that URI gives its bytes."""
    from tests.support import make_ct, write_part10

    ds = make_ct()
    signature = Dataset()
    signature.MACIDNumber = 1
    signature.CertificateType = "X509_1993_SIG"
    signature.CertificateOfSigner = bytes(range(256)) * 8  # 2 KiB: a BulkDataURI
    ds.DigitalSignaturesSequence = [signature]
    path = write_part10(ds, tmp_path / "signed.dcm")
    assert [s.Status for s in c_store(archive, [path])] == [0]
    f = _sample(ds, path)
    _wait_indexed(archive, [f])
    response = _get(_url(archive, f) + "/metadata", DICOM_JSON)
    assert response.status_code == 200
    (item,) = response.json()[0]["FFFAFFFA"]["Value"]
    uri = item["04000115"]["BulkDataURI"]
    assert uri.endswith("/bulkdata/FFFAFFFA/0/04000115")
    bulk = _get(uri, "application/octet-stream")
    assert bulk.status_code == 200
    assert bulk.content == bytes(range(256)) * 8


def test_bulk_data_bad_tag_is_400_and_unknown_tag_is_404(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    url = f"{_url(archive, files['CT_small.dcm'])}/bulkdata"
    for bad in ("XYZ", "7FE0001", "7FE000100", "7FE0,0010", "0x7FE00010"):
        response = _get(f"{url}/{bad}", "application/octet-stream")
        assert response.status_code == 400, bad
    for unknown in ("00191234", "60003000", "00100010"):  # absent; absent; not binary
        response = _get(f"{url}/{unknown}", "application/octet-stream")
        assert response.status_code == 404, unknown
    response = _get(f"{_url(archive, files['test-SR.dcm'])}/bulkdata/7FE00010",
                    "application/octet-stream")
    assert response.status_code == 404


def test_bulk_pixel_data_of_a_big_endian_instance_is_little_endian(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["emri_be"]
    original = pydicom.dcmread(f.path)
    response = _get(f"{_url(archive, f)}/bulkdata/7FE00010", "application/octet-stream")
    assert response.status_code == 200
    assert response.content == b"".join(_frame_bytes(original, n) for n in range(1, 11))


def test_bulk_pixel_data_of_a_lossless_compressed_instance_is_uncompressed(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["emri_rle"]
    original = pydicom.dcmread(f.path)
    response = _get(f"{_url(archive, f)}/bulkdata/7FE00010", "application/octet-stream")
    assert response.status_code == 200
    assert response.content == b"".join(_frame_bytes(original, n) for n in range(1, 11))


# -- errors --------------------------------------------------------------------------------
ENDPOINTS = [("", DEFAULT_DICOM), ("/metadata", DICOM_JSON),
             ("/frames/1", 'multipart/related; type="application/octet-stream"'),
             ("/bulkdata/7FE00010", "application/octet-stream")]


def test_unknown_study_series_or_instance_is_404_everywhere(
        archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["CT_small.dcm"]
    unknown = generate_uid()
    paths = {
        "study": f"/studies/{unknown}/series/{f.series_uid}/instances/{f.sop_uid}",
        "series": f"/studies/{f.study_uid}/series/{unknown}/instances/{f.sop_uid}",
        "instance": f"/studies/{f.study_uid}/series/{f.series_uid}/instances/{unknown}",
    }
    for what, path in paths.items():
        for suffix, accept in ENDPOINTS:
            response = _get(f"{archive.url}{path}{suffix}", accept)
            assert response.status_code == 404, (what, suffix, response.text)
            assert response.json()["status"] == 404
    for path in (f"/studies/{unknown}", f"/studies/{f.study_uid}/series/{unknown}"):
        for suffix, accept in ENDPOINTS[:2]:
            response = _get(f"{archive.url}{path}{suffix}", accept)
            assert response.status_code == 404, (path, suffix, response.text)


def _raw_get(archive: Archive, path: str, accept: str) -> tuple[int, bytes]:
    """GET with the path sent verbatim (httpx would resolve ``..`` segments)."""
    connection = http.client.HTTPConnection("127.0.0.1", archive.http_port, timeout=30)
    try:
        connection.request("GET", path, headers={"Accept": accept})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_malformed_uid_in_the_path_is_400(archive: Archive,
                                          files: dict[str, SampleFile]) -> None:
    f = files["CT_small.dcm"]
    for bad in ("abc", "1.2.x", "1..2", "..", "%2E%2E", ".1", "1" * 65, "1.2.3%00", "1.2%203"):
        for level in ("study", "series", "instance"):
            uids = {"study": f.study_uid, "series": f.series_uid, "instance": f.sop_uid}
            uids[level] = bad
            path = (f"/dicomweb/studies/{uids['study']}/series/{uids['series']}"
                    f"/instances/{uids['instance']}")
            for suffix, accept in ENDPOINTS:
                status, body = _raw_get(archive, path + suffix, accept)
                assert status == 400, (bad, level, suffix, body)
                assert orjson.loads(body)["status"] == 400


def test_path_segment_with_a_slash_like_dot_dot_slash_x_matches_no_route(
        archive: Archive) -> None:
    """``../x`` (slash encoded or not) is two path segments: no WADO-RS route, 404."""
    for path in ("/dicomweb/studies/../x/metadata", "/dicomweb/studies/..%2Fx/metadata",
                 "/dicomweb/studies/..%2Fx", "/dicomweb/studies/1.2/series/..%2Fx/metadata"):
        status, _ = _raw_get(archive, path, DICOM_JSON)
        assert status == 404, path


def test_malformed_accept_is_400(archive: Archive, files: dict[str, SampleFile]) -> None:
    f = files["emri_small.dcm"]
    for suffix, accept in ENDPOINTS:
        for bad in (f"{accept}; q=abc", f"{accept}; q=2", "dicom", "text/ plain"):
            response = _get(f"{_url(archive, f)}{suffix}", bad)
            assert response.status_code == 400, (suffix, bad, response.text)
    response = _get(_url(archive, f, "study"), f"{DEFAULT_DICOM}; q=abc")
    assert response.status_code == 400


# -- limits on hostile requests ------------------------------------------------------------
def test_repeated_frame_numbers_are_sent_once(archive: Archive,
                                              files: dict[str, SampleFile]) -> None:
    f = files["CT_small.dcm"]
    response = _get(_url(archive, f) + "/frames/" + ",".join(["1"] * 2000),
                    'multipart/related; type="application/octet-stream"')
    assert response.status_code == 200
    assert len(_parts(response)) == 1


def test_an_oversized_accept_header_is_400_not_a_stall(archive: Archive,
                                                       files: dict[str, SampleFile]) -> None:
    f = files["CT_small.dcm"]
    response = _get(_url(archive, f), "," * 6000 + '"')
    assert response.status_code == 400
    assert "Accept" in response.json()["message"]


def test_a_range_with_absurdly_many_digits_is_400(archive: Archive,
                                                  files: dict[str, SampleFile]) -> None:
    f = files["CT_small.dcm"]
    response = _get(_url(archive, f) + "/bulkdata/7FE00010", "application/octet-stream",
                    Range="bytes=" + "9" * 5000 + "-")
    assert response.status_code == 400
