"""Test support: a real archive process on free loopback ports, real DICOM files."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "_artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

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
            cwd=self.data_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"archive exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    if "scp" not in self.roles or self._dimse_open():
                        return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"archive did not become ready in {timeout} s:\n{self.log()}")

    def _dimse_open(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.dimse_port)) == 0

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
