"""Property-based fuzzing (hypothesis) of what clients send: mistakes never cost a 5xx.

One archive (``web.processes = 0``) serves the module. Before any fuzzing it receives a
few instances (two generated CTs in one series, and the 10-frame ``emri_small.dcm``); their
files' hashes, their QIDO-RS answers and the archive's process ids are recorded then.
The properties:

1. QIDO-RS query strings (known keywords, tags, reserved parameters, junk names; values
   with wildcards, ranges, UID lists, backslashes, unicode, percent signs, huge numbers):
   never a 5xx; a 200 is a JSON array.
2. Accept headers (random media ranges and parameters, q-values, junk, long values), with
   now and then Range / Accept-Encoding / If-None-Match and rendering parameters, on
   retrieve, frames, metadata, rendered and bulk data: never a 5xx, never a body cut off.
3. Path segments (UIDs, frame lists, bulk data tags; ``../``, ``%2F``, huge numbers,
   empty, unicode) in the WADO-RS and QIDO-RS paths, sent raw: never a 5xx.
4. STOW-RS: random multipart bodies (boundaries broken, closing missing, part types
   wrong, random bytes, valid parts mixed with junk) and random Content-Type headers:
   never a 5xx; accepted parts are stored byte for byte, a refused request stores none of
   its parts, and a well-formed body gets one outcome per part, each valid part stored.
5. Valid Part 10 files (a CT and a relabelled ``emri_small.dcm``, stored before fuzzing)
   with a few bytes flipped, set, inserted or deleted, or an element's VR or length
   field changed: over STOW-RS never a 5xx (an accepted file is stored as sent); over
   C-STORE (the mutated data set streamed as it is) a DIMSE status or an abort, never a
   dead listener. Either way the stored file of the same instance changes only when the
   mutated one is accepted in its place (each example starts from the original again).
6. After every test and at the end: the archive and its role processes are the ones
   started (none died and was restarted), ``/healthz`` answers, C-ECHO works (at the end),
   and the instances stored before fuzzing are byte-identical with unchanged QIDO answers.

Requests go through ``http.client`` so that paths, query strings and headers reach the
server exactly as generated (httpx would normalise ``../`` and re-encode). Fuzzed files
never carry the UIDs of the instances of 6 (re-sending an instance legitimately replaces
it). No example database is written (``database=None``); a failure prints its minimal
example, the server's traceback and a ``@reproduce_failure`` blob. Run with
``--hypothesis-show-statistics`` to see the statuses each property met.
"""

from __future__ import annotations

import http.client
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import psutil
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from tests.support import (
    Archive,
    c_store,
    echo,
    make_ct,
    multipart,
    part10_bytes,
    sample_file,
    sha256,
    wait_until,
)

ENV = {"DICOMCLOUD_WEB__PROCESSES": "0"}
ORIGINAL_PATIENT = "FUZZ-ORIGINAL"
TEMPLATE_PATIENT = "FUZZ-TEMPLATE"
FUZZ = {"deadline": None, "database": None, "print_blob": True,
        "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                  HealthCheck.data_too_large, HealthCheck.large_base_example]}
#: hypercorn (h11) refuses request heads over 16 KiB by closing the connection
BIG_HEAD = 16 * 1024
#: long generated values are the point here, not a mistake worth a warning (-W error)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")


# -- the archive and what it held before fuzzing ---------------------------------------
@dataclass(frozen=True)
class Uids:
    study: str
    series: str
    sop: str
    frames: int


def _emri_uids() -> Uids:
    ds = pydicom.dcmread(sample_file("emri_small.dcm"), stop_before_pixels=True)
    return Uids(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                int(ds.NumberOfFrames))


#: The instances stored before any fuzzing (module constants: the strategies use them).
CT = Uids(generate_uid(), generate_uid(), generate_uid(), 1)
CT2 = Uids(CT.study, CT.series, generate_uid(), 1)
MF = _emri_uids()
ORIGINALS = (CT, CT2, MF)
ORIGINAL_UIDS = sorted({u for o in ORIGINALS for u in (o.study, o.series, o.sop)})


@dataclass(frozen=True)
class Original:
    uids: Uids
    path: Path
    sha256: str


@dataclass(frozen=True)
class Template:
    """A valid Part 10 file, stored (by STOW-RS) before fuzzing: mutated copies of it are
    sent; a refused one must leave the stored file as it was."""

    data: bytes
    data_set_start: int  # after the File Meta
    header_end: int  # where Pixel Data starts
    elements: tuple[int, ...]  # where each top-level element of the data set starts
    path: Path


class Fuzzed:
    """The module's archive and what was true before fuzzing (not a dataclass: hypothesis
    would print all of it, templates included, with every failing example)."""

    def __init__(self, archive: Archive, originals: list[Original], qido: dict[str, Any],
                 processes: set[tuple[int, float]]) -> None:
        self.archive, self.originals, self.qido = archive, originals, qido
        self.processes = processes
        self.templates: dict[str, Template] = {}

    def __repr__(self) -> str:
        return f"Fuzzed(archive at {self.archive.base})"


def _processes(archive: Archive) -> set[tuple[int, float]]:
    """(pid, start time) of the archive's main process and every process below it."""
    assert archive.proc is not None
    main = psutil.Process(archive.proc.pid)
    return {(p.pid, p.create_time()) for p in (main, *main.children(recursive=True))}


def _qido_snapshot(archive: Archive) -> dict[str, Any]:
    """What QIDO-RS says about the original instances, their series and studies."""
    out: dict[str, Any] = {}
    for o in ORIGINALS:
        out[f"instance {o.sop}"] = archive.qido("/instances", SOPInstanceUID=o.sop,
                                                includefield="all")
        out[f"series of {o.study}"] = archive.qido(f"/studies/{o.study}/series",
                                                   includefield="all")
        out[f"study {o.study}"] = archive.qido("/studies", StudyInstanceUID=o.study,
                                               includefield="all")
    return out


def _stored_template(archive: Archive, ds: Any) -> Template:
    """``ds`` stored by STOW-RS, byte for byte."""
    data = part10_bytes(ds)
    body, content_type = multipart([data])
    answer = _send(archive, "POST", "/dicomweb/studies", [("Content-Type", content_type.encode())],
                   body)
    assert answer.status == 200, answer
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) group length
    at = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    path = archive.stored_path("default", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                               ds.SOPInstanceUID)
    assert path.read_bytes() == data
    return Template(data, 144 + meta_length, at if at > 0 else len(data),
                    _element_offsets(data, 144 + meta_length), path)


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def _element_offsets(data: bytes, position: int) -> tuple[int, ...]:
    """Offsets of the top-level elements of an Explicit VR Little Endian data set."""
    out = []
    while position + 8 <= len(data):
        out.append(position)
        vr = data[position + 4:position + 6]
        if vr in _LONG_VRS:
            length, header = int.from_bytes(data[position + 8:position + 12], "little"), 12
        else:
            length, header = int.from_bytes(data[position + 6:position + 8], "little"), 8
        if length == 0xFFFFFFFF:  # a sequence of undefined length: stop here
            break
        position += header + length
    return tuple(out)


