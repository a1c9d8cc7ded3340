"""Query/Retrieve SCP (``roles/qr.py``): C-FIND, C-MOVE and C-GET against a real archive.

Peers are DCMTK (``findscu``, ``movescu`` to a DCMTK ``storescp``, ``getscu``) and
pynetdicom. One archive serves the module, with a small generated data set in the default
tenant (2 patients, 3 studies, 6 series, 18 instances; one patient name is not ASCII), a
study in a tenant mapped to a called AE title, and a 240-instance series in another tenant
for the limit on C-FIND matches and C-CANCEL.

The instances are sent by pynetdicom as their files' data set bytes, unchanged; what a
retrieve delivers must be those bytes again (the storage SCPs write them bit-preserving).
"""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.factories import ct_dataset, new_uid, write_part10
from tests.support import (
    Archive,
    data_set_bytes,
    echo,
    free_port,
    is_listening,
    require_tool,
    wait_until,
)

ARCHIVE_AE = "DICOMCLOUD"
DEST_AE = "QRDEST"  # the storescp the archive may C-MOVE to
CARDIO_AE, CARDIO_TENANT = "CARDIO_AE", "cardio"
BULK_AE, BULK_TENANT = "BULK_AE", "bulk"
BULK_COUNT = 240
MAX_FIND = 200  # scp.max_find_results of the archive: below BULK_COUNT
PENDING, SUCCESS, CANCEL = 0xFF00, 0x0000, 0xFE00
_counter = itertools.count()


# -- the data set --------------------------------------------------------------------------
@dataclass
class Series:
    uid: str
    modality: str
    number: int
    files: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> sent file


@dataclass
class Study:
    uid: str
    patient_name: str
    patient_id: str
    date: str
    series: list[Series]

    @property
    def files(self) -> dict[str, Path]:
        return {sop: path for s in self.series for sop, path in s.files.items()}

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series})


@dataclass
class Data:
    studies: dict[str, Study]  # S1, S2, S3 (default tenant)
    cardio: Study  # in the tenant of CARDIO_AE
    bulk: Study  # BULK_COUNT instances in one series, tenant of BULK_AE

    def __getitem__(self, name: str) -> Study:
        return self.studies[name]


JOHN = ("Doe^John", "QR-P1")
ZOE = ("Müller^Zoë", "QR-P2")  # sent with Specific Character Set ISO_IR 192
LAYOUT = {  # study: (patient, date, [(modality, instances), ...])
    "S1": (JOHN, "20240105", [("CT", 3), ("CT", 2)]),
    "S2": (JOHN, "20240220", [("MR", 4), ("CT", 2)]),
    "S3": (ZOE, "20231215", [("MR", 5), ("MR", 2)]),
}


def _make_study(folder: Path, patient: tuple[str, str], date: str,
                layout: list[tuple[str, int]], accession: str) -> Study:
    study = Study(new_uid(), patient[0], patient[1], date, [])
    for number, (modality, count) in enumerate(layout, start=1):
        series = Series(new_uid(), modality, number)
        for instance in range(1, count + 1):
            ds = ct_dataset(study.uid, series.uid, patient_name=patient[0],
                            patient_id=patient[1], study_date=date, modality=modality,
                            series_number=number, instance_number=instance,
                            accession_number=accession)
            if modality == "MR":
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            series.files[ds.SOPInstanceUID] = write_part10(
                ds, folder / study.uid / series.uid / f"{ds.SOPInstanceUID}.dcm")
        study.series.append(series)
    return study


