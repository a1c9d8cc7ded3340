"""Tenants: over DICOMweb the default tenant at the root and every tenant under
``/tenants/{tenant}/dicomweb``; over DIMSE the tenant of the called AE title. Each sees only
its own data, even when two tenants hold the same UIDs (QIDO, WADO, STOW, C-FIND, C-MOVE,
C-GET)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.support import (
    Archive,
    c_store,
    free_port,
    layout_snapshot,
    make_ct,
    multipart,
    part10_bytes,
    wait_until,
)

HOSP_AE, HOSP = "HOSPB", "hospb"
DICOM_JSON = "application/dicom+json"


MOVE_DEST = "CATCHER"


@pytest.fixture(scope="module")
def catcher_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, catcher_port: int) -> Iterator[Archive]:
    instance = Archive(tmp_path_factory.mktemp("tenants") / "data", env={
        f"DICOMCLOUD_SCP__AE_TENANTS__{HOSP_AE}": HOSP,
        f"DICOMCLOUD_SCP__MOVE_DESTINATIONS__{MOVE_DEST}": f"127.0.0.1:{catcher_port}",
        "DICOMCLOUD_WEB__PROCESSES": "0",
    }).start()
    yield instance
    if instance.alive():
        instance.stop()


@pytest.fixture(scope="module")
def same_uids(archive: Archive) -> dict[str, Any]:
    """One study with the same UIDs stored in both tenants, with different patients."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    default = make_ct(study, series, sop, PatientName="Default^Patient", PatientID="P-DEF")
    other = make_ct(study, series, sop, PatientName="Hospital^Patient", PatientID="P-HOSP")
    assert [s.Status for s in c_store(archive, [default])] == [0]
    archive.ae_title = HOSP_AE
    try:
        assert [s.Status for s in c_store(archive, [other])] == [0]
    finally:
        archive.ae_title = "DICOMCLOUD"
    for root in (archive.url, tenant_root(archive, HOSP)):
        wait_until(lambda r=root: found(r, study), message=f"indexed at {root}")
    return {"study": study, "series": series, "sop": sop}


def found(root: str, study: str) -> bool:
    response = httpx.get(f"{root}/studies", params={"StudyInstanceUID": study})
    return response.status_code == 200 and bool(response.content) and bool(response.json())


def tenant_root(archive: Archive, tenant: str) -> str:
    return f"{archive.base}/tenants/{tenant}/dicomweb"


def patient(root: str, study: str) -> str:
    rows = httpx.get(f"{root}/studies", params={"StudyInstanceUID": study}).json()
    assert len(rows) == 1
    return str(rows[0]["00100020"]["Value"][0])


def test_each_tenant_searches_only_its_own_studies_with_the_same_uids(
        archive: Archive, same_uids: dict[str, Any]) -> None:
    study = same_uids["study"]
    assert patient(archive.url, study) == "P-DEF"
    assert patient(tenant_root(archive, "default"), study) == "P-DEF"
    assert patient(tenant_root(archive, HOSP), study) == "P-HOSP"
    for level in ("/series", "/instances"):
        rows = httpx.get(f"{tenant_root(archive, HOSP)}{level}",
                         params={"StudyInstanceUID": study}).json()
        assert [r["00100020"]["Value"][0] for r in rows] == ["P-HOSP"]


def test_metadata_frames_and_retrieve_come_from_the_tenant_addressed(
        archive: Archive, same_uids: dict[str, Any]) -> None:
    path = (f"/studies/{same_uids['study']}/series/{same_uids['series']}/instances/"
            f"{same_uids['sop']}")
    for root, expected in ((archive.url, "P-DEF"), (tenant_root(archive, HOSP), "P-HOSP")):
        doc = httpx.get(f"{root}{path}/metadata", headers={"Accept": DICOM_JSON}).json()
        assert doc[0]["00100020"]["Value"] == [expected]
        # BulkDataURIs and the retrieve stay under the tenant's root
        assert doc[0]["7FE00010"]["BulkDataURI"].startswith(f"{root}/studies/")
        retrieved = httpx.get(f"{root}{path}", headers={"Accept": "application/dicom"})
        assert retrieved.status_code == 200
        assert f"P-{expected[2:]}".encode() in retrieved.content
        frame = httpx.get(f"{root}{path}/frames/1", headers={
            "Accept": 'multipart/related; type="application/octet-stream"'})
        assert frame.status_code == 200


