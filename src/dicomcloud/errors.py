"""The one error tree of dicomcloud.

Every error knows the HTTP status (PS3.18) and the DIMSE status (PS3.4 Annex B.2.3, PS3.7
Annex C) it maps to, so the web and scp roles translate errors in one place each::

    DicomCloudError                      500  0xC000
    ├── ConfigError                      500  0xC000   bad settings; fix the config file
    ├── BackendError                     503  0xA700   index/queue/cache/storage unavailable
    ├── NotFound                         404  0xC000   no such study/series/instance
    ├── Unauthorized                     401  0xC000   no valid bearer token (RFC 6750 3)
    ├── Forbidden                        403  0xC000   valid token without the right/tenant
    ├── BadRequest                       400  0xC000   malformed query parameter or body
    │   ├── PayloadTooLarge              413  0xA700   request body over web.max_upload_bytes
    │   ├── RequestTimeout               408  0xC000   request body stalled (web.idle_timeout)
    │   │   └── ClientGone               408  0xC000   the client left mid-request
    │   ├── NotAcceptable                406  0xC000   no acceptable media type (WADO Accept)
    │   └── UnsupportedMediaType         415  0xC000   STOW Content-Type we cannot take
    └── InvalidInstance                  409  0xC000   a DICOM object refused at ingest
        ├── CannotUnderstand             409  0xC000   not parseable, truncated (PS3.4 B.2.3)
        ├── DataSetMismatch              409  0xA900   required attribute missing/invalid
        │                                              (UIDs, pixel data) (PS3.4 B.2.3)
        └── SopClassNotSupported         409  0x0122   not a storage SOP class (PS3.7 C.5)

Driver errors (sqlite3, asyncpg, OSError on storage, ...) are translated once, at the
backend boundary, with ``raise BackendError(...) from exc``.
"""

from __future__ import annotations


class DicomCloudError(Exception):
    """Root of all dicomcloud errors."""

    http_status = 500
    dimse_status = 0xC000

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(DicomCloudError):
    """Settings that cannot work; the message says which and how to fix it."""


class BackendError(DicomCloudError):
    """A backend (index, queue, cache, storage) failed or is unreachable."""

    http_status = 503
    dimse_status = 0xA700  # Refused: Out of Resources


class NotFound(DicomCloudError):
    """The addressed resource does not exist (PS3.18 8.3.4: 404)."""

    http_status = 404


class Unauthorized(DicomCloudError):
    """No bearer token, or one that fails validation (RFC 6750 3.1 ``invalid_token``).

    ``error`` is the RFC 6750 error code for ``WWW-Authenticate``: empty when no token was
    sent at all (3.1: the response then carries no error code)."""

    http_status = 401

    def __init__(self, message: str, error: str = "invalid_token") -> None:
        super().__init__(message)
        self.error = error


class Forbidden(DicomCloudError):
    """A valid token that lacks the scope or the tenant the request needs (RFC 6750 3.1
    ``insufficient_scope``)."""

    http_status = 403

    def __init__(self, message: str, scope: str = "") -> None:
        super().__init__(message)
        self.scope = scope


class BadRequest(DicomCloudError):
    """The client sent a malformed request (PS3.18 8.3.4: 400)."""

    http_status = 400


class PayloadTooLarge(BadRequest):
    """The request body is larger than the configured cap (413)."""

    http_status = 413
    dimse_status = 0xA700


class RequestTimeout(BadRequest):
    """The request body stopped arriving (RFC 9110 15.5.9: the connection is closed)."""

    http_status = 408


class ClientGone(RequestTimeout):
    """The client closed its connection before the end of its request body (nobody reads
    the answer; the access log records it as 408)."""


class NotAcceptable(BadRequest):
    """None of the media types or transfer syntaxes in Accept can be produced (406,
    PS3.18 8.7.3)."""

    http_status = 406


class UnsupportedMediaType(BadRequest):
    """STOW-RS Content-Type we do not accept (PS3.18 10.5.3: 415)."""

    http_status = 415


class InvalidInstance(DicomCloudError):
    """A DICOM object refused at ingest; nothing of it was written to the layout.

    ``failure_reason`` is the value for STOW-RS FailureReason (0008,1197) and the DIMSE
    C-STORE status (PS3.4 B.2.3).
    """

    http_status = 409

    @property
    def failure_reason(self) -> int:
        return self.dimse_status


class CannotUnderstand(InvalidInstance):
    """Error: Cannot understand (0xC000): unreadable, truncated or malformed encoding."""

    dimse_status = 0xC000


class DataSetMismatch(InvalidInstance):
    """Error: Data Set does not match SOP Class (0xA900): invalid UIDs, missing pixel data."""

    dimse_status = 0xA900


class SopClassNotSupported(InvalidInstance):
    """Refused: SOP Class not supported (0x0122, PS3.7 C.5)."""

    dimse_status = 0x0122
