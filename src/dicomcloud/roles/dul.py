"""A lean DICOM Upper Layer acceptor for storage associations (PS3.8 section 9, PS3.7).

Why: pynetdicom runs every association as two threads that poll each other every
millisecond and reassembles each message through several copies; on a 2-core NAS that cost
more CPU per received image than storing and indexing it. Associations that only propose
Verification and Storage SOP classes -- what modalities send -- are served here instead, in
one thread each, with blocking reads straight into buffers. Anything else (Query/Retrieve,
Storage Commitment, SCP/SCU role selection, ...) is handed unchanged to pynetdicom: the
association request is only *peeked* at (``MSG_PEEK``), so pynetdicom reads it afresh.

Covered here (PS3.8 9.3): A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF with fragmented PDVs,
A-RELEASE-RQ/RP, A-ABORT. Messages (PS3.7 9.3): C-ECHO and C-STORE requests and responses;
C-CANCEL is ignored (a C-STORE cannot be cancelled midway); any other command gets status
0x0211 "unrecognized operation" (PS3.7 C.4.2).
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name (PS3.7 A.2.1)
VERIFICATION = "1.2.840.10008.1.1"

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
_MAX_RQ_LENGTH = 1 << 20  # far above any real A-ASSOCIATE-RQ (128 contexts x 30 syntaxes)

# Presentation context results (PS3.8 9.3.3.2)
ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4

# Command fields (PS3.7 E.1)
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATA_SET = 0x0101
UNRECOGNIZED_OPERATION = 0x0211

_HEAD = struct.Struct(">BxI")
_PDV_HEAD = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")


class ProtocolError(Exception):
    """The peer broke PS3.8; the association is aborted."""


@dataclass
class ProposedContext:
    """A presentation context of an A-ASSOCIATE-RQ (PS3.8 9.3.2.2)."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) this acceptor uses."""

    protocol_version: int
    called_ae: bytes
    calling_ae: bytes
    application_context: str = ""
    contexts: list[ProposedContext] = field(default_factory=list)
    max_length: int = 0  # 0: no limit (PS3.8 D.1)
    implementation_class_uid: str = ""
    implementation_version: str = ""
    role_selection: bool = False

    @property
    def calling_title(self) -> str:
        return self.calling_ae.decode("ascii", "replace").strip(" \x00")

    @property
    def called_title(self) -> str:
        return self.called_ae.decode("ascii", "replace").strip(" \x00")


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """Decode the body (after the 6-byte header) of an A-ASSOCIATE-RQ PDU."""
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
    version = struct.unpack(">H", body[:2])[0]
    request = AssociateRequest(version, bytes(body[4:20]), bytes(body[20:36]))
    position = 68
    while position < len(body):
        if position + 4 > len(body):
            raise ProtocolError("A-ASSOCIATE-RQ item header cut short")
        kind, length = body[position], struct.unpack(">H", body[position + 2:position + 4])[0]
        value = body[position + 4:position + 4 + length]
        if len(value) != length:
            raise ProtocolError("A-ASSOCIATE-RQ item longer than the PDU")
        position += 4 + length
        if kind == 0x10:
            request.application_context = _uid(value)
        elif kind == 0x20:
            request.contexts.append(_parse_context(value))
        elif kind == 0x50:
            _parse_user_information(value, request)
    return request


def _sub_items(value: bytes) -> list[tuple[int, bytes]]:
    items, position = [], 0
    while position + 4 <= len(value):
        kind, length = value[position], struct.unpack(">H", value[position + 2:position + 4])[0]
        items.append((kind, value[position + 4:position + 4 + length]))
        position += 4 + length
    if position != len(value):
        raise ProtocolError("sub-item lengths do not add up to their item")
    return items


def _parse_context(value: bytes) -> ProposedContext:
    if len(value) < 4:
        raise ProtocolError("presentation context item too short")
    context = ProposedContext(value[0], "", [])
    for kind, sub in _sub_items(value[4:]):
        if kind == 0x30:
            context.abstract_syntax = _uid(sub)
        elif kind == 0x40:
            context.transfer_syntaxes.append(_uid(sub))
    return context