def _relabelled(path: Path) -> Any:
    """``path`` with fresh Study/Series/SOP Instance UIDs and the template patient."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = TEMPLATE_PATIENT
    return ds


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    archive = Archive(tmp_path_factory.mktemp("fuzz") / "data", env=ENV).start()
    try:
        cts = [make_ct(CT.study, CT.series, o.sop, number=n, PatientID=ORIGINAL_PATIENT)
               for n, o in enumerate((CT, CT2), 1)]
        mf_path = sample_file("emri_small.dcm")
        statuses = c_store(archive, [*cts, mf_path])
        assert [int(s.Status) for s in statuses] == [0, 0, 0], statuses
        originals = []
        for o in ORIGINALS:
            path = archive.stored_path("default", o.study, o.series, o.sop)
            originals.append(Original(o, path, sha256(path)))
        wait_until(lambda: all(archive.qido("/instances", SOPInstanceUID=o.sop)
                               for o in ORIGINALS), message="the originals indexed")
        state = Fuzzed(archive, originals, _qido_snapshot(archive), _processes(archive))
        state.templates["ct"] = _stored_template(
            archive, make_ct(PatientID=TEMPLATE_PATIENT, size=8))
        state.templates["multi-frame"] = _stored_template(archive, _relabelled(mf_path))
        yield state
    finally:
        if archive.alive():
            archive.stop()


def check_invariants(fz: Fuzzed) -> None:
    archive = fz.archive
    assert archive.alive(), f"the archive died:\n{archive.log()}"
    assert _processes(archive) >= fz.processes, \
        f"a role process died (and was restarted):\n{archive.log()}"
    assert _get(archive, "/healthz").status == 200
    for o in fz.originals:
        assert o.path.is_file() and sha256(o.path) == o.sha256, f"{o.path} changed"
    assert _qido_snapshot(archive) == fz.qido, "QIDO answers changed"


@pytest.fixture(autouse=True)
def invariants(fuzzed: Fuzzed) -> Iterator[None]:
    yield
    check_invariants(fuzzed)


# -- raw HTTP ---------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Dropped(Exception):
    """The server closed the connection without a (complete) response."""


def _send(archive: Archive, method: str, target: str,
          headers: Sequence[tuple[str, bytes]] = (), body: bytes | None = None) -> Answer:
    """One request with ``target`` and header values sent exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", archive.http_port, timeout=60)
    try:
        conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        for name, val in headers:
            conn.putheader(name, val)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        try:
            response = conn.getresponse()
            data = response.read()
        except (http.client.RemoteDisconnected, http.client.IncompleteRead,
                ConnectionResetError) as exc:
            raise Dropped(f"{type(exc).__name__}: {exc}") from exc
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def _get(archive: Archive, target: str) -> Answer:
    return _send(archive, "GET", target)


class ServerLog:
    """The archive's log from a point on (a failing example shows what the server said),
    tracebacks cut down to the archive's own frames and the exceptions."""

    def __init__(self, archive: Archive) -> None:
        self.path = archive.log_path
        self.start = self.path.stat().st_size

    def since(self) -> str:
        with open(self.path, "rb") as fh:
            fh.seek(self.start)
            lines = fh.read().decode(errors="replace").splitlines()
        kept: list[str] = []
        skip_code = False
        for line in lines:
            frame = line.lstrip().startswith('File "')
            if frame:
                skip_code = "/dicomcloud/" not in line or "site-packages" in line
            elif skip_code and line.startswith("    "):
                continue  # the code line (and ^^^ marks) of a frame left out
            else:
                skip_code = False
            if not (frame and skip_code) and not set(line.strip()) <= {"^", "~"}:
                kept.append(line)
        return "\n".join(kept)[-4000:]


def _summary(method: str, target: str, headers: Sequence[tuple[str, bytes]],
             body: bytes | None = None) -> str:
    shown = ", ".join(f"{k}: {v[:300]!r}{'...' if len(v) > 300 else ''}" for k, v in headers)
    text = f"{method} {target[:600]}{'...' if len(target) > 600 else ''} [{shown}]"
    if body is not None:
        text += f" body {len(body)} bytes: {body[:200]!r}..."
    return text


def request_ok(fz: Fuzzed, method: str, target: str, headers: list[tuple[str, bytes]],
               body: bytes | None = None, *, check_status: bool = True) -> Answer | None:
    """Send; fail unless the status is below 500 (``check_status``) and the archive still
    runs. None when the server dropped an oversized request head (hypercorn's limit),
    which is allowed."""
    summary = _summary(method, target, headers, body)
    note(summary)
    log = ServerLog(fz.archive)
    try:
        answer = _send(fz.archive, method, target, headers, body)
    except Dropped as exc:
        head = len(target) + sum(len(k) + len(v) + 4 for k, v in headers)
        assert head > BIG_HEAD, \
            f"connection dropped ({exc}) for {summary}\nserver log:\n{log.since()}"
        answer = None
    assert fz.archive.alive(), f"archive died on {summary}\nserver log:\n{log.since()}"
    event(f"status {answer.status if answer else 'dropped (oversized head)'}")
    if answer is not None and check_status:
        assert_below_500(answer, summary, log)
    return answer


