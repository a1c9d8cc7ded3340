"""The Apache Doris feed (migrations/doris/*.sql) against the messages the archive publishes.

Two parts:

1. the SQL itself, read by a small parser of this module: every routine load targets a
   defined table, its COLUMNS list is exactly the table's columns, key columns come first
   and are NOT NULL, no trailing comma, and the known defects of the reference DDL
   (DESIGN.md "Apache Doris") are fixed;
2. a real archive (embedded defaults) receives instances of varied content (generated CTs in
   several character sets, some at the VR maximum lengths, and real files of pydicom's test
   data: multi-frame, big endian, compressed, SR, waveform, segmentation) by C-STORE and
   STOW-RS; every message of ``log_queue``, ``dicom_state_queue`` and ``dicom_image_queue``
   is then read back from ``queue.db`` and must load into its Doris table unchanged: the
   keys are exactly the routine load's COLUMNS, each value fits its column's type.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest

from dicomcloud.backends.localqueue import LocalQueue
from dicomcloud.model import DicomImageMeta, DicomStateMeta, StoredObject
from tests.support import (
    ROOT,
    Archive,
    c_store,
    make_ct,
    multipart,
    part10_bytes,
    valid_testdata,
    wait_until,
)

DORIS = ROOT / "migrations" / "doris"
TABLES_SQL = DORIS / "01_tables.sql"
LOADS_SQL = DORIS / "02_routine_load.sql"

#: DESIGN.md "Apache Doris": table, key kind, key columns, source topic.
DESIGN = {
    "dicom_object_meta": ("DUPLICATE", ("tenant_id", "patient_id", "study_uid", "series_uid",
                                        "sop_uid"), "log_queue"),
    "dicom_state_meta": ("UNIQUE", ("tenant_id", "patient_id", "study_uid", "series_uid"),
                         "dicom_state_queue"),
    "dicom_image_meta": ("UNIQUE", ("tenant_id", "patient_id", "study_uid", "series_uid",
                                    "sop_uid"), "dicom_image_queue"),
}
#: The message body of each topic (model.py).
BODIES: dict[str, Any] = {"log_queue": StoredObject, "dicom_state_queue": DicomStateMeta,
                           "dicom_image_queue": DicomImageMeta}
TOPICS = tuple(BODIES)

INT_RANGE = (-(2**31), 2**31 - 1)
BIGINT_RANGE = (-(2**63), 2**63 - 1)


# -- a small parser for the Doris DDL ---------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str
    type: str  # upper case, e.g. "VARCHAR", "INT", "DATETIME"
    length: int | None  # n of VARCHAR(n)
    not_null: bool


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key_kind: str | None  # DUPLICATE, UNIQUE or AGGREGATE
    key: tuple[str, ...]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


@dataclass(frozen=True)
class RoutineLoad:
    job: str
    table: str
    columns: tuple[str, ...]
    kafka: dict[str, str]

    @property
    def topic(self) -> str:
        return self.kafka["kafka_topic"]


def strip_comments(sql: str) -> str:
    """``sql`` without ``--`` comments (those inside quotes or backquotes are kept)."""
    out: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(sql):
        ch = sql[i]
        if quote is not None:
            out.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
            out.append(ch)
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = len(sql) if end < 0 else end
            continue
        else:
            out.append(ch)
        i += 1
    assert quote is None, "unterminated quote in SQL"
    return "".join(out)


def split_top(text: str, separator: str) -> list[str]:
    """``text`` split on ``separator`` outside quotes and parentheses (pieces stripped)."""
    pieces: list[str] = []
    depth = 0
    quote: str | None = None
    current: list[str] = []
    for ch in text:
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            assert depth >= 0, f"unbalanced ')' in {text[:80]!r}"
        elif ch == separator and depth == 0:
            pieces.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    assert depth == 0 and quote is None, f"unbalanced parentheses or quotes in {text[:80]!r}"
    pieces.append("".join(current).strip())
    return pieces


def statements(sql: str) -> list[str]:
    """The statements of a SQL file, comments removed, whitespace normalised."""
    text = strip_comments(sql)
    return [" ".join(s.split()) for s in split_top(text, ";") if s.strip()]


def parenthesised(text: str, start: int) -> tuple[str, int]:
    """The text inside the parentheses opening at ``text[start]`` and the index after them."""
    assert text[start] == "(", text[start:start + 40]
    depth = 0
    quote: str | None = None
    for i in range(start, len(text)):
        ch = text[i]
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    raise AssertionError(f"no closing parenthesis in {text[start:start + 80]!r}")


def identifier(text: str) -> str:
    """A column or table name without backquotes (and without a ``db.`` prefix)."""
    name = text.strip().split(".")[-1].strip()
    if name.startswith("`") and name.endswith("`"):
        name = name[1:-1]
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), f"not an identifier: {text!r}"
    return name


def identifiers(text: str) -> tuple[str, ...]:
    pieces = split_top(text, ",")
    assert all(pieces), f"empty element (trailing or doubled comma) in ({text})"
    return tuple(identifier(p) for p in pieces)


_CREATE_TABLE = re.compile(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([`\w.]+)\s*\(", re.I)
_COLUMN = re.compile(r"(`\w+`|\w+)\s+([A-Za-z]+)\s*(?:\(\s*(\d+)(?:\s*,\s*\d+)?\s*\))?(.*)",
                     re.S)
_KEY = re.compile(r"\b(DUPLICATE|UNIQUE|AGGREGATE)\s+KEY\s*\(", re.I)
_ROUTINE_LOAD = re.compile(r"CREATE\s+ROUTINE\s+LOAD\s+([`\w.]+)\s+ON\s+([`\w.]+)", re.I)
_COLUMNS = re.compile(r"(?<!TERMINATED BY )\bCOLUMNS\s*\(", re.I)
_KAFKA = re.compile(r"\bFROM\s+KAFKA\s*\(", re.I)
_PROPERTY = re.compile(r'^"([^"]+)"\s*=\s*"([^"]*)"$')


def parse_table(statement: str) -> Table:
    match = _CREATE_TABLE.match(statement)
    assert match, f"not a CREATE TABLE: {statement[:80]!r}"
    body, after = parenthesised(statement, match.end() - 1)
    definitions = split_top(body, ",")
    assert all(definitions), f"{match.group(1)}: empty column definition (trailing comma?)"
    columns: list[Column] = []
    for definition in definitions:
        parts = _COLUMN.fullmatch(definition)
        assert parts, f"{match.group(1)}: cannot read column definition {definition!r}"
        rest = parts.group(4).upper()
        columns.append(Column(identifier(parts.group(1)), parts.group(2).upper(),
                              int(parts.group(3)) if parts.group(3) else None,
                              bool(re.search(r"\bNOT\s+NULL\b", rest))))
    key_kind: str | None = None
    key: tuple[str, ...] = ()
    if key_match := _KEY.search(statement, after):
        key_kind = key_match.group(1).upper()
        key = identifiers(parenthesised(statement, key_match.end() - 1)[0])
    return Table(identifier(match.group(1)), tuple(columns), key_kind, key)


def parse_routine_load(statement: str) -> RoutineLoad:
    match = _ROUTINE_LOAD.match(statement)
    assert match, f"not a CREATE ROUTINE LOAD: {statement[:80]!r}"
    columns_match = _COLUMNS.search(statement)
    assert columns_match, f"routine load {match.group(1)} has no COLUMNS(...)"
    columns = identifiers(parenthesised(statement, columns_match.end() - 1)[0])
    kafka_match = _KAFKA.search(statement)
    assert kafka_match, f"routine load {match.group(1)} has no FROM KAFKA (...)"
    kafka: dict[str, str] = {}
    for item in split_top(parenthesised(statement, kafka_match.end() - 1)[0], ","):
        prop = _PROPERTY.match(item)
        assert prop, f"routine load {match.group(1)}: cannot read property {item!r}"
        kafka[prop.group(1)] = prop.group(2)
    return RoutineLoad(identifier(match.group(1)), identifier(match.group(2)), columns, kafka)


@cache
def tables() -> dict[str, Table]:
    out: dict[str, Table] = {}
    for statement in statements(TABLES_SQL.read_text(encoding="utf-8")):
        assert _CREATE_TABLE.match(statement), f"unexpected statement in 01_tables.sql: " \
                                               f"{statement[:80]!r}"
        table = parse_table(statement)
        assert table.name not in out, f"table {table.name} defined twice"
        out[table.name] = table
    return out


@cache
def routine_loads() -> tuple[RoutineLoad, ...]:
    found = statements(LOADS_SQL.read_text(encoding="utf-8"))
    for statement in found:
        assert _ROUTINE_LOAD.match(statement), \
            f"unexpected statement in 02_routine_load.sql: {statement[:80]!r}"
    return tuple(parse_routine_load(s) for s in found)


def load_of_topic(topic: str) -> RoutineLoad:
    matching = [load for load in routine_loads() if load.topic == topic]
    assert len(matching) == 1, f"{len(matching)} routine loads read topic {topic}"
    return matching[0]


# -- the parser on its own ---------------------------------------------------------------------
def test_parser_reads_backquotes_comments_types_keys_and_kafka_properties() -> None:
    sql = """
    -- a comment; with a semicolon
    CREATE TABLE IF NOT EXISTS db.t (  -- trailing comment
        a VARCHAR(10) NOT NULL,
        `rows` INT,
        c DECIMAL(10, 2) NULL,
        d DATETIME
    )
    UNIQUE KEY(a)
    PROPERTIES ("x" = "a--b;c");
    """
    (statement,) = statements(sql)
    table = parse_table(statement)
    assert table.name == "t"
    assert table.columns == (Column("a", "VARCHAR", 10, True), Column("rows", "INT", None, False),
                             Column("c", "DECIMAL", 10, False),
                             Column("d", "DATETIME", None, False))
    assert (table.key_kind, table.key) == ("UNIQUE", ("a",))
    (statement,) = statements("""CREATE ROUTINE LOAD j ON t COLUMNS(a, `rows`)
        PROPERTIES ("format" = "json") FROM KAFKA ("kafka_topic" = "topic_x",
        "property.group.id" = "g");""")
    load = parse_routine_load(statement)
    assert (load.table, load.columns, load.topic) == ("t", ("a", "rows"), "topic_x")


def test_parser_rejects_a_trailing_comma_before_a_closing_parenthesis() -> None:
    with pytest.raises(AssertionError, match="trailing comma"):
        parse_table("CREATE TABLE t ( a INT NOT NULL, b INT, ) DUPLICATE KEY(a)")
    with pytest.raises(AssertionError, match="trailing or doubled comma"):
        parse_routine_load('CREATE ROUTINE LOAD j ON t COLUMNS(a, b,) '
                           'FROM KAFKA ("kafka_topic" = "x")')


# -- the SQL files -----------------------------------------------------------------------------
def test_sql_files_have_no_trailing_comma_before_a_closing_parenthesis() -> None:
    for path in (TABLES_SQL, LOADS_SQL):
        text = strip_comments(path.read_text(encoding="utf-8"))
        defects = [m.group(0) for m in re.finditer(r"[^\n]*,\s*\)", text)]
        assert not defects, f"{path.name}: trailing comma before ')': {defects}"


def test_tables_sql_defines_the_three_design_tables_with_their_key_kind_and_key_columns() -> None:
    defined = tables()
    assert set(defined) == set(DESIGN)
    for name, (kind, key, _) in DESIGN.items():
        assert (defined[name].key_kind, defined[name].key) == (kind, key), name


def test_key_columns_come_first_in_key_order_and_are_not_null() -> None:
    for table in tables().values():
        assert table.key, f"{table.name} has no key clause"
        leading = tuple(c.name for c in table.columns[:len(table.key)])
        assert leading == table.key, f"{table.name}: columns start {leading}, key {table.key}"
        nullable = [c.name for c in table.columns[:len(table.key)] if not c.not_null]
        assert not nullable, f"{table.name}: key columns without NOT NULL: {nullable}"


def test_table_columns_are_unique_and_of_types_the_value_check_knows() -> None:
    for table in tables().values():
        names = [c.name for c in table.columns]
        assert len(names) == len(set(names)), f"{table.name}: duplicate column"
        for column in table.columns:
            assert column.type in {"INT", "BIGINT", "DOUBLE", "DATE", "DATETIME", "VARCHAR"}, \
                f"{table.name}.{column.name}: type {column.type} not checked by this test"
            assert (column.length is not None) == (column.type == "VARCHAR"), \
                f"{table.name}.{column.name}: length {column.length} for {column.type}"


def test_each_routine_load_targets_a_defined_table_and_each_topic_has_one_load() -> None:
    loads = routine_loads()
    assert len(loads) == len(DESIGN)
    assert len({load.job for load in loads}) == len(loads), "duplicate routine load job name"
    for load in loads:
        assert load.table in tables(), f"{load.job} loads undefined table {load.table}"
    for name, (_, _, topic) in DESIGN.items():
        assert load_of_topic(topic).table == name


def test_routine_load_columns_are_exactly_the_columns_of_its_table() -> None:
    for load in routine_loads():
        table = tables()[load.table]
        assert len(load.columns) == len(set(load.columns)), f"{load.job}: duplicate column"
        table_columns = {c.name for c in table.columns}
        unknown = set(load.columns) - table_columns
        assert not unknown, f"{load.job}: COLUMNS not in {table.name}: {sorted(unknown)}"
        unlisted = table_columns - set(load.columns)
        assert not unlisted, f"{load.job}: {table.name} columns never loaded: {sorted(unlisted)}"


def test_routine_load_columns_are_the_fields_of_the_topic_message_body() -> None:
    for topic, model in BODIES.items():
        fields = tuple(model.__dataclass_fields__)
        assert load_of_topic(topic).columns == fields, f"{topic} vs {model.__name__}"


def test_reference_ddl_defects_are_fixed_rows_columns_no_width_series_related_instances() -> None:
    image = {c.name for c in tables()["dicom_image_meta"].columns}
    assert {"rows", "columns"} <= image
    assert "width" not in image and "height" not in image
    state = tables()["dicom_state_meta"]
    assert "series_related_instances" in {c.name for c in state.columns}
    assert "series_related_instances" in load_of_topic("dicom_state_queue").columns


# -- values against column types ---------------------------------------------------------------
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")


def value_problem(column: Column, value: Any) -> str | None:
    """Why ``value`` (from JSON) would not load into ``column`` unchanged; None if it would."""
    if value is None:
        return "null in a NOT NULL column" if column.not_null else None
    if column.type in ("INT", "BIGINT"):
        low, high = INT_RANGE if column.type == "INT" else BIGINT_RANGE
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{type(value).__name__}, not an integer"
        return None if low <= value <= high else f"{value} out of {column.type} range"
    if column.type == "DOUBLE":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{type(value).__name__}, not a number"
        return None if math.isfinite(value) else f"{value} is not finite"
    if not isinstance(value, str):
        return f"{type(value).__name__}, not a string"
    if column.type == "DATE":
        try:
            if not _DATE.fullmatch(value):
                raise ValueError
            dt.date.fromisoformat(value)
        except ValueError:
            return f"{value!r} is not a YYYY-MM-DD date"
        return None
    if column.type == "DATETIME":
        try:
            if not _DATETIME.fullmatch(value):
                raise ValueError
            dt.datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return f"{value!r} is not a 'YYYY-MM-DD HH:MM:SS' datetime"
        return None
    assert column.type == "VARCHAR" and column.length is not None, column
    size = len(value.encode("utf-8"))
    if size <= column.length:
        return None
    shown = repr(value) if len(value) <= 40 else f"{value[:40]!r}... ({len(value)} characters)"
    return f"{size} UTF-8 bytes > VARCHAR({column.length}): {shown}"


def test_value_check_accepts_loadable_values_and_rejects_the_others() -> None:
    int_col, double = Column("i", "INT", None, True), Column("d", "DOUBLE", None, False)
    date, when = Column("t", "DATE", None, False), Column("w", "DATETIME", None, False)
    text = Column("v", "VARCHAR", 4, False)
    good = [(int_col, 2**31 - 1), (double, 1), (double, 1.5), (double, None), (date, "2024-02-29"),
            (when, "2024-01-02 03:04:05"), (text, "ab\u00e9"), (text, None)]
    bad = [(int_col, None), (int_col, True), (int_col, 1.0), (int_col, "1"), (int_col, 2**31),
           (double, True), (double, "1.5"), (date, "20240102"), (date, "2023-02-29"),
           (date, "2024-1-02"), (when, "2024-01-02T03:04:05"), (when, "2024-01-02 03:04"),
           (when, "2024-01-02 03:04:05.123"), (text, "abcd\u00e9"), (text, 12)]
    assert [value_problem(c, v) for c, v in good] == [None] * len(good)
    assert all(value_problem(c, v) for c, v in bad), [(c.name, v) for c, v in bad
                                                       if not value_problem(c, v)]


# -- the archive's messages --------------------------------------------------------------------
#: Real files of pydicom's test data (all in ``valid_testdata()``), one per SOP Instance.
REAL_FILES = (
    "CT_small.dcm",  # CT, explicit VR little endian
    "MR_small.dcm",  # MR
    "ExplVR_BigEnd.dcm",  # US, explicit VR big endian (not the raw fast path)
    "emri_small.dcm",  # enhanced MR, 10 frames
    "color3d_jpeg_baseline.dcm",  # 120 frames, JPEG baseline, Latin-1
    "SC_rgb.dcm",  # secondary capture RGB, ISO_IR 192
    "JPEG2000.dcm",  # JPEG 2000
    "liver.dcm",  # segmentation, 3 frames
    "eCT_Supplemental.dcm",  # enhanced CT, 2 frames
    "reportsi_with_empty_number_tags.dcm",  # structured report, empty IS/DS values
    "waveform_ecg.dcm",  # waveform
    "gdcm-US-ALOKA-16.dcm",  # implicit VR little endian
)

#: Characters of four UTF-8 bytes (CJK extension B, as in real Japanese names).
WIDE = "\U00020bb7\U0002000b\U00020089"


def wide(count: int) -> str:
    return "".join(WIDE[i % len(WIDE)] for i in range(count))


def generated() -> list[Any]:
    """CT instances of varied content: character sets, numbers, dates, VR maximum lengths."""
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    full: dict[str, Any] = {
        "AccessionNumber": "ACC-0123456789AB",  # 16 characters (SH maximum)
        "PatientBirthDate": "19700101", "PatientSex": "F", "PatientAge": "054Y",
        "PatientSize": "1.68", "PatientWeight": "61.5", "PregnancyStatus": 4,
        "StudyID": "S1", "StudyDescription": "CT THORAX", "SeriesDate": "20240102",
        "SeriesTime": "101600.123456", "SeriesDescription": "AXIAL 1mm",
        "BodyPartExamined": "CHEST", "ProtocolName": "Thorax routine",
        "ContentDate": "20240102", "ContentTime": "101700",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "ImagePositionPatient": ["-125.000000", "-125.000000", "-1234.567890"],
        "SliceThickness": "1.25", "SpacingBetweenSlices": "1.25", "SliceLocation": "-1234.5",
        "RescaleIntercept": "-1024", "RescaleSlope": "1", "RescaleType": "HU",
        "WindowCenter": ["40", "400"], "WindowWidth": ["400", "1500"],
    }
    out = [
        make_ct(study, series, number=1, **full),
        make_ct(study, series, number=2, **full),  # a series of two
        make_ct(number=1, SpecificCharacterSet="ISO_IR 192",  # UTF-8, three groups
                PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう", PatientID="患者-42",
                StudyDescription="胸部 CT 造影", SeriesDescription="Élan — série 1",
                ProtocolName="Protocole thoracique"),
        make_ct(number=1, SpecificCharacterSet="ISO_IR 100",  # Latin-1, no dates at all
                PatientName="Müller^Jürgen", PatientID="", StudyDate="", StudyTime="",
                StudyDescription="Schädel nativ"),
        make_ct(number=1, SpecificCharacterSet="GB18030", PatientName="王^小明",
                StudyDescription="头部平扫"),
        make_ct(number=1, SpecificCharacterSet=["", "ISO 2022 IR 87"],  # ISO 2022 Japanese
                PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ]
    # every text attribute the archive publishes at its VR maximum length (PS3.5 6.2),
    # in four-byte UTF-8 characters where the VR allows more than the default repertoire
    out.append(make_ct(
        number=7, SpecificCharacterSet="ISO_IR 192",
        PatientID=wide(64), AccessionNumber=wide(16), StudyID=wide(16),
        PatientName="=".join(f"{wide(31)}^{wide(32)}" for _ in range(3)),
        StudyDescription=wide(64), SeriesDescription=wide(64), ProtocolName=wide(64),
        RescaleType=wide(64), RescaleIntercept="0", RescaleSlope="1",
        PatientSex="O", PatientAge="120Y", PatientBirthTime="235959.999999",
        StudyTime="235959.999999", SeriesTime="235959.999999", ContentTime="235959.999999",
        BodyPartExamined="ABCDEFGHIJKLMNOP", ImageType=["DERIVED", "SECONDARY", "OTHER", "X"],
        ImageOrientationPatient=["-0.999999999999"] * 6,
        ImagePositionPatient=["-1234567890.123"] * 3,
        WindowCenter=["-1234567890.123"] * 4, WindowWidth=["1234567890.1234"] * 4,
        PatientSize="9999999999999999", PatientWeight="-1.234567890e-99"))
    return out


def sent_through_stow() -> Any:
    return make_ct(number=1, PatientName="Stow^Only", AccessionNumber="STOW1")


def real_files() -> list[Path]:
    by_name = {s.path.name: s for s in valid_testdata()}
    missing = [name for name in REAL_FILES if name not in by_name]
    assert not missing, f"not in valid_testdata() (pydicom-data installed?): {missing}"
    chosen = [by_name[name] for name in REAL_FILES]
    assert len({s.sop_uid for s in chosen}) == len(chosen), "a SOP Instance UID repeats"
    return [s.path for s in chosen]


async def _read_topics(queue_url: str) -> dict[str, list[Mapping[str, Any]]]:
    """Every message of the three Doris topics, from the start (a group of its own that
    never commits: nothing of the archive's consumers moves)."""
    group = f"test-doris-{uuid.uuid4().hex}"
    out: dict[str, list[Mapping[str, Any]]] = {topic: [] for topic in TOPICS}
    async with LocalQueue(queue_url) as queue:
        for topic in TOPICS:
            while batch := await queue.fetch(topic, group, 500, 0):
                out[topic] += [m.body for m in batch]
    return out


def read_topics(archive: Archive) -> dict[str, list[Mapping[str, Any]]]:
    return asyncio.run(_read_topics(f"local://{archive.data_dir / 'queue.db'}"))


@dataclass(frozen=True)
class Sent:
    sop_uids: frozenset[str]
    series: frozenset[tuple[str, str]]  # (study, series)


@pytest.fixture(scope="module")
def published(archive: Archive) -> tuple[Sent, dict[str, list[Mapping[str, Any]]]]:
    """Store the instances, wait until every one is on the three topics; the messages."""
    import pydicom

    datasets = generated()
    paths = real_files()
    statuses = c_store(archive, [*datasets, *paths])
    codes = [int(s.Status) if "Status" in s else None for s in statuses]
    assert codes == [0] * len(statuses), f"C-STORE statuses: {codes}"
    stow = sent_through_stow()
    body, content_type = multipart([part10_bytes(stow)])
    response = httpx.post(f"{archive.url}/studies", content=body,
                          headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 200, response.text

    identities = [(str(d.StudyInstanceUID), str(d.SeriesInstanceUID), str(d.SOPInstanceUID))
                  for d in [*datasets, stow]]
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        identities.append((str(header.StudyInstanceUID), str(header.SeriesInstanceUID),
                           str(header.SOPInstanceUID)))
    sent = Sent(frozenset(i[2] for i in identities), frozenset(i[:2] for i in identities))

    def complete() -> dict[str, list[Mapping[str, Any]]] | None:
        found = read_topics(archive)
        logged = {m.get("sop_uid") for m in found["log_queue"]}
        images = {m.get("sop_uid") for m in found["dicom_image_queue"]}
        series = {(m.get("study_uid"), m.get("series_uid")) for m in found["dicom_state_queue"]}
        done = sent.sop_uids <= logged and sent.sop_uids <= images and sent.series <= series
        return found if done else None

    messages = wait_until(complete, timeout=60, interval=0.3,
                          message="every instance on log_queue and dicom_image_queue, "
                                  "every series on dicom_state_queue")
    return sent, messages


def problems(topic: str, messages: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """Every way a message of ``topic`` would not load into its Doris table unchanged."""
    load = load_of_topic(topic)
    table = tables()[load.table]
    expected = set(load.columns)
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            yield f"{topic}[{index}]: body is {type(message).__name__}, not a JSON object"
            continue
        where = f"{topic}[{index}] ({message.get('sop_uid') or message.get('series_uid')})"
        keys = set(message)
        if keys != expected:
            yield (f"{where}: keys differ from COLUMNS of {load.job}: extra "
                   f"{sorted(keys - expected)}, missing {sorted(expected - keys)}")
        for name in sorted(keys & expected):
            if (why := value_problem(table.column(name), message[name])) is not None:
                yield f"{where}: {table.name}.{name}: {why}"


def _check_topic(topic: str, published: tuple[Sent, dict[str, list[Mapping[str, Any]]]]) -> None:
    _, messages = published
    assert messages[topic], f"no message on {topic}"
    found = sorted(set(problems(topic, messages[topic])))
    assert not found, f"{len(found)} problem(s) on {topic}:\n" + "\n".join(found)


def test_every_log_queue_message_is_an_object_row_loadable_into_dicom_object_meta(
        published: tuple[Sent, dict[str, list[Mapping[str, Any]]]]) -> None:
    _check_topic("log_queue", published)


def test_every_dicom_state_queue_message_is_loadable_into_dicom_state_meta(
        published: tuple[Sent, dict[str, list[Mapping[str, Any]]]]) -> None:
    _check_topic("dicom_state_queue", published)


def test_every_dicom_image_queue_message_is_loadable_into_dicom_image_meta(
        published: tuple[Sent, dict[str, list[Mapping[str, Any]]]]) -> None:
    _check_topic("dicom_image_queue", published)


def test_log_queue_has_one_row_per_reception_and_every_instance_and_series_is_published(
        published: tuple[Sent, dict[str, list[Mapping[str, Any]]]]) -> None:
    sent, messages = published
    logged = [m["sop_uid"] for m in messages["log_queue"]]
    assert sorted(logged) == sorted(sent.sop_uids), "one log_queue row per reception"
    images = {m["sop_uid"] for m in messages["dicom_image_queue"]}
    assert images == set(sent.sop_uids)
    series = {(m["study_uid"], m["series_uid"]) for m in messages["dicom_state_queue"]}
    assert series == set(sent.series)
