"""The lean DICOM Upper Layer acceptor (``roles/dul.py``) and its routing (``roles/scp.py``).

Unit tests check the PDUs and command sets that ``dul`` encodes and decodes against
pynetdicom, the reference implementation: an A-ASSOCIATE-RQ encoded by pynetdicom is parsed
by ``dul``; A-ASSOCIATE-AC/RJ, A-ABORT and response command sets encoded by ``dul`` are
decoded by pynetdicom.

Integration tests run against real archive processes. Which acceptor served an association
shows in its A-ASSOCIATE-AC: the lean acceptor answers with the archive's Implementation
Class UID, pynetdicom (the fallback for anything but Verification and Storage, or with
SCP/SCU role selection) with its own. Peers are pynetdicom, DCMTK (``storescu``,
``echoscu``) and raw sockets for what no well-behaved peer sends.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_context, build_role
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from dicomcloud.ingest import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from dicomcloud.roles import dul
from tests.support import (
    Archive,
    data_set_bytes,
    echo,
    find_instances,
    layout_snapshot,
    make_ct,
    require_tool,
    staging_files,
    value,
    wait_until,
    write_part10,
)

ARCHIVE_AE = "DICOMCLOUD"
ALLOWED = ("PYTEST", "STORESCU", "ECHOSCU", "RAWPEER")
CARDIO_AE, CARDIO_TENANT = "CARDIO_AE", "cardio"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.1"
PEER_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1435.98"
PEER_IMPLEMENTATION_VERSION = "DULTEST_1"
UNRECOGNIZED_OPERATION = 0x0211


# -- archives ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """One archive for most tests (in place of conftest's): the DIMSE listener process (the
    default), calling AE titles restricted to ``ALLOWED``, called AE title ``CARDIO_AE``
    mapped to a tenant."""
    instance = Archive(tmp_path_factory.mktemp("dul") / "data", env={
        "DICOMCLOUD_SCP__ALLOWED_CALLING_AETS": ",".join(ALLOWED),
        f"DICOMCLOUD_SCP__AE_TENANTS__{CARDIO_AE}": CARDIO_TENANT,
        "DICOMCLOUD_WEB__PROCESSES": "0",
        # the stop at the end need not wait long for associations tests leave open
        "DICOMCLOUD_WEB__GRACEFUL_TIMEOUT": "2",
    }).start()
    yield instance
    if instance.alive():
        instance.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """An archive that accepts one association at a time (a single listener process)."""
    instance = Archive(tmp_path_factory.mktemp("dul-limited") / "data", env={
        "DICOMCLOUD_SCP__PROCESSES": "0",
        "DICOMCLOUD_SCP__MAX_ASSOCIATIONS": "1",
        "DICOMCLOUD_WEB__PROCESSES": "0",
    }).start()
    yield instance
    if instance.alive():
        instance.stop()


# -- helpers -----------------------------------------------------------------------------
def associate_rq(contexts: list[tuple[int, str, list[str]]], *, calling: str = "RAWPEER",
                 called: str = ARCHIVE_AE, application_context: str = dul.APPLICATION_CONTEXT,
                 max_length: int = 16384, roles: tuple[str, ...] = ()) -> bytes:
    """An A-ASSOCIATE-RQ PDU as pynetdicom encodes it; ``contexts``: (id, abstract
    syntax, transfer syntaxes); ``roles``: SOP classes with an SCP/SCU role selection."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = application_context
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    for context_id, abstract_syntax, syntaxes in contexts:
        context = build_context(abstract_syntax, syntaxes)
        context.context_id = context_id
        primitive.presentation_context_definition_list.append(context)
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_length
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PEER_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PEER_IMPLEMENTATION_VERSION
    user: list[Any] = [maximum, implementation, version]
    user += [build_role(uid, scu_role=True, scp_role=True) for uid in roles]
    primitive.user_information = user
    return bytes(A_ASSOCIATE_RQ(primitive).encode())


def message_pdus(message: DIMSEMessage, context_id: int, max_pdu: int = 0) -> list[bytes]:
    """The P-DATA-TF PDUs of a DIMSE message as pynetdicom fragments and encodes them."""
    return [bytes(P_DATA_TF(p).encode()) for p in message.encode_msg(context_id, max_pdu)]


def store_message(ds: Dataset, message_id: int = 1) -> C_STORE_RQ:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 0
    primitive.DataSet = BytesIO(encode(ds, False, True))  # explicit VR little endian
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return message


def echo_message(message_id: int = 1) -> C_ECHO_RQ:
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return message


def command_bytes(message: DIMSEMessage) -> bytes:
    return bytes(encode(message.command_set, True, True))


def decode_command(raw: bytes) -> Dataset:
    return decode(BytesIO(raw), True, True)


