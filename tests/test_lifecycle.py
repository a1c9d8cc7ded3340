"""Process lifecycle: graceful stop, listener processes, restart on the same data."""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.support import Archive, sample_file, wait_until


def _series(count: int) -> list[pydicom.Dataset]:
    template = pydicom.dcmread(sample_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    out = []
    for number in range(1, count + 1):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.file_meta = FileMetaDataset(template.file_meta)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def test_sigterm_lets_a_running_association_finish(archive_factory) -> None:
    archive: Archive = archive_factory("graceful")
    datasets = _series(40)
    statuses: list[int] = []
    started = threading.Event()

    def send() -> None:
        ae = AE(ae_title="GRACEFUL")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=archive.ae_title)
        assert assoc.is_established
        for ds in datasets:
            statuses.append(int(assoc.send_c_store(ds).Status))
            started.set()
            time.sleep(0.02)  # keep the association open across the SIGTERM
        assoc.release()

    sender = threading.Thread(target=send)
    sender.start()
    assert started.wait(30)
    assert archive.proc is not None
    archive.proc.send_signal(signal.SIGTERM)
    sender.join(60)
    assert archive.stop() == 0
    assert statuses == [0] * len(datasets), "every C-STORE of the running association succeeded"

    restarted = Archive(archive.data_dir)
    restarted.http_port, restarted.dimse_port = archive.http_port, archive.dimse_port
    restarted.start()
    try:
        study = str(datasets[0].StudyInstanceUID)
        wait_until(lambda: restarted.count(study) == len(datasets), message="all 40 indexed")
    finally:
        restarted.stop()


def test_listener_processes_are_supervised_and_die_with_the_archive(archive_factory) -> None:
    archive: Archive = archive_factory("listeners")
    assert archive.proc is not None
    children = Path(f"/proc/{archive.proc.pid}/task/{archive.proc.pid}/children")

    def listener_pids() -> list[int]:  # multiprocessing's resource tracker is a child too
        return [int(p) for p in children.read_text().split() if "spawn_main" in
                Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]

    listeners = listener_pids()
    assert len(listeners) == 3  # one DIMSE listener, two HTTP servers (the defaults)
    # a listener that dies is replaced, and the archive is not ready until it is back
    os.kill(listeners[0], signal.SIGKILL)

    def replaced() -> bool:
        now = listener_pids()
        ready = httpx.get(f"{archive.base}/readyz", timeout=5).status_code == 200
        return listeners[0] not in now and len(now) >= len(listeners) and ready

    wait_until(replaced, timeout=30, message="the dead listener replaced and ready")
    survivors = listener_pids()
    archive.kill()  # kill -9 of the main process ...
    # ... takes its listeners with it: nothing keeps answering on the DIMSE port
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() and _not_zombie(p)
                               for p in survivors), timeout=10, message="listeners gone")


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_readyz_and_healthz(archive: Archive) -> None:
    assert httpx.get(f"{archive.base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{archive.base}/readyz").json()
    assert ready["status"] == "ready"
    assert "web" in ready["roles"]  # the roles of the process that answered
