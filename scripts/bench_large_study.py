"""Large-study benchmark: one study of 3,000 instances (3 series x 1,000), metadata latency.

Measures what a viewer opening a big study waits for (PS3.18 10.4 metadata):
first-time series and study metadata (generated from the files, before the worker has
pre-generated them), the same once pre-generated (the worker's documents), and the peak
memory of the archive's process tree over the whole run. Runs its own archive on ports
18090/11190 in a fresh data directory; prints a table and writes JSON next to it.

    .venv/bin/python scripts/bench_large_study.py [--instances-per-series 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
HTTP, DIMSE = 18090, 11190
BASE = f"http://127.0.0.1:{HTTP}/dicomweb"


def instance(study: str, series: str, number: int, series_number: int) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = \
        "LARGE^STUDY", "LARGE-1", "19600101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = \
        "20260101", "101010", "ACC-LARGE", "1"
    ds.StudyDescription, ds.SeriesDescription = "CT chest abdomen pelvis", "Axial 0.6 mm"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", series_number, number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-250.0, -250.0, -0.6 * number]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness, ds.SliceLocation, ds.PixelSpacing = 0.6, -0.6 * number, [0.98, 0.98]
    ds.KVP, ds.ConvolutionKernel, ds.FrameOfReferenceUID = 120, "B30f", generate_uid()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.WindowCenter, ds.WindowWidth = \
        -1024, 1, 40, 400
    ds.PixelData = (np.arange(64 * 64, dtype=np.uint16) % 4096).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def stow(client: httpx.Client, files: list[bytes]) -> None:
    boundary = "largestudyboundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f
                    + b"\r\n" for f in files) + f"--{boundary}--\r\n".encode()
    response = client.post(f"{BASE}/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    response.raise_for_status()


class PeakMemory(threading.Thread):
    """Samples the RSS of a process tree every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak, self.stopped = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.05)


def timed_get(client: httpx.Client, url: str) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.get(url, headers={"Accept": "application/dicom+json"})
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000, len(response.content)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances-per-series", type=int, default=1000)
    parser.add_argument("--series", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get(
        "BENCH_WORK", tempfile.gettempdir() + "/dicom-bench")) / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicomcloud-large-"))
    env = {**os.environ, "DICOMCLOUD_WORKER__QUIET_SECONDS": "15"}
    server = subprocess.Popen(
        [str(ROOT / ".venv/bin/dicomcloud"), "run", "--data-dir", str(work / "data"),
         "--http-port", str(HTTP), "--dimse-port", str(DIMSE)], env=env,
        stdout=subprocess.DEVNULL, stderr=open(work / "archive.log", "wb"))  # noqa: SIM115
    memory = PeakMemory(server.pid)
    memory.start()
    result: dict[str, object] = {}
    try:
        with httpx.Client(timeout=120) as client:
            for _ in range(200):
                try:
                    if client.get(f"http://127.0.0.1:{HTTP}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            study = generate_uid()
            series = [generate_uid() for _ in range(args.series)]
            total = args.series * args.instances_per_series
            print(f"storing {total} instances in one study over STOW-RS ...", flush=True)
            started = time.perf_counter()
            batch: list[bytes] = []
            for s_index, series_uid in enumerate(series, 1):
                for number in range(1, args.instances_per_series + 1):
                    batch.append(instance(study, series_uid, number, s_index))
                    if len(batch) == 50:
                        stow(client, batch)
                        batch = []
            if batch:
                stow(client, batch)
            while True:
                found = client.get(f"{BASE}/studies/{study}/instances",
                                   params={"limit": 1, "offset": total - 1}).json()
                if found:
                    break
                time.sleep(0.2)
            result["ingest_seconds"] = round(time.perf_counter() - started, 2)
            series_url = f"{BASE}/studies/{study}/series/{series[0]}/metadata"
            study_url = f"{BASE}/studies/{study}/metadata"
            first_series, size_series = timed_get(client, series_url)
            first_study, size_study = timed_get(client, study_url)
            result.update(first_series_metadata_ms=round(first_series, 1),
                          first_study_metadata_ms=round(first_study, 1),
                          series_metadata_bytes=size_series, study_metadata_bytes=size_study)
            print("waiting for the worker to pre-generate the metadata ...", flush=True)
            documents = work / "data" / "storage" / "metadata" / "default" / study
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not (
                    all((documents / f"{s}.json").exists() for s in series)
                    and (documents.parent / f"{study}.json").exists()):
                time.sleep(0.5)
            time.sleep(2)  # the last series is marked done after its study document
            cached_series = [timed_get(client, series_url)[0] for _ in range(args.repeats)]
            cached_study = [timed_get(client, study_url)[0] for _ in range(args.repeats)]
            result.update(
                cached_series_metadata_p50_ms=round(statistics.median(cached_series), 1),
                cached_study_metadata_p50_ms=round(statistics.median(cached_study), 1))
    finally:
        memory.stopped.set()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        result["peak_rss_mib"] = round(memory.peak / 2**20, 1)
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"large-study-{stamp}.json").write_text(json.dumps(result, indent=2))
    print(f"\n## Large study ({args.series} series x {args.instances_per_series} instances)\n")
    print("| metric | value |\n|---|---:|")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