def _no_delay(event: evt.Event) -> None:
    """Send each PDU at once: without TCP_NODELAY every C-STORE waits for a delayed ACK."""
    sock = cast(socket.socket, event.assoc.dul.socket.socket)  # type: ignore[union-attr]
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _store(archive: Archive, paths: list[Path], called_ae: str) -> None:
    """C-STORE files with pynetdicom, their data set bytes streamed unchanged."""
    ae = AE(ae_title="PYTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=called_ae,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        statuses = [assoc.send_c_store(path).Status for path in paths]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    assert statuses == [0] * len(paths)


# -- fixtures ------------------------------------------------------------------------------
@dataclass
class Destination:
    """A DCMTK storescp (bit-preserving) the archive knows as ``DEST_AE``."""

    port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    def clear(self) -> None:
        for path in self.folder.iterdir():
            path.unlink()

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> file received."""
        return _by_sop_uid(self.folder)


def _by_sop_uid(folder: Path) -> dict[str, Path]:
    out = {}
    for path in folder.iterdir():
        meta = pydicom.filereader.read_file_meta_info(path)
        out[str(meta.MediaStorageSOPInstanceUID)] = path
    return out


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Destination]:
    storescp = require_tool("storescp")
    top = tmp_path_factory.mktemp("qr-destination")
    dest = Destination(free_port(), top / "received")
    dest.folder.mkdir()
    with open(top / "storescp.log", "wb") as log:
        dest.proc = subprocess.Popen(
            [storescp, "-v", "+B", "-aet", DEST_AE, "-od", str(dest.folder), str(dest.port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=top)
    try:
        wait_until(lambda: is_listening(dest.port), timeout=10, message="storescp listening")
        yield dest
    finally:
        dest.proc.terminate()
        dest.proc.wait(10)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory,
            destination: Destination) -> Iterator[Archive]:
    """The module's archive (in place of conftest's): C-MOVE destination ``DEST_AE``,
    called AE titles mapped to tenants, at most ``MAX_FIND`` C-FIND matches."""
    instance = Archive(tmp_path_factory.mktemp("qr") / "data", env={
        f"DICOMCLOUD_SCP__MOVE_DESTINATIONS__{DEST_AE}": f"127.0.0.1:{destination.port}",
        f"DICOMCLOUD_SCP__AE_TENANTS__{CARDIO_AE}": CARDIO_TENANT,
        f"DICOMCLOUD_SCP__AE_TENANTS__{BULK_AE}": BULK_TENANT,
        "DICOMCLOUD_SCP__MAX_FIND_RESULTS": str(MAX_FIND),
        "DICOMCLOUD_WEB__PROCESSES": "0",
        "DICOMCLOUD_WEB__GRACEFUL_TIMEOUT": "2",
    }).start()
    yield instance
    if instance.alive():
        instance.stop()


@pytest.fixture(scope="module")
def data(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> Data:
    """Everything stored and indexed."""
    folder = tmp_path_factory.mktemp("qr-sent")
    studies = {name: _make_study(folder, patient, date, layout, f"ACC-{name}")
               for name, (patient, date, layout) in LAYOUT.items()}
    cardio = _make_study(folder, ("Doe^Cardio", "QR-P3"), "20240110", [("CT", 3)], "ACC-C")
    bulk = _make_study(folder, ("Bulk^Patient", "QR-P4"), "20240301", [("CT", BULK_COUNT)],
                       "ACC-B")
    _store(archive, [p for s in studies.values() for p in s.files.values()], ARCHIVE_AE)
    _store(archive, list(cardio.files.values()), CARDIO_AE)
    _store(archive, list(bulk.files.values()), BULK_AE)

    def indexed(study: Study, called_ae: str) -> bool:
        found, _ = pynetdicom_find(archive, _identifier(
            "STUDY", StudyInstanceUID=study.uid, NumberOfStudyRelatedInstances=""),
            called_ae=called_ae)
        return (len(found) == 1
                and found[0].get("NumberOfStudyRelatedInstances") == len(study.files))

    for study in studies.values():
        wait_until(lambda s=study: archive.count(s.uid) == len(s.files),
                   message="a study indexed (QIDO-RS)")
    wait_until(lambda: indexed(cardio, CARDIO_AE), message="the cardio study indexed")
    wait_until(lambda: indexed(bulk, BULK_AE), message="the bulk study indexed")
    return Data(studies, cardio, bulk)


# -- peers ---------------------------------------------------------------------------------
def _identifier(level: str | None, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def pynetdicom_find(archive: Archive, identifier: Dataset, *, called_ae: str = ARCHIVE_AE,
                    model: Any = StudyRootQueryRetrieveInformationModelFind,
                    ) -> tuple[list[Dataset], int]:
    """A C-FIND with pynetdicom: the identifiers of the pending responses, the final status."""
    ae = AE(ae_title="PYFIND")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=called_ae)
    assert assoc.is_established
    matches: list[Dataset] = []
    final = None
    try:
        for status, found in assoc.send_c_find(identifier, model):
            assert "Status" in status, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                assert found is not None, "a pending response without an identifier"
                matches.append(found)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    assert final is not None
    return matches, final


def _keys(keys: list[str]) -> list[str]:
    return [arg for key in keys for arg in ("-k", key)]


def findscu(archive: Archive, keys: list[str], tmp_path: Path, *, model: str = "-S",
            called_ae: str = ARCHIVE_AE) -> list[Dataset]:
    """findscu with ``-k`` keys: the response identifiers (as it extracts them to files),
    after a final response Success."""
    folder = tmp_path / f"findscu-{next(_counter)}"
    folder.mkdir()
    result = subprocess.run(
        [require_tool("findscu"), "-v", model, "-X", "-od", str(folder), "-aet", "FINDSCU",
         "-aec", called_ae, "127.0.0.1", str(archive.dimse_port), *_keys(keys)],
        capture_output=True, text=True, timeout=60)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "Received Final Find Response (Success)" in log, log[-3000:]
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def movescu(archive: Archive, keys: list[str], *, destination: str = DEST_AE,
            model: str = "-S", called_ae: str = ARCHIVE_AE, check: bool = True) -> str:
    """movescu (third-party move to ``destination``): its debug log. It exits with an error
    when the final response is a failure: ``check=False`` accepts that."""
    result = subprocess.run(
        [require_tool("movescu"), "-d", model, "-aet", "MOVESCU", "-aec", called_ae,
         "-aem", destination, "127.0.0.1", str(archive.dimse_port), *_keys(keys)],
        capture_output=True, text=True, timeout=60)
    log = result.stdout + result.stderr
    assert result.returncode == 0 or not check, log
    return log


def getscu(archive: Archive, keys: list[str], folder: Path, *, model: str = "-S") -> str:
    """getscu receiving bit-preserving into ``folder``: its debug log."""
    folder.mkdir()
    result = subprocess.run(
        [require_tool("getscu"), "-d", model, "+B", "-od", str(folder), "-aet", "GETSCU",
         "-aec", ARCHIVE_AE, "127.0.0.1", str(archive.dimse_port), *_keys(keys)],
        capture_output=True, text=True, timeout=60)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    return log


def _uids(found: list[Dataset], keyword: str) -> list[str]:
    return sorted(str(ds.get(keyword)) for ds in found)


def dcmtk_final_response(log: str, kind: str) -> dict[str, int]:
    """Status and sub-operation counts of the last ``kind`` (C-MOVE, C-GET) response in a
    DCMTK debug log."""
    blocks = re.findall(r"INCOMING DIMSE MESSAGE =+\n(.*?)END DIMSE MESSAGE", log, re.S)
    responses = [b for b in blocks if re.search(rf"Message Type\s*: {kind} RSP", b)]
    assert responses, log[-3000:]
    last = responses[-1]
    status = re.search(r"DIMSE Status\s*: 0x([0-9a-fA-F]{4})", last)
    assert status, last
    out = {"status": int(status[1], 16)}
    for name in ("Remaining", "Completed", "Failed", "Warning"):
        count = re.search(rf"{name} Suboperations\s*: (\d+)", last)
        if count:
            out[name.lower()] = int(count[1])
    return out


def pynetdicom_get(archive: Archive, identifier: Dataset, *,
                   model: Any = StudyRootQueryRetrieveInformationModelGet,
                   ) -> tuple[dict[str, tuple[str, bytes]], Dataset]:
    """A C-GET with pynetdicom taking the Storage SCP role for CT and MR images: SOP
    Instance UID -> (transfer syntax, data set bytes as received), and the final response."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        received[str(request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax), cast(BytesIO, request.DataSet).getvalue())
        return 0x0000

    ae = AE(ae_title="PYGET")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model)
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    roles: list[Any] = [build_role(c, scp_role=True) for c in (CTImageStorage, MRImageStorage)]
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=ARCHIVE_AE,
                         ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = [status for status, _ in assoc.send_c_get(identifier, model)]
    finally:
        assoc.release()
    assert responses and all("Status" in r for r in responses)
    return received, responses[-1]


