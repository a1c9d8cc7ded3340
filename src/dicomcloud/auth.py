"""OAuth 2.0 bearer tokens for DICOMweb: JWT access tokens checked against the issuer's
published keys (PS3.18 leaves the choice of authorization mechanism to the deployment).

This is the only module that uses python-jose; swapping the JWT library touches nothing
else. What it checks, in order (RFC 6750 for the header, RFC 7519 / RFC 8725 for the JWT):

1. ``Authorization: Bearer <token>`` (RFC 6750 2.1); anything else is 401.
2. The header's ``alg`` is on ``auth.algorithms``, an allow-list of asymmetric algorithms
   only: ``none`` and the HMAC family are refused by configuration (RFC 8725 3.1, 3.2), so
   a token "signed" with the issuer's public key as an HMAC secret never verifies.
3. The signing key is the issuer's JWK with the token's ``kid``, of the key type the
   algorithm needs. The key set comes from OIDC discovery
   (``{issuer}/.well-known/openid-configuration`` -> ``jwks_uri``, OpenID Connect
   Discovery 1.0 section 4) and is cached, in process and in the shared cache. An unknown
   ``kid`` fetches the key set again, at most once per ``jwks_refresh_seconds``: the
   issuer's key rotation works without a restart, and a flood of forged ``kid`` values
   costs the issuer nothing.
4. The signature, ``iss`` (exactly ``auth.issuer``), ``aud`` (one of ``auth.audience``),
   ``exp`` (required), ``nbf`` and ``iat``, with ``auth.leeway_seconds`` of clock skew.

The token's rights are its scopes (``auth.scope_claim``, a space-separated string or a
list): ``read_scopes`` allow QIDO-RS and WADO-RS, ``write_scopes`` STOW-RS, ``admin_scopes``
everything. The tenants it may address are the values of ``auth.tenant_claim`` (a string
or a list; ``*`` is every tenant).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import http.client
import ipaddress
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from dicomcloud.config import AuthSettings
from dicomcloud.errors import BackendError, ConfigError, Forbidden, Unauthorized
from dicomcloud.ports import Cache

log = logging.getLogger(__name__)

READ, WRITE, ADMIN = "read", "write", "admin"
#: Asymmetric JWS algorithms python-jose verifies, by the JWK key type they need (RFC 7518 3.1).
KEY_TYPES = {
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "EC", "ES384": "EC", "ES512": "EC",
}
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_MAX_DOCUMENT = 1 << 20  # discovery document / key set: bytes read at most
_MAX_TOKEN = 16 * 1024  # a bearer token longer than this is refused unread
_TOKEN_CACHE = 4096  # verified tokens remembered (by their text) ...
_TOKEN_CACHE_SECONDS = 60.0  # ... for at most this long
_RETRY_SECONDS = 5.0  # after a failed fetch of the key set, the next waits this long


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for, and what it may do."""

    subject: str
    client_id: str | None
    scopes: frozenset[str]
    #: Tenants the token may address; None means every tenant (``*``, or no tenant claim
    #: configured).
    tenants: frozenset[str] | None
    expires: float

    def may(self, right: str, tenant: str, settings: AuthSettings) -> None:
        """Raise Forbidden unless this principal has ``right`` in ``tenant``."""
        if self.tenants is not None and tenant not in self.tenants:
            raise Forbidden(f"this token is not valid for tenant {tenant!r} "
                            f"(claim {settings.tenant_claim!r})")
        granted = set(settings.admin_scopes)
        if right in (READ, WRITE):
            granted.update(settings.write_scopes if right == WRITE else settings.read_scopes)
        if not granted & self.scopes:
            wanted = " ".join(sorted(granted))
            raise Forbidden(f"this token lacks a scope for {right} access (one of: {wanted})",
                            scope=wanted)


