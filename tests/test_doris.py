"""The Apache Doris feed (migrations/doris/*.sql) against the messages the archive publishes.

Two parts:

1. the SQL itself, read by a small parser of this module: every routine load targets a
   defined table, its COLUMNS list is exactly the table's columns (plus the column of its
   PRECEDING FILTER, which picks its kind of message on a topic that carries several), key
   columns come first and are NOT NULL, no trailing comma, and the known defects of the
   reference DDL (DESIGN.md "Apache Doris") are fixed;
2. a real archive (embedded defaults) receives instances of varied content (generated CTs in
   several character sets, some at the VR maximum lengths, and real files of pydicom's test
   data: multi-frame, big endian, compressed, SR, waveform, segmentation) by C-STORE and
   STOW-RS, and answers DICOMweb requests (QIDO-RS, WADO-RS metadata, frames, rendered, a
   404, hostile-looking UIDs and User-Agent) and a C-ECHO; every message of ``log_queue``
   (object rows and access events, told apart by ``log_type``), ``dicom_state_queue`` and
   ``dicom_image_queue`` is then read back from ``queue.db`` and must be taken by exactly
   one routine load and load into its Doris table unchanged: the keys are exactly that
   load's COLUMNS, each value fits its column's type.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import re
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from dicomcloud.accesslog import AccessEvent
from dicomcloud.backends.localqueue import LocalQueue
from dicomcloud.model import DicomImageMeta, DicomStateMeta, StoredObject
from tests.support import (
    ROOT,
    Archive,
    c_store,
    echo,
    make_ct,
    multipart,
    part10_bytes,
    valid_testdata,
    wait_until,
)

DORIS = ROOT / "migrations" / "doris"
TABLES_SQL = DORIS / "01_tables.sql"
LOADS_SQL = DORIS / "02_routine_load.sql"

#: DESIGN.md "Apache Doris" (and the access log, accesslog.py): table, key kind, key
#: columns, source topic, kind of message taken (its log_type; None: every message).
DESIGN = {
    "dicom_object_meta": ("DUPLICATE", ("tenant_id", "patient_id", "study_uid", "series_uid",
                                        "sop_uid"), "log_queue", "object"),
    "dicom_state_meta": ("UNIQUE", ("tenant_id", "patient_id", "study_uid", "series_uid"),
                         "dicom_state_queue", None),
    "dicom_image_meta": ("UNIQUE", ("tenant_id", "patient_id", "study_uid", "series_uid",
                                    "sop_uid"), "dicom_image_queue", None),
    "dicom_access_log": ("DUPLICATE", ("event_time", "tenant_id"), "log_queue", "access"),
}
#: Where a topic carries several kinds of message, the key that tells them apart.
KIND_KEY = "log_type"
#: The keys of each kind of message body, in order: (topic, kind) -> keys. Object rows are
#: StoredObject (model.py) plus log_type (ingest.py); access events are AccessEvent.body().
BODIES: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("log_queue", "object"): (*StoredObject.__dataclass_fields__, KIND_KEY),
    ("log_queue", "access"): tuple(AccessEvent.__dataclass_fields__),
    ("dicom_state_queue", None): tuple(DicomStateMeta.__dataclass_fields__),
    ("dicom_image_queue", None): tuple(DicomImageMeta.__dataclass_fields__),
}
TOPICS = tuple(dict.fromkeys(topic for topic, _ in BODIES))

INT_RANGE = (-(2**31), 2**31 - 1)
BIGINT_RANGE = (-(2**63), 2**63 - 1)


# -- a small parser for the Doris DDL ---------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str
    type: str  # upper case, e.g. "VARCHAR", "INT", "DATETIME"
    length: int | None  # n of VARCHAR(n)
    not_null: bool
    precision: int = 0  # digits of fractional seconds: p of DATETIME(p)


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
    #: PRECEDING FILTER column = 'value' or ifnull(column, 'missing') = 'value' (the only
    #: forms this module reads), or None
    preceding_filter: tuple[str, str] | None = None
    #: the ifnull default: the kind of a message without the column (from older versions)
    missing: str | None = None

    @property
    def topic(self) -> str:
        return self.kafka["kafka_topic"]

    @property
    def kind(self) -> str | None:
        """The kind of message the load takes (its filter's value); None: all of them."""
        return self.preceding_filter[1] if self.preceding_filter else None

    def takes(self, message: Mapping[str, Any]) -> bool:
        """Whether Doris loads ``message`` (from this load's topic) with this job: the
        filter column = 'value' is true (a missing key is NULL: not taken)."""
        if self.preceding_filter is None:
            return True
        column, value = self.preceding_filter
        found = message.get(column)
        return (self.missing if found is None else found) == value


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
_PRECEDING_FILTER = re.compile(  # up to a comma outside parentheses, or the next part
    r"\bPRECEDING\s+FILTER\s+((?:[^,()]|\([^()]*\))*?)\s*(?:,|\bPROPERTIES\b|\bFROM\b)", re.I)
_EQUALS_TEXT = re.compile(r"(`\w+`|\w+)\s*=\s*'([^'\\]*)'")
_IFNULL_EQUALS = re.compile(
    r"ifnull\(\s*(`\w+`|\w+)\s*,\s*'([^'\\]*)'\s*\)\s*=\s*'([^'\\]*)'", re.I)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_FILTERS = re.compile(r"\b(?:WHERE|DELETE\s+ON|PRECEDING\s+FILTER)\b", re.I)


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
        kind = parts.group(2).upper()
        size = int(parts.group(3)) if parts.group(3) else None
        precision = 0
        if kind == "DATETIME":  # DATETIME(p): p digits of fractional seconds, not a length
            precision, size = size or 0, None
        columns.append(Column(identifier(parts.group(1)), kind, size,
                              bool(re.search(r"\bNOT\s+NULL\b", rest)), precision))
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
    # the load properties between COLUMNS(...) and PROPERTIES/FROM KAFKA: this module reads
    # one filter, PRECEDING FILTER column = 'text'; anything else it would not check
    head = _QUOTED.sub("''", statement[:statement.upper().find(" FROM KAFKA")])
    clauses = [m.group(0).upper() for m in _FILTERS.finditer(head)]
    assert clauses in ([], ["PRECEDING FILTER"]), \
        f"routine load {match.group(1)}: filters {clauses} (this test reads one PRECEDING FILTER)"
    preceding_filter: tuple[str, str] | None = None
    missing: str | None = None
    if clauses:
        filter_match = _PRECEDING_FILTER.search(statement)
        assert filter_match, f"routine load {match.group(1)}: cannot read its PRECEDING FILTER"
        if ifnull := _IFNULL_EQUALS.fullmatch(filter_match.group(1)):
            preceding_filter = (identifier(ifnull.group(1)), ifnull.group(3))
            missing = ifnull.group(2)
        else:
            equals = _EQUALS_TEXT.fullmatch(filter_match.group(1))
            assert equals, f"routine load {match.group(1)}: PRECEDING FILTER " \
                           f"{filter_match.group(1)!r} is not column = 'text'"
            preceding_filter = (identifier(equals.group(1)), equals.group(2))
    kafka_match = _KAFKA.search(statement)
    assert kafka_match, f"routine load {match.group(1)} has no FROM KAFKA (...)"
    kafka: dict[str, str] = {}
    for item in split_top(parenthesised(statement, kafka_match.end() - 1)[0], ","):
        prop = _PROPERTY.match(item)
        assert prop, f"routine load {match.group(1)}: cannot read property {item!r}"
        kafka[prop.group(1)] = prop.group(2)
    return RoutineLoad(identifier(match.group(1)), identifier(match.group(2)), columns, kafka,
                       preceding_filter, missing)


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


def load_of(topic: str, kind: str | None = None) -> RoutineLoad:
    """The routine load of ``topic`` taking messages of ``kind`` (None: the topic's only one)."""
    matching = [load for load in routine_loads() if load.topic == topic and load.kind == kind]
    assert len(matching) == 1, f"{len(matching)} routine loads read {kind or 'all'} " \
                               f"messages of topic {topic}"
    return matching[0]


def loads_taking(topic: str, message: Mapping[str, Any]) -> list[RoutineLoad]:
    """The routine loads that load ``message`` of ``topic`` (exactly one, or it is lost or
    loaded twice)."""
    return [load for load in routine_loads() if load.topic == topic and load.takes(message)]


# -- the parser on its own ---------------------------------------------------------------------
def test_parser_reads_backquotes_comments_types_keys_and_kafka_properties() -> None:
    sql = """
    -- a comment; with a semicolon
    CREATE TABLE IF NOT EXISTS db.t (  -- trailing comment
        a VARCHAR(10) NOT NULL,
        `rows` INT,
        c DECIMAL(10, 2) NULL,
        d DATETIME,
        e DATETIME(3) NOT NULL
    )
    UNIQUE KEY(a)
    PROPERTIES ("x" = "a--b;c");
    """
    (statement,) = statements(sql)
    table = parse_table(statement)
    assert table.name == "t"
    assert table.columns == (Column("a", "VARCHAR", 10, True), Column("rows", "INT", None, False),
                             Column("c", "DECIMAL", 10, False),
                             Column("d", "DATETIME", None, False),
                             Column("e", "DATETIME", None, True, 3))
    assert (table.key_kind, table.key) == ("UNIQUE", ("a",))
    (statement,) = statements("""CREATE ROUTINE LOAD j ON t COLUMNS(a, `rows`)
        PROPERTIES ("format" = "json") FROM KAFKA ("kafka_topic" = "topic_x",
        "property.group.id" = "g");""")
    load = parse_routine_load(statement)
    assert (load.table, load.columns, load.topic) == ("t", ("a", "rows"), "topic_x")
    assert (load.preceding_filter, load.kind) == (None, None)
    assert load.takes({}) and load.takes({"a": 1})
    (statement,) = statements("""CREATE ROUTINE LOAD j ON t COLUMNS(a, `kind`),
        PRECEDING FILTER `kind` = 'x' PROPERTIES ("format" = "json", "where" = "WHERE")
        FROM KAFKA ("kafka_topic" = "topic_x");""")
    load = parse_routine_load(statement)
    assert (load.columns, load.preceding_filter, load.kind) == (("a", "kind"), ("kind", "x"), "x")
    assert load.takes({"kind": "x"})
    assert not load.takes({"kind": "y"}) and not load.takes({"kind": None}) and not load.takes({})
    (statement,) = statements("""CREATE ROUTINE LOAD j ON t COLUMNS(a, kind),
        PRECEDING FILTER ifnull(kind, 'x') = 'x' FROM KAFKA ("kafka_topic" = "topic_x");""")
    load = parse_routine_load(statement)
    assert (load.preceding_filter, load.missing) == (("kind", "x"), "x")
    assert load.takes({"kind": "x"}) and load.takes({}) and load.takes({"kind": None})
    assert not load.takes({"kind": "y"})


def test_parser_rejects_filters_it_would_not_check() -> None:
    for clause in ("WHERE a = 'x'", "PRECEDING FILTER a > 1", "PRECEDING FILTER a = 'x' OR b",
                   "PRECEDING FILTER a = 'x', WHERE b = 'y'"):
        with pytest.raises(AssertionError, match=r"PRECEDING FILTER"):
            parse_routine_load(f"CREATE ROUTINE LOAD j ON t COLUMNS(a, b), {clause} "
                               f'FROM KAFKA ("kafka_topic" = "x")')


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


def test_tables_sql_defines_the_design_tables_with_their_key_kind_and_key_columns() -> None:
    defined = tables()
    assert set(defined) == set(DESIGN)
    for name, (kind, key, _, _) in DESIGN.items():
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
            assert column.length is None or 1 <= column.length <= 65533, column  # Doris limit
            assert 0 <= column.precision <= (6 if column.type == "DATETIME" else 0), column


def test_each_routine_load_targets_a_defined_table_and_each_kind_of_message_has_one_load() -> None:
    loads = routine_loads()
    assert len(loads) == len(DESIGN)
    assert len({load.job for load in loads}) == len(loads), "duplicate routine load job name"
    for load in loads:
        assert load.table in tables(), f"{load.job} loads undefined table {load.table}"
    for name, (_, _, topic, kind) in DESIGN.items():
        assert load_of(topic, kind).table == name
    assert {(load.topic, load.kind) for load in loads} == set(BODIES)


def test_loads_sharing_a_topic_split_it_by_log_type_each_with_a_consumer_group_of_its_own() -> None:
    loads = routine_loads()
    groups = [load.kafka.get("property.group.id") for load in loads]
    assert None not in groups and len(set(groups)) == len(groups), groups
    for topic in TOPICS:
        sharing = [load for load in loads if load.topic == topic]
        if len(sharing) == 1:
            assert sharing[0].preceding_filter is None, sharing[0]  # the whole topic
            continue
        # each takes one kind, chosen before the mapping (a message of another kind is an
        # unselected row, not an error), and together they take every kind of the topic
        assert all(load.preceding_filter and load.preceding_filter[0] == KIND_KEY
                   for load in sharing), sharing
        kinds = [load.kind for load in sharing]
        assert len(set(kinds)) == len(kinds), f"{topic}: two loads take {kinds}"
        assert set(kinds) == {kind for t, kind in BODIES if t == topic}


def test_routine_load_columns_are_exactly_the_columns_of_its_table_and_its_filter() -> None:
    for load in routine_loads():
        table = tables()[load.table]
        assert len(load.columns) == len(set(load.columns)), f"{load.job}: duplicate column"
        table_columns = {c.name for c in table.columns}
        # the filter column is read from the message to pick it, never stored
        source_only = {load.preceding_filter[0]} if load.preceding_filter else set()
        assert not source_only & table_columns, f"{load.job}: filter on a table column"
        assert source_only <= set(load.columns), f"{load.job}: filter column not in COLUMNS"
        unknown = set(load.columns) - table_columns - source_only
        assert not unknown, f"{load.job}: COLUMNS not in {table.name}: {sorted(unknown)}"
        unlisted = table_columns - set(load.columns)
        assert not unlisted, f"{load.job}: {table.name} columns never loaded: {sorted(unlisted)}"


def test_routine_load_columns_are_the_keys_of_the_message_body_it_takes() -> None:
    for (topic, kind), keys in BODIES.items():
        assert load_of(topic, kind).columns == keys, f"{topic} {kind or ''}"


def test_reference_ddl_defects_are_fixed_rows_columns_no_width_series_related_instances() -> None:
    image = {c.name for c in tables()["dicom_image_meta"].columns}
    assert {"rows", "columns"} <= image
    assert "width" not in image and "height" not in image
    state = tables()["dicom_state_meta"]
    assert "series_related_instances" in {c.name for c in state.columns}
    assert "series_related_instances" in load_of("dicom_state_queue").columns


# -- values against column types ---------------------------------------------------------------
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.(\d{1,6}))?")


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
        shape = "YYYY-MM-DD HH:MM:SS" + (f"[.{'f' * column.precision}]"
                                         if column.precision else "")
        try:
            if not (match := _DATETIME.fullmatch(value)):
                raise ValueError
            fraction = match.group(1)
            if fraction is not None and len(fraction) > column.precision:
                raise ValueError  # Doris would round it: not loaded unchanged
            dt.datetime.strptime(value, "%Y-%m-%d %H:%M:%S" + (".%f" if fraction else ""))
        except ValueError:
            return f"{value!r} is not a '{shape}' datetime"
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
    when_ms = Column("m", "DATETIME", None, True, 3)
    text = Column("v", "VARCHAR", 4, False)
    good = [(int_col, 2**31 - 1), (double, 1), (double, 1.5), (double, None), (date, "2024-02-29"),
            (when, "2024-01-02 03:04:05"), (text, "ab\u00e9"), (text, None),
            (when_ms, "2024-01-02 03:04:05.123"), (when_ms, "2024-01-02 03:04:05.1"),
            (when_ms, "2024-01-02 03:04:05")]
    bad = [(int_col, None), (int_col, True), (int_col, 1.0), (int_col, "1"), (int_col, 2**31),
           (double, True), (double, "1.5"), (date, "20240102"), (date, "2023-02-29"),
           (date, "2024-1-02"), (when, "2024-01-02T03:04:05"), (when, "2024-01-02 03:04"),
           (when, "2024-01-02 03:04:05.123"), (text, "abcd\u00e9"), (text, 12),
           (when_ms, None), (when_ms, "2024-01-02 03:04:05.1234"),
           (when_ms, "2024-01-02T03:04:05.123"), (when_ms, "2024-01-02 03:04:05."),
           (when_ms, "2024-01-02 24:04:05.123"), (when_ms, "2024-01-02 03:04:05.123Z")]
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