def _parse_user_information(value: bytes, request: AssociateRequest) -> None:
    for kind, sub in _sub_items(value):
        if kind == 0x51 and len(sub) == 4:
            request.max_length = struct.unpack(">I", sub)[0]
        elif kind == 0x52:
            request.implementation_class_uid = _uid(sub)
        elif kind == 0x55:
            request.implementation_version = sub.decode("ascii", "replace").strip()
        elif kind == 0x54:
            request.role_selection = True


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return _HEAD.pack(kind, len(body)) + body


def encode_associate_ac(request: AssociateRequest, results: list[tuple[int, int, str]],
                        max_length: int, implementation_uid: str,
                        implementation_version: str) -> bytes:
    """A-ASSOCIATE-AC (PS3.8 9.3.3); ``results`` holds (context id, result, transfer syntax).

    The AE title fields echo the request's (PS3.8 9.3.3: sent as received, never tested);
    a refused context still carries a transfer syntax sub-item, whose value is not
    significant (PS3.8 9.3.3.2).
    """
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, result, syntax in results:
        items += _item(0x21, bytes((context_id, 0, result, 0))
                       + _item(0x40, syntax.encode("ascii")))
    user = (_item(0x51, struct.pack(">I", max_length))
            + _item(0x52, implementation_uid.encode("ascii"))
            + _item(0x55, implementation_version.encode("ascii")))
    items += _item(0x50, user)
    fixed = (struct.pack(">HH", 1, 0) + request.called_ae.ljust(16)[:16]
             + request.calling_ae.ljust(16)[:16] + bytes(32))
    return _pdu(ASSOCIATE_AC, fixed + items)


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient; source; reason."""
    return _pdu(ASSOCIATE_RJ, bytes((0, result, source, reason)))


def encode_abort(source: int = 2, reason: int = 0) -> bytes:
    """A-ABORT (PS3.8 9.3.8): source 0 service user, 2 service provider."""
    return _pdu(ABORT, bytes((0, 0, source, reason)))


RELEASE_RP_PDU = _pdu(RELEASE_RP, bytes(4))


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set (PS3.7 6.3, implicit VR little endian) with its group length."""
    body = b"".join(_ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value
                    for tag, value in elements)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def parse_command(raw: bytes) -> dict[int, bytes]:
    """Elements of a command set (group 0000, implicit VR little endian)."""
    elements: dict[int, bytes] = {}
    position = 0
    while position + 8 <= len(raw):
        group, element, length = _ELEMENT.unpack_from(raw, position)
        position += 8
        if position + length > len(raw):
            raise ProtocolError("command element longer than the command set")
        elements[(group << 16) | element] = bytes(raw[position:position + length])
        position += length
    return elements


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _even(raw: bytes) -> bytes:
    return raw + b"\x00" if len(raw) % 2 else raw


def error_comment(text: str) -> str:
    """Text fit for Error Comment (0000,0902), an LO value (PS3.7 C.4.2.1.4, PS3.5 6.2):
    at most 64 characters, ASCII, no backslash (the value separator) and no control
    characters."""
    text = text.encode("ascii", "replace").decode()
    return "".join("/" if c == "\\" else c if " " <= c < "\x7f" else " " for c in text)[:64]


def _lo(value: str) -> bytes:
    raw = error_comment(value).encode()
    return raw + b" " if len(raw) % 2 else raw


def command_uid(command: dict[int, bytes], tag: int) -> str:
    return _uid(command.get(tag, b""))


def command_us(command: dict[int, bytes], tag: int) -> int:
    raw = command.get(tag, b"")
    if len(raw) != 2:
        raise ProtocolError(f"command element ({tag >> 16:04X},{tag & 0xFFFF:04X}) "
                            "is not a US value")
    return int(struct.unpack("<H", raw)[0])


