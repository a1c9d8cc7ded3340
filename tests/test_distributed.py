"""Distributed mode on real engines: roles in separate processes sharing PostgreSQL, Kafka
(Tansu, a Kafka-protocol broker) and Redis, two web nodes behind Debian's nginx running
``deploy/nginx.conf``.

One cluster per module: one ``scp`` node, two ``consumer`` nodes, two ``web`` nodes, one
``worker`` node, each a ``dicomcloud run --roles=...`` process configured by environment
alone (``DICOMCLOUD_INDEX_URL``, ``DICOMCLOUD_QUEUE_URL``, ``DICOMCLOUD_CACHE_URL``) and
sharing one storage directory. DCMTK ``storescu`` sends over four associations at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from dicomcloud.model import DicomImageMeta, DicomStateMeta
from tests.support import (
    ROOT,
    _die_with_test_run,
    free_port,
    make_ct,
    require_tool,
    wait_until,
    write_part10,
)

AE = "DICOMCLOUD"
SERIES_PER_STUDY, PER_SERIES = 2, 25


# -- processes ------------------------------------------------------------------------------
@dataclasses.dataclass
class Node:
    """One ``dicomcloud run`` process with some roles."""

    name: str
    roles: str
    env: dict[str, str]
    data_dir: Path
    http_port: int = 0
    dimse_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def start(self) -> Node:
        self.http_port = self.http_port or free_port()
        self.dimse_port = self.dimse_port or free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomcloud", "run", "--data-dir", str(self.data_dir),
                 "--roles", self.roles, "--http-port", str(self.http_port),
                 "--dimse-port", str(self.dimse_port), "--ae-title", AE],
                env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.data_dir.parent, preexec_fn=_die_with_test_run)
        wait_until(self._started, timeout=90, message=f"{self.name} started")
        return self

    def _started(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        if "web" in self.roles:
            try:
                return httpx.get(f"http://127.0.0.1:{self.http_port}/readyz",
                                 timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        return "dicomcloud starting roles" in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class RedisServer:
    """A Redis server of this module only (so that the test may restart it)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_test_run)
        import redis

        def up() -> bool:
            try:
                return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
            except redis.RedisError:
                return False
        wait_until(up, timeout=20, message="Redis up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def nginx_config(listen: int, upstreams: list[int], prefix: Path) -> str:
    """``deploy/nginx.conf`` pointed at loopback ports, runnable without root paths."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    servers = [line for line in text.splitlines() if ":8080" in line]
    assert len(servers) == 2, "deploy/nginx.conf: expected two upstream server lines"
    for line, port in zip(servers, upstreams, strict=True):
        text = text.replace(line, re.sub(r"\S+:8080", f"127.0.0.1:{port}", line))
    assert "listen 80;" in text
    text = text.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    # paths of a system nginx (pid, logs, user) become ours
    text = re.sub(r"(?m)^\s*(user|pid|error_log)\s[^;]*;\s*$", "", text)
    text = re.sub(r"(?m)^(\s*)access_log\s[^;]*;", r"\1access_log off;", text)
    return f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n" + text


@dataclasses.dataclass
class Cluster:
    nodes: dict[str, Node]
    redis: RedisServer
    nginx_port: int
    index_url: str
    kafka: str
    prefix: str
    storage: Path

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}/dicomweb"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_url: str,
            kafka_broker: str) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("distributed")
    index_url = _fresh_database(postgres_url, "dist")
    redis_server = RedisServer(base)
    redis_server.start()
    prefix = f"d{uuid.uuid4().hex[:8]}."
    shared = base / "shared"
    env = {
        "DICOMCLOUD_INDEX_URL": index_url,
        "DICOMCLOUD_QUEUE_URL": f"kafka://{kafka_broker}?prefix={prefix}&partitions=4"
                                "&session_timeout_ms=3000",
        "DICOMCLOUD_CACHE_URL": f"redis://127.0.0.1:{redis_server.port}/0?prefix={prefix}",
        "DICOMCLOUD_STORAGE_URL": f"file://{shared}",
        "DICOMCLOUD_WEB__PROCESSES": "0",
        "DICOMCLOUD_SCP__PROCESSES": "0",
        "DICOMCLOUD_WEB__TRUST_FORWARDED_HEADERS": "true",
        "DICOMCLOUD_WORKER__QUIET_SECONDS": "1",
        "DICOMCLOUD_WORKER__SCAN_INTERVAL_SECONDS": "0.5",
    }
    migrate = subprocess.run([sys.executable, "-m", "dicomcloud", "migrate"],
                             env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    layout = [("scp", "scp"), ("consumer1", "consumer"), ("consumer2", "consumer"),
              ("web1", "web"), ("web2", "web"), ("worker", "worker")]
    nodes = {name: Node(name, roles, env, base / name) for name, roles in layout}
    nginx: subprocess.Popen[bytes] | None = None
    try:
        for node in nodes.values():
            node.start()
        nginx_port = free_port()
        prefix_dir = base / "nginx"
        prefix_dir.mkdir()
        conf = prefix_dir / "nginx.conf"
        conf.write_text(nginx_config(nginx_port, [nodes["web1"].http_port,
                                                  nodes["web2"].http_port], prefix_dir))
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        with open(prefix_dir / "out.log", "wb") as out:
            nginx = subprocess.Popen([binary, "-p", str(prefix_dir), "-c", str(conf),
                                      "-g", "daemon off;"], stderr=subprocess.STDOUT,
                                     stdout=out, preexec_fn=_die_with_test_run)
        wait_until(lambda: _ok(f"http://127.0.0.1:{nginx_port}/healthz"), timeout=20,
                   message="nginx up")
        yield Cluster(nodes, redis_server, nginx_port, index_url, kafka_broker, prefix,
                      shared)
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for node in nodes.values():
            node.stop()
        redis_server.stop()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _fresh_database(postgres_url: str, suffix: str) -> str:
    """A new empty database next to the session's one."""
    base, _, name = postgres_url.rpartition("/")
    fresh = f"{name}_{suffix}"

    async def create() -> None:
        engine = create_async_engine(postgres_url, isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{fresh}"'))
            await conn.execute(sa.text(f'CREATE DATABASE "{fresh}"'))
        await engine.dispose()

    asyncio.run(create())
    return f"{base}/{fresh}"


# -- data and DIMSE -------------------------------------------------------------------------
@dataclasses.dataclass
class Sent:
    studies: dict[str, dict[str, list[str]]]  # study -> series -> SOP UIDs
    directory: Path

    @property
    def sops(self) -> list[str]:
        return [s for series in self.studies.values() for sops in series.values() for s in sops]


def make_files(directory: Path, count: int) -> Sent:
    studies: dict[str, dict[str, list[str]]] = {}
    per_study = SERIES_PER_STUDY * PER_SERIES
    for n in range(count):
        if n % per_study == 0:
            study = make_ct().StudyInstanceUID
            studies[study] = {}
        if n % PER_SERIES == 0:
            series = make_ct().SeriesInstanceUID
            studies[study][series] = []
        ds = make_ct(study, series, number=n % PER_SERIES + 1, size=32,
                     PatientID=f"DIST-{len(studies)}", PatientName=f"Dist^{len(studies)}")
        write_part10(ds, directory / f"{n:05d}.dcm")
        studies[study][series].append(str(ds.SOPInstanceUID))
    return Sent(studies, directory)


def store(cluster: Cluster, sent: Sent, associations: int = 4) -> list[subprocess.Popen[bytes]]:
    """Start ``associations`` storescu processes, each sending its share of the files."""
    storescu = require_tool("storescu")
    files = sorted(sent.directory.glob("*.dcm"))
    procs = []
    for k in range(associations):
        share = [str(f) for f in files[k::associations]]
        procs.append(subprocess.Popen(
            [storescu, "-aet", "DISTSCU", "-aec", AE, "127.0.0.1",
             str(cluster.nodes["scp"].dimse_port), *share],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def finish(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
        assert b"E:" not in out, out.decode(errors="replace")[-3000:]


def qido_all(cluster: Cluster, study: str) -> list[dict[str, Any]]:
    """Every instance of a study through nginx, paged."""
    out: list[dict[str, Any]] = []
    while True:
        response = httpx.get(f"{cluster.dicomweb}/studies/{study}/instances",
                             params={"limit": 100, "offset": len(out)}, timeout=30)
        assert response.status_code in (200, 204), response.text
        page = response.json() if response.status_code == 200 and response.content else []
        out += page
        if len(page) < 100:
            return out


def sop_uids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["00080018"]["Value"][0] for r in rows]


def wait_all_indexed(cluster: Cluster, sent: Sent, timeout: float = 120) -> None:
    def done() -> bool:
        return all(len(qido_all(cluster, study)) == sum(map(len, series.values()))
                   for study, series in sent.studies.items())
    wait_until(done, timeout=timeout, interval=0.5, message="every instance queryable")


def index_counts(cluster: Cluster, sent: Sent) -> tuple[int, int, dict[str, int]]:
    """(instance rows, distinct SOPs, series_related_instances per series) in PostgreSQL."""
    async def query() -> tuple[int, int, dict[str, int]]:
        engine = create_async_engine(cluster.index_url)
        async with engine.connect() as conn:
            sops = sent.sops
            rows = (await conn.execute(sa.text(
                "SELECT count(*), count(DISTINCT sop_uid) FROM dicom_instance "
                "WHERE sop_uid = ANY(:sops)"), {"sops": sops})).one()
            series = dict((await conn.execute(sa.text(
                "SELECT series_uid, series_related_instances FROM dicom_state_meta "
                "WHERE study_uid = ANY(:studies)"), {"studies": list(sent.studies)})).all())
        await engine.dispose()
        return int(rows[0]), int(rows[1]), {k: int(v) for k, v in series.items()}
    return asyncio.run(query())


def check_exactly_once(cluster: Cluster, sent: Sent) -> None:
    for node in cluster.nodes.values():  # no node gave up on the way
        assert node.proc is not None and node.proc.poll() is None, (
            f"{node.name} exited:\n{node.log()}")
        assert "Traceback" not in node.log(), f"{node.name} logged an error:\n{node.log()}"
    found: list[str] = []
    for study in sent.studies:
        found += sop_uids(qido_all(cluster, study))
    assert sorted(found) == sorted(sent.sops), "QIDO through nginx: each instance once"
    rows, distinct, per_series = index_counts(cluster, sent)
    assert rows == distinct == len(sent.sops)
    assert per_series == {series: len(sops) for s in sent.studies.values()
                          for series, sops in s.items()}


def check_metadata(cluster: Cluster, sent: Sent) -> None:
    """The worker generated every series' metadata; served through nginx."""
    for study, series_map in sent.studies.items():
        for series, sops in series_map.items():
            path = cluster.storage / "metadata" / "default" / study / f"{series}.json"
            wait_until(path.exists, timeout=60, message=f"metadata of series {series}")
            response = httpx.get(f"{cluster.dicomweb}/studies/{study}/series/{series}/metadata",
                                 headers={"Accept": "application/dicom+json"}, timeout=30)
            assert response.status_code == 200
            assert sorted(sop_uids(response.json())) == sorted(sops)


# -- Kafka messages -------------------------------------------------------------------------
def consume_topic(cluster: Cluster, topic: str, expect_keys: set[str],
                  timeout: float = 60) -> list[dict[str, Any]]:
    """Every message on ``topic`` until messages for all ``expect_keys`` SOPs/series came."""
    from aiokafka import AIOKafkaConsumer

    async def read() -> list[dict[str, Any]]:
        import orjson

        consumer = AIOKafkaConsumer(
            cluster.prefix + topic, bootstrap_servers=cluster.kafka,
            group_id=f"probe-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest",
            enable_auto_commit=False, session_timeout_ms=3000, heartbeat_interval_ms=750)
        await consumer.start()
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and not expect_keys <= seen:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        body = orjson.loads(record.value)
                        out.append(body)
                        seen.add(body.get("sop_uid") or body.get("series_uid"))
        finally:
            await consumer.stop()
        return out
    return asyncio.run(read())


# -- tests ----------------------------------------------------------------------------------
def test_thousand_instances_over_four_associations_are_each_queryable_once_through_nginx(
        cluster: Cluster, tmp_path: Path) -> None:
    sent = make_files(tmp_path, 1000)
    finish(store(cluster, sent))
    wait_all_indexed(cluster, sent)
    check_exactly_once(cluster, sent)
    check_metadata(cluster, sent)
    # both web nodes served (nginx balances): each answered a request of its own
    for node in ("web1", "web2"):
        port = cluster.nodes[node].http_port
        assert _ok(f"http://127.0.0.1:{port}/readyz")


def test_state_and_image_messages_have_the_design_bodies(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    sent = make_files(tmp_path, 50)
    finish(store(cluster, sent, associations=1))
    wait_all_indexed(cluster, sent)
    series = {s for per_study in sent.studies.values() for s in per_study}
    images = consume_topic(cluster, "dicom_image_queue", set(sent.sops))
    states = consume_topic(cluster, "dicom_state_queue", series)
    image_fields = {f.name for f in dataclasses.fields(DicomImageMeta)}
    state_fields = {f.name for f in dataclasses.fields(DicomStateMeta)}
    ours = [m for m in images if m["sop_uid"] in set(sent.sops)]
    assert {m["sop_uid"] for m in ours} == set(sent.sops)
    assert all(set(m) == image_fields for m in images)
    ours_state = [m for m in states if m["series_uid"] in series]
    assert {m["series_uid"] for m in ours_state} == series
    assert all(set(m) == state_fields for m in states)
    for m in ours:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", m["created_time"])
        assert m["rows"] == m["columns"] == 32
    final = {}
    for m in ours_state:  # the last message of a series carries its full count
        final[m["series_uid"]] = m["series_related_instances"]
    assert set(final.values()) == {PER_SERIES}


def test_consumer_killed_and_redis_restarted_during_ingest_lose_and_duplicate_nothing(
        cluster: Cluster, tmp_path: Path) -> None:
    sent = make_files(tmp_path, 1000)
    errors: list[str] = []
    stop_queries = threading.Event()

    def query_loop() -> None:  # a viewer searching through nginx the whole time
        with httpx.Client(timeout=30) as client:
            while not stop_queries.is_set():
                study = next(iter(sent.studies))
                response = client.get(f"{cluster.dicomweb}/studies",
                                      params={"StudyInstanceUID": study})
                if response.status_code not in (200, 204):
                    errors.append(f"{response.status_code} {response.text[:200]}")
                time.sleep(0.05)

    with cf.ThreadPoolExecutor(1) as pool:
        queries = pool.submit(query_loop)
        procs = store(cluster, sent)
        victim = cluster.nodes["consumer1"]
        wait_until(lambda: _indexed_count(cluster, sent) >= 150, timeout=60, interval=0.1,
                   message="ingest under way")
        victim.kill()  # kill -9 in the middle of ingest
        cluster.redis.stop()
        time.sleep(1.0)
        cluster.redis.start()  # an empty Redis again, on the same port
        victim.start()
        finish(procs)
        wait_all_indexed(cluster, sent, timeout=180)
        stop_queries.set()
        queries.result(timeout=60)
    assert errors == []
    check_exactly_once(cluster, sent)
    check_metadata(cluster, sent)


def _indexed_count(cluster: Cluster, sent: Sent) -> int:
    rows, _, _ = index_counts(cluster, sent)
    return rows


def test_a_poison_storage_event_is_parked_with_its_error_and_the_partition_goes_on(
        cluster: Cluster, tmp_path: Path) -> None:
    """An event the consumer cannot index (its file does not exist) is retried, then parked
    on storage_queue.dlq with its error; instances of the same study (same key, so the
    same partition) sent after it are indexed all the same."""
    from aiokafka import AIOKafkaProducer

    sent = make_files(tmp_path, 20)
    study = next(iter(sent.studies))
    poison = {"tenant_id": "default", "study_uid": study, "series_uid": "1.2.3",
              "sop_uid": "1.2.3.4", "file_path": "default/1.2/3.4/5.6.dcm"}

    async def publish() -> None:
        import orjson

        producer = AIOKafkaProducer(bootstrap_servers=cluster.kafka, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(cluster.prefix + "storage_queue",
                                         orjson.dumps(poison), key=study.encode())
        finally:
            await producer.stop()

    asyncio.run(publish())
    finish(store(cluster, sent, associations=1))
    wait_all_indexed(cluster, sent, timeout=120)

    def parked() -> list[dict[str, Any]]:  # the whole dead-letter topic, read for 3 s
        return [p for p in consume_topic(cluster, "storage_queue.dlq", {"all"}, timeout=3)
                if p.get("message", {}).get("file_path") == poison["file_path"]]
    ours = wait_until(parked, timeout=90, interval=0, message="the poison event parked")
    assert len(ours) == 1, ours
    assert ours[0]["error"]
    check_exactly_once(cluster, sent)
