"""Domain values: frozen dataclasses whose fields are the names of DESIGN.md.

The message bodies (``storage_queue``, ``dicom_state_queue``, ``dicom_image_queue``) are
these dataclasses as JSON: field names and order are the Doris columns, dates are
``YYYY-MM-DD``, datetimes ``YYYY-MM-DD HH:MM:SS`` and missing values JSON null.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any


def fmt_datetime(value: dt.datetime) -> str:
    """Doris DATETIME text: ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    return value.strftime("%Y-%m-%d %H:%M:%S")


def utcnow() -> dt.datetime:
    """Current UTC time without microseconds and without tzinfo (stored as UTC)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)


def body(value: Any) -> dict[str, Any]:
    """A dataclass as a JSON-ready message body (field order kept)."""
    return dataclasses.asdict(value)


@dataclass(frozen=True)
class InstanceKey:
    """Where an instance lives: tenant and the three validated UIDs."""

    tenant_id: str
    study_uid: str
    series_uid: str
    sop_uid: str

    @property
    def relative_path(self) -> str:
        """``{tenant_id}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm``."""
        return f"{self.tenant_id}/{self.study_uid}/{self.series_uid}/{self.sop_uid}.dcm"


@dataclass(frozen=True)
class StoredObject:
    """Body of ``storage_queue`` and the object rows of ``log_queue`` (DESIGN.md)."""

    trace_id: str
    worker_node_id: str
    tenant_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    file_size: int
    file_path: str
    transfer_syntax_uid: str
    number_of_frames: int
    created_time: str
    series_uid_hash: str
    study_uid_hash: str
    accession_number: str | None
    target_ts: str | None
    study_date: str
    transfer_status: str
    source_ip: str | None
    source_ae: str | None

    @property
    def key(self) -> InstanceKey:
        return InstanceKey(self.tenant_id, self.study_uid, self.series_uid, self.sop_uid)


@dataclass(frozen=True)
class DicomStateMeta:
    """One series with its patient and study attributes (``dicom_state_queue``)."""

    tenant_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    study_uid_hash: str
    series_uid_hash: str
    patient_name: str | None
    patient_sex: str | None
    patient_birth_date: str | None
    patient_birth_time: str | None
    patient_age: str | None
    patient_size: float | None
    patient_weight: float | None
    pregnancy_status: int | None
    study_date: str
    study_date_origin: str | None
    study_time: str | None
    accession_number: str | None
    study_id: str | None
    study_description: str | None
    modality: str | None
    series_number: int | None
    series_date: str | None
    series_time: str | None
    series_description: str | None
    body_part_examined: str | None
    protocol_name: str | None
    series_related_instances: int
    created_time: str
    updated_time: str


@dataclass(frozen=True)
class DicomImageMeta:
    """One instance (``dicom_image_queue``)."""

    tenant_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    study_date_origin: str | None
    content_date: str | None
    content_time: str | None
    instance_number: int | None
    image_type: str | None
    image_orientation_patient: str | None
    image_position_patient: str | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    slice_location: float | None
    samples_per_pixel: int | None
    photometric_interpretation: str | None
    rows: int | None
    columns: int | None
    bits_allocated: int | None
    bits_stored: int | None
    high_bit: int | None
    pixel_representation: int | None
    rescale_intercept: float | None
    rescale_slope: float | None
    rescale_type: str | None
    window_center: str | None
    window_width: str | None
    transfer_syntax_uid: str
    pixel_data_location: str | None
    thumbnail_location: str | None
    sop_class_uid: str
    image_status: str
    space_size: int
    created_time: str
    updated_time: str


@dataclass(frozen=True)
class SeriesAttributes:
    """Index-only study/series attributes that are not in the DESIGN.md body."""

    referring_physician_name: str | None
    specific_character_set: str | None


@dataclass(frozen=True)
class IndexedInstance:
    """Everything the consumer writes for one stored object."""

    event: StoredObject
    state: DicomStateMeta
    image: DicomImageMeta
    extra: SeriesAttributes
    #: Native frames' place in the file (see ``InstanceRow``), None when not applicable.
    pixel_offset: int | None = None
    frame_size: int | None = None


@dataclass(frozen=True)
class SeriesRef:
    """A series in one tenant."""

    tenant_id: str
    study_uid: str
    series_uid: str


@dataclass(frozen=True)
class JsonTask:
    """A ``dicom_json_meta`` row the worker has to (re)generate metadata for."""

    tenant_id: str
    study_uid: str
    series_uid: str
    flag_time: dt.datetime
    retry_times: int


@dataclass(frozen=True)
class InstanceRow:
    """What the index knows of a stored instance."""

    tenant_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    number_of_frames: int
    file_path: str
    file_size: int
    #: First byte of frame 1 and bytes per frame, for uncompressed little-endian byte
    #: aligned pixel data (None otherwise: the header is read to find the frames).
    pixel_offset: int | None = None
    frame_size: int | None = None
