"""Role ``scp``: DICOM Upper Layer server for C-ECHO, C-STORE and (``qr.py``) C-FIND,
C-MOVE and C-GET.

Each association runs in its own thread. Associations that propose only Verification and
Storage SOP classes are served by the lean acceptor of ``dul.py``; any other is handed to
pynetdicom (see that module for why). The C-STORE handler does its blocking work
(validate, write, fsync, rename) in the association's thread and publishes the storage
event durably before it answers success (PS3.4 B.2.3: success means the SCP has stored it).

Statuses (PS3.4 B.2.3, PS3.7 C): 0x0000 success; 0xA700 out of resources (storage or
queue unavailable); 0xA900 data set does not match SOP class (invalid UIDs, missing or
short pixel data); 0xC000 cannot understand (unreadable, truncated). A failure carries an
Error Comment (0000,0902) saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass, VerificationServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from dicomcloud.accesslog import AccessEvent, AccessLog
from dicomcloud.config import ScpSettings, Settings
from dicomcloud.errors import DicomCloudError, InvalidInstance
from dicomcloud.ingest import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    Origin,
    dimse_file_bytes,
)
from dicomcloud.roles import dul, qr
from dicomcloud.runtime import Runtime
from dicomcloud.uids import is_valid_uid

log = logging.getLogger(__name__)

# Accept every storage SOP class proposed, private ones included (PS3.4 B.5: an SCP may
# support any storage SOP class); the transfer syntax must still be one we know.
_config.UNRESTRICTED_STORAGE_SERVICE = True
_config.LOG_HANDLER_LEVEL = "none"
_ANNOUNCE_TIMEOUT = 120.0


def _recv_exactly(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading straight into one buffer.

    pynetdicom 3.0 reads PDUs 4 KiB at a time and appends each piece: ~130 calls and copies
    per 512 KiB image. Same contract (blocking; fewer bytes only if the peer closed),
    measured ~10% less CPU per received instance.
    """
    sock = cast(socket.socket, self.socket)
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    while received < nr_bytes:
        count = sock.recv_into(view[received:], nr_bytes - received)
        if not count:
            del view
            del buffer[received:]
            return buffer
        received += count
    return buffer


AssociationSocket.recv = _recv_exactly  # type: ignore[method-assign]
_VERIFICATION = UID("1.2.840.10008.1.1")


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = dul.error_comment(comment)
    return status


_NOBODY = "\x00"  # a calling AE title no peer can have (see TenantAE)


class AssociationReport:
    """What one association did, for its access event (``dicomcloud.accesslog``)."""

    def __init__(self, client_ip: str | None) -> None:
        self.started = time.time()
        self.clock = time.perf_counter()
        self.client_ip = client_ip
        self.tenant_id = ""
        self.calling_ae: str | None = None
        self.called_ae: str | None = None
        self.services: dict[str, None] = {}  # in order of first use
        self.operations = 0
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.studies: set[str] = set()
        self.done = False

    def identify(self, settings: Settings, calling_ae: str,
                 called_ae: str) -> tuple[int, int, int] | None:
        """Take the request's AE titles and tenant (``Settings.admit``); the rejection
        the request earns, None when admitted."""
        self.calling_ae, self.called_ae = calling_ae[:16] or None, called_ae[:16] or None
        self.tenant_id, reject = settings.admit(calling_ae, called_ae, self.client_ip or "")
        return reject

    def note(self, service: str, status: int = 0, study_uid: str | None = None) -> None:
        """One DIMSE operation; a failure or warning status is kept (the last one wins)."""
        self.services[service] = None
        self.operations += 1
        if status not in (0x0000, 0xFF00, 0xFF01):
            self.status = status
        if study_uid:
            self.studies.add(study_uid[:64])

    def event(self, status: int | None = None) -> AccessEvent:
        return AccessEvent(
            tenant_id=self.tenant_id, protocol="DIMSE",
            service=",".join(self.services) or "association", route="association",
            status=self.status if status is None else status, client_ip=self.client_ip,
            study_uid=next(iter(self.studies)) if len(self.studies) == 1 else None,
            bytes_in=self.bytes_in, bytes_out=self.bytes_out,
            duration_ms=round((time.perf_counter() - self.clock) * 1000, 3),
            calling_ae=self.calling_ae, called_ae=self.called_ae, principal=self.calling_ae,
            operations=self.operations)