#: User-Agent of this module's DICOMweb requests: the prefix, then the request's name and ";".
AGENT = f"test-doris-{uuid.uuid4().hex[:8]}/"
#: Matches event_time as the archive writes it (accesslog.event_time).
_EVENT_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}")


@dataclass(frozen=True)
class Sent:
    sop_uids: frozenset[str]
    series: frozenset[tuple[str, str]]  # (study, series)
    web: Mapping[str, int]  # name of each marked DICOMweb request -> HTTP status answered
    started: dt.datetime  # UTC, before the first access
    ended: dt.datetime  # UTC, after the last


def agent(name: str, extra: bytes = b"") -> bytes:
    return f"{AGENT}{name};".encode() + extra


def request_name(event: Mapping[str, Any]) -> str | None:
    """The name of the marked request an access event records (None: not ours)."""
    user_agent = event.get("user_agent")
    if not isinstance(user_agent, str) or not user_agent.startswith(AGENT):
        return None
    return user_agent[len(AGENT):].split(";", 1)[0]


def access_events(messages: dict[str, list[Mapping[str, Any]]]) -> list[Mapping[str, Any]]:
    return [m for m in messages["log_queue"] if m.get(KIND_KEY) == "access"]


def object_rows(messages: dict[str, list[Mapping[str, Any]]]) -> list[Mapping[str, Any]]:
    return [m for m in messages["log_queue"] if m.get(KIND_KEY) == "object"]


