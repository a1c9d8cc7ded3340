"""Never lose an acknowledged instance: ``kill -9`` the archive while it receives.

Each round sends a generated series over C-STORE from a thread, records exactly which
instances were acknowledged (status 0x0000), kills the server at a random moment during
the sending and restarts it on the same data directory and ports. Like a real modality, the
next round first re-sends what was not acknowledged. At the end every acknowledged instance
must be on disk, indexed exactly once, and in the series and study metadata documents.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from tests.factories import ct_series, new_uid
from tests.support import Archive, wait_until

ROUNDS = 6
PER_ROUND = 60
TENANT = "default"


class Sender(threading.Thread):
    """Sends data sets over one association; remembers which were acknowledged."""

    def __init__(self, archive: Archive, datasets: list[Dataset]) -> None:
        super().__init__(name="crash-test-scu", daemon=True)
        self.port = archive.dimse_port
        self.called = archive.ae_title
        self.datasets = datasets
        self.acked: list[str] = []
        self.refused: list[tuple[str, int]] = []
        self.attempted = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ae = AE(ae_title="CRASHTEST")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            # pynetdicom waits dimse_timeout for a response even after the peer is gone
            ae.acse_timeout = ae.network_timeout = 15
            ae.dimse_timeout = 5
            assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called)
            if not assoc.is_established:
                return
            # pynetdicom skips close() when shutdown() fails on a connection the peer reset:
            # keep the socket to close it ourselves (else a ResourceWarning, an error here).
            raw = assoc.dul.socket.socket if assoc.dul.socket else None
            try:
                for ds in self.datasets:
                    if not assoc.is_established:
                        break
                    self.attempted += 1
                    status = assoc.send_c_store(ds)
                    code = status.get("Status") if status else None
                    if code == 0x0000:
                        self.acked.append(str(ds.SOPInstanceUID))
                    elif code is not None:
                        self.refused.append((str(ds.SOPInstanceUID), int(code)))
            finally:
                if assoc.is_established:
                    assoc.release()
                if raw is not None:
                    raw.close()
        except Exception as exc:  # the server dies under us on purpose
            self.error = exc


def send_and_kill(archive: Archive, datasets: list[Dataset], rng: random.Random,
                  notes: list[str]) -> list[str]:
    """Send ``datasets``; kill -9 the server after a random number of acknowledgements."""
    kill_after = rng.randint(1, len(datasets) - 15)
    sender = Sender(archive, datasets)
    started = time.monotonic()
    sender.start()
    while len(sender.acked) < kill_after and sender.is_alive():
        if time.monotonic() - started > 60:
            break
        time.sleep(0.001)
    # a random moment, well before the last 15 instances could have been sent
    per_instance = (time.monotonic() - started) / max(len(sender.acked), 1)
    time.sleep(rng.uniform(0, min(0.2, 5 * per_instance)))
    archive.kill()
    sender.join(30)
    notes.append(f"sent {sender.attempted}/{len(datasets)}, acked {len(sender.acked)} "
                 f"(kill after {kill_after}), client error {sender.error!r}")
    context = "\n".join(notes)
    assert not sender.is_alive(), f"the SCU hung after the server died\n{context}"
    assert sender.refused == [], f"instances refused: {sender.refused[:5]}\n{context}"
    assert len(sender.acked) >= kill_after, f"server failed early\n{context}\n{archive.log()}"
    assert len(sender.acked) < len(datasets), f"killed after the last instance\n{context}"
    return sender.acked


def send_all(archive: Archive, datasets: list[Dataset]) -> list[str]:
    sender = Sender(archive, datasets)
    sender.start()
    sender.join(120)
    assert sender.error is None, sender.error
    assert sender.refused == []
    return sender.acked


def metadata_sops(path: Path) -> list[str] | None:
    """SOP Instance UIDs of a DICOM JSON metadata document (None while absent)."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return [item["00080018"]["Value"][0] for item in doc]


def test_acknowledged_instances_survive_kill_9(
        archive_factory: Callable[..., Archive]) -> None:
    seed = int(os.environ.get("DICOMCLOUD_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    notes: list[str] = [f"seed {seed} (rerun with DICOMCLOUD_CRASH_SEED={seed})"]
    archive = archive_factory("crash")

    study = new_uid()
    series_of: dict[str, str] = {}  # sop -> series
    acked: set[str] = set()
    pending: list[Dataset] = []  # generated, not acknowledged yet: re-sent next round
    for round_no in range(ROUNDS):
        fresh = ct_series(PER_ROUND, study_uid=study, series_number=round_no + 1,
                          patient_name="CRASH^TEST", patient_id="CRASH")
        for ds in fresh:
            series_of[str(ds.SOPInstanceUID)] = str(ds.SeriesInstanceUID)
        batch = pending + fresh
        got = send_and_kill(archive, batch, rng, notes)
        # on disk the moment the server died, before a restart could repair anything
        lost = [sop for sop in got if not archive.stored_path(
            TENANT, study, series_of[sop], sop).is_file()]
        assert lost == [], f"{len(lost)} acknowledged file(s) missing\n" + "\n".join(notes)
        acked.update(got)
        pending = [ds for ds in batch if str(ds.SOPInstanceUID) not in acked]
        archive.restart()

    # A last, undisturbed pass delivers what was never acknowledged.
    acked.update(send_all(archive, pending))
    assert acked == set(series_of), "\n".join(notes)

    # 1. every acknowledged instance is on disk
    missing = [sop for sop in acked
               if not archive.stored_path(TENANT, study, series_of[sop], sop).is_file()]
    assert missing == [], f"{len(missing)} acknowledged instance(s) lost\n" + "\n".join(notes)

    # 2. indexed exactly once
    def indexed() -> Counter[str]:
        rows = archive.qido(f"/studies/{study}/instances", limit=10000)
        return Counter(row["00080018"]["Value"][0] for row in rows)

    wait_until(lambda: set(indexed()) >= acked, timeout=60, message="all instances indexed")
    counts = indexed()
    assert set(counts) == acked
    assert [sop for sop, n in counts.items() if n > 1] == []
    wait_until(lambda: archive.count(study) == len(acked), timeout=30,
               message="study instance count")
    per_series = Counter(series_of.values())
    for row in archive.qido(f"/studies/{study}/series"):
        series = row["0020000E"]["Value"][0]
        assert row["00201209"]["Value"] == [per_series[series]]

    # 3. in the series and study metadata, once each
    meta = archive.data_dir / "storage" / "metadata" / TENANT / study
    for series, expected in per_series.items():
        wanted = sorted(s for s in acked if series_of[s] == series)
        wait_until(lambda p=meta / f"{series}.json", w=wanted: sorted(metadata_sops(p) or [])
                   == w, timeout=60, message=f"metadata of series {series}")
        assert len(wanted) == expected
    wait_until(lambda: sorted(metadata_sops(meta.parent / f"{study}.json") or []) == sorted(acked),
               timeout=60, message="study metadata")

    # 4. nothing half-written is left once the archive has settled
    staging = archive.data_dir / "storage" / ".staging"
    wait_until(lambda: not list(staging.rglob("*.part")), timeout=30,
               message="empty staging area")