def assert_delivered(received: dict[str, Path], expected: dict[str, Path]) -> None:
    """Exactly the expected instances arrived, each data set byte for byte as it was sent,
    in the transfer syntax it was stored in."""
    assert sorted(received) == sorted(expected)
    for sop_uid, sent in expected.items():
        meta = pydicom.filereader.read_file_meta_info(received[sop_uid])
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian, sop_uid
        assert data_set_bytes(received[sop_uid]) == data_set_bytes(sent), sop_uid


def _move(archive: Archive, destination: Destination, keys: list[str], *, to: str = DEST_AE,
          **options: Any) -> tuple[dict[str, int], dict[str, Path]]:
    """movescu to AE title ``to`` (``destination`` emptied first): the final response and
    the instances ``destination`` received."""
    destination.clear()
    final = dcmtk_final_response(movescu(archive, keys, destination=to, **options), "C-MOVE")
    return final, destination.received()


# -- C-FIND --------------------------------------------------------------------------------
STUDY_KEYS = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "PatientID",
              "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances", "AccessionNumber"]


def _studies_found(archive: Archive, tmp_path: Path, *keys: str, model: str = "-S",
                   called_ae: str = ARCHIVE_AE) -> list[str]:
    """Study Instance UIDs of the findscu matches (final status Success)."""
    found = findscu(archive, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", *keys],
                    tmp_path, model=model, called_ae=called_ae)
    return _uids(found, "StudyInstanceUID")


