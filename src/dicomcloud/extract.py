"""Attributes of a stored instance as index rows and analytics bodies.

Real-world headers are messy: values are read defensively, an unusable value becomes None
(JSON null) rather than refusing an image that was already accepted. Person names are
decoded with the data set's Specific Character Set (ISO 2022, GB18030, UTF-8, ...) and kept
as Unicode with their ``=`` component groups.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import struct
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from dicomcloud.dicomjson import fast_encoding
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


class HeaderReader:
    """Reads attributes of one header defensively, fast for common character sets.

    Raw little-endian values in ASCII, Latin-1 or UTF-8 are decoded directly (pydicom's
    general conversion costs about a millisecond per instance for the ~60 attributes
    indexed); everything else goes through pydicom, which handles ISO 2022 and friends.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.encoding = fast_encoding(ds)

    def text(self, keyword: str, limit: int | None = None) -> str | None:
        """A value as text (multi-values joined by ``\\``); None when absent or empty."""
        out = self._raw_text(keyword)
        if out is None:
            out = self._converted_text(keyword)
        elif "\\" in out and keyword not in _FREE_TEXT:  # padding of each value is not data
            out = "\\".join(part.strip() for part in out.split("\\"))
        if not out:
            return None
        return out[:limit] if limit else out

    def _raw(self, keyword: str) -> tuple[str, bytes] | None:
        """VR and bytes of a little endian raw element (VR from the dictionary when implicit)."""
        tag, dictionary_vr = _tag_vr(keyword)
        element = self.ds._dict.get(tag)
        if (not isinstance(element, RawDataElement) or not element.is_little_endian
                or element.value is None):
            return None
        return element.VR or dictionary_vr, element.value

    def _raw_text(self, keyword: str) -> str | None:
        raw = self._raw(keyword) if self.encoding is not None else None
        if raw is None or raw[0] not in _TEXT_VRS:
            return None
        vr, value = raw
        try:
            out = value.decode(self.encoding).strip(" \x00").replace("\x00", "")  # type: ignore[arg-type]
        except UnicodeDecodeError:
            return None
        if vr == "PN":  # empty trailing component groups are not part of the name
            out = "\\".join(name.rstrip("=") for name in out.split("\\"))
        return str(out)

    def _converted_text(self, keyword: str) -> str | None:
        try:
            value = self.ds.get(keyword)
        except Exception:  # a broken value must not stop indexing
            return None
        if value is None:
            return None
        if isinstance(value, MultiValue | list | tuple):
            out = "\\".join(str(v).strip() for v in value)
        else:
            out = str(value)
        return out.strip().replace("\x00", "")

    def number(self, keyword: str) -> float | None:
        """First value as float; None when absent or not a number."""
        binary = self._raw(keyword)
        if binary is not None and binary[0] in _BINARY:
            layout = _BINARY[binary[0]]
            if len(binary[1]) < layout.size:
                return None
            value = float(layout.unpack_from(binary[1])[0])
            return value if math.isfinite(value) else None
        raw = self.text(keyword)
        if raw is None:
            return None
        try:
            value = float(raw.split("\\")[0])
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    def integer(self, keyword: str) -> int | None:
        """First value as int; None when absent or not an integer."""
        value = self.number(keyword)
        if value is None or not value.is_integer() or abs(value) > 2**31 - 1:
            return None
        return int(value)

    def date(self, keyword: str) -> str | None:
        """A DA value as ``YYYY-MM-DD``; None when absent or invalid."""
        raw = self.text(keyword)
        return parse_da(raw) if raw else None


_FREE_TEXT = frozenset({"StudyDescription", "SeriesDescription", "ProtocolName"})
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                       "ST", "TM", "UC", "UI", "UR", "UT"})


_BINARY = {"US": struct.Struct("<H"), "SS": struct.Struct("<h"), "UL": struct.Struct("<I"),
           "SL": struct.Struct("<i"), "FL": struct.Struct("<f"), "FD": struct.Struct("<d")}


@functools.cache
def _tag_vr(keyword: str) -> tuple[BaseTag, str]:
    tag = _tag(keyword)
    return BaseTag(tag), dictionary_VR(tag)


@functools.cache
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


def indexed_instance(ds: Dataset, event: StoredObject) -> IndexedInstance:
    """Index rows and analytics bodies of one stored instance."""
    now = fmt_datetime(utcnow())
    r = HeaderReader(ds)
    state = DicomStateMeta(
        tenant_id=event.tenant_id,
        patient_id=event.patient_id,
        study_uid=event.study_uid,
        series_uid=event.series_uid,
        study_uid_hash=event.study_uid_hash,
        series_uid_hash=event.series_uid_hash,
        patient_name=r.text("PatientName"),
        patient_sex=r.text("PatientSex", 16),
        patient_birth_date=r.date("PatientBirthDate"),
        patient_birth_time=r.text("PatientBirthTime", 32),
        patient_age=r.text("PatientAge", 16),
        patient_size=r.number("PatientSize"),
        patient_weight=r.number("PatientWeight"),
        pregnancy_status=r.integer("PregnancyStatus"),
        study_date=event.study_date,
        study_date_origin=r.text("StudyDate", 16),
        study_time=r.text("StudyTime", 32),
        accession_number=r.text("AccessionNumber", 64),
        study_id=r.text("StudyID", 64),
        study_description=r.text("StudyDescription"),
        modality=r.text("Modality", 16),
        series_number=r.integer("SeriesNumber"),
        series_date=r.date("SeriesDate"),
        series_time=r.text("SeriesTime", 32),
        series_description=r.text("SeriesDescription"),
        body_part_examined=r.text("BodyPartExamined", 64),
        protocol_name=r.text("ProtocolName"),
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
        content_date=r.date("ContentDate"),
        content_time=r.text("ContentTime", 32),
        instance_number=r.integer("InstanceNumber"),
        image_type=r.text("ImageType"),
        image_orientation_patient=r.text("ImageOrientationPatient"),
        image_position_patient=r.text("ImagePositionPatient"),
        slice_thickness=r.number("SliceThickness"),
        spacing_between_slices=r.number("SpacingBetweenSlices"),
        slice_location=r.number("SliceLocation"),
        samples_per_pixel=r.integer("SamplesPerPixel"),
        photometric_interpretation=r.text("PhotometricInterpretation", 32),
        rows=r.integer("Rows"),
        columns=r.integer("Columns"),
        bits_allocated=r.integer("BitsAllocated"),
        bits_stored=r.integer("BitsStored"),
        high_bit=r.integer("HighBit"),
        pixel_representation=r.integer("PixelRepresentation"),
        rescale_intercept=r.number("RescaleIntercept"),
        rescale_slope=r.number("RescaleSlope"),
        rescale_type=r.text("RescaleType", 64),
        window_center=r.text("WindowCenter", 64),
        window_width=r.text("WindowWidth", 64),
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
        referring_physician_name=r.text("ReferringPhysicianName"),
        specific_character_set=r.text("SpecificCharacterSet", 128),
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
