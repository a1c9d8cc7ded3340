"""Frame serving capacity with a client that is not the bottleneck: dicomcloud vs Orthanc.

The harness's "16 clients x frames" row (``../shared/bench``) drives 16 Python threads in one
process. On a 2-core host that client, not the server, sets the pace: its threads contend
for Python's GIL, and the faster the server answers, the more of them contend (a server
that does no work at all, answering every request with the same bytes from memory, scores
below Orthanc there). This measures the same workload, 16 keep-alive connections fetching
frame 1 of every CT instance in turn (``Accept: multipart/related;
type="application/octet-stream"; transfer-syntax=*``), with wrk, an event-driven C client
on one thread, against the reference Orthanc and dicomcloud in alternation on the same data
(each round in the other order), and prints requests per second, latency and the ratio. A
failed response or a lost request (socket error, timeout) fails the run.

Both archives are the benchmark's: Orthanc from ``../shared/bench/orthanc-ctl.sh``,
dicomcloud from ``scripts/bench-server.sh`` (its embedded defaults). Instances missing from
either are stored first over STOW-RS (untimed). Needs ``wrk`` (Debian package ``wrk``).

    .venv/bin/python scripts/bench_frames_wrk.py [--rounds 3] [--seconds 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(os.environ.get("BENCH_DIR", ROOT.parent / "shared" / "bench"))
WORK = Path(os.environ.get("BENCH_WORK", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                       "dicom-bench")))
ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
LUA = """
local paths, n = {}, 0
function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  n = math.random(#paths)
end
function request()
  n = n % #paths + 1
  return wrk.format("GET", paths[n], {["Accept"] = 'ACCEPT', ["Accept-Encoding"] = "identity"})
end
""".replace("ACCEPT", ACCEPT)


def say(message: str) -> None:
    print(f"[frames {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def frame_paths(manifest: dict[str, Any]) -> list[str]:
    return [f"/studies/{st['StudyInstanceUID']}/series/{se['SeriesInstanceUID']}/instances/"
            f"{i['SOPInstanceUID']}/frames/1"
            for st in manifest["ct"]["studies"] for se in st["series"] for i in se["instances"]]


def ensure_loaded(base: str, manifest: dict[str, Any], root: Path) -> None:
    """STOW-RS (untimed) every CT instance the archive does not have yet, then wait until
    the last of them is retrievable."""
    missing: list[tuple[Path, str]] = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for st in manifest["ct"]["studies"]:
            found = client.get("/instances", params={"StudyInstanceUID": st["StudyInstanceUID"],
                                                     "limit": 10000},
                               headers={"Accept": "application/dicom+json"})
            have = {i["00080018"]["Value"][0] for i in found.json()} \
                if found.status_code == 200 and found.content else set()
            missing += [(root / i["path"], f"/studies/{st['StudyInstanceUID']}/series/"
                         f"{se['SeriesInstanceUID']}/instances/{i['SOPInstanceUID']}/frames/1")
                        for se in st["series"] for i in se["instances"]
                        if i["SOPInstanceUID"] not in have]
        if not missing:
            return
        say(f"storing {len(missing)} instance(s) at {base} first (STOW-RS, untimed)")
        for start in range(0, len(missing), 50):
            boundary = uuid.uuid4().hex
            body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom"
                            b"\r\n\r\n" + path.read_bytes() + b"\r\n"
                            for path, _ in missing[start:start + 50])
            response = client.post("/studies", content=body + f"--{boundary}--\r\n".encode(),
                                   headers={"Content-Type": "multipart/related; type="
                                            f'"application/dicom"; boundary={boundary}',
                                            "Accept": "application/dicom+json"})
            if response.status_code not in (200, 202):
                sys.exit(f"STOW-RS to {base} failed: HTTP {response.status_code}")
        deadline = time.monotonic() + 300
        while client.get(missing[-1][1], headers={"Accept": ACCEPT}).status_code != 200:
            if time.monotonic() > deadline:
                sys.exit(f"{base}: the stored instances did not become retrievable")
            time.sleep(0.5)


def check_frame(base: str, path: str, size: int) -> None:
    response = httpx.get(base + path, headers={"Accept": ACCEPT, "Accept-Encoding": "identity"},
                         timeout=60)
    if response.status_code != 200 or len(response.content) < size:
        sys.exit(f"{base}{path}: HTTP {response.status_code}, {len(response.content)} bytes; "
                 f"expected a frame of {size} bytes")


def run_wrk(host: str, prefix: str, paths: list[str], seconds: float, connections: int,
            tmp: Path) -> dict[str, float]:
    listing = tmp / f"{prefix.strip('/')}.txt"
    listing.write_text("".join(prefix + p + "\n" for p in paths))
    script = tmp / "frames.lua"
    script.write_text(LUA)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script),
         host, "--", str(listing)], check=True, capture_output=True, text=True).stdout
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        sys.exit(f"{host}: {m.group(1)} failed responses\n{out}")
    if (m := re.search(r"Socket errors: (.*)", out)) and any(
            int(n) for n in re.findall(r"\d+", m.group(1))):
        sys.exit(f"{host}: requests lost ({m.group(1)}); the figures would flatter it\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {"req_per_s": rps,
            "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternations (default 3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--manifest", type=Path, default=WORK / "data" / "manifest.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (Debian)")
    if not args.manifest.exists():
        sys.exit(f"no dataset at {args.manifest}: run {BENCH}/setup.sh first")
    manifest = json.loads(args.manifest.read_text())
    paths = frame_paths(manifest)
    env = {**os.environ, "BENCH_WORK": str(WORK)}
    ctl, server = str(BENCH / "orthanc-ctl.sh"), str(ROOT / "scripts" / "bench-server.sh")
    orthanc_was_up = subprocess.run([ctl, "status"], env=env, capture_output=True).returncode == 0
    pid_file = Path(subprocess.run([server, "pidfile"], env=env, check=True, text=True,
                                   capture_output=True).stdout.strip())
    archive_was_up = pid_file.exists() and Path(f"/proc/{pid_file.read_text().strip()}").exists()
    targets = {"orthanc": (f"http://127.0.0.1:{os.environ.get('ORTHANC_HTTP_PORT', '8042')}",
                           "/dicom-web"),
               "dicomcloud": (f"http://127.0.0.1:{os.environ.get('BENCH_HTTP_PORT', '18080')}",
                              "/dicomweb")}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    try:
        subprocess.run([ctl, "start"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([server, "start"], env=env, check=True)
        for host, prefix in targets.values():
            ensure_loaded(host + prefix, manifest, Path(manifest["root"]))
            check_frame(host + prefix, paths[0], int(manifest["frame_bytes"]))
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(args.rounds):
                order = list(targets.items())
                for name, (host, prefix) in order if n % 2 == 0 else order[::-1]:
                    result = run_wrk(host, prefix, paths, args.seconds, args.connections,
                                     Path(tmp))
                    results[name].append(result)
                    say(f"round {n + 1}/{args.rounds} {name}: {result['req_per_s']:.0f} req/s, "
                        f"p50 {result['p50_ms']:.1f} ms")
    finally:
        if not orthanc_was_up:
            subprocess.run([ctl, "stop"], env=env, stdout=subprocess.DEVNULL)
        if not archive_was_up:
            subprocess.run([server, "stop"], env=env)
    rps = {name: statistics.median(r["req_per_s"] for r in rs) for name, rs in results.items()}
    p50 = {name: statistics.median(r["p50_ms"] for r in rs) for name, rs in results.items()}
    print(f"\n{args.connections} connections x frames, wrk (1 thread), median of "
          f"{args.rounds} alternating {args.seconds:g} s runs\n")
    print("| measure | Orthanc | dicomcloud | dicomcloud/Orthanc |\n|---|---:|---:|---:|")
    print(f"| req/s (higher is better) | {rps['orthanc']:.0f} | {rps['dicomcloud']:.0f} | "
          f"{rps['dicomcloud'] / rps['orthanc']:.2f} |")
    print(f"| p50 ms (lower is better) | {p50['orthanc']:.1f} | {p50['dicomcloud']:.1f} | "
          f"{p50['dicomcloud'] / p50['orthanc']:.2f} |")


if __name__ == "__main__":
    main()