class RawPeer:
    """A TCP peer that speaks PDUs by hand."""

    def __init__(self, archive: Archive, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", archive.dimse_port), timeout=timeout)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            chunk = self.sock.recv(size - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {size} bytes")
            out += chunk
        return out

    def read_pdu(self) -> bytes:
        """One whole PDU, header included."""
        head = self._exactly(6)
        return head + self._exactly(struct.unpack(">I", head[2:])[0])

    def associate(self, rq: bytes) -> A_ASSOCIATE_AC:
        self.send(rq)
        pdu = self.read_pdu()
        assert pdu[0] == dul.ASSOCIATE_AC, pdu[:16]
        ac = A_ASSOCIATE_AC()
        ac.decode(pdu)
        return ac

    def read_command(self) -> tuple[int, Dataset]:
        """The next command set (its presentation context id, the set) from P-DATA-TF PDUs."""
        parts: list[bytes] = []
        while True:
            pdu = self.read_pdu()
            assert pdu[0] == dul.P_DATA_TF, pdu[:16]
            p_data = P_DATA_TF()
            p_data.decode(pdu)
            for item in p_data.presentation_data_value_items:
                data = bytes(item.presentation_data_value)
                assert data[0] & 0x01, "a command fragment"
                parts.append(data[1:])
                if data[0] & 0x02:
                    return int(item.presentation_context_id), decode_command(b"".join(parts))

    def read_pdu_or_close(self) -> bytes:
        """The next PDU, or b"" when the archive closes (or resets) the connection first."""
        try:
            return self.read_pdu()
        except ConnectionError:  # closed (see _exactly) or reset
            return b""

    def read_until_closed(self) -> bytes:
        """Everything the archive sends until it closes the connection."""
        out = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk

    def release(self) -> None:
        self.send(b"\x05\x00\x00\x00\x00\x04" + bytes(4))
        assert self.read_pdu()[0] == dul.RELEASE_RP


def rejection(archive: Archive, rq: bytes) -> tuple[int, int, int]:
    """Send ``rq``; the (result, source, reason) of the A-ASSOCIATE-RJ that answers it.

    A raw socket, not pynetdicom: the archive resets the connection after this
    rejection, and pynetdicom then leaks its socket (its shutdown fails, so it never
    closes it), which this test run turns into an error.
    """
    with RawPeer(archive) as peer:
        peer.send(rq)
        pdu = peer.read_pdu()
        peer.read_until_closed()
    assert pdu[0] == dul.ASSOCIATE_RJ, pdu[:16]
    rj = A_ASSOCIATE_RJ()
    rj.decode(pdu)
    assert rj.result is not None and rj.source is not None
    assert rj.reason_diagnostic is not None
    return rj.result, rj.source, rj.reason_diagnostic


def accepted(archive: Archive) -> bool:
    """True when a Verification association is accepted now (then released); False when
    it is rejected. A raw socket, for the reason given in ``rejection``."""
    with RawPeer(archive) as peer:
        peer.send(associate_rq([(1, Verification, [ImplicitVRLittleEndian])]))
        pdu = peer.read_pdu()
        if pdu[0] == dul.ASSOCIATE_RJ:
            peer.read_until_closed()
            return False
        assert pdu[0] == dul.ASSOCIATE_AC, pdu[:16]
        peer.release()
        return True


class Relay:
    """A TCP relay to the archive's DIMSE port that records what the peer sends."""

    def __init__(self, archive: Archive) -> None:
        self.target = archive.dimse_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sent = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(30)
        try:
            client, _ = self.listener.accept()
        except OSError:  # nobody came (the test fails on its own assertions)
            return
        server = socket.create_connection(("127.0.0.1", self.target), timeout=30)
        back = threading.Thread(target=self._pump, args=(server, client, None), daemon=True)
        back.start()
        self._pump(client, server, self.sent)
        back.join(30)
        client.close()
        server.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, record: bytearray | None) -> None:
        try:
            while chunk := source.recv(65536):
                if record is not None:
                    record += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()

    def pdus(self) -> list[tuple[int, int]]:
        """(type, length) of each PDU the peer sent; after the peer has closed."""
        self.thread.join(30)
        out, position = [], 0
        while position + 6 <= len(self.sent):
            kind, length = self.sent[position], struct.unpack(
                ">I", self.sent[position + 2:position + 6])[0]
            out.append((kind, length))
            position += 6 + length
        assert position == len(self.sent), "the recorded stream is whole PDUs"
        return out


def served_natively(assoc: Any) -> bool:
    """True when the lean acceptor (not pynetdicom) accepted this pynetdicom association."""
    return bool(assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
                and assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION)


def private_instance() -> Dataset:
    """A complete instance of a private (unknown) SOP class: no pixel data."""
    ds = Dataset()
    ds.SOPClassUID = PRIVATE_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Private^Class"
    ds.PatientID = "PID-PRIVATE"
    ds.StudyDate = "20240103"
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    block = ds.private_block(0x0011, "DICOMCLOUD DUL TEST", create=True)
    block.add_new(0x01, "LO", "vendor payload")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def peer_ae(calling: str = "PYTEST") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    return ae