def dicomweb_requests(archive: Archive, study: str, multiframe: tuple[str, str, str]) -> dict[
        str, int]:
    """DICOMweb requests of several routes, each marked by its User-Agent; their statuses."""
    instance = "/studies/{}/series/{}/instances/{}".format(*multiframe)
    octets = 'multipart/related; type="application/octet-stream"'
    requests: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
        "qido-studies": (f"{archive.url}/studies", {"PatientName": "Stow^Only"}, {}),
        "qido-tenant-series": (f"{archive.base}/tenants/default/dicomweb/series",
                               {"limit": "5"}, {}),
        "wado-metadata": (f"{archive.url}/studies/{study}/metadata", {}, {}),
        "wado-frames": (f"{archive.url}{instance}/frames/1,2", {}, {"Accept": octets}),
        "wado-rendered-frame": (f"{archive.url}{instance}/frames/1/rendered", {},
                                {"Accept": "image/jpeg"}),
        "missing-404": (f"{archive.url}/studies/1.2.826.0.1.3680043.2.1143.404/metadata", {},
                        {}),
        # a path UID is logged as sent, cut to 64 characters: here 4 UTF-8 bytes each
        "wide-uid": (f"{archive.url}/studies/{quote(WIDE * 30)}/metadata", {}, {}),
    }
    statuses: dict[str, int] = {}
    with httpx.Client(timeout=60) as client:
        for name, (url, params, headers) in requests.items():
            response = client.get(url, params=params,
                                  headers={**headers, "User-Agent": agent(name).decode()})
            statuses[name] = response.status_code
        # the header is read as Latin-1: each byte one character of up to 2 UTF-8 bytes,
        # cut to 256 characters
        name = "wide-user-agent"
        response = client.get(f"{archive.url}/studies", params={"limit": "1"},
                              headers={"User-Agent": agent(name, "é".encode() * 300)})
        statuses[name] = response.status_code
    assert statuses["missing-404"] == 404, statuses
    assert statuses["qido-studies"] == statuses["wado-metadata"] == 200, statuses
    assert statuses["wado-frames"] == 200, statuses
    return statuses


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@pytest.fixture(scope="module")
def published(archive: Archive) -> tuple[Sent, dict[str, list[Mapping[str, Any]]]]:
    """Store the instances, make DICOMweb requests and associations, wait until every
    instance and access is on the topics; the messages."""
    import pydicom

    started = _utcnow()
    datasets = generated()
    paths = real_files()
    statuses = c_store(archive, [*datasets, *paths])
    codes = [int(s.Status) if "Status" in s else None for s in statuses]
    assert codes == [0] * len(statuses), f"C-STORE statuses: {codes}"
    stow = sent_through_stow()
    body, content_type = multipart([part10_bytes(stow)])
    response = httpx.post(f"{archive.url}/studies", content=body, timeout=60,
                          headers={"Content-Type": content_type, "User-Agent": agent("stow")})
    assert response.status_code == 200, response.text

    identities = [(str(d.StudyInstanceUID), str(d.SeriesInstanceUID), str(d.SOPInstanceUID))
                  for d in [*datasets, stow]]
    multiframe: tuple[str, str, str] | None = None
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        identities.append((str(header.StudyInstanceUID), str(header.SeriesInstanceUID),
                           str(header.SOPInstanceUID)))
        if path.name == "emri_small.dcm":  # 10 frames, uncompressed
            multiframe = identities[-1]
    assert multiframe is not None
    web = {"stow": response.status_code,
           **dicomweb_requests(archive, identities[0][0], multiframe)}
    assert echo(archive), "C-ECHO failed"
    ended = _utcnow()
    sent = Sent(frozenset(i[2] for i in identities), frozenset(i[:2] for i in identities),
                web, started, ended)

    def complete() -> dict[str, list[Mapping[str, Any]]] | None:
        found = read_topics(archive)
        logged = {m.get("sop_uid") for m in object_rows(found)}
        images = {m.get("sop_uid") for m in found["dicom_image_queue"]}
        series = {(m.get("study_uid"), m.get("series_uid")) for m in found["dicom_state_queue"]}
        access = access_events(found)
        named = {request_name(m) for m in access}
        dimse = {service for m in access if m.get("protocol") == "DIMSE"
                 for service in str(m.get("service")).split(",")}
        done = (sent.sop_uids <= logged and sent.sop_uids <= images and sent.series <= series
                and set(sent.web) <= named and {"C-STORE", "C-ECHO"} <= dimse)
        return found if done else None

    messages = wait_until(complete, timeout=60, interval=0.3,
                          message="every instance on log_queue (object rows) and "
                                  "dicom_image_queue, every series on dicom_state_queue, every "
                                  "DICOMweb request and association on log_queue (access events)")
    return sent, messages


