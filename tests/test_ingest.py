"""The hand-encoded File Meta Information of instances received over DIMSE (PS3.10 7.1)."""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info

from dicomcloud.ingest import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    dimse_file_bytes,
    file_meta_bytes,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _pydicom_meta(sop_uid: str, source_ae: str | None) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = EXPLICIT_LE
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue()


def test_file_meta_bytes_equal_pydicoms_encoding() -> None:
    # odd and even UID lengths, with and without a source AE title (odd length padded)
    for sop_uid, ae in (("1.2.3.4", "STORESCU"), ("1.2.3.45", "MODALITY1"), ("1.2.3", None)):
        assert file_meta_bytes(EXPLICIT_LE, CT, sop_uid, ae) == _pydicom_meta(sop_uid, ae)


def test_dimse_file_reads_back_with_the_data_set_unchanged() -> None:
    dataset = io.BytesIO()
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientName = CT, "1.2.3.4", "DOE^JANE"
    ds.save_as(dataset, implicit_vr=False, little_endian=True, enforce_file_format=False)
    raw = dataset.getvalue()
    data = dimse_file_bytes([raw], EXPLICIT_LE, CT, "1.2.3.4", "SCU")
    read = pydicom.dcmread(io.BytesIO(data))
    assert read.file_meta.SourceApplicationEntityTitle == "SCU"
    assert read.PatientName == "DOE^JANE"
    assert data.endswith(raw)