# == unit: encoding and decoding against pynetdicom =======================================
def test_parse_associate_rq_reads_what_pynetdicom_encoded() -> None:
    rq = associate_rq([(1, Verification, [ImplicitVRLittleEndian]),
                       (3, CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
                       (5, PRIVATE_SOP_CLASS, [ExplicitVRLittleEndian])],
                      calling="MODALITY1", called="ARCHIVE", max_length=32768)
    assert rq[0] == dul.ASSOCIATE_RQ
    request = dul.parse_associate_rq(rq[6:])
    assert request.protocol_version == 1
    assert request.called_title == "ARCHIVE"
    assert request.calling_title == "MODALITY1"
    assert request.called_ae == b"ARCHIVE".ljust(16)
    assert request.application_context == dul.APPLICATION_CONTEXT
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes)
            for c in request.contexts] == [
        (1, Verification, [ImplicitVRLittleEndian]),
        (3, CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
        (5, PRIVATE_SOP_CLASS, [ExplicitVRLittleEndian])]
    assert request.max_length == 32768
    assert request.implementation_class_uid == PEER_IMPLEMENTATION_UID
    assert request.implementation_version == PEER_IMPLEMENTATION_VERSION
    assert request.role_selection is False


def test_parse_associate_rq_sees_an_scp_scu_role_selection_item() -> None:
    rq = associate_rq([(1, CTImageStorage, [ExplicitVRLittleEndian])], roles=(CTImageStorage,))
    request = dul.parse_associate_rq(rq[6:])
    assert request.role_selection is True
    assert [c.abstract_syntax for c in request.contexts] == [CTImageStorage]


def test_parse_associate_rq_refuses_an_item_longer_than_the_pdu() -> None:
    rq = associate_rq([(1, Verification, [ImplicitVRLittleEndian])])
    with pytest.raises(dul.ProtocolError):
        dul.parse_associate_rq(rq[6:-3])
    with pytest.raises(dul.ProtocolError):
        dul.parse_associate_rq(rq[6:40])  # shorter than the fixed fields


def test_encode_associate_ac_decodes_in_pynetdicom_with_results_and_user_information() -> None:
    request = dul.parse_associate_rq(associate_rq(
        [(1, Verification, [ImplicitVRLittleEndian]),
         (3, CTImageStorage, [ExplicitVRLittleEndian]),
         (5, "", [ExplicitVRLittleEndian])], calling="MODALITY1", called="ARCHIVE")[6:])
    results = [(1, dul.ACCEPTANCE, ImplicitVRLittleEndian),
               (3, dul.TRANSFER_SYNTAXES_NOT_SUPPORTED, ImplicitVRLittleEndian),
               (5, dul.ABSTRACT_SYNTAX_NOT_SUPPORTED, ImplicitVRLittleEndian)]
    raw = dul.encode_associate_ac(request, results, 65536, "1.2.3.4.5", "DUL_1")
    assert raw[0] == dul.ASSOCIATE_AC
    assert struct.unpack(">I", raw[2:6])[0] == len(raw) - 6
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    assert ac.protocol_version == 1
    assert ac.application_context_name == dul.APPLICATION_CONTEXT
    assert ac.called_ae_title.strip() == "ARCHIVE"
    assert ac.calling_ae_title.strip() == "MODALITY1"
    primitive = ac.to_primitive()
    assert [(c.context_id, c.result, c.transfer_syntax[0])
            for c in primitive.presentation_context_definition_results_list] == results
    user = {type(item).__name__: item for item in primitive.user_information}
    assert user["MaximumLengthNotification"].maximum_length_received == 65536
    assert user["ImplementationClassUIDNotification"].implementation_class_uid == "1.2.3.4.5"
    assert user["ImplementationVersionNameNotification"].implementation_version_name \
        == "DUL_1"


@pytest.mark.parametrize(("result", "source", "reason"), [(1, 1, 3), (2, 3, 2), (1, 2, 2)])
def test_encode_associate_rj_decodes_in_pynetdicom(result: int, source: int,
                                                   reason: int) -> None:
    raw = dul.encode_associate_rj(result, source, reason)
    rj = A_ASSOCIATE_RJ()
    rj.decode(raw)
    assert (rj.pdu_type, rj.result, rj.source, rj.reason_diagnostic) == (3, result, source,
                                                                        reason)
    assert len(raw) == 10


def test_encode_abort_decodes_in_pynetdicom() -> None:
    abort = A_ABORT_RQ()
    abort.decode(dul.encode_abort(2, 0))
    assert (abort.pdu_type, abort.source, abort.reason_diagnostic) == (7, 2, 0)


def test_release_rp_pdu_is_a_release_rp() -> None:
    assert dul.RELEASE_RP_PDU == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def test_parse_command_reads_a_pynetdicom_c_store_rq_command_set() -> None:
    ds = make_ct()
    command = dul.parse_command(command_bytes(store_message(ds, message_id=42)))
    assert dul.command_us(command, 0x00000100) == dul.C_STORE_RQ
    assert dul.command_us(command, 0x00000110) == 42
    assert dul.command_us(command, 0x00000800) != dul.NO_DATA_SET
    assert dul.command_uid(command, 0x00000002) == CTImageStorage
    assert dul.command_uid(command, 0x00001000) == ds.SOPInstanceUID


def test_c_store_response_decodes_as_a_c_store_rsp_to_the_request() -> None:
    ds = make_ct()
    command = dul.parse_command(command_bytes(store_message(ds, message_id=7)))
    raw = dul.response(command, 0x0000)
    rsp = decode_command(raw)
    assert rsp.CommandGroupLength == len(raw) - 12
    assert rsp.CommandField == 0x8001
    assert rsp.MessageIDBeingRespondedTo == 7
    assert rsp.CommandDataSetType == 0x0101
    assert rsp.Status == 0x0000
    assert rsp.AffectedSOPClassUID == CTImageStorage
    assert rsp.AffectedSOPInstanceUID == ds.SOPInstanceUID
    assert "ErrorComment" not in rsp
    assert list(rsp.keys()) == sorted(rsp.keys())


def test_c_echo_response_decodes_as_a_c_echo_rsp() -> None:
    command = dul.parse_command(command_bytes(echo_message(message_id=9)))
    rsp = decode_command(dul.response(command, 0x0000))
    assert rsp.CommandField == 0x8030
    assert rsp.MessageIDBeingRespondedTo == 9
    assert rsp.AffectedSOPClassUID == Verification
    assert rsp.Status == 0x0000
    assert "AffectedSOPInstanceUID" not in rsp


@pytest.mark.parametrize("comment", ["odd", "even", "x" * 63, "y" * 64, "z" * 100])
def test_error_comment_is_at_most_64_characters_and_even_length(comment: str) -> None:
    command = dul.parse_command(command_bytes(store_message(make_ct())))
    raw = dul.response(command, 0xA900, comment)
    element = raw.find(b"\x00\x00\x02\x09")  # (0000,0902) implicit VR little endian
    assert element > 0
    length = struct.unpack("<I", raw[element + 4:element + 8])[0]
    assert length % 2 == 0 and length <= 64
    rsp = decode_command(raw)
    assert rsp.Status == 0xA900
    assert rsp.ErrorComment == comment[:64]


def test_parse_command_refuses_an_element_longer_than_the_command_set() -> None:
    raw = command_bytes(echo_message())
    assert raw[-10:-2] == b"\x00\x00\x00\x08\x02\x00\x00\x00"  # (0000,0800), 2 bytes, last
    assert dul.command_us(dul.parse_command(raw), 0x00000800) == dul.NO_DATA_SET
    with pytest.raises(dul.ProtocolError):
        dul.parse_command(raw[:-1])  # its value cut short
    with pytest.raises(dul.ProtocolError):
        dul.parse_command(raw[:-6] + struct.pack("<I", 1000) + raw[-2:])  # length 1000


class Received:
    """What the store handler of an in-process ``StorageAssociation`` was given."""

    def __init__(self, status: int, comment: str | None) -> None:
        self.answer = (status, comment)
        self.calls: list[tuple[str, str, str, bytes, str]] = []

    def __call__(self, transfer_syntax: str, sop_class: str, sop_uid: str,
                 data: list[memoryview], request: dul.AssociateRequest) -> tuple[int, str | None]:
        self.calls.append((transfer_syntax, sop_class, sop_uid, b"".join(data),
                           request.calling_title))
        return self.answer


@pytest.fixture
def in_process() -> Iterator[tuple[socket.socket, Received]]:
    """A ``StorageAssociation`` running on one end of a socket pair; the test holds the
    other end. Its store handler refuses with 0xA900 and a 100-character comment."""
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    handler = Received(0xA900, "c" * 100)
    accept = dul.Acceptance(ae_title=ARCHIVE_AE, max_pdu_size=1 << 16,
                            implementation_class_uid="1.2.3.4", implementation_version="T_1",
                            transfer_syntaxes=frozenset({ExplicitVRLittleEndian}))
    association = dul.StorageAssociation(theirs, ("127.0.0.1", 0), accept, handler, 10)
    thread = threading.Thread(target=association.run, daemon=True)
    thread.start()
    yield ours, handler
    ours.close()
    thread.join(10)
    assert not thread.is_alive()


def _read_pdu(sock: socket.socket) -> bytes:
    head = sock.recv(6, socket.MSG_WAITALL)
    assert len(head) == 6, head
    length = struct.unpack(">I", head[2:])[0]
    body = sock.recv(length, socket.MSG_WAITALL) if length else b""
    assert len(body) == length
    return head + body


def test_in_process_association_fragments_its_response_to_the_peers_maximum_length(
        in_process: tuple[socket.socket, Received]) -> None:
    """The peer receives at most 64-byte P-DATA-TF PDUs: the C-STORE-RSP (with its
    Error Comment) comes in several fragments that pynetdicom reassembles and decodes."""
    sock, handler = in_process
    sock.sendall(associate_rq([(1, CTImageStorage, [ImplicitVRLittleEndian,
                                                    ExplicitVRLittleEndian]),
                               (3, CTImageStorage, [ImplicitVRLittleEndian])],
                              max_length=64))
    ac = A_ASSOCIATE_AC()
    ac.decode(_read_pdu(sock))
    assert [(c.context_id, c.result, c.transfer_syntax[0]) for c in
            ac.to_primitive().presentation_context_definition_results_list] == [
        (1, dul.ACCEPTANCE, ExplicitVRLittleEndian),
        (3, dul.TRANSFER_SYNTAXES_NOT_SUPPORTED, ImplicitVRLittleEndian)]
    ds = make_ct(size=32)
    sock.sendall(b"".join(message_pdus(store_message(ds, message_id=3), 1, max_pdu=1000)))
    fragments: list[bytes] = []
    lengths: list[int] = []
    last = False
    while not last:
        pdu = _read_pdu(sock)
        assert pdu[0] == dul.P_DATA_TF
        lengths.append(len(pdu) - 6)
        p_data = P_DATA_TF()
        p_data.decode(pdu)
        for item in p_data.presentation_data_value_items:
            assert item.presentation_context_id == 1
            data = bytes(item.presentation_data_value)
            assert data[0] & 0x01
            fragments.append(data[1:])
            last = bool(data[0] & 0x02)
    assert len(lengths) > 2 and max(lengths) <= 64, lengths
    rsp = decode_command(b"".join(fragments))
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8001, 3, 0xA900)
    assert rsp.ErrorComment == "c" * 64
    assert handler.calls == [(ExplicitVRLittleEndian, CTImageStorage, ds.SOPInstanceUID,
                              encode(ds, False, True), "RAWPEER")]
    sock.sendall(b"\x05\x00\x00\x00\x00\x04" + bytes(4))
    assert _read_pdu(sock) == dul.RELEASE_RP_PDU
    assert sock.recv(1) == b""  # and the acceptor closed the connection