def problems(topic: str, messages: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """Every way a message of ``topic`` would not load into its Doris table unchanged: it
    must be taken by exactly one routine load, carry exactly that load's COLUMNS, and each
    value must fit its column (the filter column is no table column: taken is enough)."""
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            yield f"{topic}[{index}]: body is {type(message).__name__}, not a JSON object"
            continue
        where = (f"{topic}[{index}] ({message.get(KIND_KEY) or ''} "
                 f"{message.get('sop_uid') or message.get('series_uid') or message.get('route')})")
        taking = loads_taking(topic, message)
        if len(taking) != 1:
            yield (f"{where}: taken by {len(taking)} routine loads "
                   f"({', '.join(load.job for load in taking)}), not one")
            continue
        (load,) = taking
        table = tables()[load.table]
        expected = set(load.columns)
        keys = set(message)
        if keys != expected:
            yield (f"{where}: keys differ from COLUMNS of {load.job}: extra "
                   f"{sorted(keys - expected)}, missing {sorted(expected - keys)}")
        stored = {c.name for c in table.columns}
        for name in sorted(keys & expected & stored):
            if (why := value_problem(table.column(name), message[name])) is not None:
                yield f"{where}: {table.name}.{name}: {why}"


def _check(topic: str, messages: Sequence[Mapping[str, Any]]) -> None:
    assert messages, f"no message on {topic}"
    found = sorted(set(problems(topic, messages)))
    assert not found, f"{len(found)} problem(s) on {topic}:\n" + "\n".join(found)


def test_every_log_queue_message_is_taken_by_one_load_and_loadable_into_its_table(
        published: tuple[Sent, dict[str, list[Mapping[str, Any]]]]) -> None:
    _, messages = published
    _check("log_queue", messages["log_queue"])
    kinds = {m.get(KIND_KEY) for m in messages["log_queue"]}
    assert kinds == {"object", "access"}, kinds


def test_every_dicom_state_queue_message_is_loadable_into_dicom_state_meta(
        published: tuple[Sent, dict[str, list[Mapping[str, Any]]]]) -> None:
    _check("dicom_state_queue", published[1]["dicom_state_queue"])


def test_every_dicom_image_queue_message_is_loadable_into_dicom_image_meta(
        published: tuple[Sent, dict[str, list[Mapping[str, Any]]]]) -> None:
    _check("dicom_image_queue", published[1]["dicom_image_queue"])


def test_log_queue_has_one_object_row_per_reception_and_every_instance_and_series_is_published(
        published: tuple[Sent, dict[str, list[Mapping[str, Any]]]]) -> None:
    sent, messages = published
    objects = object_rows(messages)
    assert all(loads_taking("log_queue", m) == [load_of("log_queue", "object")]
               for m in objects)
    logged = [m["sop_uid"] for m in objects]
    assert sorted(logged) == sorted(sent.sop_uids), "one log_queue object row per reception"
    images = {m["sop_uid"] for m in messages["dicom_image_queue"]}
    assert images == set(sent.sop_uids)
    series = {(m["study_uid"], m["series_uid"]) for m in messages["dicom_state_queue"]}
    assert series == set(sent.series)


def test_access_events_of_dicomweb_requests_and_associations_load_into_dicom_access_log(
        published: tuple[Sent, dict[str, list[Mapping[str, Any]]]]) -> None:
    sent, messages = published
    access = access_events(messages)
    load = load_of("log_queue", "access")
    assert load.table == "dicom_access_log"
    assert all(loads_taking("log_queue", m) == [load] for m in access)
    _check("log_queue", access)

    def in_time(event: Mapping[str, Any]) -> bool:
        text = str(event["event_time"])  # UTC, milliseconds
        if not _EVENT_TIME.fullmatch(text):
            return False
        moment = dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f")
        slack = dt.timedelta(seconds=2)
        return sent.started - slack <= moment <= sent.ended + slack

    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for event in access:
        if (name := request_name(event)) is not None:
            by_name.setdefault(name, []).append(event)
    assert set(by_name) == set(sent.web)
    for name, status in sent.web.items():
        (event,) = by_name[name]
        assert (event["protocol"], event["tenant_id"], event["status"]) == (
            "DICOMweb", "default", status), (name, event)
        assert event["method"] == ("POST" if name == "stow" else "GET"), (name, event)
        assert in_time(event), (name, event["event_time"], sent.started, sent.ended)
    assert by_name["stow"][0]["service"] == "STOW-RS"
    assert by_name["qido-studies"][0]["route"] == "/studies"
    assert by_name["qido-tenant-series"][0]["service"] == "QIDO-RS"
    frames = by_name["wado-frames"][0]
    assert frames["service"] == "WADO-RS"
    assert frames["route"] == "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}"
    assert frames["bytes_out"] > 0 and frames["duration_ms"] >= 0
    assert by_name["wado-rendered-frame"][0]["route"].endswith("/frames/{frames}/rendered")

    dimse = [m for m in access if m["protocol"] == "DIMSE"]
    stores = [m for m in dimse if "C-STORE" in m["service"].split(",")]
    echoes = [m for m in dimse if "C-ECHO" in m["service"].split(",")]
    assert stores and echoes, [m["service"] for m in dimse]
    for event in (*stores, *echoes):
        assert (event["route"], event["status"], event["calling_ae"], event["called_ae"]) == (
            "association", 0, "PYTEST", "DICOMCLOUD"), event
        assert event["operations"] >= 1 and event["bytes_in"] > 0, event
        assert in_time(event), event["event_time"]
    assert sum(m["operations"] for m in stores) >= len(sent.sop_uids) - 1  # one by STOW-RS


def _raw_get(port: int, request_line: bytes, user_agent: bytes) -> bytes:
    """Send one HTTP/1.1 request as given; the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request_line + b"\r\nHost: 127.0.0.1\r\nUser-Agent: " + user_agent
                     + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


def test_access_events_of_requests_with_a_long_method_or_tenant_still_load(
        archive_factory: Any) -> None:
    archive = archive_factory("hostile")
    lines = {"long-method": b"GET" + b"X" * 200 + b" /dicomweb/studies HTTP/1.1",
             "long-tenant": b"GET /tenants/" + b"t" * 200 + b"/dicomweb/studies HTTP/1.1"}
    for name, line in lines.items():
        assert _raw_get(archive.http_port, line, agent(name)).startswith(b"HTTP/1.1 4")

    def recorded() -> list[Mapping[str, Any]] | None:
        events = [m for m in access_events(read_topics(archive)) if request_name(m) in lines]
        return events if len(events) == len(lines) else None

    events = wait_until(recorded, timeout=30, interval=0.3, message="both access events")
    _check("log_queue", events)