def _study_uids(data: Data, *names: str) -> list[str]:
    return sorted(data[name].uid for name in names)


def test_findscu_study_level_universal_match_returns_every_study_once_with_return_keys(
        archive: Archive, data: Data, tmp_path: Path) -> None:
    found = findscu(archive, STUDY_KEYS, tmp_path)
    assert _uids(found, "StudyInstanceUID") == _study_uids(data, "S1", "S2", "S3")
    by_uid = {ds.StudyInstanceUID: ds for ds in found}
    for name, study in data.studies.items():
        ds = by_uid[study.uid]
        assert ds.QueryRetrieveLevel == "STUDY"
        assert ds.RetrieveAETitle == ARCHIVE_AE
        assert str(ds.PatientName) == study.patient_name  # ISO_IR 192 decoded
        assert ds.PatientID == study.patient_id
        assert ds.StudyDate == study.date
        assert ds.AccessionNumber == f"ACC-{name}"
        modalities = ds.ModalitiesInStudy
        assert sorted([modalities] if isinstance(modalities, str) else modalities) \
            == study.modalities
        assert ds.NumberOfStudyRelatedSeries == len(study.series)
        assert ds.NumberOfStudyRelatedInstances == len(study.files)


def test_findscu_single_value_match_on_patient_id(
        archive: Archive, data: Data, tmp_path: Path) -> None:
    assert _studies_found(archive, tmp_path, "PatientID=QR-P1") == _study_uids(data, "S1", "S2")
    assert _studies_found(archive, tmp_path, "PatientID=QR-P2") == _study_uids(data, "S3")
    assert _studies_found(archive, tmp_path, "PatientID=QR-P9") == []


def test_wildcard_patient_name_matches_regardless_of_case(
        archive: Archive, data: Data, tmp_path: Path) -> None:
    for pattern in ("Doe*", "doe*", "DOE^J?HN"):
        assert _studies_found(archive, tmp_path, f"PatientName={pattern}") \
            == _study_uids(data, "S1", "S2"), pattern
    # not ASCII, in UTF-8 (ISO_IR 192): findscu, then pynetdicom
    found = findscu(archive, ["SpecificCharacterSet=ISO_IR 192", "QueryRetrieveLevel=STUDY",
                              "StudyInstanceUID", "PatientName=müller*"], tmp_path)
    assert [(ds.StudyInstanceUID, str(ds.PatientName)) for ds in found] \
        == [(data["S3"].uid, "Müller^Zoë")]
    for pattern in ("Müller*", "MÜLLER^ZOË", "*zoë"):
        found, status = pynetdicom_find(archive, _identifier(
            "STUDY", PatientName=pattern, StudyInstanceUID=""))
        assert status == SUCCESS
        assert [(ds.StudyInstanceUID, str(ds.PatientName)) for ds in found] \
            == [(data["S3"].uid, "Müller^Zoë")], pattern


def test_study_date_single_value_and_ranges(archive: Archive, data: Data,
                                            tmp_path: Path) -> None:
    for value, expected in (("20240220", ("S2",)), ("20240101-20240131", ("S1",)),
                            ("20240101-", ("S1", "S2")), ("-20231231", ("S3",)),
                            ("20231201-20240110", ("S1", "S3")), ("20250101-", ())):
        assert _studies_found(archive, tmp_path, f"StudyDate={value}") \
            == _study_uids(data, *expected), value


def test_list_of_study_instance_uids_matches_each(archive: Archive, data: Data,
                                                  tmp_path: Path) -> None:
    s1, s3 = data["S1"].uid, data["S3"].uid
    assert _studies_found(archive, tmp_path, f"StudyInstanceUID={s1}\\{s3}") \
        == _study_uids(data, "S1", "S3")
    found, status = pynetdicom_find(archive, _identifier(
        "STUDY", StudyInstanceUID=[s3, data["S2"].uid, new_uid()]))
    assert status == SUCCESS
    assert _uids(found, "StudyInstanceUID") == _study_uids(data, "S2", "S3")


def test_modalities_in_study_matches_studies_with_a_series_of_that_modality(
        archive: Archive, data: Data, tmp_path: Path) -> None:
    assert _studies_found(archive, tmp_path, "ModalitiesInStudy=MR") \
        == _study_uids(data, "S2", "S3")
    assert _studies_found(archive, tmp_path, "ModalitiesInStudy=CT") \
        == _study_uids(data, "S1", "S2")


