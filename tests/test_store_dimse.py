"""C-STORE end to end: DCMTK and pynetdicom peers against a real archive process.

The archive keeps what it receives bit for bit (PS3.4 B.4.1 level 2): the stored file is a
File Meta Information header followed by the data set bytes of the C-STORE request.

Two senders, because DCMTK re-encodes what it sends: it reads each file and writes the
data set again (group lengths dropped, sequence lengths and deflate streams re-encoded),
so for nearly half of the test files the bytes on the wire are not the file's bytes.

- ``storescu`` with the option that proposes the file's transfer syntax first (``-xb``
  big endian, ``-xi`` implicit, ``-xy`` JPEG baseline, ... compressed ones included; the
  archive, like any pynetdicom SCP, takes the first proposed transfer syntax it supports).
  ``dcmsend`` is not used here: for an uncompressed file it always proposes explicit VR
  little endian first, so big endian and implicit VR files would travel converted.
  DCMTK's ``storescp +B`` (bit-preserving) receives the same send and is the witness of
  the bytes on the wire.
- pynetdicom sends a file path chunked: the file's data set bytes go out unchanged, so
  the stored data set must equal the original file's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.support import (
    Archive,
    SampleFile,
    c_store,
    data_set_bytes,
    find_instances,
    free_port,
    is_listening,
    make_ct,
    require_tool,
    rounds_by_sop,
    valid_testdata,
    value,
    wait_until,
    write_part10,
)

TENANT = "default"
#: storescu option that proposes this transfer syntax first (or alone)
STORESCU_PROPOSAL = {
    ImplicitVRLittleEndian: "-xi", ExplicitVRLittleEndian: "-xe", ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd", JPEGBaseline8Bit: "-xy", JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs", JPEGLSLossless: "-xt", JPEG2000Lossless: "-xv", JPEG2000: "-xw",
    RLELossless: "-xr",
}
REQUIRED_SYNTAXES = {
    ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
    JPEGLSLossless, JPEG2000Lossless, JPEG2000, RLELossless,
}


def _stored(archive: Archive, item: SampleFile) -> Path:
    return archive.stored_path(TENANT, item.study_uid, item.series_uid, item.sop_uid)


def _qido_agrees(row: dict, item: SampleFile) -> bool:
    """The QIDO-RS instance result describes this very file."""
    return (value(row, "0020000D") == item.study_uid
            and value(row, "0020000E") == item.series_uid
            and value(row, "00080016") == item.sop_class
            and value(row, "00083002") == item.transfer_syntax
            and value(row, "00280008") == item.frames
            and value(row, "00280010") == item.rows
            and value(row, "00280011") == item.columns
            and value(row, "00280100") == item.bits_allocated)


def _wait_indexed(archive: Archive, items: list[SampleFile]) -> None:
    """Each item found exactly once by QIDO-RS, with its own attributes."""
    def done() -> list[str]:
        found = find_instances(archive, [i.sop_uid for i in items])
        return [i.name for i in items
                if len(found[i.sop_uid]) != 1 or not _qido_agrees(found[i.sop_uid][0], i)]

    wait_until(lambda: not done(), timeout=30, message="every file indexed once")


def _storescu(storescu: str, ae_title: str, port: int, syntax: str,
              paths: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [storescu, "-v", "-R", STORESCU_PROPOSAL[syntax], "-aec", ae_title, "127.0.0.1",
         str(port), *paths],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _successes(*senders: subprocess.Popen) -> list[int]:
    """For each storescu: the C-STORE responses with status Success it received."""
    outputs = [sender.communicate(timeout=120)[0] for sender in senders]
    for sender, output in zip(senders, outputs, strict=True):
        assert sender.returncode == 0, output[-3000:]
    return [output.count("Received Store Response (Success)") for output in outputs]


def test_echoscu_gets_a_c_echo_success(archive: Archive) -> None:
    echoscu = require_tool("echoscu")
    result = subprocess.run(
        [echoscu, "-v", "-aec", archive.ae_title, "127.0.0.1", str(archive.dimse_port)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_valid_test_data_has_40_files_and_every_required_encoding() -> None:
    files = valid_testdata()
    assert len(files) >= 40, [f.name for f in files]
    assert {f.transfer_syntax for f in files} >= REQUIRED_SYNTAXES, \
        sorted(n.name for n in REQUIRED_SYNTAXES - {pydicom.uid.UID(f.transfer_syntax)
                                                     for f in files})
    assert any(f.frames > 1 for f in files), "no multi-frame file"
    assert {"RGB", "YBR_FULL", "YBR_FULL_422"} <= {f.photometric for f in files}


def test_storescu_stores_each_valid_file_in_its_transfer_syntax_as_sent_and_qido_finds_it(
        archive: Archive, tmp_path: Path) -> None:
    """Every valid file, sent by storescu proposing the file's own transfer syntax first
    (compressed ones too): stored under that transfer syntax, its data set bit-identical to
    the bytes DCMTK put on the wire (as DCMTK's bit-preserving storescp received them from
    the same send), found once by QIDO-RS with its attributes. Variants of one SOP
    Instance UID go in separate rounds, each checked before the next replaces it."""
    storescu, storescp = require_tool("storescu"), require_tool("storescp")
    files = valid_testdata()
    assert {f.transfer_syntax for f in files} <= set(STORESCU_PROPOSAL)
    witness_dir = tmp_path / "witness"
    witness_dir.mkdir()
    witness_port = free_port()
    with open(tmp_path / "storescp.log", "wb") as log:
        witness = subprocess.Popen(
            [storescp, "+B", "+xa", "-od", str(witness_dir), str(witness_port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until(lambda: is_listening(witness_port), timeout=10, message="storescp")
        checked = 0
        for items in rounds_by_sop(files):
            by_syntax: dict[str, list[str]] = {}
            for item in items:
                by_syntax.setdefault(item.transfer_syntax, []).append(str(item.path))
            for syntax, paths in sorted(by_syntax.items()):
                senders = (
                    _storescu(storescu, archive.ae_title, archive.dimse_port, syntax, paths),
                    _storescu(storescu, "WITNESS", witness_port, syntax, paths))
                assert _successes(*senders) == [len(paths), len(paths)], syntax
            wire = {}
            for received in witness_dir.iterdir():
                meta = pydicom.filereader.read_file_meta_info(received)
                wire[str(meta.MediaStorageSOPInstanceUID)] = (
                    meta.TransferSyntaxUID, data_set_bytes(received))
                received.unlink()
            for item in items:
                stored = _stored(archive, item)
                assert stored.is_file(), item.name
                meta = pydicom.filereader.read_file_meta_info(stored)
                assert meta.TransferSyntaxUID == item.transfer_syntax, item.name
                assert wire[item.sop_uid] == (item.transfer_syntax, data_set_bytes(stored)), \
                    item.name
                checked += 1
            _wait_indexed(archive, items)
        assert checked == len(files)
    finally:
        witness.terminate()
        witness.wait(10)


def test_pynetdicom_streamed_valid_files_are_stored_with_the_original_data_set_bytes(
        archive: Archive) -> None:
    """Every valid file, its data set streamed unchanged: the stored data set equals the
    original file's data set byte for byte, under its own transfer syntax; QIDO-RS finds
    each SOP Instance once (the last variant sent)."""
    rounds = rounds_by_sop(valid_testdata())
    last: dict[str, SampleFile] = {}
    for items in rounds:
        statuses = c_store(archive, [i.path for i in items])
        assert [s.Status for s in statuses] == [0] * len(items), \
            [(i.name, s.get("ErrorComment")) for i, s in zip(items, statuses, strict=True)
             if s.Status]
        for item in items:
            stored = _stored(archive, item)
            assert data_set_bytes(stored) == data_set_bytes(item.path), item.name
            meta = pydicom.filereader.read_file_meta_info(stored)
            assert meta.TransferSyntaxUID == item.transfer_syntax, item.name
            last[item.sop_uid] = item
    _wait_indexed(archive, list(last.values()))


def test_same_sop_instance_sent_twice_keeps_one_index_entry_and_the_newer_bytes(
        archive: Archive, tmp_path: Path) -> None:
    first = make_ct(PatientName="First^Version")
    second = make_ct(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID,
                     number=7, PatientName="Second^Version")
    first_path = write_part10(first, tmp_path / "first.dcm")
    second_path = write_part10(second, tmp_path / "second.dcm")
    stored = archive.stored_path(TENANT, first.StudyInstanceUID, first.SeriesInstanceUID,
                                 first.SOPInstanceUID)

    assert c_store(archive, [first_path])[0].Status == 0
    wait_until(lambda: archive.count(first.StudyInstanceUID) == 1, message="first indexed")
    assert c_store(archive, [second_path])[0].Status == 0
    assert data_set_bytes(stored) == data_set_bytes(second_path)

    def second_indexed() -> bool:
        rows = archive.qido(f"/studies/{first.StudyInstanceUID}/instances")
        return len(rows) == 1 and value(rows[0], "00200013") == 7

    wait_until(second_indexed, message="second version indexed")
    rows = archive.qido("/instances", SOPInstanceUID=first.SOPInstanceUID)
    assert len(rows) == 1
    assert value(rows[0], "00100010") == {"Alphabetic": "Second^Version"}
    assert archive.count(first.StudyInstanceUID) == 1
    assert data_set_bytes(stored) == data_set_bytes(second_path)


def test_three_parallel_storescu_associations_store_30_instances_each_found_once(
        archive: Archive, tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    study, series = generate_uid(), generate_uid()
    expected = []
    for number in range(30):
        ds = make_ct(study, series, number=number + 1)
        write_part10(ds, tmp_path / f"part{number % 3}" / f"ct{number:02}.dcm")
        expected.append(str(ds.SOPInstanceUID))
    senders = [
        subprocess.Popen(
            [storescu, "-R", "-aec", archive.ae_title, "-aet", f"PARALLEL{part}",
             "127.0.0.1", str(archive.dimse_port),
             *sorted(str(p) for p in (tmp_path / f"part{part}").iterdir())],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for part in range(3)
    ]
    for sender in senders:
        output, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, output[-3000:]

    path = f"/studies/{study}/series/{series}/instances"
    wait_until(lambda: len(archive.qido(path)) == 30, message="30 instances indexed")
    found = [value(row, "00080018") for row in archive.qido(path)]
    assert sorted(found) == sorted(expected)
    assert archive.count(study) == 30
    for sop in expected:
        assert archive.stored_path(TENANT, study, series, sop).is_file()
