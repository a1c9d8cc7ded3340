"""``dicomcloud import``: bulk import through the ingest checks, indexed by the archive."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.factories import ct_dataset, ct_series, new_uid, write_part10
from tests.support import Archive, wait_until

STUDIES = 10
PER_STUDY = 100
SERIES_PER_STUDY = 4


def dicomcloud(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # wide lines: rich wraps at 80 columns when stderr is not a terminal
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "dicomcloud", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def generate(folder: Path, studies: int, per_study: int) -> dict[str, set[str]]:
    """Write ``studies`` studies of ``per_study`` 8x8 CT instances; study -> SOP UIDs."""
    made: dict[str, set[str]] = {}
    for s in range(studies):
        study = new_uid()
        made[study] = set()
        per_series = per_study // SERIES_PER_STUDY
        for k in range(SERIES_PER_STUDY):
            count = per_series if k < SERIES_PER_STUDY - 1 else per_study - per_series * k
            for ds in ct_series(count, study_uid=study, series_number=k + 1,
                                patient_name=f"IMPORT^{s:02d}", patient_id=f"IMP-{s:02d}"):
                sop = str(ds.SOPInstanceUID)
                write_part10(ds, folder / f"study{s:02d}" / f"series{k}" / f"{sop}.dcm")
                made[study].add(sop)
    return made


def write_bad_files(folder: Path) -> dict[str, str]:
    """Garbage, a truncated file and an invalid UID; file name -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "garbage.dcm").write_bytes(random.Random(7).randbytes(3000))
    good = write_part10(ct_dataset(new_uid(), new_uid()), folder / "good.tmp")
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.dcm").write_bytes(data[:-60])  # inside Pixel Data
    sop = new_uid()
    whole = write_part10(ct_dataset(new_uid(), new_uid(), sop), folder / "uid.tmp").read_bytes()
    (folder / "uid.tmp").unlink()
    bad_uid = sop[:5] + "x." + sop[7:]  # same length, not digits and dots (PS3.5 9.1)
    (folder / "invalid_uid.dcm").write_bytes(whole.replace(sop.encode(), bad_uid.encode()))
    return {"garbage.dcm": "0xC000 CannotUnderstand",
            "truncated.dcm": "0xC000 CannotUnderstand",
            "invalid_uid.dcm": "0xA900 DataSetMismatch"}


def indexed_sops(archive: Archive, **params: str) -> list[str]:
    rows = archive.qido("/instances", limit="5000", **params)
    return [row["00080018"]["Value"][0] for row in rows]


def test_import_then_start_indexes_everything(
        tmp_path: Path, archive_factory: Callable[..., Archive]) -> None:
    source = tmp_path / "source"
    made = generate(source / "good", STUDIES, PER_STUDY)
    bad = write_bad_files(source / "bad")
    (source / "DICOMDIR").write_bytes(b"skipped by name")
    (source / ".hidden").write_bytes(b"skipped as hidden")
    data_dir = tmp_path / "imported"

    result = dicomcloud("import", str(source), "--data-dir", str(data_dir), cwd=tmp_path)
    output = result.stderr
    assert result.returncode == 1, output
    assert "importing" in output  # the progress display
    assert "1003/1003" in output  # its final state
    assert "accepted 1000, rejected 3 of 1003 file(s)" in output
    assert "rejected: 0xC000 CannotUnderstand" in output
    assert "rejected: 0xA900 DataSetMismatch" in output
    for name, reason in bad.items():
        line = next((x for x in output.splitlines() if name in x), None)
        assert line is not None, f"{name} not listed:\n{output}"
        assert reason in line
    assert "DICOMDIR" not in output and ".hidden" not in output

    stored = list((data_dir / "storage").glob("default/*/*/*.dcm"))
    assert len(stored) == STUDIES * PER_STUDY
    # nothing of a refused file reached the layout or stayed in staging
    assert list((data_dir / "storage" / ".staging").iterdir()) == []

    # Imported offline: the next start indexes the queued events.
    archive = archive_factory("imported")
    everything = set().union(*made.values())
    wait_until(lambda: len(indexed_sops(archive)) >= len(everything), timeout=60,
               message="imported instances indexed")
    found = indexed_sops(archive)
    assert len(found) == len(set(found)) == len(everything)
    assert set(found) == everything
    studies = archive.qido("/studies", includefield="00201208", limit="100")
    counts = {row["0020000D"]["Value"][0]: row["00201208"]["Value"][0] for row in studies}
    assert counts == {study: PER_STUDY for study in made}
    series = archive.qido("/series", PatientID="IMP-03")
    assert len(series) == SERIES_PER_STUDY


def test_import_into_a_running_archive_is_indexed_by_it(
        tmp_path: Path, archive_factory: Callable[..., Archive]) -> None:
    archive = archive_factory("live")
    assert indexed_sops(archive) == []  # also primes the QIDO cache with an empty answer
    made = generate(tmp_path / "source", 2, 20)
    result = dicomcloud("import", str(tmp_path / "source"), "--data-dir",
                        str(archive.data_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "accepted 40, rejected 0 of 40 file(s)" in result.stderr
    everything = set().union(*made.values())
    wait_until(lambda: set(indexed_sops(archive)) == everything, timeout=30,
               message="instances imported while running indexed")
    assert archive.alive()
    for study in made:
        assert archive.count(study) == 20


def test_import_refuses_a_bad_tenant(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    write_part10(ct_dataset(new_uid(), new_uid()), tmp_path / "src" / "a.dcm")
    result = dicomcloud("import", str(tmp_path / "src"), "--data-dir", str(tmp_path / "d"),
                        "--tenant", "Bad/Tenant", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "invalid tenant id 'Bad/Tenant'" in result.stderr
    assert not list((tmp_path / "d").glob("storage/**/*.dcm"))