def test_several_modalities_in_study_match_studies_holding_any_of_them(
        archive: Archive, data: Data, tmp_path: Path) -> None:
    assert _studies_found(archive, tmp_path, "ModalitiesInStudy=CT\\MR") \
        == _study_uids(data, "S1", "S2", "S3")
    assert _studies_found(archive, tmp_path, "ModalitiesInStudy=US\\MR") \
        == _study_uids(data, "S2", "S3")
    assert _studies_found(archive, tmp_path, "ModalitiesInStudy=US\\XA") == []


def test_key_the_index_cannot_match_is_returned_empty_and_does_not_filter(
        archive: Archive, data: Data, tmp_path: Path) -> None:
    found = findscu(archive, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                              "PatientID=QR-P1", "StudyComments=no such comment",
                              "AdmittingDiagnosesDescription=XYZ"], tmp_path)
    assert _uids(found, "StudyInstanceUID") == _study_uids(data, "S1", "S2")
    for ds in found:
        assert not ds.get("StudyComments")
        assert not ds.get("AdmittingDiagnosesDescription")


def test_series_level_returns_the_series_of_a_study_with_their_counts(
        archive: Archive, data: Data) -> None:
    for study in data.studies.values():
        found, status = pynetdicom_find(archive, _identifier(
            "SERIES", StudyInstanceUID=study.uid, SeriesInstanceUID="", Modality="",
            SeriesNumber="", NumberOfSeriesRelatedInstances=""))
        assert status == SUCCESS
        assert sorted((ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber,
                       ds.NumberOfSeriesRelatedInstances, ds.QueryRetrieveLevel)
                      for ds in found) \
            == sorted((s.uid, s.modality, s.number, len(s.files), "SERIES")
                      for s in study.series)
        assert {ds.StudyInstanceUID for ds in found} == {study.uid}


def test_series_level_modality_matching(archive: Archive, data: Data, tmp_path: Path) -> None:
    s2, s3 = data["S2"], data["S3"]
    found = findscu(archive, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={s2.uid}",
                                 "SeriesInstanceUID", "Modality=MR"], tmp_path)
    assert [(ds.SeriesInstanceUID, ds.Modality) for ds in found] == [(s2.series[0].uid, "MR")]
    found = findscu(archive, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={s3.uid}",
                                 "SeriesInstanceUID", "Modality=CT"], tmp_path)
    assert found == []
    found, status = pynetdicom_find(archive, _identifier(
        "SERIES", SeriesInstanceUID="", Modality="MR"))
    assert status == SUCCESS
    assert _uids(found, "SeriesInstanceUID") == sorted(
        s.uid for study in data.studies.values() for s in study.series if s.modality == "MR")


def test_image_level_returns_each_instance_of_a_series(archive: Archive, data: Data,
                                                        tmp_path: Path) -> None:
    for study in data.studies.values():
        for series in study.series:
            found, status = pynetdicom_find(archive, _identifier(
                "IMAGE", StudyInstanceUID=study.uid, SeriesInstanceUID=series.uid,
                SOPInstanceUID="", SOPClassUID="", InstanceNumber=""))
            assert status == SUCCESS
            assert _uids(found, "SOPInstanceUID") == sorted(series.files)
            sop_class = MRImageStorage if series.modality == "MR" else CTImageStorage
            assert {ds.SOPClassUID for ds in found} == {sop_class}
            assert sorted(ds.InstanceNumber for ds in found) \
                == list(range(1, len(series.files) + 1))
    series = data["S1"].series[0]
    found = findscu(archive, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={data['S1'].uid}",
                                 f"SeriesInstanceUID={series.uid}", "SOPInstanceUID"], tmp_path)
    assert _uids(found, "SOPInstanceUID") == sorted(series.files)


def test_patient_root_patient_level_returns_each_patient_once(
        archive: Archive, data: Data, tmp_path: Path) -> None:
    found = findscu(archive, ["QueryRetrieveLevel=PATIENT", "PatientName", "PatientID",
                              "PatientBirthDate"], tmp_path, model="-P")
    assert sorted((ds.PatientID, str(ds.PatientName), ds.QueryRetrieveLevel) for ds in found) \
        == [("QR-P1", "Doe^John", "PATIENT"), ("QR-P2", "Müller^Zoë", "PATIENT")]
    found, status = pynetdicom_find(
        archive, _identifier("PATIENT", PatientID="QR-P1", PatientName=""),
        model=PatientRootQueryRetrieveInformationModelFind)
    assert status == SUCCESS
    assert [(ds.PatientID, str(ds.PatientName)) for ds in found] == [("QR-P1", "Doe^John")]
    assert _studies_found(archive, tmp_path, "PatientID=QR-P2", model="-P") \
        == _study_uids(data, "S3")