def assert_below_500(answer: Answer, summary: str, log: ServerLog) -> None:
    assert answer.status < 500, (
        f"{answer.status} for {summary}\nresponse: {answer.body[:500]!r}\n"
        f"server log:\n{log.since()}")


def _enc(segment: str, safe: str) -> str:
    """Percent-encode a path segment or query piece; ASCII in ``safe`` stays raw."""
    return quote(segment, safe=safe, encoding="utf-8", errors="surrogatepass")


# -- strategies: shared pieces ---------------------------------------------------------
printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
unicode_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
#: digits of every script (str.isdigit() is true for all of them, int() takes only some)
unicode_digits = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4)
huge_number = st.integers(min_value=10, max_value=5000).map(lambda n: "9" * n)
long_text = st.builds(lambda s, n: (s or "x") * n, printable, st.integers(50, 800))
random_uid = st.lists(st.integers(0, 10**40), min_size=1, max_size=12).map(
    lambda parts: ".".join(map(str, parts)))
odd_numbers = st.sampled_from(["0", "-1", "+1", " 1", "1 ", "1_0", "0x10", "1e3", "1.5",
                               "\u00b2", "\u0661\u0662", "\u0663", "\u216b", "nan", "inf", "",
                               "00", "007"])


# -- 1. QIDO-RS query strings ----------------------------------------------------------
NUMBER_NAMES = ["limit", "offset", "LIMIT", "Offset", "SeriesNumber", "InstanceNumber",
                "00200011", "00200013"]
DATE_NAMES = ["StudyDate", "StudyTime", "SeriesDate", "PatientBirthDate", "00080020",
              "00080030"]
UID_NAMES = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
             "0020000D", "0020000d", "0020000E", "00080018"]
TEXT_NAMES = ["PatientName", "PatientID", "ModalitiesInStudy", "Modality", "AccessionNumber",
              "ReferringPhysicianName", "PatientSex", "StudyID", "StudyDescription",
              "SeriesDescription", "BodyPartExamined", "00100010", "00080061", "patientname"]
OTHER_NAMES = ["includefield", "IncludeField", "fuzzymatching", "7FE00010", "PixelData",
               "0010001", "001000100", "ffffffff", "Rows", ""]
QIDO_NAMES = NUMBER_NAMES + DATE_NAMES + UID_NAMES + TEXT_NAMES + OTHER_NAMES
DATE_PART = st.one_of(st.sampled_from(["20240102", "2024", "19000101", "99991231", "",
                                       "20241301", "2024-01-02", "101500", "10", "1015.5",
                                       "101500.1234567", "\u00b2" * 8, "2024010\u0662"]),
                      st.integers(0, 99999999).map(str))
WILDCARD_TEXT = st.sampled_from([
    "*", "?", "**", "Test*", "*Patient", "T?st^Patient", "test^patient", "CT", "CT,MR",
    "CT\\MR", ",", "\\", "\\\\", "%", "%%", "%25", "%00", "_", "%_", "'", "\"",
    "' OR 1=1 --", "all", "ALL", "true", "false", "-", "--", "FUZZ-ORIGINAL", "PID-1",
    "\x00", " ", "\t", "*\u00e9*", "=?UTF-8?B?x?="])


def _qido_param(uids: list[str]) -> st.SearchStrategy[tuple[str, str]]:
    """A (name, value) pair: the value drawn to suit the name, or anything at all."""
    generic = st.one_of(unicode_text, printable, long_text, huge_number, odd_numbers,
                        WILDCARD_TEXT)
    numbers = st.one_of(odd_numbers, huge_number, unicode_digits,
                        st.integers(-5, 2**80).map(str), st.integers(2**62, 2**65).map(str),
                        generic)
    dates = st.one_of(DATE_PART, st.tuples(DATE_PART, st.sampled_from(["-", "--", " - "]),
                                           DATE_PART).map("".join), generic)
    uid_lists = st.one_of(
        st.sampled_from(uids), random_uid,
        st.sampled_from(["1.2.3", "1.2.3.", ".1.2", "1..2", "01.02", "1.2.3\n", "1.2.3,",
                         "1." + "2" * 63, "1." + "2" * 62, "1.2.3\\1.2.4"]),
        st.lists(st.one_of(st.sampled_from(uids), random_uid, printable), min_size=1,
                 max_size=5).flatmap(lambda us: st.sampled_from([",", "\\", ", "]).map(
                     lambda sep: sep.join(us))),
        generic)
    fields = st.one_of(st.lists(st.sampled_from([*QIDO_NAMES, "all", "ALL", ""]),
                                max_size=5).map(",".join), generic)
    return st.one_of(
        st.tuples(st.sampled_from(NUMBER_NAMES), numbers),
        st.tuples(st.sampled_from(["limit", "offset"]), numbers),
        st.tuples(st.sampled_from(DATE_NAMES), dates),
        st.tuples(st.sampled_from(UID_NAMES), uid_lists),
        st.tuples(st.sampled_from(TEXT_NAMES), st.one_of(WILDCARD_TEXT, generic)),
        st.tuples(st.sampled_from(["includefield", "IncludeField"]), fields),
        st.tuples(st.sampled_from(["fuzzymatching"]), st.sampled_from(
            ["true", "false", "TRUE", "1", "", "yes"]) | generic),
        st.tuples(st.one_of(st.sampled_from(OTHER_NAMES), printable, unicode_text), generic),
    )


@st.composite
def qido_requests(draw: st.DrawFn) -> str:
    uids, ct, mf = ORIGINAL_UIDS, CT, MF
    path = draw(st.sampled_from(["/studies", "/series", "/instances",
                                 f"/studies/{ct.study}/series", f"/studies/{mf.study}/instances",
                                 f"/studies/{ct.study}/series/{ct.series}/instances"]))
    if draw(st.integers(0, 9)) == 0:  # now and then a study UID or tenant of any kind
        study = draw(st.one_of(st.sampled_from(uids), random_uid, printable, unicode_text))
        path = path.replace(ct.study, _enc(study, "")).replace(mf.study, _enc(study, ""))
        tenant = draw(st.sampled_from([None, "default", "other", ""]) | printable)
        path = ("/dicomweb" if tenant is None else f"/tenants/{_enc(tenant, '')}/dicomweb") \
            + path
    else:
        path = "/dicomweb" + path
    params = draw(st.lists(_qido_param(uids), min_size=1, max_size=3))
    safe = draw(st.sampled_from(["", "*,", "*?,-\\", "*?,-\\%'\"", "=&*?,-%"]))
    separator = draw(st.sampled_from(["&", "&", "&&", ";"]))
    pieces = []
    for name, val in params:
        style = draw(st.sampled_from(["pair", "pair", "pair", "bare", "empty"]))
        if style == "bare":
            pieces.append(_enc(name, safe))
        elif style == "empty":
            pieces.append(_enc(name, safe) + "=")
        else:
            pieces.append(_enc(name, safe) + "=" + _enc(val, safe))
    return path + "?" + separator.join(pieces)