def check_settings(settings: AuthSettings) -> None:
    """Refuse settings that would make token checking unsafe or impossible (at start-up)."""
    if not settings.enabled:
        return
    try:
        import jose  # noqa: F401
    except ImportError as exc:
        raise ConfigError("auth.enabled needs python-jose: pip install 'dicomcloud[auth]'") \
            from exc
    if not settings.issuer:
        raise ConfigError("auth.enabled needs auth.issuer, the OpenID provider's issuer URL "
                          "(e.g. https://login.example.org/realms/hospital)")
    _check_url(settings.issuer, "auth.issuer")
    if not settings.audience:
        raise ConfigError("auth.enabled needs auth.audience: the audience value(s) the "
                          "issuer puts in tokens meant for this archive")
    bad = [alg for alg in settings.algorithms if alg not in KEY_TYPES]
    if bad or not settings.algorithms:
        raise ConfigError(f"auth.algorithms: {', '.join(bad) or '(empty)'} not allowed; "
                          f"choose from {', '.join(KEY_TYPES)} (never none or HS*)")
    if settings.ca_certs:
        try:
            ssl.create_default_context(cafile=settings.ca_certs)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"auth.ca_certs {settings.ca_certs!r}: {exc}") from exc


def _check_url(url: str, name: str) -> None:
    """HTTPS, or plain HTTP to this machine only (a provider on loopback; RFC 8252 8.3)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _loopback(parts.hostname):
        return
    raise ConfigError(f"{name} {url!r} must be an https:// URL (plain http only to "
                      "127.0.0.1, ::1 or localhost)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Verifies bearer tokens of one issuer; one per process, shared by its requests."""

    def __init__(self, settings: AuthSettings, cache: Cache | None = None) -> None:
        self.settings = settings
        self._cache = cache
        self._cache_key = "auth:jwks:" + hashlib.sha256(settings.issuer.encode()).hexdigest()[:24]
        self._keys: dict[str, dict[str, Any]] = {}  # kid -> public JWK
        self._unnamed: list[dict[str, Any]] = []  # keys without a kid
        self._keys_until = 0.0  # monotonic time the key set goes stale
        self._last_fetch = -1e9  # monotonic time of the last fetch from the issuer
        self._retry_at = 0.0  # after a failed fetch, none before this monotonic time
        self._generation = 0  # bumped when the key set changes
        self._lock = asyncio.Lock()
        self._verified: dict[str, tuple[Principal, float]] = {}
        self._ssl = ssl.create_default_context(cafile=settings.ca_certs or None)

    # -- entry point ---------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value; Unauthorized otherwise."""
        token = self._bearer(authorization)
        now = time.time()
        hit = self._verified.get(token)
        if hit is not None and now < hit[1]:
            return hit[0]
        from jose import jwt  # only here: python-jose stays behind this module
        from jose.exceptions import JOSEError

        try:
            header = jwt.get_unverified_header(token)
        except JOSEError as exc:
            raise Unauthorized(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.settings.algorithms:
            raise Unauthorized(f"token algorithm {str(alg)[:20]!r} is not accepted "
                               f"(auth.algorithms: {', '.join(self.settings.algorithms)})")
        kid = header.get("kid")
        generation = self._generation
        key = await self._key(kid if isinstance(kid, str) else None, alg)
        s = self.settings
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], issuer=s.issuer,
                options={"verify_aud": False, "require_exp": True, "require_iss": True,
                         "verify_at_hash": False, "leeway": s.leeway_seconds})
        except JOSEError as exc:
            raise Unauthorized(f"token rejected: {exc}") from None
        if not isinstance(claims, dict):
            raise Unauthorized("token rejected: its claims are not a JSON object")
        principal = self._principal(claims)
        if generation == self._generation:  # not verified with a key withdrawn meanwhile
            if len(self._verified) >= _TOKEN_CACHE:
                self._verified.clear()
            self._verified[token] = (principal, min(principal.expires + s.leeway_seconds,
                                                    now + _TOKEN_CACHE_SECONDS))
        return principal

    @staticmethod
    def _bearer(authorization: str | None) -> str:
        if not authorization:
            raise Unauthorized("this archive needs a bearer token (Authorization: Bearer "
                               "<access token> from the hospital's identity provider)",
                               error="")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":  # RFC 6750 3.1: no error code for another scheme
            raise Unauthorized("use the Bearer scheme: Authorization: Bearer <access token>",
                               error="")
        if not token:  # RFC 6750 3.1: a malformed request is invalid_request, 400
            raise Unauthorized("Authorization: Bearer without a token",
                               error="invalid_request")
        if len(token) > _MAX_TOKEN or token.count(".") != 2:
            raise Unauthorized("malformed token: not a JWS compact serialization")
        return token

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        s = self.settings
        audience = claims.get("aud")
        audiences = {audience} if isinstance(audience, str) else \
            set(audience) if isinstance(audience, list) else set()
        if not audiences & set(s.audience):
            raise Unauthorized("token rejected: it is not meant for this archive "
                               f"(aud must include one of {', '.join(s.audience)})")
        scopes = _strings(claims.get(s.scope_claim))
        tenants: frozenset[str] | None = None
        if s.tenant_claim:
            tenants = _strings(claims.get(s.tenant_claim))
            if "*" in tenants:
                tenants = None
        client_id = claims.get("client_id") or claims.get("azp")
        subject = claims.get("sub") or client_id or "?"
        expires = claims.get("exp")
        return Principal(
            subject=str(subject)[:256], client_id=str(client_id)[:256] if client_id else None,
            scopes=scopes, tenants=tenants,
            expires=float(expires) if isinstance(expires, int | float) else time.time())

    # -- keys ----------------------------------------------------------------------------
    async def _key(self, kid: str | None, alg: str) -> dict[str, Any]:
        """The issuer's public JWK that verifies ``alg`` under ``kid``."""
        if time.monotonic() >= self._keys_until:
            await self._load(refresh=False)
        key = self._pick(kid, alg)
        wait = self.settings.jwks_refresh_seconds
        if key is None and time.monotonic() - self._last_fetch >= wait:
            await self._load(refresh=True)  # the issuer may have rotated its keys
            key = self._pick(kid, alg)
        if key is None:
            raise Unauthorized(f"token signed with an unknown key (kid {str(kid)[:64]!r})")
        return key

    def _pick(self, kid: str | None, alg: str) -> dict[str, Any] | None:
        if kid is not None:
            candidates = [self._keys[kid]] if kid in self._keys else []
        else:
            candidates = list(self._keys.values()) + self._unnamed
        usable = [k for k in candidates if _fits(k, alg)]
        # without a kid, only an unambiguous key set may decide (RFC 7515 4.1.4)
        return usable[0] if len(usable) == 1 or (kid is not None and usable) else None

    async def _load(self, refresh: bool) -> None:
        """Fill the key set: from the shared cache unless ``refresh``, else from the issuer.

        A fetch that fails keeps the keys already known (for ``_RETRY_SECONDS``, then the
        next request tries again); with none known it is a BackendError (503). Only a key
        set that parses is kept or shared."""
        async with self._lock:
            now = time.monotonic()
            if not refresh and now < self._keys_until:
                return  # another request loaded it meanwhile
            if refresh and now - self._last_fetch < self.settings.jwks_refresh_seconds:
                return
            if not refresh and self._cache is not None:
                data = await self._cache.get(self._cache_key)
                if data is not None:
                    with contextlib.suppress(BackendError):  # not a key set: fetch it
                        self._use(*_parse_jwks(data))
                        self._keys_until = now + self.settings.jwks_cache_seconds
                        return
            if now < self._retry_at:  # the issuer failed moments ago
                if self._keys or self._unnamed:
                    self._keys_until = self._retry_at
                    return
                raise BackendError("the token issuer could not be reached a moment ago; "
                                   "try again in a few seconds")
            self._last_fetch = now
            try:
                data = await asyncio.to_thread(self._fetch_jwks)
                parsed = _parse_jwks(data)
            except BackendError as exc:
                self._retry_at = time.monotonic() + _RETRY_SECONDS
                if not (self._keys or self._unnamed):
                    raise
                log.warning("OAuth: %s; keeping the signing keys already known", exc.message)
                self._keys_until = self._retry_at
                return
            self._use(*parsed)
            if self._cache is not None:
                await self._cache.set(self._cache_key, data,
                                      ttl=self.settings.jwks_cache_seconds)
            self._keys_until = time.monotonic() + self.settings.jwks_cache_seconds

    def _use(self, named: dict[str, dict[str, Any]], unnamed: list[dict[str, Any]]) -> None:
        if named == self._keys and unnamed == self._unnamed:
            return
        self._keys, self._unnamed = named, unnamed
        self._generation += 1
        self._verified.clear()  # a key the issuer withdrew no longer vouches for a token
        log.info("OAuth: %d signing key(s) of %s", len(named) + len(unnamed),
                 self.settings.issuer)

    def _fetch_jwks(self) -> bytes:
        """Discovery, then the key set (runs in a thread)."""
        issuer = self.settings.issuer.rstrip("/")
        try:
            discovery = orjson.loads(self._get(issuer + "/.well-known/openid-configuration"))
        except orjson.JSONDecodeError:
            raise BackendError(f"the discovery document of {issuer} is not JSON") from None
        named = discovery.get("issuer") if isinstance(discovery, dict) else None
        if not isinstance(named, str) or named.rstrip("/") != issuer:
            # OpenID Connect Discovery 1.0, 4.3: the document must name the same issuer
            raise BackendError(f"the discovery document of {issuer} names another issuer")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise BackendError(f"the discovery document of {issuer} has no jwks_uri")
        try:
            _check_url(jwks_uri, "jwks_uri")
        except ConfigError as exc:
            raise BackendError(exc.message) from None
        return self._get(jwks_uri)

    def _get(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.settings.http_timeout,
                                        context=self._ssl if url.startswith("https:") else None
                                        ) as response:
                data: bytes = response.read(_MAX_DOCUMENT + 1)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            log.warning("OAuth: cannot fetch %s: %s", url, exc)
            raise BackendError(f"cannot reach the token issuer ({url}); try again later") \
                from None
        if len(data) > _MAX_DOCUMENT:
            raise BackendError(f"{url} returned more than {_MAX_DOCUMENT} bytes")
        return data


