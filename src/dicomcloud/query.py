"""The query model shared by QIDO-RS and C-FIND.

Parses QIDO-RS query parameters (PS3.18 8.3.4, 10.6.1) into a backend-neutral ``Query``:
attribute matches per PS3.4 C.2.2.2 (single value, UID list, wildcard, range, universal),
``includefield``, ``limit``/``offset`` and ``fuzzymatching``. The index backends translate
a ``Query`` to SQL; nothing here knows about a database.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dicomcloud.errors import BadRequest
from dicomcloud.uids import is_valid_uid

Level = Literal["study", "series", "instance"]
MatchKind = Literal["single", "list", "wildcard", "range"]


@dataclass(frozen=True)
class Attribute:
    """A queryable attribute: its tag, VR, level and index column."""

    keyword: str
    tag: int
    vr: str
    level: Level
    column: str


def _attr(keyword: str, level: Level, column: str) -> Attribute:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Attribute(keyword, tag, dictionary_VR(tag), level, column)


#: PS3.18 table 10.6.1-5 matching attributes and the column each is kept in.
ATTRIBUTES: dict[str, Attribute] = {
    a.keyword: a
    for a in (
        _attr("StudyDate", "study", "study_date_origin"),
        _attr("StudyTime", "study", "study_time"),
        _attr("AccessionNumber", "study", "accession_number"),
        _attr("ModalitiesInStudy", "study", "modality"),
        _attr("ReferringPhysicianName", "study", "referring_physician_name"),
        _attr("PatientName", "study", "patient_name"),
        _attr("PatientID", "study", "patient_id"),
        _attr("PatientBirthDate", "study", "patient_birth_date"),
        _attr("PatientSex", "study", "patient_sex"),
        _attr("StudyInstanceUID", "study", "study_uid"),
        _attr("StudyID", "study", "study_id"),
        _attr("StudyDescription", "study", "study_description"),
        _attr("Modality", "series", "modality"),
        _attr("SeriesInstanceUID", "series", "series_uid"),
        _attr("SeriesNumber", "series", "series_number"),
        _attr("SeriesDescription", "series", "series_description"),
        _attr("BodyPartExamined", "series", "body_part_examined"),
        _attr("SeriesDate", "series", "series_date"),
        _attr("SOPClassUID", "instance", "sop_class_uid"),
        _attr("SOPInstanceUID", "instance", "sop_uid"),
        _attr("InstanceNumber", "instance", "instance_number"),
    )
}

_LEVEL_ORDER: dict[Level, int] = {"study": 0, "series": 1, "instance": 2}
_RANGE_VRS = {"DA", "TM", "DT"}
# ASCII digits only, the whole value (``\d`` takes other scripts' digits, ``$`` a newline)
_DATE_RE = re.compile(r"[0-9]{8}")
_TIME_RE = re.compile(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?")
_RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}


@dataclass(frozen=True)
class Match:
    """One matching key (PS3.4 C.2.2.2)."""

    attribute: Attribute
    kind: MatchKind
    values: tuple[str, ...]  # single: (v,), list: (v1, v2..), wildcard: (pattern,), range: (lo, hi)


@dataclass(frozen=True)
class Query:
    """A search at one level, optionally inside a study / series."""

    tenant_id: str
    level: Level
    study_uid: str | None = None
    series_uid: str | None = None
    matches: tuple[Match, ...] = ()
    include_all: bool = False
    include: frozenset[int] = field(default_factory=frozenset)
    limit: int = 1000
    offset: int = 0
    fuzzy: bool = False


def parse_qido(
    tenant_id: str,
    level: Level,
    params: Iterable[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    default_limit: int,
    max_limit: int,
) -> tuple[Query, list[str]]:
    """Parse QIDO-RS query parameters (PS3.18 8.3.4).

    Returns the query and warnings to send in a ``Warning`` header (e.g. the limit was
    lowered to the configured maximum). Raises ``BadRequest`` naming the parameter.
    """
    warnings: list[str] = []
    matches: list[Match] = []
    include: set[int] = set()
    include_all = False
    limit, offset, fuzzy = default_limit, 0, False
    for name, value in params:
        lname = name.lower()
        if lname == "limit":
            limit = _non_negative_int(name, value)
            if limit > max_limit:
                warnings.append(f'299 dicomcloud "limit lowered to the maximum {max_limit}"')
                limit = max_limit
        elif lname == "offset":
            offset = _non_negative_int(name, value)
        elif lname == "fuzzymatching":
            if value.lower() not in {"true", "false"}:
                raise BadRequest(f"fuzzymatching must be true or false, not {value!r}")
            fuzzy = value.lower() == "true"
        elif lname == "includefield":
            for item in filter(None, (v.strip() for v in value.split(","))):
                if item.lower() == "all":
                    include_all = True
                else:
                    include.add(_tag_of(name, item))
        else:
            match = _parse_match(name, value, level)
            if match is not None:
                matches.append(match)
    for uid, label in ((study_uid, "study"), (series_uid, "series")):
        if uid is not None and not is_valid_uid(uid):
            raise BadRequest(f"invalid {label} UID in the path: {uid[:70]!r}")
    query = Query(tenant_id, level, study_uid, series_uid, tuple(matches), include_all,
                  frozenset(include), limit, offset, fuzzy)
    return query, warnings


def _non_negative_int(name: str, value: str) -> int:
    """ASCII digits only (str.isdigit also takes "²" and other scripts' digits), and at
    most 18 of them: the value must fit the index's 64-bit integers."""
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise BadRequest(f"{name} must be a non-negative integer below 10^18, "
                         f"not {value[:40]!r}")
    return int(value)


def _tag_of(param: str, text: str) -> int:
    """A tag from a keyword or 8 hex digits (PS3.18 8.3.4.1)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", text):
        return int(text, 16)
    tag = tag_for_keyword(text)
    if tag is None:
        raise BadRequest(f"{param}: unknown attribute {text[:64]!r}; use a keyword or tag")
    return int(tag)


def _parse_match(name: str, value: str, level: Level) -> Match | None:
    tag = _tag_of(name, name)
    keyword = keyword_for_tag(tag)
    attribute = ATTRIBUTES.get(keyword)
    if attribute is None:
        raise BadRequest(
            f"{name} is not a supported matching attribute; supported: "
            + ", ".join(sorted(ATTRIBUTES))
        )
    if _LEVEL_ORDER[attribute.level] > _LEVEL_ORDER[level]:
        raise BadRequest(f"{keyword} cannot be matched when searching for {level} resources")
    if value == "" or value == "*":
        return None  # universal matching (PS3.4 C.2.2.2.3): nothing to filter
    if attribute.vr == "UI":
        uids = tuple(v.strip() for v in value.replace("\\", ",").split(","))
        for uid in uids:
            if not is_valid_uid(uid):
                raise BadRequest(f"{name}: {uid[:70]!r} is not a valid UID")
        return Match(attribute, "list" if len(uids) > 1 else "single", uids)
    if attribute.keyword == "ModalitiesInStudy" and ("," in value or "\\" in value):
        # several modalities: a study matches when it holds any of them (PS3.4 C.2.2.2.1,
        # multi-valued key; backslash in DIMSE, comma in QIDO-RS)
        codes = tuple(v.strip() for v in re.split(r"[,\\]", value) if v.strip())
        return Match(attribute, "list", codes) if codes else None
    if attribute.vr in _RANGE_VRS and "-" in value:
        lo, _, hi = value.partition("-")
        for part in (lo, hi):
            _check_temporal(name, attribute.vr, part)
        if not lo and not hi:
            raise BadRequest(f"{name}: a range needs at least one end")
        return Match(attribute, "range", (lo, hi))
    if "*" in value or "?" in value:
        if attribute.vr in {"DA", "TM", "DT", "IS", "US", "UL", "SS", "SL", "DS"}:
            raise BadRequest(f"{name}: wildcards are not allowed for {attribute.vr} values")
        return Match(attribute, "wildcard", (value,))
    if attribute.vr in _RANGE_VRS:
        _check_temporal(name, attribute.vr, value)
    if attribute.vr == "IS" and not re.fullmatch(r"[+-]?\d{1,12}", value.strip()):
        raise BadRequest(f"{name}: {value[:40]!r} is not an integer")
    return Match(attribute, "single", (value,))


def _check_temporal(name: str, vr: str, value: str) -> None:
    if not value:
        return
    ok = _DATE_RE.fullmatch(value) if vr == "DA" else _TIME_RE.fullmatch(value)
    if vr == "DT":
        ok = re.fullmatch(r"[0-9]{4,14}(\.[0-9]{1,6})?([+-][0-9]{4})?", value)
    if ok and vr == "DA":  # a calendar date: 20241301 has the form but no month 13
        try:
            dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
        except ValueError:
            ok = None
    if not ok:
        raise BadRequest(f"{name}: {value[:40]!r} is not a valid {vr} value (PS3.5 6.2)")


def like_pattern(pattern: str) -> str:
    """A DICOM wildcard (``*``, ``?``) as an SQL LIKE pattern with ``\\`` as escape."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")