class StoreService:
    """C-STORE and connection handlers bound to one runtime."""

    def __init__(self, runtime: Runtime, loop: asyncio.AbstractEventLoop,
                 access_log: AccessLog | None = None) -> None:
        self.runtime = runtime
        self.loop = loop
        self.access_log = access_log

    def handlers(self) -> list[evt.EventHandlerType]:
        retrieve = qr.QueryRetrieve(self.runtime, self.loop, lambda e: self.origin(e).tenant_id)
        wrapped: list[evt.EventHandlerType] = [
            (item[0], self._reporting(name, item[1])) for item, name in
            zip(retrieve.handlers(), ("C-FIND", "C-MOVE", "C-GET"), strict=True)]
        return [(evt.EVT_C_STORE, self.on_store), (evt.EVT_CONN_OPEN, self.on_open),
                (evt.EVT_C_ECHO, self.on_echo), *wrapped,
                (evt.EVT_DATA_RECV, self._received), (evt.EVT_DATA_SENT, self._sent),
                (evt.EVT_REJECTED, self._rejected), (evt.EVT_CONN_CLOSE, self._closed)]

    # -- access events of the associations pynetdicom serves ----------------------------
    @staticmethod
    def report_of(assoc: Association) -> AssociationReport:
        report: AssociationReport | None = getattr(assoc, "dicomcloud_report", None)
        if report is None:
            report = AssociationReport(assoc.requestor.address or None)
            assoc.dicomcloud_report = report  # type: ignore[attr-defined]
        return report

    def _received(self, event: evt.Event) -> None:
        self.report_of(event.assoc).bytes_in += len(event.data)

    def _sent(self, event: evt.Event) -> None:
        self.report_of(event.assoc).bytes_out += len(event.data)

    def _rejected(self, event: evt.Event) -> None:
        report = self.report_of(event.assoc)
        report.services["A-ASSOCIATE-RJ"] = None
        sent = event.assoc.acceptor.primitive  # the A-ASSOCIATE-RJ (PS3.8 9.3.4)
        report.status = int(getattr(sent, "diagnostic", None) or 1)

    def _closed(self, event: evt.Event) -> None:
        report = self.report_of(event.assoc)
        primitive = event.assoc.requestor.primitive
        if primitive is not None:
            report.identify(self.runtime.settings, str(primitive.calling_ae_title).strip(),
                            str(primitive.called_ae_title).strip())
        else:
            report.tenant_id = self.runtime.settings.default_tenant
        self.record(report)

    def record(self, report: AssociationReport, status: int | None = None) -> None:
        """Hand an association's access event to the loop's access log (thread-safe)."""
        if self.access_log is None or report.done:
            return
        report.done = True
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self.loop.call_soon_threadsafe(self.access_log.record, report.event(status),
                                           report.started)

    def _reporting(self, service: str, handler: Any) -> Any:
        """A Query/Retrieve handler that also notes its operation in the report."""
        def wrapper(event: evt.Event) -> Any:
            identifier = event.identifier
            study = identifier.get("StudyInstanceUID") if identifier is not None else None
            study_uid = study if isinstance(study, str) and "\\" not in study else None
            report = self.report_of(event.assoc)
            status = 0
            try:
                for item in handler(event):
                    if service == "C-FIND" and isinstance(item, tuple) and \
                            isinstance(item[0], int):
                        status = item[0]
                    yield item
            except Exception:
                status = 0xC000
                raise
            finally:
                report.note(service, status, study_uid)
        return wrapper

    def on_open(self, event: evt.Event) -> None:
        # The report exists before the DUL thread and the association thread use it.
        self.report_of(event.assoc)
        # Without TCP_NODELAY each small C-STORE-RSP waits for the peer's delayed ACK.
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_echo(self, event: evt.Event) -> int:
        self.report_of(event.assoc).note("C-ECHO")
        return 0x0000

    def origin(self, event: evt.Event) -> Origin:
        settings = self.runtime.settings
        requestor = event.assoc.requestor
        called = getattr(requestor.primitive, "called_ae_title", None) or ""
        tenant = settings.tenant_for_called_ae(str(called)) or settings.default_tenant
        return Origin(tenant, str(requestor.ae_title).strip() or None, requestor.address)

    def on_store(self, event: evt.Event) -> int | Dataset:
        """pynetdicom's C-STORE handler (associations that pynetdicom serves)."""
        request = cast(C_STORE, event.request)
        data = memoryview(cast(BytesIO, request.DataSet).getbuffer())
        status, comment = self.store(
            event.context.transfer_syntax, str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID), [data], self.origin(event),
            self.report_of(event.assoc))
        return status if comment is None else _status(status, comment)

    def on_native_store(self, transfer_syntax: str, sop_class: str, sop_uid: str,
                        data: list[memoryview], request: dul.AssociateRequest,
                        address: str, report: AssociationReport) -> tuple[int, str | None]:
        """C-STORE handler of the lean acceptor (``dul.StorageAssociation``)."""
        origin = Origin(report.tenant_id, request.calling_title or None, address)
        for label, uid in (("Affected SOP Class", sop_class), ("Affected SOP Instance", sop_uid)):
            if not is_valid_uid(uid):
                log.warning("C-STORE from %s refused (0xA900): invalid %s UID %r",
                            origin.source_ae, label, uid[:64])
                report.note("C-STORE", 0xA900)
                return 0xA900, f"invalid {label} UID in the request"
        return self.store(transfer_syntax, sop_class, sop_uid, data, origin, report)

    def store(self, transfer_syntax: str, sop_class: str, sop_uid: str,
              data: list[memoryview], origin: Origin,
              report: AssociationReport | None = None) -> tuple[int, str | None]:
        """Store one received data set; the DIMSE status and Error Comment to answer."""
        status, comment, study_uid = self._store(transfer_syntax, sop_class, sop_uid, data,
                                                 origin)
        if report is not None:
            report.note("C-STORE", status, study_uid)
        return status, comment

    def _store(self, transfer_syntax: str, sop_class: str, sop_uid: str,
               data: list[memoryview], origin: Origin) -> tuple[int, str | None, str | None]:
        started = time.perf_counter()
        try:
            part10 = dimse_file_bytes(data, transfer_syntax, sop_class, sop_uid, origin.source_ae)
            stored = self.runtime.ingestor.store_bytes(part10, origin, expect_sop_uid=sop_uid)
            self.runtime.ingestor.announce_from_thread([stored], self.loop, _ANNOUNCE_TIMEOUT)
        except InvalidInstance as exc:
            log.warning("C-STORE from %s refused (0x%04X) %s: %s", origin.source_ae,
                        exc.dimse_status, sop_uid[:64], exc.message)
            return exc.dimse_status, exc.message, None
        except DicomCloudError as exc:
            log.error("C-STORE from %s failed: %s", origin.source_ae, exc.message)
            return 0xA700, "archive unavailable, retry later", None
        except Exception:
            log.exception("C-STORE from %s: unexpected error", origin.source_ae)
            return 0xA700, "internal error, retry later", None
        log.debug("stored %s (%d bytes) in %.1f ms", stored.file_path, stored.file_size,
                  (time.perf_counter() - started) * 1000)
        return 0x0000, None, stored.study_uid


