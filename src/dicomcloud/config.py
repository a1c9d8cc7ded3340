"""Settings: read once from dynaconf, typed, frozen, passed down.

This is the only module that touches dynaconf or the environment. Sources, later wins:

1. the defaults below (``config/settings.toml`` documents every one of them),
2. ``config/settings.toml`` and ``config/settings.local.toml`` in the working directory,
3. the file given with ``--config``,
4. environment variables ``DICOMCLOUD_<NAME>``; nested tables use a double underscore,
   e.g. ``DICOMCLOUD_SCP__PORT=104`` or ``DICOMCLOUD_WEB__MAX_UPLOAD_BYTES=1000000``,
5. command-line options of ``dicomcloud run``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dicomcloud.errors import ConfigError

ROLES = ("scp", "consumer", "web", "worker")
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
RESERVED_TENANTS = frozenset({"metadata", "tmp", "staging"})


@dataclass(frozen=True)
class ScpSettings:
    """DIMSE server (role ``scp``)."""

    ae_title: str = "DICOMCLOUD"
    host: str = "127.0.0.1"
    port: int = 11112
    #: Concurrent associations accepted by each listener process.
    max_associations: int = 32
    #: Listener processes sharing the port (SO_REUSEPORT), so DIMSE receiving runs beside,
    #: not against, the indexer and the web server. One suffices for ~300 images/s; more
    #: only help when Python, not the disk, limits ingest. 0 runs the role in the main process.
    processes: int = 1
    #: Bind with SO_REUSEPORT (set for the listener processes; lets them share the port).
    reuse_port: bool = False
    #: Calling AE titles allowed to associate; empty means any.
    allowed_calling_aets: tuple[str, ...] = ()
    #: Called AE title -> tenant. The archive's own AE title maps to ``default_tenant``.
    ae_tenants: Mapping[str, str] = field(default_factory=dict)
    #: Tenant -> peers allowed to associate with it: ``AE``, ``AE@address`` or
    #: ``*@address``, an address being an IP or a network (``10.1.2.0/24``). A tenant not
    #: listed accepts any peer (that ``allowed_calling_aets`` admits).
    allowed_peers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Reject (A-ASSOCIATE-RJ, called AE title not recognized) a called AE title that is
    #: neither ``ae_title`` nor in ``ae_tenants``, instead of serving it as default_tenant.
    reject_unknown_called_ae: bool = False
    #: C-MOVE destinations: AE title -> ``host:port`` (PS3.4 C.4.2: the SCP must know them).
    move_destinations: Mapping[str, str] = field(default_factory=dict)
    #: Most C-FIND matches returned to one query (the rest is dropped, with a warning log).
    max_find_results: int = 10_000
    #: Largest P-DATA PDU we accept (bytes); larger means fewer round trips per image.
    max_pdu_size: int = 4_194_304
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0
    #: DICOM TLS (PS3.15 B.1, TLS 1.2 or newer): PEM certificate chain and private key; both
    #: empty serve plain TCP. With TLS every connection to ``port`` must use it.
    tls_certfile: str = ""
    tls_keyfile: str = ""
    #: PEM file of the CAs whose client certificates are accepted; set, every peer must
    #: present one (mutual authentication); empty, peers are not asked for one.
    tls_ca_certs: str = ""


@dataclass(frozen=True)
class WebSettings:
    """DICOMweb server (role ``web``)."""

    host: str = "127.0.0.1"
    port: int = 8080
    root: str = "/dicomweb"
    #: HTTP server processes sharing the port (SO_REUSEPORT); 0 serves from the main process.
    processes: int = 2
    #: Bind with SO_REUSEPORT (set for the HTTP server processes).
    reuse_port: bool = False
    max_upload_bytes: int = 4 * 1024**3
    #: STOW-RS: parts (instances) in one request, and bytes in one part (413 beyond).
    max_parts: int = 10_000
    max_part_bytes: int = 2 * 1024**3
    #: Bytes of request line and headers (HTTP/1.1), or of the header list (HTTP/2).
    max_header_bytes: int = 16_384
    #: One access event per DICOMweb request on log_queue (``dicomcloud.accesslog``). Turn
    #: off only where another layer keeps a complete access log.
    access_log: bool = True
    #: Seconds a connection may go without a request in progress (a head still arriving
    #: included, "slowloris"), or a STOW-RS body may stall (408), before it is closed.
    idle_timeout: float = 75.0
    #: Seconds a client's receive window may stay shut (it stopped reading) before the
    #: kernel drops its connection (TCP_USER_TIMEOUT), freeing the request and its buffers.
    send_timeout: float = 120.0
    qido_default_limit: int = 1000
    qido_max_limit: int = 10000
    graceful_timeout: float = 10.0
    #: Origins allowed to call DICOMweb from a browser (CORS), e.g. an OHIF viewer's
    #: ``https://viewer.example.org``; ``*`` allows any; empty disables CORS.
    cors_origins: tuple[str, ...] = ()
    #: Build retrieve and BulkDataURI URLs from X-Forwarded-Proto/-Host/-Prefix. Only behind
    #: a reverse proxy that sets them (any client could otherwise steer the URLs).
    trust_forwarded_headers: bool = False
    #: HTTPS (and HTTP/2 by ALPN): PEM certificate chain and private key files. Both empty
    #: serve plain HTTP. ``dicomcloud certs`` makes a development CA and certificates.
    tls_certfile: str = ""
    tls_keyfile: str = ""


@dataclass(frozen=True)
class ConsumerSettings:
    """Indexer of ``storage_queue`` (role ``consumer``)."""

    batch_size: int = 500
    #: After the first event of a batch, wait this long for more (fewer, larger transactions).
    linger_seconds: float = 0.1
    group: str = "dicomcloud-consumer"
    max_attempts: int = 5


@dataclass(frozen=True)
class WorkerSettings:
    """Metadata generator and housekeeping (role ``worker``)."""

    quiet_seconds: float = 1.0
    scan_interval_seconds: float = 2.0
    max_retries: int = 5
    batch_size: int = 50
    #: Messages kept in the embedded queue for topics nobody consumes (analytics), in days.
    queue_retention_days: float = 7.0
    #: Load access events from log_queue into the index's access_log table: "auto" (when
    #: the queue is the embedded one, i.e. no Doris), "on" or "off".
    access_log_table: str = "auto"
    #: Days access_log rows are kept.
    access_log_days: float = 90.0
    #: Nice value (1-19) of the helper process that reads stored files into metadata: while
    #: the machine is busy, queries and retrievals get the larger share of the CPU; 0 builds
    #: in the worker's own process, at its priority.
    builder_nice: int = 5


@dataclass(frozen=True)
class AuthSettings:
    """OAuth 2.0 bearer tokens for DICOMweb (``dicomcloud.auth``)."""

    #: Off: DICOMweb is open to whoever reaches the port (the embedded quickstart).
    enabled: bool = False
    #: The OpenID provider's issuer URL; keys are found by OIDC discovery under it.
    issuer: str = ""
    #: Accepted ``aud`` values; a token must name at least one.
    audience: tuple[str, ...] = ()
    #: JWS algorithms accepted (asymmetric only: never none, never HS*).
    algorithms: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                   "ES256", "ES384", "ES512")
    #: Clock skew allowed for exp / nbf / iat, in seconds.
    leeway_seconds: float = 30.0
    #: Claim holding the scopes (space-separated string or list), e.g. ``scp`` or ``roles``.
    scope_claim: str = "scope"
    read_scopes: tuple[str, ...] = ("dicom.read",)
    write_scopes: tuple[str, ...] = ("dicom.write",)
    admin_scopes: tuple[str, ...] = ("dicom.admin",)
    #: Claim listing the tenants a token may address (``*``: all); empty: not checked.
    tenant_claim: str = "tenant"
    #: Seconds the issuer's key set is cached (in process and in the shared cache).
    jwks_cache_seconds: float = 600.0
    #: A token with an unknown key id fetches the key set again at most this often.
    jwks_refresh_seconds: float = 30.0
    #: PEM file of CAs for the issuer's HTTPS certificate (a hospital CA); empty: system CAs.
    ca_certs: str = ""
    http_timeout: float = 10.0
    #: ``realm`` of WWW-Authenticate challenges.
    realm: str = "dicomcloud"


@dataclass(frozen=True)
class Settings:
    """All settings of one process."""

    data_dir: Path = Path("./dicomcloud-data")
    roles: tuple[str, ...] = ROLES
    default_tenant: str = "default"
    index_url: str = ""
    queue_url: str = ""
    cache_url: str = ""
    storage_url: str = ""
    #: fsync files and directories before acknowledging (turn off only for throwaway data).
    fsync: bool = True
    node_id: str = field(default_factory=socket.gethostname)
    log_level: str = "INFO"
    scp: ScpSettings = field(default_factory=ScpSettings)
    web: WebSettings = field(default_factory=WebSettings)
    consumer: ConsumerSettings = field(default_factory=ConsumerSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)

    @property
    def resolved_index_url(self) -> str:
        """``index_url``, or the embedded SQLite file in the data directory."""
        return self.index_url or f"sqlite+aiosqlite:///{self.data_dir.resolve() / 'index.db'}"

    @property
    def resolved_queue_url(self) -> str:
        """``queue_url``, or the embedded durable queue in the data directory."""
        return self.queue_url or f"local://{self.data_dir.resolve() / 'queue.db'}"

    @property
    def resolved_cache_url(self) -> str:
        """``cache_url``, or the in-process cache."""
        return self.cache_url or "memory://"

    @property
    def resolved_storage_url(self) -> str:
        """``storage_url``, or ``storage/`` in the data directory."""
        return self.storage_url or f"file://{self.data_dir.resolve() / 'storage'}"

    @property
    def access_log_table(self) -> bool:
        """Whether the worker keeps the index's access_log table (``worker.access_log_table``;
        "auto": with the embedded queue, where no Doris loads log_queue)."""
        mode = self.worker.access_log_table
        return mode == "on" or (mode == "auto" and self.resolved_queue_url.startswith("local:"))

    @property
    def tenants(self) -> frozenset[str]:
        """The tenants this archive serves: the default one and every one an AE title of
        ``scp.ae_tenants`` maps to."""
        return frozenset({self.default_tenant, *self.scp.ae_tenants.values()})

    def admit(self, calling_ae: str, called_ae: str,
              address: str) -> tuple[str, tuple[int, int, int] | None]:
        """The tenant an association request addresses, and the A-ASSOCIATE-RJ (result,
        source, reason) to refuse it with (PS3.8 9.3.4), None when it is admitted.

        Refused: a calling AE title outside ``allowed_calling_aets`` or outside the
        tenant's ``allowed_peers`` (reason 3), an unknown called AE title when
        ``reject_unknown_called_ae`` (reason 7)."""
        tenant = self.tenant_for_called_ae(called_ae)
        if tenant is None:
            if self.scp.reject_unknown_called_ae:
                return self.default_tenant, (1, 1, 7)
            tenant = self.default_tenant
        calling = calling_ae.strip()
        allowed = self.scp.allowed_calling_aets
        if allowed and calling not in (a.strip() for a in allowed):
            return tenant, (1, 1, 3)
        peers = self.scp.allowed_peers.get(tenant)
        if peers is not None and not any(_peer_matches(p, calling, address) for p in peers):
            return tenant, (1, 1, 3)
        return tenant, None

    def tenant_for_called_ae(self, called_ae: str) -> str | None:
        """Tenant served under a called AE title, None when the title is unknown.

        Titles match regardless of case: the ``ae_tenants`` keys are kept in upper case
        (environment variables and TOML tables disagree about case otherwise).
        """
        title = called_ae.strip().upper()
        if title in self.scp.ae_tenants:
            return self.scp.ae_tenants[title]
        if title == self.scp.ae_title.strip().upper():
            return self.default_tenant
        return None


def _peer_matches(entry: str, calling_ae: str, address: str) -> bool:
    """``AE``, ``AE@address`` or ``*@address`` (address: an IP or a network) against a peer."""
    title, _, network = entry.partition("@")
    if title.strip() not in ("*", calling_ae):
        return False
    if not network:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 peer on a dual-stack listener
        return ip in ipaddress.ip_network(network.strip(), strict=False)
    except ValueError:
        return False


def validate_tenant(tenant: str) -> str:
    """Check a tenant id: it becomes a path segment and a key prefix."""
    if not _TENANT_RE.match(tenant) or tenant in RESERVED_TENANTS:
        raise ConfigError(
            f"invalid tenant id {tenant!r}: use 1-64 lowercase letters, digits, '-' or '_' "
            f"(not {', '.join(sorted(RESERVED_TENANTS))})"
        )
    return tenant


def mask_url(url: str) -> str:
    """Hide the password of a URL for display."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read settings from files and the environment, then apply ``overrides``.

    Args:
        config_file: an extra TOML file (``--config``), read after ``config/settings*.toml``.
        **overrides: top-level or ``section__name`` values (e.g. ``scp__port=104``); None is
            ignored so command-line options that were not given change nothing.
    """
    from dynaconf import Dynaconf  # imported here: slow, and only this module may use it

    files = ["config/settings.toml", "config/settings.local.toml"]
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        files.append(str(config_file))
    raw = Dynaconf(
        envvar_prefix="DICOMCLOUD",
        settings_files=files,
        environments=False,
        merge_enabled=True,
        load_dotenv=False,
    ).as_dict()
    values = {k.lower(): v for k, v in raw.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.partition("__")
        if name:
            values.setdefault(section, {})
            values[section] = {**{k.lower(): v for k, v in values[section].items()}, name: value}
        else:
            values[key] = value
    return _build(values)


_SECTIONS: dict[str, type[Any]] = {
    "scp": ScpSettings,
    "web": WebSettings,
    "consumer": ConsumerSettings,
    "worker": WorkerSettings,
    "auth": AuthSettings,
}


def _build(values: Mapping[str, Any]) -> Settings:
    kwargs: dict[str, Any] = {}
    names = {f.name: f for f in dataclasses.fields(Settings)}
    for key, value in values.items():
        if key in _SECTIONS:
            kwargs[key] = _section(_SECTIONS[key], key, value)
        elif key in names:
            kwargs[key] = _coerce(key, names[key].type, value)
    settings = Settings(**kwargs)
    _check(settings)
    return settings


def _section(cls: type[Any], section: str, value: Any) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{section}] must be a table")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, item in value.items():
        key = key.lower()
        if key not in names:
            raise ConfigError(f"unknown setting {section}.{key}; see config/settings.toml")
        kwargs[key] = _coerce(f"{section}.{key}", names[key].type, item)
    return cls(**kwargs)


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    kind = str(annotation)
    try:
        if kind.startswith("tuple"):
            if isinstance(value, str):
                value = [v for v in (p.strip() for p in value.split(",")) if v]
            return tuple(str(v) for v in value)
        if kind == "Path":
            return Path(str(value))
        if kind == "bool":
            if isinstance(value, str):
                return value.strip().lower() in {"1", "true", "yes", "on"}
            return bool(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind.startswith("Mapping[str, tuple"):  # tenant -> list of strings
            return {str(k): tuple(str(v) for v in ([items] if isinstance(items, str)
                                                   else items))
                    for k, items in dict(value).items()}
        if kind.startswith("Mapping"):
            upper = name.endswith(("ae_tenants", "move_destinations"))  # AE titles
            return {str(k).upper() if upper else str(k): str(v)
                    for k, v in dict(value).items()}
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot use {value!r} ({exc})") from exc


def _check(settings: Settings) -> None:
    unknown = set(settings.roles) - set(ROLES)
    if unknown or not settings.roles:
        raise ConfigError(
            f"unknown role(s) {', '.join(sorted(unknown)) or '(none given)'}; "
            f"choose from {','.join(ROLES)}"
        )
    validate_tenant(settings.default_tenant)
    if "web" in settings.roles:
        from dicomcloud.auth import check_settings

        check_settings(settings.auth)
    for tenant in settings.scp.ae_tenants.values():
        validate_tenant(tenant)
    for tenant, peers in settings.scp.allowed_peers.items():
        if tenant not in settings.tenants:
            raise ConfigError(f"scp.allowed_peers.{tenant}: no such tenant (tenants come from "
                              "default_tenant and scp.ae_tenants)")
        for peer in peers:
            title, at, network = peer.partition("@")
            if not 0 < len(title.strip()) <= 16 or (at and not network):
                raise ConfigError(f"scp.allowed_peers.{tenant}: {peer!r} is not AE, "
                                  "AE@address or *@address")
            if network:
                try:
                    ipaddress.ip_network(network.strip(), strict=False)
                except ValueError as exc:
                    raise ConfigError(f"scp.allowed_peers.{tenant}: {peer!r}: {exc}") from None
    for title, address in settings.scp.move_destinations.items():
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"scp.move_destinations.{title} = {address!r}: expected "
                              "host:port, e.g. 192.168.1.20:104")
    if not 0 < len(settings.scp.ae_title.strip()) <= 16:
        raise ConfigError("scp.ae_title must be 1-16 characters (PS3.5 AE value representation)")
    if not 0 <= settings.worker.builder_nice <= 19:
        raise ConfigError("worker.builder_nice must be 0 (no helper process) to 19")
    if settings.worker.access_log_table not in ("auto", "on", "off"):
        raise ConfigError("worker.access_log_table must be auto, on or off")
    if not settings.web.root.startswith("/") or settings.web.root.endswith("/"):
        raise ConfigError("web.root must start with '/' and not end with one, e.g. /dicomweb")
    for role, section in (("scp", settings.scp), ("web", settings.web)):
        if bool(section.tls_certfile) != bool(section.tls_keyfile):
            raise ConfigError(f"{role}.tls_certfile and {role}.tls_keyfile go together: set "
                              "both for TLS, or neither")
        if role in settings.roles:
            for name in (section.tls_certfile, section.tls_keyfile,
                         getattr(section, "tls_ca_certs", "")):
                if name and not Path(name).is_file():
                    raise ConfigError(f"TLS file {name!r} of the {role} role not found; "
                                      "`dicomcloud certs` makes development ones")