def test_in_process_association_rejects_an_even_protocol_version(
        in_process: tuple[socket.socket, Received]) -> None:
    sock, handler = in_process
    rq = bytearray(associate_rq([(1, Verification, [ExplicitVRLittleEndian])]))
    rq[6:8] = b"\x00\x02"  # protocol version: bit 0 (version 1) not set
    sock.sendall(bytes(rq))
    rj = A_ASSOCIATE_RJ()
    rj.decode(_read_pdu(sock))
    assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 2, 2)
    assert sock.recv(1) == b""
    assert handler.calls == []


def test_in_process_association_answers_a_data_set_without_a_command_with_an_abort(
        in_process: tuple[socket.socket, Received]) -> None:
    sock, handler = in_process
    sock.sendall(associate_rq([(1, CTImageStorage, [ExplicitVRLittleEndian])]))
    assert _read_pdu(sock)[0] == dul.ASSOCIATE_AC
    pdv = b"\x02" + b"dataset bytes"  # data set, last fragment, with no command before it
    sock.sendall(bytes([dul.P_DATA_TF, 0]) + struct.pack(">IIB", 4 + 1 + len(pdv),
                                                          1 + len(pdv), 1) + pdv)
    assert _read_pdu(sock) == dul.encode_abort(2, 0)
    assert sock.recv(1) == b""
    assert handler.calls == []