@given(target=qido_requests(),
       accept=st.sampled_from([None, "application/dicom+json", "application/json", "*/*",
                               "text/html", "multipart/related"]))
@settings(max_examples=400, **FUZZ)  # type: ignore[arg-type]
def test_qido_query_strings_never_give_a_5xx(fuzzed: Fuzzed, target: str,
                                              accept: str | None) -> None:
    headers = [("Accept", accept.encode())] if accept else []
    answer = request_ok(fuzzed, "GET", target, headers)
    if answer is not None and answer.status == 200:
        assert isinstance(orjson.loads(answer.body), list), answer.body[:300]


# -- 2. Accept headers on WADO-RS ------------------------------------------------------
MEDIA = ["application/dicom", "multipart/related", "application/octet-stream", "image/jpeg",
         "image/png", "image/jp2", "image/jls", "image/dicom-rle", "image/x-dicom-rle",
         "image/gif", "*/*", "*", "image/*", "multipart/*", "application/*",
         "application/dicom+json", "application/json", "application/dicom+xml",
         "text/html", "text/*", "video/mpeg", "*/dicom", "/", "//", "a/b/c", ""]
SYNTAXES = ["*", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
            "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.100", "1.2.3", ""]
Q_VALUES = ["0", "0.0", "0.001", "0.5", "1", "1.0", "1.5", "-1", "nan", "inf", "-inf",
            "1e400", "1e-400", "", "abc", "0x1", "\u0661"]


def _param() -> st.SearchStrategy[str]:
    name = st.sampled_from(["type", "transfer-syntax", "q", "boundary", "charset", "level",
                            "TYPE", "Transfer-Syntax", "", " type "]) | printable
    val = st.one_of(st.sampled_from(MEDIA), st.sampled_from(SYNTAXES),
                    st.sampled_from(Q_VALUES), printable, unicode_text, long_text)
    quoted = st.sampled_from(['{}', '"{}"', '"{}', "'{}'"])
    return st.builds(lambda n, v, qt, eq: n + eq + qt.format(v), name, val, quoted,
                     st.sampled_from(["=", "=", " = ", "", "=="]))


GOOD_MEDIA = ["application/dicom", "multipart/related", "application/octet-stream",
              "image/jpeg", "image/png", "image/jp2", "image/jls", "image/dicom-rle",
              "image/x-dicom-rle", "image/gif", "*/*", "image/*", "multipart/*",
              "application/dicom+json", "application/json", "text/html"]
#: a plausible media range: what clients send, in combinations they may not mean
good_range = st.builds(
    lambda mime, params: "; ".join([mime, *params]),
    st.sampled_from(GOOD_MEDIA),
    st.lists(st.one_of(
        st.sampled_from(GOOD_MEDIA).map('type="{}"'.format),
        st.sampled_from(GOOD_MEDIA).map("type={}".format),
        st.sampled_from(SYNTAXES).map("transfer-syntax={}".format),
        st.sampled_from(["0", "0.1", "0.5", "0.9", "1", "1.0", "0.000"]).map("q={}".format)),
        max_size=3))
#: anything that looks a little like a media range
media_range = st.builds(
    lambda mime, params, sep: sep.join([mime, *params]),
    st.sampled_from(MEDIA) | printable | unicode_text,
    st.lists(_param(), max_size=4),
    st.sampled_from([";", "; ", " ;", ";;"]))
accept_values = st.one_of(
    st.lists(good_range, min_size=1, max_size=3).map(", ".join),
    st.lists(st.one_of(good_range, good_range, media_range), min_size=1, max_size=4).flatmap(
        lambda ranges: st.sampled_from([",", ", ", " , ", ",,"]).map(lambda s: s.join(ranges))),
    long_text, unicode_text,
    st.integers(4000, 9000).map(lambda n: "*/*;" + "a" * n))


def _header_value(text: str) -> bytes:
    """``text`` as an HTTP header value: UTF-8 (non-ASCII as obs-text), no control bytes,
    no surrounding whitespace (what h11 would refuse outright)."""
    raw = text.encode("utf-8", "surrogatepass")
    return bytes(b for b in raw if b >= 0x20 and b != 0x7F).strip()


RENDER_PARAMS = st.lists(st.tuples(
    st.sampled_from(["window", "viewport", "quality", "annotation", "charset", "x", ""]),
    st.one_of(st.sampled_from(["40,400", "40,400,sigmoid", "40,400,linear-exact", "0,0",
                               "1e38,1e38", "-1e38,3e38", "nan,1", "1,inf", "64,64",
                               "64,64,0,0,10,10", "1,1,0,0,0,0", "4096,4096",
                               "64,64,1000000,1000000,5,5", "64,64,-1,0,1,1", "1", "100",
                               "0", "101", "patient", ""]),
              printable, huge_number, unicode_digits)), max_size=3)