def make_ae(runtime: Runtime) -> AE:
    """The application entity: storage SOP classes with every transfer syntax (either role,
    so that a C-GET requestor may take the SCP role, PS3.4 C.4.3.1), Verification, and
    Query/Retrieve FIND, MOVE and GET of the Patient Root and Study Root models."""
    s = runtime.settings.scp
    ae = TenantAE(runtime.settings)
    ae.maximum_associations = s.max_associations
    ae.maximum_pdu_size = s.max_pdu_size
    ae.acse_timeout = s.acse_timeout
    ae.dimse_timeout = s.dimse_timeout
    ae.network_timeout = s.network_timeout
    from pynetdicom import AllStoragePresentationContexts

    syntaxes = list(AllTransferSyntaxes)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, syntaxes, scu_role=True,
                                     scp_role=True)
    ae.add_supported_context(_VERIFICATION, syntaxes)
    for model in (*qr.FIND, *qr.MOVE, *qr.GET):
        ae.add_supported_context(model, syntaxes)
    return ae


class TenantAE(AE):
    """pynetdicom's application entity, admitting each association by
    ``Settings.admit``: the calling AE title and address the called AE title's tenant
    allows (PS3.8 9.3.4: refused with A-ASSOCIATE-RJ, reason 3 or 7).

    pynetdicom asks ``require_calling_aet`` / ``require_called_aet`` while it negotiates,
    in the association's own thread; answering from that association's request keeps the
    refusal inside pynetdicom's negotiation. (Associations that are not TLS were already
    checked on their peeked request, ``DimseServer._route``.)"""

    def __init__(self, settings: Settings) -> None:
        super().__init__(ae_title=settings.scp.ae_title)
        self.settings = settings

    def _verdict(self) -> tuple[int, int, int] | None:
        assoc = threading.current_thread()
        if not isinstance(assoc, Association) or not assoc.is_acceptor:
            return None
        primitive = assoc.requestor.primitive
        if primitive is None:
            return None
        return self.settings.admit(str(primitive.calling_ae_title),
                                   str(primitive.called_ae_title),
                                   assoc.requestor.address or "")[1]

    @property  # type: ignore[misc]
    def require_calling_aet(self) -> list[str]:
        verdict = self._verdict()
        return [_NOBODY] if verdict is not None and verdict[2] == 3 else []

    @property  # type: ignore[misc]
    def require_called_aet(self) -> bool:
        verdict = self._verdict()
        return verdict is not None and verdict[2] == 7