# == integration: routing and negotiation =================================================
def test_unlisted_calling_ae_is_rejected_permanently_and_a_listed_one_stores(
        archive: Archive) -> None:
    ae = peer_ae("INTRUDER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=ARCHIVE_AE)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)

    ds = make_ct()
    ae = peer_ae("PYTEST")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    try:
        assert served_natively(assoc)
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    assert archive.stored_path("default", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                               ds.SOPInstanceUID).is_file()


def test_echoscu_and_a_listed_storescu_are_served_and_an_unlisted_storescu_is_refused(
        archive: Archive, tmp_path: Path) -> None:
    echoscu, storescu = require_tool("echoscu"), require_tool("storescu")
    result = subprocess.run([echoscu, "-d", "-aec", ARCHIVE_AE, "127.0.0.1",
                             str(archive.dimse_port)], capture_output=True, text=True,
                            timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}\n" in output
    assert "Received Echo Response (Success)" in output
    path = write_part10(make_ct(), tmp_path / "ct.dcm")
    refused = subprocess.run([storescu, "-aet", "NOTLISTED", "-aec", ARCHIVE_AE, "127.0.0.1",
                              str(archive.dimse_port), str(path)], capture_output=True,
                             text=True, timeout=30)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr


def test_one_association_at_a_time_second_rejected_transiently_then_accepted_after_release(
        limited: Archive) -> None:
    held_ae = peer_ae("HOLDER")
    held_ae.add_requested_context(Verification)
    held = held_ae.associate("127.0.0.1", limited.dimse_port, ae_title=ARCHIVE_AE)
    assert held.is_established
    assert served_natively(held)
    try:
        assert rejection(limited, associate_rq([(1, Verification, [ImplicitVRLittleEndian])]))\
            == (2, 3, 2)  # transient, service provider (presentation), local limit exceeded
        assert held.send_c_echo().Status == 0  # the held one is unaffected
    finally:
        held.release()
    # the slot is free once the archive has closed the released association
    wait_until(lambda: accepted(limited), timeout=10, message="an association after release")


def test_native_association_is_rejected_while_a_pynetdicom_one_holds_the_only_slot(
        limited: Archive) -> None:
    held_ae = peer_ae("HOLDER")
    held_ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    held_ae.add_requested_context(Verification)
    held = held_ae.associate("127.0.0.1", limited.dimse_port, ae_title=ARCHIVE_AE)
    assert held.is_established
    assert not served_natively(held)
    try:
        assert rejection(limited, associate_rq([(1, Verification, [ImplicitVRLittleEndian])]))\
            == (2, 3, 2)
    finally:
        held.release()
    wait_until(lambda: accepted(limited), timeout=10, message="an association after release")


def test_query_retrieve_plus_ct_storage_falls_back_to_pynetdicom_which_serves_both(
        archive: Archive) -> None:
    ds = make_ct()
    ae = peer_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    try:
        assert not served_natively(assoc)
        assert sorted(c.abstract_syntax for c in assoc.accepted_contexts) == sorted(
            [StudyRootQueryRetrieveInformationModelFind, CTImageStorage])
        assert assoc.rejected_contexts == []
        assert assoc.send_c_store(ds).Status == 0
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        statuses = [status.Status for status, _ in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind)]
        assert statuses[-1] == 0x0000  # the C-FIND is answered on the same association
    finally:
        assoc.release()
    rows = wait_until(lambda: find_instances(archive, [ds.SOPInstanceUID])[ds.SOPInstanceUID],
                      message="the CT indexed")
    assert len(rows) == 1
    assert value(rows[0], "0020000D") == ds.StudyInstanceUID