def response(command: dict[int, bytes], status: int, comment: str | None = None) -> bytes:
    """The response command set to ``command`` (PS3.7 9.3.1.2 C-STORE-RSP, 9.3.5.2 C-ECHO-RSP)."""
    field_ = command_us(command, 0x00000100) | 0x8000
    elements = []
    if 0x00000002 in command:  # the UIDs are echoed as received, whatever they hold
        elements.append((0x00000002, _even(command[0x00000002])))
    elements += [(0x00000100, _us(field_)),
                 (0x00000120, _us(command_us(command, 0x00000110))),
                 (0x00000800, _us(NO_DATA_SET)),
                 (0x00000900, _us(status))]
    if 0x00001000 in command:
        elements.append((0x00001000, _even(command[0x00001000])))
    if comment and status not in (0x0000,):
        elements.append((0x00000902, _lo(comment)))  # Error Comment (PS3.7 C.4.2.1.4)
    return encode_command(sorted(elements))


class NotAnAssociation(Exception):
    """The connection did not open with an A-ASSOCIATE-RQ in time."""


def peek_associate_rq(sock: socket.socket, timeout: float) -> tuple[AssociateRequest, int]:
    """Read the A-ASSOCIATE-RQ without consuming it: the request and its size in bytes.

    Waits up to ``timeout`` (the ARTIM timer, PS3.8 9.1.5) for the whole PDU, however it
    is split into segments; raises ``NotAnAssociation`` when the peer sends something else,
    closes first or is too slow, and ``ProtocolError`` for a malformed request.
    """
    sock.settimeout(None)  # blocking: MSG_WAITALL then waits, bounded by SO_RCVTIMEO
    seconds = max(timeout, 0.001)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000)))
    try:
        head = _peek(sock, 6)
        kind, length = _HEAD.unpack(head)
        if kind != ASSOCIATE_RQ:
            raise NotAnAssociation(f"first PDU is not an A-ASSOCIATE-RQ (0x{kind:02X})")
        if length > _MAX_RQ_LENGTH:
            raise NotAnAssociation(f"A-ASSOCIATE-RQ of {length} bytes")
        data = _peek(sock, 6 + length)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
    return parse_associate_rq(data[6:]), 6 + length


def _peek(sock: socket.socket, size: int) -> bytes:
    try:
        data = sock.recv(size, socket.MSG_PEEK | socket.MSG_WAITALL)
    except BlockingIOError as exc:  # SO_RCVTIMEO expired with nothing received
        raise NotAnAssociation("no association request in time") from exc
    if len(data) < size:
        raise NotAnAssociation("connection closed or too slow before a whole PDU")
    return data


def refuse(sock: socket.socket, pdu: bytes, unread: int = 0) -> None:
    """Answer ``pdu`` (A-ASSOCIATE-RJ or A-ABORT) and close without a TCP reset.

    The ``unread`` bytes the peer sent (the peeked request) are consumed first: closing a
    socket with unread data makes the kernel reset the connection, and the peer might lose
    the answer.
    """
    deadline = time.monotonic() + 3.0  # a peer dribbling bytes holds the thread no longer
    with contextlib.suppress(OSError):
        sock.settimeout(2.0)
        while unread > 0 and time.monotonic() < deadline:
            chunk = sock.recv(min(unread, 65536))
            if not chunk:
                break
            unread -= len(chunk)
        sock.sendall(pdu)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.5)
        while time.monotonic() < deadline and sock.recv(65536):  # until the peer closes
            pass
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class Acceptance:
    """How the acceptor answers an association request."""

    ae_title: str
    max_pdu_size: int
    implementation_class_uid: str
    implementation_version: str
    transfer_syntaxes: frozenset[str]
    allowed_calling_aets: tuple[str, ...] = ()


@dataclass
class AssociationStats:
    stored: int = 0
    refused: int = 0
    echoed: int = 0
    bytes: int = 0  # data sets stored
    received: int = 0  # bytes on the wire, each way
    sent: int = 0
    started: float = field(default_factory=time.monotonic)


#: ``store(context_transfer_syntax, sop_class, sop_instance, data_set_parts, request)``
#: returns the DIMSE status and an optional Error Comment.
StoreHandler = Callable[[str, str, str, list[memoryview], AssociateRequest],
                        tuple[int, str | None]]