@st.composite
def wado_requests(draw: st.DrawFn) -> tuple[str, str]:
    ct, mf = CT, MF
    inst = {o.sop: f"/dicomweb/studies/{o.study}/series/{o.series}/instances/{o.sop}"
            for o in ORIGINALS}
    kind, target = draw(st.sampled_from([
        ("retrieve", inst[ct.sop]), ("retrieve", inst[mf.sop]),
        ("retrieve", f"/dicomweb/studies/{ct.study}"),
        ("retrieve", f"/dicomweb/studies/{ct.study}/series/{ct.series}"),
        ("frames", inst[mf.sop] + "/frames/1"), ("frames", inst[mf.sop] + "/frames/2,10,3"),
        ("frames", inst[ct.sop] + "/frames/1"),
        ("metadata", inst[ct.sop] + "/metadata"), ("metadata", inst[mf.sop] + "/metadata"),
        ("metadata", f"/dicomweb/studies/{ct.study}/metadata"),
        ("metadata", f"/dicomweb/studies/{mf.study}/series/{mf.series}/metadata"),
        ("rendered", inst[ct.sop] + "/rendered"), ("rendered", inst[mf.sop] + "/rendered"),
        ("rendered", inst[mf.sop] + "/frames/7/rendered"),
        ("rendered", inst[mf.sop] + "/thumbnail"),
        ("rendered", f"/dicomweb/studies/{ct.study}/thumbnail"),
        ("rendered", f"/dicomweb/studies/{ct.study}/rendered"),
        ("rendered", f"/dicomweb/studies/{mf.study}/series/{mf.series}/rendered"),
        ("bulkdata", inst[mf.sop] + "/bulkdata/7FE00010"),
        ("bulkdata", inst[ct.sop] + "/bulkdata/7fe00010"),
    ]))
    if kind == "rendered" and draw(st.booleans()):
        params = draw(RENDER_PARAMS)
        target += "?" + "&".join(_enc(k, "") + "=" + _enc(v, ",") for k, v in params)
    return kind, target


EXTRA_HEADERS = st.none() | st.tuples(
    st.sampled_from(["Range", "Accept-Encoding", "If-None-Match"]),
    st.one_of(st.sampled_from(["bytes=0-10", "bytes=-5", "bytes=5-", "bytes=10-5", "bytes=-",
                               "bytes=0-99999999999999999999", "bytes=999999999-",
                               "bytes=0-1,3-4", "items=0-1", "br", "gzip;q=0.5, br;q=nan",
                               "identity;q=0", "*;q=0", "deflate", "*", 'W/"x"', '"x", *']),
              printable, long_text))


@given(request=wado_requests(), accept=st.none() | accept_values, extra=EXTRA_HEADERS)
@settings(max_examples=200, **FUZZ)  # type: ignore[arg-type]
def test_accept_headers_on_wado_rs_never_give_a_5xx(
        fuzzed: Fuzzed, request: tuple[str, str], accept: str | None,
        extra: tuple[str, str] | None) -> None:
    """Now and then with a Range, Accept-Encoding or If-None-Match header, and on rendered
    resources with random rendering parameters."""
    kind, target = request
    headers: list[tuple[str, bytes]] = []
    if accept is not None:
        headers.append(("Accept", _header_value(accept)))
    if extra is not None:
        headers.append((extra[0], _header_value(extra[1])))
    answer = request_ok(fuzzed, "GET", target, headers)
    if answer is not None and answer.status == 200 and kind == "metadata" \
            and "content-encoding" not in answer.headers:
        assert isinstance(orjson.loads(answer.body), list)


# -- 3. path segments ------------------------------------------------------------------
def _segment(real: list[str]) -> st.SearchStrategy[str]:
    """A path segment, percent-encoded or left raw as drawn."""
    raw = st.one_of(
        st.sampled_from(real),
        st.sampled_from(["..", ".", "../", "../..", "%2F", "%2e%2e", "%2e%2e%2f..%2f",
                         "..%2F..%2Fetc%2Fpasswd", "%00", "%0A", "1.2.3%0A", "1.2.3%00",
                         "%", "%zz", "%C0%AF", "%FF", "", "~", "1.2.3/", "//", "1.2.3;x",
                         "1.2.3?x", "1.2.3#x", "%3F", "%23", "0", "-1", "00", "1.2..3",
                         ".1.2", "1.2.", "1.02.3", "1." + "2" * 63, "1." + "2" * 62]),
        random_uid, huge_number, printable, unicode_text, long_text)
    return st.tuples(raw, st.sampled_from(["", "", "./%", "/%"])).map(
        lambda pair: _enc(pair[0], pair[1]) if pair[1] else quote(
            pair[0], safe="%/.;?#~", errors="surrogatepass"))


FRAME_LISTS = st.one_of(
    st.lists(st.one_of(st.integers(-3, 12), st.integers(-(10**30), 10**30)),
             min_size=0, max_size=6).map(lambda ns: ",".join(map(str, ns))),
    st.sampled_from(["", ",", "1,", ",1", "1,,2", "1 ,2", "1;2", "1-3", "1.0", "0x1",
                     "1_0", "\u00b2", "\u0661", "1e3", " 1", "1" * 5000, "1," * 3000]),
    printable, unicode_text)
BULK_TAGS = st.one_of(
    st.sampled_from(["7FE00010", "7fe00010", "7FE00008", "7FE00009", "00100010", "00080018",
                     "00000000", "FFFFFFFF", "FFFEE000", "7FE0001", "7FE000100",
                     "00081140/0/00081155", "00081140/999999/00081155", "7FE00010/0/7FE00010",
                     "00081140/1000000/00081155", "00081140/-1/00081155", "00081140//",
                     "/7FE00010", "7FE00010/", "../../etc/passwd", "..%2F7FE00010"]),
    st.lists(st.integers(0, 0xFFFFFFFF).map("{:08X}".format), min_size=1, max_size=4).map(
        "/0/".join),
    printable, unicode_text)
WADO_TEMPLATES = [
    "/dicomweb/studies/{s}", "/dicomweb/studies/{s}/metadata",
    "/dicomweb/studies/{s}/series/{se}", "/dicomweb/studies/{s}/series/{se}/metadata",
    "/dicomweb/studies/{s}/series/{se}/instances/{i}",
    "/dicomweb/studies/{s}/series/{se}/instances/{i}/metadata",
    "/dicomweb/studies/{s}/series/{se}/instances/{i}/frames/{f}",
    "/dicomweb/studies/{s}/series/{se}/instances/{i}/frames/{f}/rendered",
    "/dicomweb/studies/{s}/series/{se}/instances/{i}/frames/{f}/thumbnail",
    "/dicomweb/studies/{s}/series/{se}/instances/{i}/bulkdata/{b}",
    "/dicomweb/studies/{s}/series/{se}/instances/{i}/rendered",
    "/dicomweb/studies/{s}/series/{se}/instances/{i}/thumbnail",
    "/dicomweb/studies/{s}/rendered", "/dicomweb/studies/{s}/thumbnail",
    "/dicomweb/studies/{s}/series/{se}/rendered", "/dicomweb/studies/{s}/series",
    "/dicomweb/studies/{s}/instances", "/dicomweb/studies/{s}/series/{se}/instances",
    "/tenants/{t}/dicomweb/studies/{s}/series/{se}/instances/{i}/frames/{f}",
    "/dicomweb/{s}", "/{s}", "/dicomweb/studies/{s}/{se}",
]


