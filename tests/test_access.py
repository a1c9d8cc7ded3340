"""Who may associate, and the record of who did what.

- Per-tenant peer allow-lists (``scp.allowed_peers``) and ``scp.reject_unknown_called_ae``:
  refused with A-ASSOCIATE-RJ (PS3.8 9.3.4) on the lean acceptor's path (C-ECHO/C-STORE),
  on pynetdicom's (C-FIND) and over DICOM TLS.
- The access log: one event per DICOMweb request and per association, published on
  ``log_queue`` and loaded by the worker into the index's ``access_log`` table, which
  ``dicomcloud access-log`` shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from tests.support import (
    ROOT,
    Archive,
    c_store,
    make_ct,
    require_tool,
    rows_where,
    wait_until,
    write_part10,
)

HOSP_AE, HOSP = "HOSPB", "hospb"


def peers_env() -> dict[str, str]:
    return {
        f"DICOMCLOUD_SCP__AE_TENANTS__{HOSP_AE}": HOSP,
        # CT1 from this machine only; MR2 from a network we are not on
        "DICOMCLOUD_SCP__ALLOWED_PEERS": "@json " + json.dumps(
            {HOSP: ["CT1@127.0.0.0/8", "MR2@10.9.9.0/24"]}),
        "DICOMCLOUD_SCP__REJECT_UNKNOWN_CALLED_AE": "true",
        "DICOMCLOUD_WEB__PROCESSES": "0",
    }


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    instance = Archive(tmp_path_factory.mktemp("access") / "data", env=peers_env()).start()
    yield instance
    if instance.alive():
        instance.stop()


def associate(archive: Archive, calling: str, called: str, context: Any = Verification,
              port: int | None = None, tls: Any = None) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port or archive.dimse_port, ae_title=called,
                        tls_args=tls)


def outcome(assoc: Any) -> tuple[str, int | None]:
    """("accepted", None), or ("rejected", reason) from the A-ASSOCIATE-RJ."""
    if assoc.is_established:
        assoc.release()
        return "accepted", None
    if assoc.is_rejected:
        return "rejected", int(assoc.acceptor.primitive.diagnostic)
    return "other", None


# -- allow-lists ------------------------------------------------------------------------
@pytest.mark.parametrize("context", [Verification, StudyRootQueryRetrieveInformationModelFind],
                         ids=["lean-acceptor", "pynetdicom"])
def test_a_tenant_admits_only_its_listed_peers(archive: Archive, context: Any) -> None:
    assert outcome(associate(archive, "CT1", HOSP_AE, context)) == ("accepted", None)
    # an AE title the tenant does not list: calling AE title not recognized (reason 3)
    assert outcome(associate(archive, "INTRUDER", HOSP_AE, context)) == ("rejected", 3)
    # a listed title from the wrong address
    assert outcome(associate(archive, "MR2", HOSP_AE, context)) == ("rejected", 3)
    # the default tenant has no list: any peer
    assert outcome(associate(archive, "INTRUDER", "DICOMCLOUD", context)) == ("accepted", None)


def test_an_unknown_called_ae_title_is_rejected_not_served_as_the_default_tenant(
        archive: Archive) -> None:
    assert outcome(associate(archive, "CT1", "TYPO_AE")) == ("rejected", 7)
    ds = make_ct()
    archive.ae_title = "TYPO_AE"
    try:
        with pytest.raises(AssertionError, match="not established"):
            c_store(archive, [ds], calling_ae="CT1")
    finally:
        archive.ae_title = "DICOMCLOUD"
    assert archive.count(str(ds.StudyInstanceUID)) == 0


def test_a_refused_peer_stores_nothing_and_an_admitted_one_stores_in_its_tenant(
        archive: Archive, tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    ds = make_ct()
    path = write_part10(ds, tmp_path / "ct.dcm")
    target = ["-aec", HOSP_AE, "127.0.0.1", str(archive.dimse_port), str(path)]
    refused = subprocess.run([storescu, "-aet", "INTRUDER", *target], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
    stored = subprocess.run([storescu, "-aet", "CT1", *target], capture_output=True,
                            text=True, timeout=60)
    assert stored.returncode == 0, stored.stderr
    root = f"{archive.base}/tenants/{HOSP}/dicomweb"
    study = str(ds.StudyInstanceUID)
    wait_until(lambda: bool(httpx.get(f"{root}/studies", params={
        "StudyInstanceUID": study}).json()), message="stored in the hospital tenant")
    assert archive.count(study) == 0  # not in the default tenant


def test_allowed_peers_hold_over_dicom_tls(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Over TLS the request cannot be peeked at; pynetdicom's negotiation refuses instead."""
    import ssl

    certs = tmp_path_factory.mktemp("access-certs")
    made = subprocess.run([sys.executable, "-m", "dicomcloud", "certs", "--out", str(certs),
                           "--host", "127.0.0.1"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    archive = Archive(tmp_path_factory.mktemp("access-tls") / "data", env={
        **peers_env(),
        "DICOMCLOUD_SCP__TLS_CERTFILE": str(certs / "server.pem"),
        "DICOMCLOUD_SCP__TLS_KEYFILE": str(certs / "server-key.pem"),
    }).start()
    try:
        def tls() -> tuple[ssl.SSLContext, str]:
            return ssl.create_default_context(cafile=str(certs / "ca.pem")), "127.0.0.1"

        assert outcome(associate(archive, "CT1", HOSP_AE, tls=tls())) == ("accepted", None)
        assert outcome(associate(archive, "INTRUDER", HOSP_AE, tls=tls())) == ("rejected", 3)
        assert outcome(associate(archive, "CT1", "TYPO_AE", tls=tls())) == ("rejected", 7)
        assert outcome(associate(archive, "INTRUDER", "DICOMCLOUD", tls=tls())) == (
            "accepted", None)
        # rejections over TLS are logged with their reason too
        wait_until(lambda: bool(rows_where(archive, calling_ae="INTRUDER", called_ae=HOSP_AE)),
                   message="the TLS rejection logged", timeout=30)
        [refused] = rows_where(archive, calling_ae="INTRUDER", called_ae=HOSP_AE)
        assert (refused["service"], refused["status"]) == ("A-ASSOCIATE-RJ", 3)
    finally:
        archive.stop()


@pytest.mark.parametrize(("setting", "message"), [
    ({"nosuch": ["CT1"]}, "no such tenant"),
    ({HOSP: ["CT1@300.1.1.1"]}, "CT1@300.1.1.1"),
    ({HOSP: ["A_TITLE_LONGER_THAN_16"]}, "is not AE"),
])
def test_bad_allowed_peers_are_a_clear_start_error(tmp_path: Path, setting: dict[str, Any],
                                                   message: str) -> None:
    env = {**os.environ, f"DICOMCLOUD_SCP__AE_TENANTS__{HOSP_AE}": HOSP,
           "DICOMCLOUD_SCP__ALLOWED_PEERS": "@json " + json.dumps(setting)}
    result = subprocess.run([sys.executable, "-m", "dicomcloud", "config", "show",
                             "--data-dir", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert message in " ".join(result.stderr.split())


# -- the access log ---------------------------------------------------------------------
def test_each_dicomweb_request_is_one_access_row(archive: Archive) -> None:
    ds = make_ct()
    assert [s.Status for s in c_store(archive, [ds])] == [0]
    study, series, sop = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                          str(ds.SOPInstanceUID))
    wait_until(lambda: archive.count(study) == 1, message="indexed")
    agent = {"User-Agent": "access-test/1.0"}
    frames = httpx.get(f"{archive.url}/studies/{study}/series/{series}/instances/{sop}/frames/1",
                       headers={**agent, "Accept": "multipart/related; type="
                                "\"application/octet-stream\"; transfer-syntax=*"})
    assert frames.status_code == 200
    missing = httpx.get(f"{archive.url}/studies/{generate_uid()}/metadata", headers=agent)
    assert missing.status_code == 404
    wait_until(lambda: len(rows_where(archive, user_agent="access-test/1.0")) >= 2,
               message="access rows of the requests loaded", timeout=30)
    rows = rows_where(archive, user_agent="access-test/1.0")
    frame = next(r for r in rows if r["status"] == 200)
    assert frame["protocol"] == "DICOMweb" and frame["service"] == "WADO-RS"
    assert frame["route"] == "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}"
    assert (frame["study_uid"], frame["series_uid"], frame["sop_uid"]) == (study, series, sop)
    assert frame["method"] == "GET" and frame["tenant_id"] == "default"
    assert frame["bytes_out"] >= len(frames.content) and frame["bytes_in"] == 0
    assert frame["client_ip"] == "127.0.0.1" and frame["duration_ms"] > 0
    assert frame["principal"] is None  # no auth configured
    assert [r["status"] for r in rows if r["route"] == "/studies/{study}/metadata"] == [404]


def test_each_association_is_one_access_row_with_its_services_and_study(
        archive: Archive, tmp_path: Path) -> None:
    study = generate_uid()
    items = [make_ct(study, generate_uid(), generate_uid()) for _ in range(2)]
    assert [s.Status for s in c_store(archive, items, calling_ae="ACCESSCT")] == [0, 0]
    echo = associate(archive, "ACCESSECHO", "DICOMCLOUD")
    assert echo.send_c_echo().Status == 0
    echo.release()
    find = associate(archive, "ACCESSFIND", "DICOMCLOUD",
                     StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    assert [status.Status for status, _ in find.send_c_find(
        query, StudyRootQueryRetrieveInformationModelFind)][-1] == 0
    find.release()
    rejected = associate(archive, "ACCESSNOTOK", HOSP_AE)
    assert rejected.is_rejected
    for calling in ("ACCESSCT", "ACCESSECHO", "ACCESSFIND", "ACCESSNOTOK"):
        wait_until(lambda c=calling: bool(rows_where(archive, calling_ae=c)),
                   message=f"the association of {calling} logged", timeout=30)
    [store] = rows_where(archive, calling_ae="ACCESSCT")
    assert store["protocol"] == "DIMSE" and store["route"] == "association"
    assert store["service"] == "C-STORE" and store["operations"] == 2
    assert store["status"] == 0 and store["study_uid"] == study
    assert store["called_ae"] == "DICOMCLOUD" and store["tenant_id"] == "default"
    sizes = sum(len(bytes(ds.PixelData)) for ds in items)
    assert store["bytes_in"] > sizes and store["bytes_out"] > 0
    assert rows_where(archive, calling_ae="ACCESSECHO")[0]["service"] == "C-ECHO"
    [found] = rows_where(archive, calling_ae="ACCESSFIND")
    assert found["service"] == "C-FIND" and found["study_uid"] == study
    assert found["bytes_in"] > 0 and found["bytes_out"] > 0
    [refused] = rows_where(archive, calling_ae="ACCESSNOTOK")
    assert refused["service"] == "A-ASSOCIATE-RJ" and refused["status"] == 3
    assert refused["tenant_id"] == HOSP


def test_a_refused_c_store_is_kept_with_its_status(archive: Archive) -> None:
    ds = make_ct()
    del ds.PixelData  # an image without pixel data: 0xA900 (PS3.4 B.2.3)
    statuses = c_store(archive, [ds], calling_ae="ACCESSBAD")
    assert statuses[0].Status == 0xA900
    assert "\\" not in str(statuses[0].get("ErrorComment", ""))
    wait_until(lambda: bool(rows_where(archive, calling_ae="ACCESSBAD")),
               message="logged", timeout=30)
    assert rows_where(archive, calling_ae="ACCESSBAD")[0]["status"] == 0xA900


def test_access_log_cli_prints_a_table_for_people(archive: Archive) -> None:
    httpx.get(f"{archive.url}/studies")
    wait_until(lambda: bool(rows_where(archive, route="/studies")), message="logged",
               timeout=30)
    result = subprocess.run(
        [sys.executable, "-m", "dicomcloud", "access-log", "--limit", "5", "--data-dir",
         str(archive.data_dir)], capture_output=True, text=True, cwd=archive.data_dir.parent,
        timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "QIDO-RS" in result.stdout and "service" in result.stdout


def test_access_events_replace_control_characters_and_fit_their_columns() -> None:
    from dicomcloud.accesslog import LIMITS, AccessEvent

    event = AccessEvent(tenant_id="default", protocol="DICOMweb", service="WADO-RS",
                        route="/studies/{study}/metadata", status=404, client_ip="::1",
                        study_uid="1.2\x00x" + "9" * 100, method="G" * 200,
                        user_agent="agent\x1b[31m" + "x" * 5000, calling_ae="A\x00B")
    event.clip()
    assert event.study_uid == "1.2?x" + "9" * 59
    assert event.method == "G" * 16 and event.calling_ae == "A?B"
    assert len(event.user_agent or "") == LIMITS["user_agent"]
    assert (event.user_agent or "").isprintable()
