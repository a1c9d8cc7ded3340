"""QIDO-RS responses: index rows as DICOM JSON (PS3.18 10.6.3, Annex F).

Each level returns the attributes of PS3.18 table 10.6.3-3 (study), -4 (series) and -5
(instance); a series or instance search that is not scoped to a study also carries the
study attributes. Empty attributes are sent with their VR and no Value (PS3.18 F.2.5).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from dicomcloud.query import Level, Query

# (tag, VR, row column or None for computed)
_STUDY = (
    ("00080020", "DA", "study_date_origin"),
    ("00080030", "TM", "study_time"),
    ("00080050", "SH", "accession_number"),
    ("00080056", "CS", None),  # InstanceAvailability
    ("00080061", "CS", "modalities"),
    ("00080090", "PN", "referring_physician_name"),
    ("00081030", "LO", "study_description"),
    ("00100010", "PN", "patient_name"),
    ("00100020", "LO", "patient_id"),
    ("00100030", "DA", "patient_birth_date"),
    ("00100040", "CS", "patient_sex"),
    ("0020000D", "UI", "study_uid"),
    ("00200010", "SH", "study_id"),
    ("00201206", "IS", "number_of_series"),
    ("00201208", "IS", "number_of_instances"),
)
_SERIES = (
    ("00080021", "DA", "series_date"),
    ("00080031", "TM", "series_time"),
    ("00080060", "CS", "modality"),
    ("0008103E", "LO", "series_description"),
    ("00180015", "CS", "body_part_examined"),
    ("0020000E", "UI", "series_uid"),
    ("00200011", "IS", "series_number"),
    ("00201209", "IS", "series_related_instances"),
)
_INSTANCE = (
    ("00080016", "UI", "sop_class_uid"),
    ("00080018", "UI", "sop_uid"),
    ("00083002", "UI", "transfer_syntax_uid"),  # AvailableTransferSyntaxUID
    ("00200013", "IS", "instance_number"),
    ("00280008", "IS", "number_of_frames"),
    ("00280010", "US", "image_rows"),
    ("00280011", "US", "image_columns"),
    ("00280100", "US", "bits_allocated"),
)
_STUDY_IN_SERIES = {"00080061", "00201206", "00201208"}  # only computed at study level


def _value(vr: str, raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {"vr": vr}
    if vr == "PN":
        groups = str(raw).split("=")
        names = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False))
        return {"vr": vr, "Value": [{k: v for k, v in names.items() if v}]}
    if vr == "DA" and isinstance(raw, dt.date):
        raw = raw.strftime("%Y%m%d")
    if vr in ("IS", "US"):
        return {"vr": vr, "Value": [int(raw)]}
    if vr == "CS" and isinstance(raw, str) and ("," in raw or "\\" in raw):
        parts = sorted({p for p in raw.replace("\\", ",").split(",") if p})
        return {"vr": vr, "Value": parts}
    return {"vr": vr, "Value": [str(raw)]}


def _url(base: str, row: dict[str, Any], level: Level) -> str:
    url = f"{base}/studies/{row['study_uid']}"
    if level in ("series", "instance"):
        url += f"/series/{row['series_uid']}"
    if level == "instance":
        url += f"/instances/{row['sop_uid']}"
    return url


def to_json(query: Query, row: dict[str, Any], base_url: str) -> dict[str, Any]:
    """One QIDO-RS result as a DICOM JSON object, keys in tag order."""
    fields: list[tuple[str, str, str | None]] = list(_STUDY)
    if query.level != "study":
        fields = [f for f in fields if f[0] not in _STUDY_IN_SERIES] + list(_SERIES)
    if query.level == "instance":
        fields += list(_INSTANCE)
    out: dict[str, Any] = {}
    for tag, vr, column in fields:
        if column is None:
            out[tag] = {"vr": vr, "Value": ["ONLINE"]}
        else:
            out[tag] = _value(vr, row.get(column))
    out["00081190"] = {"vr": "UR", "Value": [_url(base_url, row, query.level)]}
    return dict(sorted(out.items()))
