"""Attributes of a stored instance as index rows and analytics bodies.

Real-world headers are messy: values are read defensively, an unusable value becomes None
(JSON null) rather than refusing an image that was already accepted. Person names are
decoded with the data set's Specific Character Set (ISO 2022, GB18030, UTF-8, ...) and kept
as Unicode with their ``=`` component groups.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomcloud.ingest import parse_da
from dicomcloud.model import (
    DicomImageMeta,
    DicomStateMeta,
    IndexedInstance,
    SeriesAttributes,
    StoredObject,
    fmt_datetime,
    utcnow,
)


def text(ds: Dataset, keyword: str, limit: int | None = None) -> str | None:
    """A value as text (multi-values joined by ``\\``); None when absent or empty."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        out = "\\".join(str(v) for v in value)
    else:
        out = str(value)
    out = out.strip().replace("\x00", "")
    if not out:
        return None
    return out[:limit] if limit else out


def number(ds: Dataset, keyword: str) -> float | None:
    """First value as float; None when absent or not a number."""
    raw = text(ds, keyword)
    if raw is None:
        return None
    try:
        return float(raw.split("\\")[0])
    except ValueError:
        return None


def integer(ds: Dataset, keyword: str) -> int | None:
    """First value as int; None when absent or not an integer."""
    value = number(ds, keyword)
    if value is None or not value.is_integer() or abs(value) > 2**31 - 1:
        return None
    return int(value)


def date(ds: Dataset, keyword: str) -> str | None:
    """A DA value as ``YYYY-MM-DD``; None when absent or invalid."""
    raw = text(ds, keyword)
    return parse_da(raw) if raw else None


def indexed_instance(ds: Dataset, event: StoredObject) -> IndexedInstance:
    """Index rows and analytics bodies of one stored instance."""
    now = fmt_datetime(utcnow())
    state = DicomStateMeta(
        tenant_id=event.tenant_id,
        patient_id=event.patient_id,
        study_uid=event.study_uid,
        series_uid=event.series_uid,
        study_uid_hash=event.study_uid_hash,
        series_uid_hash=event.series_uid_hash,
        patient_name=text(ds, "PatientName"),
        patient_sex=text(ds, "PatientSex", 16),
        patient_birth_date=date(ds, "PatientBirthDate"),
        patient_birth_time=text(ds, "PatientBirthTime", 32),
        patient_age=text(ds, "PatientAge", 16),
        patient_size=number(ds, "PatientSize"),
        patient_weight=number(ds, "PatientWeight"),
        pregnancy_status=integer(ds, "PregnancyStatus"),
        study_date=event.study_date,
        study_date_origin=text(ds, "StudyDate", 16),
        study_time=text(ds, "StudyTime", 32),
        accession_number=text(ds, "AccessionNumber", 64),
        study_id=text(ds, "StudyID", 64),
        study_description=text(ds, "StudyDescription"),
        modality=text(ds, "Modality", 16),
        series_number=integer(ds, "SeriesNumber"),
        series_date=date(ds, "SeriesDate"),
        series_time=text(ds, "SeriesTime", 32),
        series_description=text(ds, "SeriesDescription"),
        body_part_examined=text(ds, "BodyPartExamined", 64),
        protocol_name=text(ds, "ProtocolName"),
        series_related_instances=0,
        created_time=now,
        updated_time=now,
    )
    image = DicomImageMeta(
        tenant_id=event.tenant_id,
        patient_id=event.patient_id,
        study_uid=event.study_uid,
        series_uid=event.series_uid,
        sop_uid=event.sop_uid,
        study_date_origin=state.study_date_origin,
        content_date=date(ds, "ContentDate"),
        content_time=text(ds, "ContentTime", 32),
        instance_number=integer(ds, "InstanceNumber"),
        image_type=text(ds, "ImageType"),
        image_orientation_patient=text(ds, "ImageOrientationPatient"),
        image_position_patient=text(ds, "ImagePositionPatient"),
        slice_thickness=number(ds, "SliceThickness"),
        spacing_between_slices=number(ds, "SpacingBetweenSlices"),
        slice_location=number(ds, "SliceLocation"),
        samples_per_pixel=integer(ds, "SamplesPerPixel"),
        photometric_interpretation=text(ds, "PhotometricInterpretation", 32),
        rows=integer(ds, "Rows"),
        columns=integer(ds, "Columns"),
        bits_allocated=integer(ds, "BitsAllocated"),
        bits_stored=integer(ds, "BitsStored"),
        high_bit=integer(ds, "HighBit"),
        pixel_representation=integer(ds, "PixelRepresentation"),
        rescale_intercept=number(ds, "RescaleIntercept"),
        rescale_slope=number(ds, "RescaleSlope"),
        rescale_type=text(ds, "RescaleType", 64),
        window_center=text(ds, "WindowCenter", 64),
        window_width=text(ds, "WindowWidth", 64),
        transfer_syntax_uid=event.transfer_syntax_uid,
        pixel_data_location=event.file_path,
        thumbnail_location=None,
        sop_class_uid=str(ds.SOPClassUID),
        image_status="stored",
        space_size=event.file_size,
        created_time=now,
        updated_time=now,
    )
    extra = SeriesAttributes(
        referring_physician_name=text(ds, "ReferringPhysicianName"),
        specific_character_set=text(ds, "SpecificCharacterSet", 128),
    )
    return IndexedInstance(event=event, state=state, image=image, extra=extra)


def state_body(row: dict[str, Any]) -> dict[str, Any]:
    """A ``dicom_state_meta`` index row as the ``DicomStateMeta`` message body."""
    out: dict[str, Any] = {}
    for name in DicomStateMeta.__dataclass_fields__:
        value = row.get(name)
        if isinstance(value, dt.datetime):
            value = fmt_datetime(value)
        elif isinstance(value, dt.date):
            value = value.isoformat()
        out[name] = value
    return out