class StorageAssociation:
    """One association from A-ASSOCIATE-RQ to release or abort, in the calling thread."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], accept: Acceptance,
                 store: StoreHandler, network_timeout: float) -> None:
        self.sock = sock
        self.address = address
        self.accept = accept
        self.store = store
        self.network_timeout = network_timeout
        self.contexts: dict[int, str] = {}  # accepted context id -> transfer syntax
        self.peer_max = 0
        self.stats = AssociationStats()
        self._reader: io.BufferedReader | None = None

    # -- transport --------------------------------------------------------------------
    def _read_exact(self, size: int) -> bytearray:
        assert self._reader is not None
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            count = self._reader.readinto(view[got:])
            if not count:
                raise ConnectionError("peer closed the connection")
            got += count
        return buffer

    def _read_pdu(self) -> tuple[int, bytearray]:
        kind, length = _HEAD.unpack(self._read_exact(6))
        self.stats.received += 6 + length
        if kind == P_DATA_TF and length > self.accept.max_pdu_size + 6 + 64:
            raise ProtocolError(f"P-DATA-TF of {length} bytes exceeds the negotiated maximum")
        if kind != P_DATA_TF and length > _MAX_RQ_LENGTH:
            raise ProtocolError(f"PDU type 0x{kind:02X} of {length} bytes")
        return kind, self._read_exact(length)

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.stats.sent += len(data)

    def _send_command(self, context_id: int, command: bytes) -> None:
        limit = self.peer_max - 6 if self.peer_max else len(command)
        limit = max(limit, 1)
        pieces = [command[i:i + limit] for i in range(0, len(command), limit)] or [b""]
        out = bytearray()
        for index, piece in enumerate(pieces):
            control = 0x03 if index == len(pieces) - 1 else 0x01  # command, last fragment
            pdv = _PDV_HEAD.pack(len(piece) + 2, context_id, control) + piece
            out += _pdu(P_DATA_TF, pdv)
        self._send(bytes(out))

    # -- association ------------------------------------------------------------------
    def run(self) -> None:
        """Serve the association; never raises for peer behaviour (aborts instead)."""
        request: AssociateRequest | None = None
        try:
            self.sock.settimeout(self.network_timeout)
            self._reader = cast(io.BufferedReader,
                                self.sock.makefile("rb", buffering=1 << 18))
            kind, body = self._read_pdu()
            if kind != ASSOCIATE_RQ:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}")
            request = parse_associate_rq(bytes(body))
            if not self._negotiate(request):
                return
            self._serve(request)
        except (ProtocolError, ValueError, struct.error) as exc:
            log.warning("association from %s aborted: %s", self._peer(request), exc)
            with contextlib.suppress(OSError):
                self._send(encode_abort(2, 0))
        except TimeoutError:
            log.warning("association from %s aborted: no data for %.0f s",
                        self._peer(request), self.network_timeout)
            with contextlib.suppress(OSError):
                self._send(encode_abort(2, 0))
        except (ConnectionError, OSError) as exc:
            if self.stats.stored or self.contexts:
                log.info("association from %s: connection lost (%s)", self._peer(request),
                         exc.strerror or exc)
        finally:
            self._close()
            if self.stats.stored or self.stats.refused:
                log.info("association from %s: %d stored (%.1f MB), %d refused, in %.1f s",
                         self._peer(request), self.stats.stored, self.stats.bytes / 1e6,
                         self.stats.refused, time.monotonic() - self.stats.started)

    def _peer(self, request: AssociateRequest | None) -> str:
        title = request.calling_title if request is not None else "?"
        return f"{title}@{self.address[0]}"

    def _close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(OSError):
                self._reader.close()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _negotiate(self, request: AssociateRequest) -> bool:
        """Answer with A-ASSOCIATE-AC or -RJ (PS3.8 9.3.3, 9.3.4); True when accepted."""
        reject = None
        if not request.protocol_version & 1:
            reject = (1, 2, 2)  # permanent, ACSE, protocol version not supported
        elif request.application_context != APPLICATION_CONTEXT:
            reject = (1, 1, 2)  # permanent, service user, application context not supported
        elif (self.accept.allowed_calling_aets
              and request.calling_title not in self.accept.allowed_calling_aets):
            reject = (1, 1, 3)  # permanent, service user, calling AE title not recognized
        if reject is not None:
            log.warning("association from %s rejected (source %d, reason %d)",
                        self._peer(request), reject[1], reject[2])
            self._send(encode_associate_rj(*reject))
            return False
        results = []
        for context in request.contexts:
            chosen = next((ts for ts in context.transfer_syntaxes
                           if ts in self.accept.transfer_syntaxes), None)
            if not context.abstract_syntax:
                results.append((context.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED,
                                "1.2.840.10008.1.2"))
            elif chosen is None:
                results.append((context.context_id, TRANSFER_SYNTAXES_NOT_SUPPORTED,
                                "1.2.840.10008.1.2"))
            else:
                results.append((context.context_id, ACCEPTANCE, chosen))
                self.contexts[context.context_id] = chosen
        self.peer_max = request.max_length
        self._send(encode_associate_ac(
            request, results, self.accept.max_pdu_size, self.accept.implementation_class_uid,
            self.accept.implementation_version))
        log.debug("association from %s accepted: %d of %d contexts", self._peer(request),
                  len(self.contexts), len(request.contexts))
        return True

    def _serve(self, request: AssociateRequest) -> None:
        """Receive messages until release or abort (PS3.8 9.3.5 P-DATA-TF, PS3.7 E.2)."""
        command_parts: list[memoryview] = []
        command: dict[int, bytes] | None = None
        data_parts: list[memoryview] = []
        context_id = 0
        while True:
            kind, body = self._read_pdu()
            if kind == RELEASE_RQ:
                self._send(RELEASE_RP_PDU)
                return
            if kind == ABORT:
                log.info("association from %s aborted by the peer", self._peer(request))
                return
            if kind != P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{kind:02X}")
            view = memoryview(body)
            position = 0
            while position < len(body):
                if position + 6 > len(body):
                    raise ProtocolError("PDV header cut short")
                length, pdv_context, control = _PDV_HEAD.unpack_from(body, position)
                if length < 2 or position + 4 + length > len(body):
                    raise ProtocolError("PDV length exceeds its PDU")
                fragment = view[position + 6:position + 4 + length]
                position += 4 + length
                if pdv_context not in self.contexts:
                    raise ProtocolError(f"PDV on presentation context {pdv_context}, "
                                        "which was not accepted")
                if control & 0x01:  # command fragment
                    if command is not None:
                        raise ProtocolError("a new command before the data set of the last")
                    command_parts.append(fragment)
                    if control & 0x02:
                        command = parse_command(b"".join(command_parts))
                        command_parts = []
                        context_id = pdv_context
                        if command_us(command, 0x00000800) == NO_DATA_SET:
                            self._dispatch(context_id, command, [], request)
                            command = None
                else:
                    if command is None:
                        raise ProtocolError("data set fragment without a command")
                    data_parts.append(fragment)
                    if control & 0x02:
                        self._dispatch(context_id, command, data_parts, request)
                        command, data_parts = None, []

    def _dispatch(self, context_id: int, command: dict[int, bytes],
                  data: list[memoryview], request: AssociateRequest) -> None:
        kind = command_us(command, 0x00000100)
        if kind == C_CANCEL_RQ:
            return  # nothing to cancel: each C-STORE is answered as soon as it is stored
        if kind == C_ECHO_RQ:
            self.stats.echoed += 1
            self._send_command(context_id, response(command, 0x0000))
            return
        if kind != C_STORE_RQ:
            self._send_command(context_id, response(command, UNRECOGNIZED_OPERATION,
                                                    "operation not supported here"))
            return
        if not data:
            self._send_command(context_id, response(command, 0xC000, "C-STORE without data set"))
            self.stats.refused += 1
            return
        status, comment = self.store(self.contexts[context_id],
                                     command_uid(command, 0x00000002),
                                     command_uid(command, 0x00001000), data, request)
        if status == 0x0000:
            self.stats.stored += 1
            self.stats.bytes += sum(len(part) for part in data)
        else:
            self.stats.refused += 1
        self._send_command(context_id, response(command, status, comment))