async def run(runtime: Runtime, stop: asyncio.Event) -> None:
    """Serve DIMSE until ``stop``; then refuse new associations and let running ones end."""
    s = runtime.settings.scp
    async with AccessLog(runtime.queue, runtime.settings.node_id).running() as access_log:
        service = StoreService(runtime, asyncio.get_running_loop(), access_log)
        ae = make_ae(runtime)
        server = _start_server(ae, (s.host, s.port), service, reuse_port=s.reuse_port)
        log.info("DIMSE listening on %s:%d as %s%s", s.host, s.port, s.ae_title,
                 " (TLS only)" if s.tls_certfile else "")
        runtime.mark_listening()
        await stop.wait()
        await asyncio.to_thread(_drain, ae, server, runtime.settings.web.graceful_timeout)
        await asyncio.sleep(0.2)  # the events of associations aborted by the drain arrive


def serves_natively(request: dul.AssociateRequest) -> bool:
    """True when the lean acceptor can serve every context proposed: Verification and
    Storage SOP classes (private ones too), no SCP/SCU role selection (PS3.7 D.3.3.4)."""
    if request.role_selection:
        return False
    for context in request.contexts:
        service = uid_to_service_class(context.abstract_syntax)
        if service not in (StorageServiceClass, VerificationServiceClass) and \
                service.__name__ != "ServiceClass":  # unknown UID: a private storage class
            return False
    return True


