"""Generated DICOM data sets: small CT images with unique UIDs, valid Part 10 files."""

from __future__ import annotations

import os
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomcloud.ingest import IMPLEMENTATION_CLASS_UID


def new_uid() -> str:
    """A fresh ``2.25.`` UID (PS3.5 B.2)."""
    return str(generate_uid(prefix=None))


def ct_dataset(
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    *,
    patient_name: str = "DOE^JOHN",
    patient_id: str = "PAT-1",
    study_date: str = "20240105",
    modality: str = "CT",
    series_number: int = 1,
    instance_number: int = 1,
    accession_number: str = "ACC-1",
    study_description: str = "generated",
    size: int = 8,
) -> Dataset:
    """A complete CT Image Storage data set with ``size`` x ``size`` 16-bit pixels."""
    sop_uid = sop_uid or new_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesDate = study_date
    ds.AccessionNumber = accession_number
    ds.StudyID = "1"
    ds.StudyDescription = study_description
    ds.ReferringPhysicianName = "REF^DOC"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"series {series_number}"
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = bytes((instance_number + i) % 256 for i in range(size * size * 2))
    return ds


def ct_series(count: int, study_uid: str | None = None, series_uid: str | None = None,
              **attrs: object) -> list[Dataset]:
    """``count`` instances of one series (instance numbers 1..count)."""
    study_uid = study_uid or new_uid()
    series_uid = series_uid or new_uid()
    return [ct_dataset(study_uid, series_uid, instance_number=n, **attrs)  # type: ignore[arg-type]
            for n in range(1, count + 1)]


def write_part10(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a Part 10 file (preamble, file meta) and return the path."""
    os.makedirs(path.parent, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