def test_role_selection_item_falls_back_to_pynetdicom_and_stores(archive: Archive) -> None:
    ds = make_ct()
    ae = peer_ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=ARCHIVE_AE,
                         ext_neg=[build_role(CTImageStorage, scu_role=True)])
    assert assoc.is_established
    try:
        assert not served_natively(assoc)
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    stored = archive.stored_path("default", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                 ds.SOPInstanceUID)
    assert data_set_bytes(stored) == encode(ds, False, True)
    wait_until(lambda: find_instances(archive, [ds.SOPInstanceUID])[ds.SOPInstanceUID],
               message="the CT indexed")


def test_private_sop_class_is_stored_natively_and_indexed(archive: Archive) -> None:
    ds = private_instance()
    ae = peer_ae()
    ae.add_requested_context(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    try:
        assert served_natively(assoc)
        assert [c.abstract_syntax for c in assoc.accepted_contexts] == [PRIVATE_SOP_CLASS]
        status = assoc.send_c_store(ds)
        assert status.Status == 0, status.get("ErrorComment")
    finally:
        assoc.release()
    stored = archive.stored_path("default", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                 ds.SOPInstanceUID)
    assert data_set_bytes(stored) == encode(ds, False, True)
    assert pydicom.dcmread(stored).file_meta.MediaStorageSOPClassUID == PRIVATE_SOP_CLASS
    rows = wait_until(lambda: find_instances(archive, [ds.SOPInstanceUID])[ds.SOPInstanceUID],
                      message="the private instance indexed")
    assert len(rows) == 1
    assert value(rows[0], "00080016") == PRIVATE_SOP_CLASS


def test_storescu_with_4_kib_pdus_stores_a_multi_fragment_image_byte_identical(
        archive: Archive, tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    ds = make_ct(size=128)  # 32 KiB of pixel data: at least 8 PDUs of 4 KiB
    path = write_part10(ds, tmp_path / "big.dcm")
    assert len(data_set_bytes(path)) > 8 * 4096
    with Relay(archive) as relay:  # to see the PDUs storescu sends
        result = subprocess.run(
            [storescu, "-d", "-R", "-xe", "--max-pdu", "4096", "--max-send-pdu", "4096",
             "-aec", ARCHIVE_AE, "127.0.0.1", str(relay.port), str(path)],
            capture_output=True, text=True, timeout=60)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        p_data = [length for kind, length in relay.pdus() if kind == dul.P_DATA_TF]
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}\n" in output
    assert "DIMSE Status                  : 0x0000: Success" in output
    assert len(p_data) > 8 and max(p_data) <= 4096, p_data
    stored = archive.stored_path("default", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                 ds.SOPInstanceUID)
    assert data_set_bytes(stored) == data_set_bytes(path)
    assert pydicom.dcmread(stored).pixel_array.shape == (128, 128)


def test_called_ae_title_of_a_tenant_stores_natively_under_that_tenant(
        archive: Archive) -> None:
    ds = make_ct()
    ae = peer_ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=CARDIO_AE)
    assert assoc.is_established
    try:
        assert served_natively(assoc)
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    ids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    stored = archive.data_dir / "storage" / CARDIO_TENANT / ids[0] / ids[1] / f"{ids[2]}.dcm"
    assert stored == archive.stored_path(CARDIO_TENANT, *ids)
    assert data_set_bytes(stored) == encode(ds, False, True)
    assert not archive.stored_path("default", *ids).exists()