@st.composite
def wado_paths(draw: st.DrawFn) -> str:
    template = draw(st.sampled_from(WADO_TEMPLATES))
    original = draw(st.sampled_from(ORIGINALS))
    fields = {"s": original.study, "se": original.series, "i": original.sop,
              "f": str(draw(st.integers(1, original.frames))), "b": "7FE00010",
              "t": "default"}
    real = [fields["s"], fields["se"], fields["i"]]
    # one or more positions fuzzed; the others stay real so that deeper code is reached
    for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3)):
        if name == "f":
            fields[name] = draw(st.one_of(FRAME_LISTS, _segment(real)))
            fields[name] = quote(fields[name], safe=",%/-+")
        elif name == "b":
            fields[name] = quote(draw(BULK_TAGS), safe="/%.")
        else:
            fields[name] = draw(_segment(real))
    return template.format(**fields)


@given(target=wado_paths(), accept=st.sampled_from([
    None, "*/*", 'multipart/related; type="application/dicom"; transfer-syntax=*',
    'multipart/related; type="application/octet-stream"', "application/dicom+json",
    "image/png", "application/octet-stream"]))
@settings(max_examples=200, **FUZZ)  # type: ignore[arg-type]
def test_wado_path_segments_never_give_a_5xx(fuzzed: Fuzzed, target: str,
                                              accept: str | None) -> None:
    request_ok(fuzzed, "GET", target, [("Accept", accept.encode())] if accept else [])


# -- 4. STOW-RS bodies -----------------------------------------------------------------
BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=?"
GOOD_TYPES = ["application/dicom", "Application/DICOM",
              "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"]
BAD_TYPES = ["application/octet-stream", "image/jpeg", "application/dicom+json",
             "application/dicom+xml", "text/plain", "multipart/related", "application/dicom2",
             "application", "*/*", ";", "application/dicom ;;", "x" * 300]


@dataclass(frozen=True)
class PartSpec:
    kind: str  # valid, truncated, junk, text, empty
    part_type: str | None  # the part's Content-Type header; None: no header
    junk: bytes
    cut: float
    extra_header: bool


part_specs = st.builds(
    PartSpec,
    kind=st.sampled_from(["valid", "valid", "valid", "truncated", "junk", "text", "empty"]),
    part_type=st.one_of(st.sampled_from(GOOD_TYPES), st.sampled_from(GOOD_TYPES),
                        st.none(), st.sampled_from(BAD_TYPES), printable),
    junk=st.one_of(st.binary(max_size=300),
                   st.binary(min_size=1, max_size=40).map(lambda b: b"DICM" + b * 20),
                   st.binary(max_size=200).map(lambda b: b"\0" * 128 + b"DICM" + b)),
    cut=st.floats(0.0, 1.0, exclude_max=True),
    extra_header=st.booleans(),
)
FRAMINGS = ["ok"] * 10 + ["close-without-crlf", "no-close", "wrong-boundary",
            "lf-only", "preamble", "epilogue", "cut", "no-blank-line", "double-close",
            "no-leading-boundary", "space-after-boundary"]


def _effective_type(spec: PartSpec) -> str:
    if spec.part_type is None:
        return "application/dicom"
    return spec.part_type.split(";")[0].strip().lower()


@dataclass(frozen=True)
class StowPlan:
    """Everything drawn for one STOW-RS request; the body is built in the test (its
    valid parts get fresh UIDs each time, which no strategy may depend on)."""

    boundary: str
    declared: str  # the boundary the Content-Type names
    specs: list[PartSpec]
    framing: str
    where: str  # root, matching (a fresh study in the URL), original, junk
    junk_study: str
    preamble: bytes
    epilogue: bytes
    cut: float
    header_kind: str
    header_extra: str


stow_plans = st.builds(
    StowPlan,
    boundary=st.text(st.sampled_from(BCHARS), min_size=1, max_size=70),
    declared=st.text(st.sampled_from(BCHARS), min_size=1, max_size=70),
    specs=st.lists(part_specs, max_size=4),
    framing=st.sampled_from(FRAMINGS),
    where=st.sampled_from(["root", "root", "matching", "original", "junk"]),
    junk_study=printable,
    preamble=st.binary(max_size=50).filter(lambda b: b"--" not in b),
    epilogue=st.binary(max_size=50),
    cut=st.floats(0.0, 1.0, exclude_max=True),
    header_kind=st.sampled_from(["right"] * 8 + ["no-type", "unquoted", "missing",
                                 "random", "wrong-type", "no-boundary", "empty-boundary",
                                 "long-boundary", "form-data", "dicom", "duplicate-boundary"]),
    header_extra=st.one_of(st.sampled_from(BAD_TYPES), printable, unicode_text, long_text),
)


@dataclass
class StowBody:
    body: bytes
    content_type: bytes | None
    target: str
    well_formed: bool  # framing intact and the Content-Type header right
    url_study: str | None
    parts: list[tuple[PartSpec, bytes, str | None]]  # spec, bytes, SOP UID of a valid one


def _part_bytes(spec: PartSpec, study: str | None) -> tuple[bytes, str | None]:
    if spec.kind in ("valid", "truncated"):
        ds = make_ct(study, PatientID=TEMPLATE_PATIENT, size=8)
        data = part10_bytes(ds)
        if spec.kind == "valid":
            return data, str(ds.SOPInstanceUID)
        return data[:max(1, int(len(data) * spec.cut))], None
    if spec.kind == "text":
        return spec.junk.decode("latin-1").encode("utf-8"), None
    if spec.kind == "empty":
        return b"", None
    return spec.junk, None


