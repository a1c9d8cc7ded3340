"""Contract of the ``Index`` port, run against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
from collections.abc import Iterable
from typing import Any

import pytest
import sqlalchemy as sa

from dicomcloud.backends import sqlschema
from dicomcloud.backends.sqlindex import SqlIndex
from dicomcloud.model import IndexedInstance, SeriesRef, utcnow
from dicomcloud.query import Level, Query, parse_qido
from tests.contract.conftest import TENANT, make_instance
from tests.factories import new_uid

FUTURE = dt.timedelta(seconds=30)


def query(level: Level, *params: tuple[str, str], tenant: str = TENANT,
          study_uid: str | None = None, series_uid: str | None = None) -> Query:
    parsed, _ = parse_qido(tenant, level, params, study_uid=study_uid, series_uid=series_uid,
                           default_limit=100, max_limit=1000)
    return parsed


def ref(item: IndexedInstance) -> SeriesRef:
    e = item.event
    return SeriesRef(e.tenant_id, e.study_uid, e.series_uid)


def column(rows: Iterable[dict[str, Any]], name: str) -> list[Any]:
    return [r[name] for r in rows]


async def related(index: SqlIndex, series: SeriesRef) -> int | None:
    rows = await index.series_state([series])
    return rows[0]["series_related_instances"] if rows else None


# -- apply ------------------------------------------------------------------------------
async def test_apply_is_idempotent(index: SqlIndex) -> None:
    study, series = new_uid(), new_uid()
    items = [make_instance(study, series, instance_number=n) for n in (1, 2, 3)]
    first, _ = await index.apply(items)
    again, orphans = await index.apply(items)
    assert first == again == [ref(items[0])]
    assert orphans == []
    assert await index.count_instances() == 3
    assert await related(index, ref(items[0])) == 3
    rows = await index.search(query("instance", study_uid=study))
    assert sorted(column(rows, "sop_uid")) == sorted(i.event.sop_uid for i in items)


async def test_apply_collapses_duplicates_within_a_batch(index: SqlIndex) -> None:
    study, series, sop = new_uid(), new_uid(), new_uid()
    older = make_instance(study, series, sop, instance_number=1)
    newer = make_instance(study, series, sop, instance_number=7)
    await index.apply([older, newer])
    rows = await index.instances(TENANT, study)
    assert [(r.sop_uid, r.instance_number) for r in rows] == [(sop, 7)]
    assert await related(index, ref(older)) == 1


async def test_apply_returns_the_touched_series_recounted(index: SqlIndex) -> None:
    study = new_uid()
    a, b = new_uid(), new_uid()
    items = [make_instance(study, a, instance_number=n) for n in range(1, 5)]
    items += [make_instance(study, b, instance_number=n, series_number=2) for n in (1, 2)]
    touched, orphans = await index.apply(items)
    assert set(touched) == {SeriesRef(TENANT, study, a), SeriesRef(TENANT, study, b)}
    assert len(touched) == 2
    assert orphans == []
    states = {r["series_uid"]: r for r in await index.series_state(touched)}
    assert states[a]["series_related_instances"] == 4
    assert states[b]["series_related_instances"] == 2
    # A later batch touching one series returns only that one, counted in full.
    extra = make_instance(study, b, instance_number=3, series_number=2)
    touched, _ = await index.apply([extra])
    assert touched == [SeriesRef(TENANT, study, b)]
    assert await related(index, touched[0]) == 3


async def test_concurrent_writers_of_one_series_lose_no_count(index: SqlIndex,
                                                              index_url: str) -> None:
    """Two consumers (two connections) writing the same series at once, with overlapping
    re-deliveries in opposite orders: every instance is counted once, nothing deadlocks."""
    study, series = new_uid(), new_uid()
    items = [make_instance(study, series, instance_number=n) for n in range(60)]

    async def consumer(batches: list[list[IndexedInstance]]) -> None:
        async with SqlIndex(index_url, auto_migrate=False) as other:
            for batch in batches:
                await other.apply(batch)

    forward = [items[i:i + 6] for i in range(0, 60, 6)]
    backward = [list(reversed(items[i:i + 9])) for i in range(0, 60, 9)][::-1]
    await asyncio.gather(consumer(forward), consumer(backward))
    assert await related(index, ref(items[0])) == 60
    assert await index.count_instances() == 60


async def test_instance_resent_under_another_series_moves(index: SqlIndex) -> None:
    study, old_series = new_uid(), new_uid()
    moving = make_instance(study, old_series, instance_number=1)
    staying = make_instance(study, old_series, instance_number=2)
    await index.apply([moving, staying])
    old_path = moving.event.file_path

    other_study, new_series = new_uid(), new_uid()
    moved = make_instance(other_study, new_series, moving.event.sop_uid)
    touched, orphans = await index.apply([moved])
    assert touched == [SeriesRef(TENANT, other_study, new_series)]
    assert orphans == [old_path]
    assert await related(index, ref(moving)) == 1
    assert await related(index, ref(moved)) == 1
    assert await index.previous_path(TENANT, moving.event.sop_uid) == moved.event.file_path
    assert await index.count_instances() == 2

    # The last instance leaves too: the old series disappears everywhere.
    _, orphans = await index.apply([make_instance(other_study, new_series,
                                                  staying.event.sop_uid)])
    assert orphans == [staying.event.file_path]
    assert await index.series_state([ref(moving)]) == []
    assert await index.search(query("series", study_uid=study)) == []
    due = await index.due_series(utcnow() + FUTURE, 5, 100)
    assert {t.series_uid for t in due} == {new_series}
    assert await related(index, ref(moved)) == 2


async def test_resending_to_the_same_series_leaves_no_orphan(index: SqlIndex) -> None:
    item = make_instance(new_uid(), new_uid())
    await index.apply([item])
    _, orphans = await index.apply([item])
    assert orphans == []


async def test_instances_and_previous_path(index: SqlIndex) -> None:
    study, a, b = new_uid(), new_uid(), new_uid()
    items = [make_instance(study, s, instance_number=n) for s in (a, b) for n in (3, 1, 2)]
    await index.apply(items)
    rows = await index.instances(TENANT, study)
    assert len(rows) == 6
    assert [r.series_uid for r in rows] == sorted(r.series_uid for r in rows)
    only_a = await index.instances(TENANT, study, a)
    assert [r.instance_number for r in only_a] == [1, 2, 3]
    assert all(r.file_path == f"{TENANT}/{study}/{a}/{r.sop_uid}.dcm" for r in only_a)
    assert await index.previous_path(TENANT, new_uid()) is None
    assert await index.previous_path("other", items[0].event.sop_uid) is None


async def test_with_instance_hands_the_row_or_none_to_work_on_a_worker_thread(
        index: SqlIndex) -> None:
    """``with_instance``: the same row as ``instances`` for one instance, handed to the
    work on a thread other than the event loop's; None for an instance of another study,
    series or tenant; an exception of the work reaches the caller."""
    study, series = new_uid(), new_uid()
    item = make_instance(study, series, instance_number=7)
    await index.apply([item])
    sop = item.event.sop_uid
    (expected,) = await index.instances(TENANT, study, series, sop)
    loop_thread = threading.get_ident()
    seen: list[tuple[object, int]] = []

    def work(row: object) -> str:
        seen.append((row, threading.get_ident()))
        return "done"

    assert await index.with_instance(TENANT, study, series, sop, work) == "done"
    assert seen[-1][0] == expected and seen[-1][1] != loop_thread
    for key in ((TENANT, new_uid(), series, sop), (TENANT, study, new_uid(), sop),
                ("other", study, series, sop), (TENANT, study, series, new_uid())):
        assert await index.with_instance(*key, work) == "done"
        assert seen[-1][0] is None

    def fail(row: object) -> None:
        raise ValueError("from the work")

    with pytest.raises(ValueError, match="from the work"):
        await index.with_instance(TENANT, study, series, sop, fail)


async def test_tenants_are_isolated(index: SqlIndex) -> None:
    study, series = new_uid(), new_uid()
    await index.apply([make_instance(study, series, instance_number=1)])
    await index.apply([make_instance(study, series, tenant="other", instance_number=n)
                       for n in (1, 2)])
    assert await index.count_instances(TENANT) == 1
    assert await index.count_instances("other") == 2
    assert await index.count_instances() == 3
    assert len(await index.search(query("instance"))) == 1
    assert len(await index.search(query("instance", tenant="other"))) == 2
    assert await index.search(query("study", tenant="nobody")) == []


# -- search -----------------------------------------------------------------------------
@pytest.fixture
async def three_studies(index: SqlIndex) -> dict[str, dict[str, str]]:
    """ABC^DEF (CT, 2024-01-05, 2 series), abcd^x (MR, 2024-02-20), XYZ (CT, 2023-01-01)."""
    specs = {
        "abc": ("ABC^DEF", "20240105", "CT", 2),
        "abcd": ("abcd^x", "20240220", "MR", 1),
        "xyz": ("XYZ^ONLY", "20230101", "CT", 1),
    }
    studies: dict[str, dict[str, str]] = {}
    items = []
    for name, (patient, date, modality, nseries) in specs.items():
        study = new_uid()
        studies[name] = {"study": study}
        for s in range(nseries):
            series = new_uid()
            studies[name][f"series{s}"] = series
            items += [make_instance(study, series, patient_name=patient, study_date=date,
                                    modality=modality, series_number=s + 1,
                                    patient_id=f"ID-{name}", instance_number=n,
                                    accession_number=f"ACC-{name}")
                      for n in (1, 2)]
    await index.apply(items)
    return studies


async def test_search_study_level(index: SqlIndex,
                                  three_studies: dict[str, dict[str, str]]) -> None:
    rows = await index.search(query("study"))
    assert len(rows) == 3
    by_uid = {r["study_uid"]: r for r in rows}
    abc = by_uid[three_studies["abc"]["study"]]
    assert abc["number_of_series"] == 2
    assert abc["number_of_instances"] == 4
    assert abc["patient_name"] == "ABC^DEF"
    assert abc["modalities"] == "CT"
    assert abc["study_date_origin"] == "20240105"


async def test_search_single_value(index: SqlIndex,
                                   three_studies: dict[str, dict[str, str]]) -> None:
    abc = three_studies["abc"]["study"]
    rows = await index.search(query("study", ("StudyInstanceUID", abc)))
    assert column(rows, "study_uid") == [abc]
    rows = await index.search(query("study", ("PatientID", "ID-xyz")))
    assert column(rows, "study_uid") == [three_studies["xyz"]["study"]]
    rows = await index.search(query("study", ("AccessionNumber", "ACC-abcd")))
    assert column(rows, "study_uid") == [three_studies["abcd"]["study"]]
    assert await index.search(query("study", ("PatientID", "id-xyz"))) == []  # LO: exact


async def test_search_modalities_in_study_list_matches_any(
        index: SqlIndex, three_studies: dict[str, dict[str, str]]) -> None:
    rows = await index.search(query("study", ("ModalitiesInStudy", "MR,US")))
    assert column(rows, "study_uid") == [three_studies["abcd"]["study"]]
    rows = await index.search(query("study", ("ModalitiesInStudy", "CT\\MR")))
    assert len(rows) == 3
    assert await index.search(query("study", ("ModalitiesInStudy", "US,XA"))) == []


async def test_search_uid_list(index: SqlIndex,
                               three_studies: dict[str, dict[str, str]]) -> None:
    wanted = {three_studies["abc"]["study"], three_studies["xyz"]["study"]}
    rows = await index.search(query("study", ("StudyInstanceUID", ",".join(sorted(wanted)))))
    assert set(column(rows, "study_uid")) == wanted
    rows = await index.search(query("study", ("StudyInstanceUID", "\\".join(sorted(wanted)))))
    assert set(column(rows, "study_uid")) == wanted


async def test_search_patient_name_wildcard_ignores_case(
        index: SqlIndex, three_studies: dict[str, dict[str, str]]) -> None:
    expected = {three_studies["abc"]["study"], three_studies["abcd"]["study"]}
    for pattern in ("ABC*", "abc*", "aBc*"):
        rows = await index.search(query("study", ("PatientName", pattern)))
        assert set(column(rows, "study_uid")) == expected, pattern
    rows = await index.search(query("study", ("PatientName", "abc^def")))
    assert column(rows, "study_uid") == [three_studies["abc"]["study"]]
    rows = await index.search(query("study", ("PatientName", "?BC^DEF")))
    assert column(rows, "study_uid") == [three_studies["abc"]["study"]]
    assert await index.search(query("study", ("PatientName", "ABC"))) == []
    # SQL wildcards in the value are literals, not patterns.
    assert await index.search(query("study", ("PatientName", "%"))) == []
    assert await index.search(query("study", ("PatientName", "ABC_DEF"))) == []


async def test_search_date_ranges(index: SqlIndex,
                                  three_studies: dict[str, dict[str, str]]) -> None:
    abc, abcd, xyz = (three_studies[n]["study"] for n in ("abc", "abcd", "xyz"))

    async def found(value: str) -> set[str]:
        return set(column(await index.search(query("study", ("StudyDate", value))),
                          "study_uid"))

    assert await found("20240101-20241231") == {abc, abcd}
    assert await found("20240105-20240105") == {abc}
    assert await found("20240201-") == {abcd}
    assert await found("-20231231") == {xyz}
    assert await found("-20240105") == {abc, xyz}
    assert await found("20240105") == {abc}
    assert await found("20250101-") == set()


async def test_search_series_level(index: SqlIndex,
                                   three_studies: dict[str, dict[str, str]]) -> None:
    rows = await index.search(query("series", ("Modality", "CT")))
    assert len(rows) == 3
    assert {r["modality"] for r in rows} == {"CT"}
    abc = three_studies["abc"]
    rows = await index.search(query("series", study_uid=abc["study"]))
    assert column(rows, "series_uid") == [abc["series0"], abc["series1"]]  # series number
    assert column(rows, "series_related_instances") == [2, 2]
    rows = await index.search(query("series", ("SeriesInstanceUID", abc["series1"])))
    assert column(rows, "series_number") == [2]
    rows = await index.search(query("series", ("PatientName", "xyz*")))
    assert column(rows, "series_uid") == [three_studies["xyz"]["series0"]]


async def test_search_instance_level(index: SqlIndex,
                                     three_studies: dict[str, dict[str, str]]) -> None:
    abc = three_studies["abc"]
    rows = await index.search(query("instance", study_uid=abc["study"],
                                    series_uid=abc["series0"]))
    assert column(rows, "instance_number") == [1, 2]
    sops = column(rows, "sop_uid")
    rows = await index.search(query("instance", ("SOPInstanceUID", ",".join(sops))))
    assert sorted(column(rows, "sop_uid")) == sorted(sops)
    rows = await index.search(query("instance", ("InstanceNumber", "2"),
                                    study_uid=abc["study"]))
    assert len(rows) == 2
    assert {r["image_rows"] for r in rows} == {8}
    rows = await index.search(query("instance", ("Modality", "MR")))
    assert {r["study_uid"] for r in rows} == {three_studies["abcd"]["study"]}
    assert len(await index.search(query("instance"))) == 8


@pytest.mark.parametrize("level", ["study", "series", "instance"])
async def test_limit_offset_paging_is_deterministic(index: SqlIndex, level: Level) -> None:
    items = []
    for _ in range(4):
        study = new_uid()
        for k in range(2):
            series = new_uid()
            items += [make_instance(study, series, instance_number=n, series_number=k,
                                    study_date="20240101") for n in (2, 1)]
    await index.apply(items)
    key = {"study": "study_uid", "series": "series_uid", "instance": "sop_uid"}[level]
    everything = column(await index.search(query(level, ("limit", "100"))), key)
    assert len(everything) == {"study": 4, "series": 8, "instance": 16}[level]
    assert len(set(everything)) == len(everything)
    for size in (1, 3, 5):
        paged: list[str] = []
        for offset in range(0, len(everything) + size, size):
            page = await index.search(query(level, ("limit", str(size)),
                                            ("offset", str(offset))))
            assert len(page) <= size
            paged += column(page, key)
        assert paged == everything, f"pages of {size}"
    assert column(await index.search(query(level, ("limit", "100"))), key) == everything
    assert await index.search(query(level, ("offset", "1000"))) == []


# -- metadata tasks ---------------------------------------------------------------------
async def test_due_series_honours_the_quiet_cutoff(index: SqlIndex) -> None:
    item = make_instance(new_uid(), new_uid())
    before = utcnow()
    await index.apply([item])
    assert await index.due_series(before - dt.timedelta(seconds=10), 5, 100) == []
    due = await index.due_series(utcnow() + FUTURE, 5, 100)
    assert [(t.tenant_id, t.study_uid, t.series_uid, t.retry_times) for t in due] == [
        (TENANT, item.event.study_uid, item.event.series_uid, 0)]
    assert before <= due[0].flag_time.replace(microsecond=0) <= utcnow()


async def test_due_series_limit_takes_the_oldest_first(index: SqlIndex) -> None:
    study = new_uid()
    first = make_instance(study, new_uid())
    await index.apply([first])
    await index.apply([make_instance(study, new_uid()) for _ in range(3)])
    due = await index.due_series(utcnow() + FUTURE, 5, 2)
    assert len(due) == 2
    assert due[0].series_uid == first.event.series_uid
    assert len(await index.due_series(utcnow() + FUTURE, 5, 100)) == 4


async def test_finish_series_done(index: SqlIndex) -> None:
    item = make_instance(new_uid(), new_uid())
    await index.apply([item])
    (task,) = await index.due_series(utcnow() + FUTURE, 5, 100)
    assert await index.finish_series(task, ok=True) is True
    assert await index.due_series(utcnow() + FUTURE, 5, 100) == []
    assert await index.finish_series(task, ok=True) is False  # already done
    # A new instance flags the series again.
    await index.apply([make_instance(item.event.study_uid, item.event.series_uid)])
    (again,) = await index.due_series(utcnow() + FUTURE, 5, 100)
    assert again.series_uid == task.series_uid
    assert again.retry_times == 0


async def test_finish_series_is_compare_and_set(index: SqlIndex) -> None:
    """Flagged again while the worker built the metadata: the task must stay due."""
    item = make_instance(new_uid(), new_uid())
    await index.apply([item])
    (task,) = await index.due_series(utcnow() + FUTURE, 5, 100)
    # Within the same second as the first flag: precision must not hide the second one.
    await index.apply([make_instance(item.event.study_uid, item.event.series_uid)])
    assert await index.finish_series(task, ok=True) is False
    (again,) = await index.due_series(utcnow() + FUTURE, 5, 100)
    assert again.flag_time > task.flag_time
    assert await index.finish_series(again, ok=True) is True
    assert await index.due_series(utcnow() + FUTURE, 5, 100) == []


async def test_finish_series_failure_is_compare_and_set(index: SqlIndex) -> None:
    item = make_instance(new_uid(), new_uid())
    await index.apply([item])
    (task,) = await index.due_series(utcnow() + FUTURE, 5, 100)
    await index.apply([item])
    assert await index.finish_series(task, ok=False) is False
    (again,) = await index.due_series(utcnow() + FUTURE, 5, 100)
    assert again.retry_times == 0


async def test_failed_tasks_are_retried_up_to_max_retries(index: SqlIndex) -> None:
    item = make_instance(new_uid(), new_uid())
    await index.apply([item])
    (task,) = await index.due_series(utcnow() + FUTURE, 3, 100)
    for attempt in (1, 2, 3):
        before = utcnow()
        assert await index.finish_series(task, ok=False) is True
        # A failure waits for another quiet period before it is due again.
        assert await index.due_series(before - dt.timedelta(seconds=10), 3, 100) == []
        due = await index.due_series(utcnow() + FUTURE, 3, 100)
        if attempt < 3:
            (task,) = due
            assert task.retry_times == attempt
        else:
            assert due == []
    (last,) = await index.due_series(utcnow() + FUTURE, 4, 100)
    assert last.retry_times == 3
    assert await index.finish_series(last, ok=True) is True
    assert await index.due_series(utcnow() + FUTURE, 10, 100) == []


async def test_next_due_is_the_oldest_waiting_flag(index: SqlIndex) -> None:
    assert await index.next_due(5) is None
    study = new_uid()
    first, second = make_instance(study, new_uid()), make_instance(study, new_uid())
    await index.apply([first])
    await index.apply([second])
    tasks = await index.due_series(utcnow() + FUTURE, 5, 100)
    assert await index.next_due(5) == min(t.flag_time for t in tasks)
    for task in tasks:
        assert await index.finish_series(task, ok=True)
    assert await index.next_due(5) is None
    (task,) = [t for t in tasks if t.series_uid == second.event.series_uid]
    await index.apply([second])  # flagged again, then failing: due until out of retries
    (again,) = await index.due_series(utcnow() + FUTURE, 5, 100)
    assert await index.finish_series(again, ok=False)
    assert await index.next_due(5) is not None
    assert await index.next_due(1) is None  # its one retry is used up


async def test_frame_offsets_round_trip(index: SqlIndex) -> None:
    study, series = new_uid(), new_uid()
    native = dataclasses.replace(make_instance(study, series, instance_number=1),
                                 pixel_offset=1234, frame_size=524288)
    other = make_instance(study, series, instance_number=2)
    await index.apply([native, other])
    rows = await index.instances(TENANT, study, series)
    assert [(r.pixel_offset, r.frame_size) for r in rows] == [(1234, 524288), (None, None)]
    (one,) = await index.instances(TENANT, study, series, other.event.sop_uid)
    assert one.sop_uid == other.event.sop_uid
    assert await index.instances(TENANT, study, new_uid()) == []


# -- schema -----------------------------------------------------------------------------
async def test_migrations_and_table_objects_agree(index: SqlIndex) -> None:
    def reflect(conn: sa.Connection) -> dict[str, dict[str, Any]]:
        inspector = sa.inspect(conn)
        return {
            table.name: {
                "columns": {c["name"]: c["nullable"] for c in inspector.get_columns(table.name)},
                "primary_key": inspector.get_pk_constraint(table.name)["constrained_columns"],
            }
            for table in sqlschema.metadata.sorted_tables
        }

    async with index.engine.connect() as conn:
        found = await conn.run_sync(reflect)
    for table in sqlschema.metadata.sorted_tables:
        db = found[table.name]
        declared = {c.name: c.nullable for c in table.columns}
        assert set(db["columns"]) == set(declared), table.name
        for name, nullable in declared.items():
            assert db["columns"][name] == nullable, f"{table.name}.{name} nullability"
        assert sorted(db["primary_key"]) == sorted(c.name for c in table.primary_key), (
            table.name)


async def test_migrate_is_repeatable(index: SqlIndex) -> None:
    async with index.engine.begin() as conn:
        assert await sqlschema.migrate(conn) == []
        versions = (await conn.execute(sa.text(
            "SELECT version FROM schema_migrations ORDER BY version"))).scalars().all()
    assert list(versions) == [v for v, _, _ in sqlschema.migration_files()]


async def test_flag_time_is_the_current_flag(index: SqlIndex) -> None:
    item = make_instance(new_uid(), new_uid())
    e = item.event
    assert await index.flag_time(TENANT, e.study_uid, e.series_uid) is None
    await index.apply([item])
    (task,) = await index.due_series(utcnow() + FUTURE, 5, 100)
    assert await index.flag_time(TENANT, e.study_uid, e.series_uid) == task.flag_time
    await index.apply([make_instance(e.study_uid, e.series_uid)])
    newer = await index.flag_time(TENANT, e.study_uid, e.series_uid)
    assert newer is not None and newer > task.flag_time


async def test_a_failed_series_waits_retry_in_seconds(index: SqlIndex) -> None:
    item = make_instance(new_uid(), new_uid())
    await index.apply([item])
    (task,) = await index.due_series(utcnow() + FUTURE, 5, 100)
    assert await index.finish_series(task, ok=False, retry_in=120) is True
    assert await index.due_series(utcnow() + FUTURE, 5, 100) == []
    (again,) = await index.due_series(utcnow() + dt.timedelta(seconds=180), 5, 100)
    assert again.retry_times == 1


async def test_patient_name_exact_match_covers_the_first_component_group_only(
        index: SqlIndex) -> None:
    """PS3.4 C.2.2.2.1 with PN folding: "Doe^John" finds "DOE^JOHN" and the multi-group
    "Doe^John=ドウ^ジョン", never "Doe^Johnny" nor "Doe^John Jr" (served by the folded-name
    index of migration 0003)."""
    names = {"plain": "DOE^JOHN", "groups": "Doe^John=ドウ^ジョン", "longer": "Doe^Johnny",
             "suffix": "Doe^John Jr", "other": "Roe^John"}
    studies = {}
    for label, name in names.items():
        item = make_instance(new_uid(), new_uid(), patient_name=name)  # UTF-8 data set
        await index.apply([item])
        studies[label] = item.event.study_uid
    rows = await index.search(query("study", ("PatientName", "doe^john")))
    assert set(column(rows, "study_uid")) == {studies["plain"], studies["groups"]}
    rows = await index.search(query("study", ("PatientName", "DOE^JOHN*")))
    assert set(column(rows, "study_uid")) == {studies[k] for k in ("plain", "groups",
                                                                   "longer", "suffix")}


async def test_access_log_rows_round_trip_once_and_are_pruned_by_age(index: SqlIndex) -> None:
    from dicomcloud.accesslog import AccessEvent, access_rows

    def event(tenant: str, when: str, trace: str) -> dict[str, Any]:
        body = AccessEvent(tenant_id=tenant, protocol="DICOMweb", service="WADO-RS",
                           route="/studies/{study}", status=200, client_ip="127.0.0.1",
                           study_uid=new_uid(), principal="Dr. Müller", event_time=when,
                           trace_id=trace).body()
        return body

    t1, t2 = f"t1-{new_uid()[-8:]}", f"t2-{new_uid()[-8:]}"  # the index may hold other rows
    bodies = [event(t1, "2026-01-01 10:00:00.250", "a" * 32),
              event(t2, "2026-01-02 10:00:00.000", "b" * 32),
              event(t1, "2026-01-03 10:00:00.999", "c" * 32),
              {"log_type": "object", "sop_uid": new_uid()}]  # object rows are not access rows
    rows = access_rows(bodies)
    await index.record_access(rows)
    await index.record_access(rows)  # redelivered: skipped by trace_id
    ours = [r for r in await index.recent_access(limit=100_000)
            if r["tenant_id"] in (t1, t2)]
    assert [r["trace_id"] for r in ours] == ["c" * 32, "b" * 32, "a" * 32]
    assert ours[2]["event_time"] == dt.datetime(2026, 1, 1, 10, 0, 0, 250000)
    assert ours[2]["principal"] == "Dr. Müller"
    assert [r["trace_id"] for r in await index.recent_access(t1, limit=1)] == ["c" * 32]
    assert await index.prune_access(dt.datetime(2026, 1, 2, 12)) >= 2
    assert [r["trace_id"] for r in await index.recent_access(t1)] == ["c" * 32]
    assert await index.recent_access(t2) == []


async def test_the_access_log_loader_skips_a_row_the_index_refuses_and_keeps_the_others(
        index: SqlIndex) -> None:
    """A forged log_queue message (an INTEGER out of range) must not stop the loader."""
    from types import SimpleNamespace

    from dicomcloud.accesslog import AccessEvent, access_rows
    from dicomcloud.roles.worker import _record_access

    tenant = f"loader-{new_uid()[-8:]}"

    def body(trace: str, status: int) -> dict[str, Any]:
        return AccessEvent(tenant_id=tenant, protocol="DIMSE", service="C-ECHO",
                           route="association", status=status, client_ip=None,
                           event_time="2026-01-01 00:00:00.000", trace_id=trace).body()

    traces = [f"{n}{tenant[-8:]}".ljust(32, "0") for n in (1, 2, 3)]
    rows = access_rows([body(traces[0], 0), body(traces[1], 2**70), body(traces[2], 0)])
    await _record_access(SimpleNamespace(index=index), rows)  # type: ignore[arg-type]
    assert sorted(r["trace_id"] for r in await index.recent_access(tenant)) == [
        traces[0], traces[2]]