@pytest.mark.parametrize("level", [None, "FOO", ""], ids=["missing", "bogus", "empty"])
def test_identifier_without_a_valid_level_fails_and_the_archive_keeps_serving(
        archive: Archive, data: Data, level: str | None) -> None:
    found, status = pynetdicom_find(archive, _identifier(level, PatientID="QR-P1",
                                                         StudyInstanceUID=""))
    assert found == []
    assert status == 0xA900 or 0xC000 <= status <= 0xCFFF, hex(status)
    assert echo(archive)
    found, status = pynetdicom_find(archive, _identifier("STUDY", PatientID="QR-P1",
                                                         StudyInstanceUID=""))
    assert (status, _uids(found, "StudyInstanceUID")) == (SUCCESS, _study_uids(data, "S1", "S2"))


def test_find_returns_at_most_max_find_results_matches(archive: Archive, data: Data) -> None:
    found, status = pynetdicom_find(archive, _identifier(
        "IMAGE", StudyInstanceUID=data.bulk.uid, SeriesInstanceUID=data.bulk.series[0].uid,
        SOPInstanceUID=""), called_ae=BULK_AE)
    assert status == SUCCESS
    uids = _uids(found, "SOPInstanceUID")
    assert len(uids) == len(set(uids)) == MAX_FIND < BULK_COUNT
    assert set(uids) <= set(data.bulk.files)


def test_c_cancel_during_a_find_ends_it_with_status_cancel(archive: Archive,
                                                           data: Data) -> None:
    """A C-CANCEL (PS3.7 9.3.2.3) sent after the first pending response of a 200-match
    C-FIND ends it with status Cancel before all matches are sent.

    pynetdicom's reactor reads an incoming PDU only when it has nothing queued to send, so
    now and then (about 1 in 40 here) the archive queues every pending response before it
    reads the cancel and ends with Success: a cancel that comes too late, inherent to
    DIMSE. Each attempt must end one of these two ways; one of five must be cancelled.
    """
    model = StudyRootQueryRetrieveInformationModelFind
    ae = AE(ae_title="PYCANCEL")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=BULK_AE)
    assert assoc.is_established
    identifier = _identifier("IMAGE", StudyInstanceUID=data.bulk.uid, SOPInstanceUID="")
    outcomes = []
    try:
        for msg_id in range(7, 12):  # a cancel that comes late must not hit the next one
            responses = assoc.send_c_find(identifier, model, msg_id=msg_id)
            status, first = next(responses)
            assert status.Status == PENDING and first is not None
            assert first.SOPInstanceUID in data.bulk.files
            assoc.send_c_cancel(msg_id, query_model=model)
            statuses = [PENDING, *(int(s.Status) for s, _ in responses)]
            assert set(statuses[:-1]) == {PENDING}
            pending, final = len(statuses) - 1, statuses[-1]
            outcomes.append((pending, hex(final)))
            assert (final == CANCEL and pending < MAX_FIND) or \
                (final == SUCCESS and pending == MAX_FIND), outcomes
            if final == CANCEL:
                break
        assert outcomes[-1][1] == hex(CANCEL), outcomes
        # the association goes on: the next C-FIND on it completes
        again = list(assoc.send_c_find(_identifier(
            "STUDY", StudyInstanceUID=data.bulk.uid), model, msg_id=20))
        assert [int(s.Status) for s, _ in again] == [PENDING, SUCCESS]
    finally:
        assoc.release()


def test_find_on_a_tenant_called_ae_title_sees_only_that_tenant(
        archive: Archive, data: Data, tmp_path: Path) -> None:
    assert _studies_found(archive, tmp_path, "PatientName", called_ae=CARDIO_AE) \
        == [data.cardio.uid]
    assert _studies_found(archive, tmp_path, "PatientName", called_ae=ARCHIVE_AE) \
        == _study_uids(data, "S1", "S2", "S3")
    for called_ae, expected in ((CARDIO_AE, [data.cardio.uid]), (ARCHIVE_AE, []),
                                (BULK_AE, [])):
        assert _studies_found(archive, tmp_path, "PatientID=QR-P3",
                              called_ae=called_ae) == expected, called_ae
    found, status = pynetdicom_find(archive, _identifier(
        "IMAGE", StudyInstanceUID=data.cardio.uid, SOPInstanceUID=""), called_ae=CARDIO_AE)
    assert (status, _uids(found, "SOPInstanceUID")) == (SUCCESS, sorted(data.cardio.files))