class DimseServer(ThreadedAssociationServer):
    """The DIMSE listener: each connection gets a thread that peeks at the association
    request and serves it with ``dul.StorageAssociation`` or hands it to pynetdicom."""

    reuse_port = False

    def __init__(self, *args: object, service: StoreService, **kwargs: object) -> None:
        self.service = service
        self._native: set[socket.socket] = set()
        self._lock = threading.Lock()
        settings = service.runtime.settings.scp
        self.acceptance = dul.Acceptance(
            ae_title=settings.ae_title, max_pdu_size=settings.max_pdu_size,
            implementation_class_uid=str(IMPLEMENTATION_CLASS_UID),
            implementation_version=IMPLEMENTATION_VERSION,
            transfer_syntaxes=frozenset(str(ts) for ts in AllTransferSyntaxes),
            allowed_calling_aets=tuple(settings.allowed_calling_aets))
        self.tls = tls_context(settings)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    @property
    def association_count(self) -> int:
        return len(self._native) + len(self.active_associations)

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket],
                        client_address: tuple[str, int] | str) -> None:
        threading.Thread(target=self._route, args=(request, client_address),
                         name="dimse-association", daemon=True).start()

    def _route(self, sock: socket.socket, address: tuple[str, int]) -> None:
        settings = self.service.runtime.settings.scp
        with contextlib.suppress(OSError):
            # Without TCP_NODELAY each small C-STORE-RSP waits for the peer's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        timeout = sock.gettimeout()
        if self.tls is not None:  # DICOM TLS: every association is pynetdicom's
            self._serve_tls(sock, address, timeout)
            return
        try:
            request, size = dul.peek_associate_rq(sock, settings.acse_timeout)
        except (dul.NotAnAssociation, dul.ProtocolError, ValueError, struct.error) as exc:
            log.info("connection from %s refused: %s", address[0], exc)
            dul.refuse(sock, dul.encode_abort(2, 0))
            return
        except OSError as exc:
            log.info("connection from %s lost before an association: %s", address[0], exc)
            with contextlib.suppress(OSError):
                sock.close()
            return
        report = AssociationReport(address[0])
        reject = report.identify(self.service.runtime.settings, request.calling_title,
                                 request.called_title)
        if reject is not None:
            log.warning("association from %s@%s to %s rejected: %s", request.calling_title,
                        address[0], request.called_title,
                        "called AE title not recognized" if reject[2] == 7 else
                        "calling AE title or address not allowed for this tenant")
            dul.refuse(sock, dul.encode_associate_rj(*reject), unread=size)
            report.services["A-ASSOCIATE-RJ"] = None
            self.service.record(report, status=reject[2])
            return
        native = serves_natively(request)
        with self._lock:
            # pynetdicom counts only its own associations: the limit is enforced here
            if self.association_count >= settings.max_associations:
                full = True
            else:
                full = False
                if native:
                    self._native.add(sock)
        if full:
            log.warning("association from %s rejected: %d associations already open",
                        address[0], settings.max_associations)
            dul.refuse(sock, dul.encode_associate_rj(2, 3, 2), unread=size)  # local limit
            return
        if not native:
            sock.settimeout(timeout)
            self.process_request_thread(sock, address)  # pynetdicom takes it from here
            return
        association = dul.StorageAssociation(
            sock, address, self.acceptance,
            lambda ts, cls, uid, data, rq: self.service.on_native_store(
                ts, cls, uid, data, rq, address[0], report),
            settings.network_timeout)
        try:
            association.run()
        finally:
            with self._lock:
                self._native.discard(sock)
            stats = association.stats
            if stats.echoed:
                report.services.setdefault("C-ECHO", None)
                report.operations += stats.echoed
            report.bytes_in, report.bytes_out = stats.received, stats.sent
            self.service.record(report)

    def _serve_tls(self, sock: socket.socket, address: tuple[str, int],
                   timeout: float | None) -> None:
        """The TLS handshake (PS3.15 B.1) in this connection's own thread, bounded by the
        ARTIM timeout, then pynetdicom serves the association (its own association limit
        applies: the request cannot be peeked at through TLS)."""
        assert self.tls is not None
        settings = self.service.runtime.settings.scp
        try:
            secure = self.tls.wrap_socket(sock, server_side=True,
                                          do_handshake_on_connect=False)
            secure.settimeout(settings.acse_timeout)
            secure.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS connection from %s refused: %s", address[0],
                     getattr(exc, "reason", None) or exc)
            with contextlib.suppress(OSError):
                sock.close()
            return
        secure.settimeout(timeout)
        self.process_request_thread(secure, address)

    def abort_native(self) -> None:
        """Drop the lean acceptor's connections (the end of a graceful stop)."""
        with self._lock:
            for sock in list(self._native):
                with contextlib.suppress(OSError):
                    sock.sendall(dul.encode_abort(2, 0))
                    sock.shutdown(socket.SHUT_RDWR)


class ReusePortServer(DimseServer):
    """A DIMSE listener whose port other listener processes may bind too."""

    reuse_port = True


def tls_context(settings: ScpSettings) -> ssl.SSLContext | None:
    """The DICOM TLS server context (PS3.15 Annex B: the BCP 195 based secure transport
    profiles require TLS 1.2 or newer), None without a certificate."""
    if not settings.tls_certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_certfile, settings.tls_keyfile)
    if settings.tls_ca_certs:  # mutual authentication: the peer must prove who it is
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(settings.tls_ca_certs)
    return context


def _start_server(ae: AE, address: tuple[str, int], service: StoreService,
                  reuse_port: bool) -> DimseServer:
    server_class = ReusePortServer if reuse_port else DimseServer
    server = server_class(ae, address, ae.ae_title, ae.supported_contexts,
                          evt_handlers=service.handlers(), service=service)
    thread = threading.Thread(target=server.serve_forever, name="dimse-acceptor",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # so that ae.shutdown() stops it too
    return server


def _drain(ae: AE, server: DimseServer, timeout: float) -> None:
    """Stop accepting, wait for running associations, then abort what is left."""
    socketserver.BaseServer.shutdown(server)  # stop serve_forever, keep associations
    server.server_close()
    deadline = time.monotonic() + timeout
    while server.association_count and time.monotonic() < deadline:
        time.sleep(0.05)
    left = server.association_count
    if left:
        log.warning("aborting %d association(s) still open after %.0f s", left, timeout)
    server.abort_native()
    ae.shutdown()
