"""The README quickstart, as written: `make run`, then DCMTK echoscu and storescu, then QIDO."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx

from tests.support import ROOT, free_port, require_tool, sample_file, wait_until


def test_make_run_then_echoscu_storescu_and_qido(tmp_path: Path) -> None:
    http_port, dimse_port = free_port(), free_port()
    env = {**os.environ, "DICOMCLOUD_DATA_DIR": str(tmp_path / "data"),
           "DICOMCLOUD_WEB__PORT": str(http_port), "DICOMCLOUD_SCP__PORT": str(dimse_port)}
    log = open(tmp_path / "make-run.log", "wb")  # noqa: SIM115 - closed below
    make = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=120, message="make run to serve")
        echo = subprocess.run([require_tool("echoscu"), "-aec", "DICOMCLOUD", "127.0.0.1",
                               str(dimse_port)], capture_output=True, timeout=60)
        assert echo.returncode == 0, echo.stderr
        store = subprocess.run([require_tool("storescu"), "-aec", "DICOMCLOUD", "127.0.0.1",
                                str(dimse_port), str(sample_file("CT_small.dcm"))],
                               capture_output=True, timeout=60)
        assert store.returncode == 0, store.stderr

        def found() -> list[dict[str, object]]:
            response = httpx.get(f"http://127.0.0.1:{http_port}/dicomweb/studies",
                                 params={"PatientID": "1CT1"})
            return list(response.json())

        studies = wait_until(found, message="the stored study in QIDO-RS")
        assert studies[0]["0020000D"]["Value"] == [
            "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"]
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(60)
        log.close()