# -- C-MOVE --------------------------------------------------------------------------------
def test_movescu_study_level_delivers_every_instance_byte_identical(
        archive: Archive, data: Data, destination: Destination) -> None:
    study = data["S2"]  # CT and MR images
    final, received = _move(archive, destination,
                            ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.uid}"])
    assert final["status"] == SUCCESS
    assert (final["completed"], final["failed"], final["warning"]) == (len(study.files), 0, 0)
    assert_delivered(received, study.files)


def test_movescu_series_level_delivers_the_series_byte_identical(
        archive: Archive, data: Data, destination: Destination) -> None:
    study = data["S3"]
    series = study.series[0]
    final, received = _move(archive, destination, [
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study.uid}",
        f"SeriesInstanceUID={series.uid}"])
    assert final["status"] == SUCCESS
    assert (final["completed"], final["failed"], final["warning"]) == (len(series.files), 0, 0)
    assert_delivered(received, series.files)


def test_movescu_image_level_delivers_the_listed_instances(
        archive: Archive, data: Data, destination: Destination) -> None:
    study = data["S1"]
    series = study.series[0]
    wanted = dict(sorted(series.files.items())[:2])
    final, received = _move(archive, destination, [
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study.uid}",
        f"SeriesInstanceUID={series.uid}", "SOPInstanceUID=" + "\\".join(wanted)])
    assert final["status"] == SUCCESS
    assert (final["completed"], final["failed"], final["warning"]) == (2, 0, 0)
    assert_delivered(received, wanted)


def test_movescu_patient_root_patient_level_delivers_the_patients_studies(
        archive: Archive, data: Data, destination: Destination) -> None:
    final, received = _move(archive, destination,
                            ["QueryRetrieveLevel=PATIENT", "PatientID=QR-P2"], model="-P")
    assert final["status"] == SUCCESS
    assert final["completed"] == len(data["S3"].files)
    assert_delivered(received, data["S3"].files)


def test_move_to_an_unknown_destination_fails_with_a801(
        archive: Archive, data: Data, destination: Destination) -> None:
    final, received = _move(archive, destination, [
        "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={data['S1'].uid}"],
        to="NOSUCHAE", check=False)
    assert final["status"] == 0xA801
    assert received == {}
    assert echo(archive)


def test_move_of_a_study_that_does_not_exist_succeeds_with_no_sub_operations(
        archive: Archive, data: Data, destination: Destination) -> None:
    final, received = _move(archive, destination,
                            ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={new_uid()}"])
    assert final["status"] == SUCCESS
    assert (final["completed"], final["failed"], final["warning"]) == (0, 0, 0)
    assert received == {}


def test_move_through_a_tenant_called_ae_title_retrieves_only_that_tenant(
        archive: Archive, data: Data, destination: Destination) -> None:
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={data.cardio.uid}"]
    final, received = _move(archive, destination, keys, called_ae=CARDIO_AE)
    assert (final["status"], final["completed"]) == (SUCCESS, len(data.cardio.files))
    assert_delivered(received, data.cardio.files)
    final, received = _move(archive, destination, keys, called_ae=ARCHIVE_AE)
    assert (final["status"], final["completed"], received) == (SUCCESS, 0, {})


# -- C-GET ---------------------------------------------------------------------------------
def test_getscu_study_and_series_level_deliver_byte_identical_instances(
        archive: Archive, data: Data, tmp_path: Path) -> None:
    study = data["S1"]
    log = getscu(archive, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.uid}"],
                 tmp_path / "study")
    final = dcmtk_final_response(log, "C-GET")
    assert final["status"] == SUCCESS
    assert (final["completed"], final["failed"], final["warning"]) == (len(study.files), 0, 0)
    assert_delivered(_by_sop_uid(tmp_path / "study"), study.files)

    study = data["S2"]
    series = study.series[0]  # MR
    log = getscu(archive, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study.uid}",
                           f"SeriesInstanceUID={series.uid}"], tmp_path / "series")
    final = dcmtk_final_response(log, "C-GET")
    assert final["status"] == SUCCESS
    assert (final["completed"], final["failed"], final["warning"]) == (len(series.files), 0, 0)
    assert_delivered(_by_sop_uid(tmp_path / "series"), series.files)