def _parse_jwks(data: bytes) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The signing keys of a JWK Set (RFC 7517 5), by kid and without one; BackendError
    if ``data`` is not a JWK Set."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        document = None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise BackendError("the issuer's key set (jwks_uri) is not a JWK Set")
    named: dict[str, dict[str, Any]] = {}
    unnamed: list[dict[str, Any]] = []
    for key in keys:
        if not isinstance(key, dict) or key.get("use", "sig") != "sig":
            continue
        public = {k: v for k, v in key.items() if k not in _PRIVATE_MEMBERS}
        if isinstance(key.get("kid"), str):
            named[key["kid"]] = public
        else:
            unnamed.append(public)
    return named, unnamed


# private members of RSA and EC JWKs (RFC 7518 6.2.2, 6.3.2): never kept, even if published
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def _fits(key: Mapping[str, Any], alg: str) -> bool:
    """A JWK that may verify ``alg``: its key type, curve and (if stated) algorithm agree."""
    if key.get("kty") != KEY_TYPES[alg]:
        return False
    if "alg" in key and key["alg"] != alg:
        return False
    return alg not in _CURVES or key.get("crv") == _CURVES[alg]


def _strings(value: Any) -> frozenset[str]:
    """A claim that is a space-separated string or a list of strings, as a set."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()
