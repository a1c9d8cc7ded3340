"""The OHIF viewer, served from another origin, lists our studies and shows an image.

The prebuilt viewer (npm ``@ohif/app``, fetched by ``scripts/ohif-deps.sh``) is served by
this test on its own port with an ``app-config.js`` pointing at the archive, which allows
that origin through CORS. Headless Debian Chromium, driven by ``playwright-core``
(``tests/ohif/check.cjs``), opens the study list, then the viewer, and reads the viewport
canvas back. Screenshots are kept in ``tests/_artifacts/``.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.support import Archive, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
OHIF = ROOT / ".cache" / "ohif"
OHIF_DIST = OHIF / "dist-3.13.2"
PLAYWRIGHT = OHIF / "node_modules" / "playwright-core"
ARTIFACTS = ROOT / "tests" / "_artifacts"


def _config(archive_base: str) -> bytes:
    return f"""window.config = {{
  routerBasename: '/', extensions: [], modes: [], showStudyList: true,
  maxNumberOfWebWorkers: 2, showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false, showLoadingIndicator: true,
  defaultDataSourceName: 'dicomcloud',
  dataSources: [{{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'dicomcloud',
    configuration: {{
      friendlyName: 'dicomcloud', name: 'dicomcloud',
      wadoUriRoot: '{archive_base}/dicomweb', qidoRoot: '{archive_base}/dicomweb',
      wadoRoot: '{archive_base}/dicomweb', qidoSupportsIncludeField: true,
      imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
      staticWado: false, singlepart: 'bulkdata,video', bulkDataURI: {{ enabled: true }},
    }},
  }}],
}};
""".encode()


class _ViewerHandler(http.server.SimpleHTTPRequestHandler):
    """The viewer's files; ``/app-config.js`` generated; other paths are the SPA's."""

    config = b""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(self.config)))
            self.end_headers()
            self.wfile.write(self.config)
            return
        if not (OHIF_DIST / path.lstrip("/")).is_file():
            self.path = "/index.html"  # client-side routes (/viewer?...) load the app
        super().do_GET()


@pytest.fixture(scope="module")
def viewer_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, viewer_port: int) -> Iterator[Archive]:
    missing = [str(p) for p in (OHIF_DIST / "index.html", PLAYWRIGHT / "package.json")
               if not p.exists()]
    if missing or shutil.which("chromium") is None or shutil.which("node") is None:
        pytest.fail(f"the OHIF test needs chromium, node and {', '.join(missing) or 'OHIF'}: "
                    "run `make test` or `bash scripts/system-deps.sh` first")
    instance = Archive(tmp_path_factory.mktemp("ohif") / "data", env={
        "DICOMCLOUD_WEB__CORS_ORIGINS": f"http://127.0.0.1:{viewer_port}",
    }).start()
    yield instance
    if instance.alive():
        instance.stop()


@pytest.fixture(scope="module")
def viewer(archive: Archive, viewer_port: int) -> Iterator[str]:
    handler = type("Handler", (_ViewerHandler,), {"config": _config(archive.base)})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", viewer_port), functools.partial(handler, directory=str(OHIF_DIST)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{viewer_port}"
    server.shutdown()
    server.server_close()


def test_ohif_lists_the_study_and_shows_a_non_blank_image(archive: Archive,
                                                          viewer: str) -> None:
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    stored = subprocess.run(["storescu", "-aec", "DICOMCLOUD", "127.0.0.1",
                             str(archive.dimse_port), str(path)], capture_output=True, text=True)
    assert stored.returncode == 0, stored.stderr
    wait_until(lambda: httpx.get(f"{archive.base}/dicomweb/studies").json(),
               message="the CT indexed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        ["node", str(ROOT / "tests" / "ohif" / "check.cjs"), str(PLAYWRIGHT), viewer,
         str(ds.StudyInstanceUID), "CompressedSamples", str(ARTIFACTS)],
        capture_output=True, text=True, timeout=300, env={**os.environ})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["studyList"], result  # the study list showed our patient
    canvas = result["canvas"]
    assert canvas is not None, result
    # the viewport canvas holds an image: many grey levels, a good part of it lit
    assert canvas["distinct"] > 20 and canvas["litFraction"] > 0.05, result
    assert (ARTIFACTS / "ohif-viewer.png").stat().st_size > 10_000