def test_stow_to_a_tenant_root_stores_in_that_tenant_only(archive: Archive) -> None:
    ds = make_ct(PatientID="P-STOW")
    body, content_type = multipart([part10_bytes(ds)])
    response = httpx.post(f"{tenant_root(archive, HOSP)}/studies", content=body, headers={
        "Content-Type": content_type, "Accept": DICOM_JSON})
    assert response.status_code == 200, response.text
    study = str(ds.StudyInstanceUID)
    wait_until(lambda: found(tenant_root(archive, HOSP), study), message="indexed in hospb")
    assert patient(tenant_root(archive, HOSP), study) == "P-STOW"
    assert not found(archive.url, study)
    # the stored object's URL names the tenant's root
    assert f"/tenants/{HOSP}/dicomweb/studies/{study}" in response.text


@pytest.mark.parametrize("tenant", ["unknown", "metadata", "Hospb", "%2E%2E", "a" * 70])
def test_unknown_or_invalid_tenant_is_404_and_never_creates_anything(
        archive: Archive, tenant: str) -> None:
    root = f"{archive.base}/tenants/{tenant}/dicomweb"
    before = layout_snapshot(archive)
    assert httpx.get(f"{root}/studies").status_code == 404
    body, content_type = multipart([part10_bytes(make_ct())])
    response = httpx.post(f"{root}/studies", content=body,
                          headers={"Content-Type": content_type})
    assert response.status_code == 404
    assert layout_snapshot(archive) == before


# -- DIMSE: the called AE title selects the tenant ---------------------------------------
def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _associate(archive: Archive, called: str, *contexts: Any, get_roles: bool = False) -> Any:
    ae = AE(ae_title="TENANTTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in contexts:
        ae.add_requested_context(context)
    roles = []
    if get_roles:
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        roles = [build_role(CTImageStorage, scp_role=True)]
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=called, ext_neg=roles)
    assert assoc.is_established
    return assoc


@pytest.mark.parametrize(("called", "expected"), [("DICOMCLOUD", "P-DEF"), (HOSP_AE, "P-HOSP")])
def test_c_find_with_the_same_uids_answers_from_the_called_tenant_only(
        archive: Archive, same_uids: dict[str, Any], called: str, expected: str) -> None:
    assoc = _associate(archive, called, StudyRootQueryRetrieveInformationModelFind)
    try:
        for level, keys in (("STUDY", {"StudyInstanceUID": same_uids["study"]}),
                            ("IMAGE", {"StudyInstanceUID": same_uids["study"],
                                       "SeriesInstanceUID": same_uids["series"],
                                       "SOPInstanceUID": same_uids["sop"]})):
            query = _query(level, PatientID="", **keys)
            answers = [ident.PatientID for status, ident in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind)
                if status.Status in (0xFF00, 0xFF01)]
            assert answers == [expected], level
    finally:
        assoc.release()


@pytest.mark.parametrize(("called", "expected"), [("DICOMCLOUD", "P-DEF"), (HOSP_AE, "P-HOSP")])
def test_c_get_with_the_same_uids_sends_the_called_tenant_instance_only(
        archive: Archive, same_uids: dict[str, Any], called: str, expected: str) -> None:
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.dataset.PatientID))
        return 0x0000

    assoc = _associate(archive, called, StudyRootQueryRetrieveInformationModelGet,
                          get_roles=True)
    assoc.bind(evt.EVT_C_STORE, on_store)
    try:
        statuses = [status.Status for status, _ in assoc.send_c_get(
            _query("STUDY", StudyInstanceUID=same_uids["study"]),
            StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000
    assert received == [expected]


@pytest.mark.parametrize(("called", "expected"), [("DICOMCLOUD", "P-DEF"), (HOSP_AE, "P-HOSP")])
def test_c_move_with_the_same_uids_sends_the_called_tenant_instance_only(
        archive: Archive, same_uids: dict[str, Any], catcher_port: int, called: str,
        expected: str) -> None:
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.dataset.PatientID))
        return 0x0000

    catcher = AE(ae_title=MOVE_DEST)
    catcher.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    server = catcher.start_server(("127.0.0.1", catcher_port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        assoc = _associate(archive, called, StudyRootQueryRetrieveInformationModelMove)
        try:
            statuses = [status.Status for status, _ in assoc.send_c_move(
                _query("STUDY", StudyInstanceUID=same_uids["study"]), MOVE_DEST,
                StudyRootQueryRetrieveInformationModelMove)]
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert statuses[-1] == 0x0000
    assert received == [expected]