# == integration: hostile peers ==========================================================
def test_garbage_instead_of_an_associate_rq_is_aborted_and_c_echo_still_works(
        archive: Archive) -> None:
    with RawPeer(archive) as peer:
        peer.send(b"GET / HTTP/1.1\r\nHost: dicom\r\n\r\n" + bytes(range(256)))
        # no A-ASSOCIATE-RQ to peek at: an A-ABORT, then the archive closes its side
        answer = peer.read_pdu_or_close()
    assert answer[:1] == bytes([dul.ABORT]), answer[:16]
    A_ABORT_RQ().decode(answer)
    assert echo(archive)


def test_associate_rq_with_a_broken_item_is_aborted_and_c_echo_still_works(
        archive: Archive) -> None:
    rq = associate_rq([(1, Verification, [ImplicitVRLittleEndian])])
    broken = bytearray(rq)
    broken[76:78] = b"\xff\xff"  # the application context item claims 65535 bytes
    with RawPeer(archive) as peer:
        peer.send(bytes(broken))
        answer = peer.read_until_closed()  # an A-ABORT, then a clean close (no reset)
    assert answer[:1] == bytes([dul.ABORT]) and len(answer) == 10, answer[:16]
    assert echo(archive)


def test_an_associate_rq_arriving_in_pieces_is_still_served_natively(
        archive: Archive) -> None:
    rq = associate_rq([(1, Verification, [ImplicitVRLittleEndian])])
    with RawPeer(archive) as peer:
        peer.send(rq[:50])
        time.sleep(0.3)  # the rest arrives in a later segment
        peer.send(rq[50:])
        ac = peer.associate(b"")  # the request is already sent
        user = {type(i).__name__: i for i in ac.to_primitive().user_information}
        # the archive's own implementation class UID: the lean acceptor, not pynetdicom
        assert user["ImplementationClassUIDNotification"].implementation_class_uid \
            == IMPLEMENTATION_CLASS_UID
        peer.release()


def test_a_pynetdicom_association_is_rejected_while_a_native_one_holds_the_only_slot(
        limited: Archive) -> None:
    held_ae = peer_ae("HOLDER")
    held_ae.add_requested_context(Verification)
    held = held_ae.associate("127.0.0.1", limited.dimse_port, ae_title=ARCHIVE_AE)
    assert held.is_established and served_natively(held)
    try:
        query = associate_rq([(1, StudyRootQueryRetrieveInformationModelFind,
                               [ImplicitVRLittleEndian])])
        assert rejection(limited, query) == (2, 3, 2)
    finally:
        held.release()
    wait_until(lambda: accepted(limited), timeout=10, message="an association after release")


def test_a_transient_rejection_ends_with_a_clean_close_not_a_reset(limited: Archive) -> None:
    held_ae = peer_ae("HOLDER")
    held_ae.add_requested_context(Verification)
    held = held_ae.associate("127.0.0.1", limited.dimse_port, ae_title=ARCHIVE_AE)
    assert held.is_established
    try:
        with RawPeer(limited) as peer:
            peer.send(associate_rq([(1, Verification, [ImplicitVRLittleEndian])]))
            assert peer.read_pdu()[0] == dul.ASSOCIATE_RJ
            assert peer.sock.recv(1) == b""  # orderly end of stream; a reset would raise
    finally:
        held.release()


def test_garbage_does_not_keep_the_only_association_slot(limited: Archive) -> None:
    with RawPeer(limited) as peer:
        peer.send(b"GET / HTTP/1.1\r\nHost: dicom\r\n\r\n")
        assert peer.read_until_closed()[:1] == bytes([dul.ABORT])
    # at once, not after acse_timeout (30 s): the slot was never taken
    wait_until(lambda: accepted(limited), timeout=5, message="an association after garbage")


def test_wrong_application_context_is_rejected_source_1_reason_2(archive: Archive) -> None:
    rq = associate_rq([(1, Verification, [ImplicitVRLittleEndian])],
                      application_context="1.2.840.10008.3.1.1.99")
    with RawPeer(archive) as peer:
        peer.send(rq)
        pdu = peer.read_pdu()
        assert peer.read_until_closed() == b""
    assert pdu[0] == dul.ASSOCIATE_RJ
    rj = A_ASSOCIATE_RJ()
    rj.decode(pdu)
    assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 1, 2)
    assert echo(archive)