def build_stow(plan: StowPlan) -> StowBody:
    boundary, framing, where = plan.boundary, plan.framing, plan.where
    url_study = {"root": None, "matching": generate_uid(), "original": CT.study,
                 "junk": plan.junk_study}[where]
    target = "/dicomweb/studies" + (f"/{quote(url_study, safe='')}" if url_study is not None
                                    else "")
    study = url_study if where == "matching" else None
    eol = "\n" if framing == "lf-only" else "\r\n"
    parts = []
    out = bytearray()
    if framing == "preamble":
        out += plan.preamble + b"\r\n"
    for n, spec in enumerate(plan.specs):
        data, sop = _part_bytes(spec, study)
        parts.append((spec, data, sop))
        if not (framing == "no-leading-boundary" and n == 0):
            out += f"--{boundary}{' ' if framing == 'space-after-boundary' else ''}{eol}"\
                .encode()
        if spec.part_type is not None:
            out += f"Content-Type: {spec.part_type}{eol}".encode()
        if spec.extra_header:
            out += f"Content-Location: part-{n}{eol}".encode()
        if framing != "no-blank-line":
            out += eol.encode()
        out += data + eol.encode()
    if framing != "no-close":
        out += f"--{boundary}--".encode()
        if framing == "double-close":
            out += f"{eol}--{boundary}--".encode()
        if framing != "close-without-crlf":
            out += eol.encode()
        if framing == "epilogue":
            out += plan.epilogue
    if framing == "cut":
        out = out[:int(len(out) * plan.cut)]
    declared = plan.declared if framing == "wrong-boundary" and plan.declared != boundary \
        else boundary
    right = f'multipart/related; type="application/dicom"; boundary="{declared}"'
    kind = plan.header_kind
    content_type = {
        "right": right,
        "no-type": f'multipart/related; boundary="{declared}"',
        "unquoted": f"multipart/related; type=application/dicom; boundary={declared}",
        "missing": None,
        "wrong-type": f'multipart/related; type="{plan.header_extra}"; boundary="{declared}"',
        "no-boundary": 'multipart/related; type="application/dicom"',
        "empty-boundary": 'multipart/related; type="application/dicom"; boundary=""',
        "long-boundary": f'multipart/related; type="application/dicom"; boundary={"b" * 300}',
        "form-data": f"multipart/form-data; boundary={declared}",
        "dicom": "application/dicom",
        "duplicate-boundary": f'{right}; boundary="{plan.header_extra}"',
        "random": plan.header_extra,
    }[kind]
    unquoted_ok = kind != "unquoted" or re.fullmatch(r"[A-Za-z0-9'()+_.-]+", declared)
    well_formed = (framing in ("ok", "close-without-crlf") and bool(plan.specs)
                   and kind in ("right", "no-type", "unquoted") and bool(unquoted_ok)
                   and where != "junk")
    return StowBody(bytes(out), None if content_type is None else _header_value(content_type),
                    target, well_formed, url_study, parts)


def _referenced(answer: Answer) -> dict[str, str]:
    """SOP Instance UID -> RetrieveURL of each instance a STOW-RS answer says it stored."""
    body = orjson.loads(answer.body)
    out = {}
    for item in body.get("00081199", {}).get("Value", []):
        out[item["00081155"]["Value"][0]] = item["00081190"]["Value"][0]
    return out


def _stored_file(fz: Fuzzed, url: str) -> Path:
    match = re.search(r"/studies/([0-9.]+)/series/([0-9.]+)/instances/([0-9.]+)$", url)
    assert match, url
    return fz.archive.stored_path("default", *match.groups())


def _check_stow(fz: Fuzzed, answer: Answer, sent: dict[str, bytes], summary: str) -> None:
    """Accepted instances are stored as sent; a refused request stores nothing."""
    if answer.status in (200, 202):
        referenced = _referenced(answer)
        assert set(referenced) <= set(sent), f"stored what was not valid: {summary}"
        for sop, url in referenced.items():
            assert _stored_file(fz, url).read_bytes() == sent[sop], f"{sop} not as sent"
    else:
        for sop in sent:
            stored = list((fz.archive.data_dir / "storage" / "default").glob(f"*/*/{sop}.dcm"))
            assert not stored, f"{answer.status} but {sop} was stored: {summary}"


@given(plan=stow_plans)
@settings(max_examples=150, **FUZZ)  # type: ignore[arg-type]
def test_stow_rs_random_multipart_bodies_never_give_a_5xx_and_store_all_or_nothing(
        fuzzed: Fuzzed, plan: StowPlan) -> None:
    request = build_stow(plan)
    headers = [("Content-Type", request.content_type)] if request.content_type is not None \
        else []
    summary = _summary("POST", request.target, headers, request.body)
    note(f"parts: {[(s.kind, s.part_type, len(b)) for s, b, _ in request.parts]}")
    answer = request_ok(fuzzed, "POST", request.target, headers, request.body)
    assert answer is not None
    valid = {sop: b for s, b, sop in request.parts
             if sop is not None and _effective_type(s) == "application/dicom"}
    _check_stow(fuzzed, answer, valid, summary)
    event(f"well-formed: {request.well_formed}")
    if not request.well_formed:
        return
    # a well-formed body: one outcome per part; each valid DICOM part stored unless the
    # URL names another study (then refused with A900, its SOP Instance UID reported)
    assert answer.status in (200, 202, 409), f"{answer.status} {answer.body[:500]!r}"
    body = orjson.loads(answer.body)
    failed = body.get("00081198", {}).get("Value", [])
    referenced = _referenced(answer)
    assert len(failed) + len(referenced) == len(request.parts), body
    if request.url_study == CT.study:
        failed_sops = {f["00081155"]["Value"][0] for f in failed if "00081155" in f}
        assert not referenced and set(valid) <= failed_sops, body
    else:
        assert set(referenced) == set(valid), body


# -- 5. mutated Part 10 files ----------------------------------------------------------
@dataclass(frozen=True)
class Mutation:
    """A byte-level change (flip, set, insert, delete) at ``position``, or a change of
    one element's VR or 16-bit length field (``vr``, ``length``: the element chosen by
    ``position``), which reaches the attribute parsing far more often than blind bytes."""

    kind: str
    position: int  # taken modulo the length of the region mutated (or the element count)
    near_start: bool  # position counted within the attributes before the Pixel Data
    value: int
    insert: bytes
    count: int
    vr: bytes


VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
       b"OB", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM", b"UI", b"UL", b"UN",
       b"US", b"UT"]
mutations = st.lists(st.builds(
    Mutation,
    kind=st.sampled_from(["flip", "set", "insert", "delete", "vr", "vr", "length"]),
    position=st.integers(0, 2**20),
    near_start=st.booleans(),
    value=st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 1, 0xFF, 0x7F, 0x80, 0xFFFF])),
    insert=st.binary(min_size=1, max_size=8),
    count=st.integers(1, 8),
    vr=st.one_of(st.sampled_from(VRS), st.binary(min_size=2, max_size=2),
                 st.text(st.sampled_from(string.ascii_uppercase), min_size=2, max_size=2).map(
                     str.encode)),
), min_size=1, max_size=4)


def mutate(stored: Template, start: int, changes: list[Mutation]) -> bytes:
    """``stored.data`` with ``changes`` applied at or after ``start``."""
    out = bytearray(stored.data)
    for m in changes:
        if m.kind in ("vr", "length"):
            at = stored.elements[m.position % len(stored.elements)]
            if m.kind == "vr":
                out[at + 4:at + 6] = m.vr
            else:
                out[at + 6:at + 8] = m.value.to_bytes(2, "little")
            continue
        span = max(1, len(out) - start)
        window = min(span, max(1, stored.header_end - start)) if m.near_start else span
        at = start + m.position % window
        if m.kind == "flip" and at < len(out):
            out[at] ^= 1 << (m.value % 8)
        elif m.kind == "set" and at < len(out):
            out[at] = m.value & 0xFF
        elif m.kind == "insert":
            out[at:at] = m.insert
        elif m.kind == "delete":
            del out[at:at + m.count]
    return bytes(out)


TEMPLATES = st.sampled_from(["ct", "multi-frame"])


def _restored(fz: Fuzzed, name: str) -> Template:
    """The template ``name``, its stored file made the original again (by STOW-RS) if an
    earlier example replaced it: every example starts from the same state, so that a
    failure replays."""
    stored = fz.templates[name]
    if stored.path.read_bytes() != stored.data:
        body, content_type = multipart([stored.data])
        answer = _send(fz.archive, "POST", "/dicomweb/studies",
                       [("Content-Type", content_type.encode())], body)
        assert answer.status == 200, answer
        assert stored.path.read_bytes() == stored.data
    return stored


@given(template=TEMPLATES, changes=mutations, whole_file=st.booleans())
@settings(max_examples=500, **FUZZ)  # type: ignore[arg-type]
def test_mutated_part10_files_over_stow_rs_never_give_a_5xx_nor_alter_the_stored_one(
        fuzzed: Fuzzed, template: str, changes: list[Mutation], whole_file: bool) -> None:
    """Mutations anywhere (preamble and File Meta too) or in the data set only. The
    stored file of the same instance changes only when the mutated one is accepted in its
    place (then it is stored as sent)."""
    stored = _restored(fuzzed, template)
    mutated = mutate(stored, 0 if whole_file else stored.data_set_start, changes)
    body, content_type = multipart([mutated])
    headers = [("Content-Type", content_type.encode())]
    summary = _summary("POST", "/dicomweb/studies", headers, body)
    log = ServerLog(fuzzed.archive)
    answer = request_ok(fuzzed, "POST", "/dicomweb/studies", headers, body, check_status=False)
    assert answer is not None
    referenced = _referenced(answer) if answer.status in (200, 202) else {}
    replaced = any(_stored_file(fuzzed, url) == stored.path for url in referenced.values())
    assert stored.path.read_bytes() == (mutated if replaced else stored.data), (
        f"{answer.status} (not accepted in its place) but the stored file changed: "
        f"{summary}\nserver log:\n{log.since()}")
    assert_below_500(answer, summary, log)
    assert answer.status in (200, 409), f"{answer.status}: {answer.body[:500]!r}"
    for url in referenced.values():
        assert _stored_file(fuzzed, url).read_bytes() == mutated, "not stored as sent"


@given(template=TEMPLATES, changes=mutations)
@settings(max_examples=250, **FUZZ)  # type: ignore[arg-type]
def test_mutated_data_sets_over_c_store_get_a_status_never_kill_the_listener_nor_alter(
        fuzzed: Fuzzed, tmp_path_factory: pytest.TempPathFactory, template: str,
        changes: list[Mutation]) -> None:
    """The File Meta stays intact (it names the SOP class, instance and transfer syntax
    of the C-STORE request); the data set bytes are mutated and streamed as they are.
    Any status will do, or an abort; the stored file of the instance changes only with a
    success status (then it holds the mutated data set)."""
    stored = _restored(fuzzed, template)
    mutated = mutate(stored, stored.data_set_start, changes)
    path = tmp_path_factory.mktemp("mutated") / "mutated.dcm"
    path.write_bytes(mutated)
    log = ServerLog(fuzzed.archive)
    try:
        statuses = c_store(fuzzed.archive, [path])
    except AssertionError as exc:  # association refused: allowed
        assert "not established" in str(exc), exc
        statuses = []
    assert fuzzed.archive.alive(), f"the archive died:\n{log.since()}"
    assert _processes(fuzzed.archive) >= fuzzed.processes, \
        f"the DIMSE listener died:\n{log.since()}"
    status = int(statuses[0].Status) if statuses and "Status" in statuses[0] else None
    note(f"C-STORE status: {status if status is None else hex(status)}")
    event(f"C-STORE status {status if status is None else hex(status)}")
    after = stored.path.read_bytes()
    if after != stored.data:
        assert status == 0 and after.endswith(mutated[stored.data_set_start:]), (
            f"C-STORE status {status if status is None else hex(status)} "
            f"({statuses[0].get('ErrorComment', '') if statuses else 'aborted'}) but the "
            f"stored file changed\nserver log:\n{log.since()}")


# -- 6. afterwards ---------------------------------------------------------------------
def test_after_all_fuzzing_archive_alive_c_echo_works_originals_unchanged(
        fuzzed: Fuzzed) -> None:
    check_invariants(fuzzed)
    assert echo(fuzzed.archive)
