"""HTTPS for the web role (hypercorn with web.tls_certfile / tls_keyfile) and the
development certificates of ``dicomcloud certs``."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from dicomweb_client import DICOMwebClient

from tests.support import ROOT, Archive, c_store, make_ct, wait_until


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    result = subprocess.run([sys.executable, "-m", "dicomcloud", "certs", "--out", str(out),
                             "--host", "127.0.0.1", "--host", "localhost"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Archive]:
    instance = Archive(tmp_path_factory.mktemp("tls") / "data", env={
        "DICOMCLOUD_WEB__TLS_CERTFILE": str(certs / "server.pem"),
        "DICOMCLOUD_WEB__TLS_KEYFILE": str(certs / "server-key.pem"),
    }).start()
    yield instance
    if instance.alive():
        instance.stop()


def trust(certs: Path) -> ssl.SSLContext:
    """A client context trusting only the development CA."""
    return ssl.create_default_context(cafile=str(certs / "ca.pem"))


def test_certs_makes_a_ca_and_a_server_certificate_for_the_hosts(certs: Path) -> None:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.load_cert_chain(certs / "client.pem", certs / "client-key.pem")  # a valid pair
    from cryptography import x509

    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert (certs / "server-key.pem").stat().st_mode & 0o077 == 0


def test_dicomweb_client_searches_and_retrieves_over_https(archive: Archive,
                                                           certs: Path) -> None:
    ds = make_ct()
    assert [s.Status for s in c_store(archive, [ds])] == [0]
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE of the environment wins over verify
    session.verify = str(certs / "ca.pem")
    client = DICOMwebClient(url=archive.url, session=session)
    assert archive.url.startswith("https://")
    wait_until(lambda: client.search_for_studies(
        search_filters={"StudyInstanceUID": ds.StudyInstanceUID}), message="indexed")
    (got,) = client.retrieve_study(ds.StudyInstanceUID)
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    metadata = client.retrieve_series_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    # URLs name the scheme the client used (dicomweb-client drops the port from Host)
    assert metadata[0]["7FE00010"]["BulkDataURI"].startswith("https://127.0.0.1")


def test_http2_is_offered_by_alpn(archive: Archive, certs: Path) -> None:
    with httpx.Client(http2=True, verify=trust(certs)) as client:
        response = client.get(f"{archive.base}/healthz")
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"


def test_plain_http_to_the_https_port_fails_and_the_server_goes_on(archive: Archive,
                                                                    certs: Path) -> None:
    with socket.create_connection(("127.0.0.1", archive.http_port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = sock.recv(1024)
    assert not answer.startswith(b"HTTP/1.1 200")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{archive.http_port}/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused
        httpx.get(f"{archive.base}/healthz")
    assert httpx.get(f"{archive.base}/healthz", verify=trust(certs)).status_code == 200


def test_half_configured_tls_is_a_clear_start_error(tmp_path: Path, certs: Path) -> None:
    import os

    env = {**os.environ, "DICOMCLOUD_WEB__TLS_CERTFILE": str(certs / "server.pem")}
    result = subprocess.run([sys.executable, "-m", "dicomcloud", "run", "--data-dir",
                             str(tmp_path / "d")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "tls_keyfile" in result.stderr
    env["DICOMCLOUD_WEB__TLS_KEYFILE"] = str(tmp_path / "missing.pem")
    result = subprocess.run([sys.executable, "-m", "dicomcloud", "run", "--data-dir",
                             str(tmp_path / "d")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "not found" in " ".join(result.stderr.split())


# -- DICOM TLS (PS3.15 B.1) ------------------------------------------------------------
@pytest.fixture(scope="module")
def dimse_tls(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Archive]:
    """An archive whose DIMSE port speaks TLS only and asks peers for a certificate."""
    instance = Archive(tmp_path_factory.mktemp("dicom-tls") / "data", env={
        "DICOMCLOUD_SCP__TLS_CERTFILE": str(certs / "server.pem"),
        "DICOMCLOUD_SCP__TLS_KEYFILE": str(certs / "server-key.pem"),
        "DICOMCLOUD_SCP__TLS_CA_CERTS": str(certs / "ca.pem"),
    }).start()
    yield instance
    if instance.alive():
        instance.stop()


def _tls_args(certs: Path, client_cert: bool = True) -> list[str]:
    own = (["+tls", str(certs / "client-key.pem"), str(certs / "client.pem")] if client_cert
           else ["+tla"])
    return [*own, "+cf", str(certs / "ca.pem")]


def test_echoscu_and_storescu_over_tls_with_a_client_certificate(
        dimse_tls: Archive, certs: Path, tmp_path: Path) -> None:
    from tests.support import require_tool, write_part10

    echoscu, storescu = require_tool("echoscu"), require_tool("storescu")
    target = ["-aec", dimse_tls.ae_title, "127.0.0.1", str(dimse_tls.dimse_port)]
    echo = subprocess.run([echoscu, *_tls_args(certs), *target], capture_output=True,
                          text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    ds = make_ct()
    path = write_part10(ds, tmp_path / "ct.dcm")
    store = subprocess.run([storescu, *_tls_args(certs), *target, str(path)],
                           capture_output=True, text=True, timeout=60)
    assert store.returncode == 0, store.stderr
    wait_until(lambda: dimse_tls.count(str(ds.StudyInstanceUID)) == 1,
               message="the instance stored over TLS indexed")


def test_plain_or_certificate_less_peers_are_refused_and_tls_goes_on(
        dimse_tls: Archive, certs: Path) -> None:
    from tests.support import require_tool

    echoscu = require_tool("echoscu")
    target = ["-aec", dimse_tls.ae_title, "127.0.0.1", str(dimse_tls.dimse_port)]
    plain = subprocess.run([echoscu, *target], capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
    anonymous = subprocess.run([echoscu, *_tls_args(certs, client_cert=False), *target],
                               capture_output=True, text=True, timeout=60)
    assert anonymous.returncode != 0
    again = subprocess.run([echoscu, *_tls_args(certs), *target], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "refused" in dimse_tls.log()