def test_pynetdicom_c_get_with_role_selection_delivers_byte_identical_instances(
        archive: Archive, data: Data) -> None:
    for study, series in ((data["S2"], None), (data["S3"], data["S3"].series[1])):
        if series is None:
            identifier = _identifier("STUDY", StudyInstanceUID=study.uid)
            expected = study.files
        else:
            identifier = _identifier("SERIES", StudyInstanceUID=study.uid,
                                     SeriesInstanceUID=series.uid)
            expected = series.files
        received, final = pynetdicom_get(archive, identifier)
        assert final.Status == SUCCESS
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations,
                final.NumberOfWarningSuboperations) == (len(expected), 0, 0)
        assert sorted(received) == sorted(expected)
        for sop_uid, sent in expected.items():
            assert received[sop_uid] == (ExplicitVRLittleEndian, data_set_bytes(sent))


def test_patient_root_c_get_at_patient_level(archive: Archive, data: Data) -> None:
    received, final = pynetdicom_get(
        archive, _identifier("PATIENT", PatientID="QR-P1"),
        model=PatientRootQueryRetrieveInformationModelGet)
    expected = {**data["S1"].files, **data["S2"].files}
    assert (final.Status, final.NumberOfCompletedSuboperations) == (SUCCESS, len(expected))
    assert sorted(received) == sorted(expected)
    assert all(received[sop][1] == data_set_bytes(path) for sop, path in expected.items())


# -- refusals and partial failures ---------------------------------------------------------
def test_retrieve_ae_title_of_a_tenant_answer_is_the_called_tenant_ae(
        archive: Archive, data: Data) -> None:
    found, status = pynetdicom_find(archive, _identifier(
        "STUDY", StudyInstanceUID=data.cardio.uid, RetrieveAETitle=""), called_ae=CARDIO_AE)
    assert status == SUCCESS
    assert [str(f.RetrieveAETitle).strip() for f in found] == [CARDIO_AE]
    found, _ = pynetdicom_find(archive, _identifier(
        "STUDY", StudyInstanceUID=_study_uids(data, "S1")[0], RetrieveAETitle=""))
    assert [str(f.RetrieveAETitle).strip() for f in found] == [ARCHIVE_AE]


def test_study_root_has_no_patient_level(archive: Archive, data: Data) -> None:
    found, status = pynetdicom_find(archive, _identifier("PATIENT", PatientID=""))
    assert found == [] and status == 0xA900  # Identifier does not match SOP Class


def test_c_get_without_the_unique_key_of_its_level_fails_and_sends_nothing(
        archive: Archive, data: Data) -> None:
    wildcard = _identifier("STUDY")
    with pydicom.config.disable_value_validation():  # a wildcard is no valid UID value
        wildcard.add_new(0x0020000D, "UI", "1.2.*")
    for identifier in (_identifier("STUDY", PatientName="doe*"), wildcard,
                       _identifier("FOO", StudyInstanceUID=_study_uids(data, "S1")[0])):
        received, final = pynetdicom_get(archive, identifier)
        assert received == {}
        assert final.Status & 0xF000 in (0xA000, 0xC000), hex(final.Status)  # a failure


def test_c_move_with_a_bad_identifier_fails_without_claiming_an_unknown_destination(
        archive: Archive, destination: Destination, data: Data) -> None:
    ae = AE(ae_title="PYMOVE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    try:
        responses = [s for s, _ in assoc.send_c_move(
            _identifier("FOO", StudyInstanceUID=_study_uids(data, "S1")[0]), DEST_AE,
            StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    final = responses[-1].Status
    assert final != 0xA801 and final & 0xF000 in (0xA000, 0xC000), hex(final)


def test_an_unreadable_file_fails_one_sub_operation_and_the_rest_is_delivered(
        archive: Archive, data: Data) -> None:
    study = data.cardio
    stored = sorted((archive.data_dir / "storage" / CARDIO_TENANT / study.uid).rglob("*.dcm"))
    assert len(stored) == len(study.files)
    hidden = stored[0].with_suffix(".hidden")
    stored[0].rename(hidden)
    try:
        ae = AE(ae_title="PYGET")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        got: list[str] = []

        def on_store(event: evt.Event) -> int:
            got.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=CARDIO_AE,
                             ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        try:
            responses = [s for s, _ in assoc.send_c_get(
                _identifier("STUDY", StudyInstanceUID=study.uid),
                StudyRootQueryRetrieveInformationModelGet)]
        finally:
            assoc.release()
        final = responses[-1]
        assert len(got) == len(study.files) - 1
        assert final.NumberOfFailedSuboperations == 1
        assert final.NumberOfCompletedSuboperations == len(study.files) - 1
        assert final.Status in (0xB000, 0xA702)  # warning: some sub-operations failed
    finally:
        hidden.rename(stored[0])