def test_p_data_on_a_context_not_accepted_is_aborted_and_c_echo_still_works(
        archive: Archive) -> None:
    rq = associate_rq([(1, Verification, [ImplicitVRLittleEndian])])
    with RawPeer(archive) as peer:
        ac = peer.associate(rq)
        assert ac.to_primitive().presentation_context_definition_results_list[0].result == 0
        peer.send(b"".join(message_pdus(echo_message(), context_id=3)))
        pdu = peer.read_pdu()
        assert peer.read_until_closed() == b""
    assert pdu[0] == dul.ABORT
    abort = A_ABORT_RQ()
    abort.decode(pdu)
    assert abort.source == 2
    assert echo(archive)


def test_raw_c_echo_on_the_accepted_context_succeeds(archive: Archive) -> None:
    """The raw peer itself is sound: the same PDUs on the accepted context get an answer."""
    rq = associate_rq([(1, Verification, [ImplicitVRLittleEndian])])
    with RawPeer(archive) as peer:
        peer.associate(rq)
        peer.send(b"".join(message_pdus(echo_message(message_id=5), context_id=1)))
        context_id, rsp = peer.read_command()
        peer.release()
    assert context_id == 1
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8030, 5, 0)


def test_connection_closed_midway_through_a_data_set_stores_nothing(archive: Archive) -> None:
    ds = make_ct(size=64)
    rq = associate_rq([(1, CTImageStorage, [ExplicitVRLittleEndian])])
    pdus = message_pdus(store_message(ds), context_id=1, max_pdu=4096)
    assert len(pdus) > 3, "command plus several data set fragments"
    before = layout_snapshot(archive)
    with RawPeer(archive) as peer:
        peer.associate(rq)
        peer.send(b"".join(pdus[:-1]))  # everything but the last data set fragment
        peer.sock.shutdown(socket.SHUT_WR)
        assert peer.read_until_closed() == b""  # no response: the archive has let go
    assert layout_snapshot(archive) == before
    wait_until(lambda: not staging_files(archive), timeout=5, message="staging empty")
    assert find_instances(archive, [ds.SOPInstanceUID])[ds.SOPInstanceUID] == []
    assert echo(archive)

    # the very same PDUs, all of them, store the instance
    with RawPeer(archive) as peer:
        peer.associate(rq)
        peer.send(b"".join(pdus))
        _, rsp = peer.read_command()
        peer.release()
    assert (rsp.CommandField, rsp.Status) == (0x8001, 0)
    stored = archive.stored_path("default", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                 ds.SOPInstanceUID)
    assert data_set_bytes(stored) == encode(ds, False, True)


def test_c_find_rq_on_a_storage_context_gets_status_0211_and_the_association_goes_on(
        archive: Archive) -> None:
    rq = associate_rq([(1, CTImageStorage, [ExplicitVRLittleEndian])])
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    primitive = C_FIND()
    primitive.MessageID = 11
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.Priority = 0
    primitive.Identifier = BytesIO(encode(identifier, False, True))
    find = C_FIND_RQ()
    find.primitive_to_message(primitive)
    ds = make_ct()
    with RawPeer(archive) as peer:
        peer.associate(rq)
        peer.send(b"".join(message_pdus(find, context_id=1)))
        context_id, rsp = peer.read_command()
        # the association is still usable: a C-STORE after it succeeds
        peer.send(b"".join(message_pdus(store_message(ds, message_id=12), context_id=1)))
        _, stored = peer.read_command()
        peer.release()
    assert context_id == 1
    assert rsp.CommandField == 0x8020
    assert rsp.MessageIDBeingRespondedTo == 11
    assert rsp.Status == UNRECOGNIZED_OPERATION
    assert rsp.ErrorComment
    assert (stored.CommandField, stored.MessageIDBeingRespondedTo, stored.Status) == (
        0x8001, 12, 0)


def test_c_store_with_a_non_ascii_sop_instance_uid_is_refused_a900_and_the_association_goes_on(
        archive: Archive) -> None:
    rq = associate_rq([(1, CTImageStorage, [ExplicitVRLittleEndian])])
    ds = make_ct()
    data = encode(ds, False, True)
    command = dul.encode_command([
        (0x00000002, CTImageStorage.encode() + (b"\x00" if len(CTImageStorage) % 2 else b"")),
        (0x00000100, struct.pack("<H", dul.C_STORE_RQ)),
        (0x00000110, struct.pack("<H", 21)),
        (0x00000700, struct.pack("<H", 0)),
        (0x00000800, struct.pack("<H", 0x0000)),
        (0x00001000, b"1.2.3\xe9"),
    ])
    pdus = (_p_data(1, 0x03, command) + _p_data(1, 0x02, data))
    with RawPeer(archive) as peer:
        peer.associate(rq)
        peer.send(pdus)
        _, refused = peer.read_command()
        peer.send(b"".join(message_pdus(store_message(ds, message_id=22), context_id=1)))
        _, stored = peer.read_command()
        peer.release()
    assert (refused.MessageIDBeingRespondedTo, refused.Status) == (21, 0xA900)
    assert (stored.MessageIDBeingRespondedTo, stored.Status) == (22, 0)


def _p_data(context_id: int, control: int, value: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BxI", dul.P_DATA_TF, len(pdv)) + pdv
