"""OAuth 2.0 bearer tokens on DICOMweb against a real OpenID provider (npm oidc-provider,
client credentials): valid tokens work, every kind of bad token is a 401 with an RFC 6750
challenge, scopes and the tenant claim give 403, and the provider's key rotation is picked
up without a restart."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from dicomcloud.auth import Authenticator
from dicomcloud.config import AuthSettings, load_settings
from dicomcloud.errors import BackendError, ConfigError, Forbidden, Unauthorized
from tests.oidc_provider import OidcProvider, ec_jwk, rsa_jwk, sign
from tests.support import (
    Archive,
    free_port,
    make_ct,
    multipart,
    part10_bytes,
    rows_where,
    wait_until,
)

AUDIENCE = "https://dicomcloud.test/dicomweb"
HOSP_AE, HOSP = "HOSPB", "hospb"
ORIGIN = "http://viewer.test"
CLIENTS = [
    {"client_id": "reader", "client_secret": "r-secret", "scope": "dicom.read",
     "tenant": "default"},
    {"client_id": "writer", "client_secret": "w-secret", "scope": "dicom.read dicom.write",
     "tenant": "default"},
    {"client_id": "hosp", "client_secret": "h-secret", "scope": "dicom.read dicom.write",
     "tenant": HOSP},
    {"client_id": "admin", "client_secret": "a-secret", "scope": "dicom.admin", "tenant": "*"},
    {"client_id": "nobody", "client_secret": "n-secret", "scope": "dicom.read"},
]
SECRETS = {c["client_id"]: c["client_secret"] for c in CLIENTS}


@pytest.fixture(scope="module")
def keys() -> dict[str, dict[str, Any]]:
    return {"first": rsa_jwk("rsa-1"), "second": ec_jwk("ec-2")}


@pytest.fixture(scope="module")
def idp(keys: dict[str, dict[str, Any]]) -> Iterator[OidcProvider]:
    with OidcProvider.start(free_port(), AUDIENCE, [keys["first"]], CLIENTS) as provider:
        yield provider


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, idp: OidcProvider) -> Iterator[Archive]:
    instance = Archive(tmp_path_factory.mktemp("auth") / "data", env={
        "DICOMCLOUD_AUTH__ENABLED": "true",
        "DICOMCLOUD_AUTH__ISSUER": idp.issuer,
        "DICOMCLOUD_AUTH__AUDIENCE": AUDIENCE,
        "DICOMCLOUD_AUTH__JWKS_REFRESH_SECONDS": "0",  # rotation is tested right away
        f"DICOMCLOUD_SCP__AE_TENANTS__{HOSP_AE}": HOSP,
        "DICOMCLOUD_WEB__CORS_ORIGINS": ORIGIN,
        # one web process: which process a request reaches decides whether it has seen the
        # rotation yet (each refreshes on its own, see the rotation test)
        "DICOMCLOUD_WEB__PROCESSES": "0",
    }).start()
    yield instance
    if instance.alive():
        instance.stop()


def token(idp: OidcProvider, client: str) -> str:
    return idp.token(client, SECRETS[client])


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def claims(idp: OidcProvider, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": idp.issuer, "aud": AUDIENCE, "sub": "forger", "client_id": "forger",
            "scope": "dicom.read dicom.write dicom.admin", "tenant": "*", "iat": now,
            "exp": now + 300}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def studies(archive: Archive, headers: dict[str, str], root: str | None = None
            ) -> httpx.Response:
    return httpx.get(f"{root or archive.url}/studies", headers=headers)


def challenge(response: httpx.Response) -> str:
    return response.headers.get("www-authenticate", "")


# -- valid tokens -----------------------------------------------------------------------
def test_a_provider_token_reads_with_dicomweb_client(archive: Archive,
                                                     idp: OidcProvider) -> None:
    writer = token(idp, "writer")
    ds = make_ct(generate_uid(), generate_uid(), generate_uid())
    ds.preamble = bytes(128)  # dicomweb-client writes PS3.10 files only with one
    client = DICOMwebClient(archive.url, headers=bearer(writer))
    client.store_instances([ds])
    study = str(ds.StudyInstanceUID)
    reader = DICOMwebClient(archive.url, headers=bearer(token(idp, "reader")))
    wait_until(lambda: bool(reader.search_for_studies(search_filters={
        "StudyInstanceUID": study})), message="stored study found with a reader token")
    instance = reader.retrieve_instance(study, str(ds.SeriesInstanceUID),
                                        str(ds.SOPInstanceUID))
    assert instance.SOPInstanceUID == ds.SOPInstanceUID
    assert reader.retrieve_instance_metadata(study, str(ds.SeriesInstanceUID),
                                             str(ds.SOPInstanceUID))["00080018"]


def test_health_probes_need_no_token(archive: Archive) -> None:
    assert httpx.get(f"{archive.base}/healthz").status_code == 200
    assert httpx.get(f"{archive.base}/readyz").status_code == 200


@pytest.mark.parametrize("path", ["/dicomweb", "/dicomweb/", "/dicomweb//studies",
                                  "//dicomweb/studies", "/tenants//dicomweb/studies",
                                  "/tenants/hospb%2Fx/dicomweb/studies", "/DICOMWEB/studies",
                                  "/dicomweb/../dicomweb/studies", "/anything/else"])
def test_every_path_but_the_probes_needs_a_token(archive: Archive, path: str) -> None:
    response = httpx.get(archive.base + path)
    assert response.status_code == 401, (path, response.status_code)


# -- refused tokens: 401 ----------------------------------------------------------------
def test_no_token_is_401_with_a_bare_bearer_challenge(archive: Archive) -> None:
    response = studies(archive, {})
    assert response.status_code == 401
    assert challenge(response) == 'Bearer realm="dicomcloud"'  # RFC 6750 3.1: no error code
    assert "bearer token" in response.json()["message"]


@pytest.mark.parametrize("kind", [
    "expired", "not_yet_valid", "wrong_audience", "wrong_issuer", "no_expiry", "alg_none",
    "hs256_with_public_key", "tampered_payload", "tampered_signature", "unknown_kid",
    "foreign_key", "garbage", "basic_scheme",
])
def test_bad_tokens_are_401_invalid_token(archive: Archive, idp: OidcProvider,
                                          keys: dict[str, dict[str, Any]], kind: str) -> None:
    key = keys["first"]
    now = int(time.time())
    if kind == "expired":  # well beyond the 30 s leeway
        value = sign(claims(idp, exp=now - 120, iat=now - 400), key)
    elif kind == "not_yet_valid":
        value = sign(claims(idp, nbf=now + 600), key)
    elif kind == "wrong_audience":
        value = sign(claims(idp, aud="https://other.test/api"), key)
    elif kind == "wrong_issuer":
        value = sign(claims(idp, iss="http://127.0.0.1:1/other"), key)
    elif kind == "no_expiry":
        value = sign(claims(idp, exp=None), key)
    elif kind == "alg_none":
        value = (b64(json.dumps({"alg": "none", "typ": "JWT", "kid": key["kid"]}).encode())
                 + "." + b64(json.dumps(claims(idp)).encode()) + ".")
    elif kind == "hs256_with_public_key":  # the classic key-confusion forgery (RFC 8725 2.1)
        public_pem = _public_pem(key)
        head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key["kid"]}).encode())
        body = b64(json.dumps(claims(idp)).encode())
        mac = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
        value = f"{head}.{body}.{b64(mac)}"
    elif kind == "tampered_payload":
        good = token(idp, "reader")
        head, body, signature = good.split(".")
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        payload["scope"] = "dicom.admin"
        payload["tenant"] = "*"
        value = f"{head}.{b64(json.dumps(payload).encode())}.{signature}"
    elif kind == "tampered_signature":
        good = token(idp, "reader")
        head, body, signature = good.split(".")
        value = f"{head}.{body}.{signature[:-4]}AAAA"
    elif kind == "unknown_kid":
        value = sign(claims(idp), key, headers={"kid": "no-such-key"})
    elif kind == "foreign_key":  # right kid, key the issuer never published
        value = sign(claims(idp), {**rsa_jwk("other"), "kid": key["kid"]})
    elif kind == "garbage":
        value = "not.a.token"
    else:  # another scheme: a bare challenge (RFC 6750 3.1)
        response = studies(archive, {"Authorization": "Basic cmVhZGVyOnItc2VjcmV0"})
        assert response.status_code == 401
        assert challenge(response) == 'Bearer realm="dicomcloud"'
        return
    response = studies(archive, bearer(value))
    assert response.status_code == 401, response.text
    assert challenge(response).startswith('Bearer realm="dicomcloud", error="invalid_token"')
    assert response.json()["status"] == 401


def test_bearer_without_a_token_is_400_invalid_request(archive: Archive) -> None:
    response = studies(archive, {"Authorization": "Bearer"})
    assert response.status_code == 400
    assert 'error="invalid_request"' in challenge(response)


def _public_pem(jwk: dict[str, Any]) -> bytes:
    def number(name: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(jwk[name] + "=" * (-len(jwk[name]) % 4)),
                              "big")
    public = rsa.RSAPublicNumbers(number("e"), number("n")).public_key()
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def test_bad_tokens_never_reach_stored_data(archive: Archive, idp: OidcProvider,
                                            keys: dict[str, dict[str, Any]]) -> None:
    """A forged write is refused before its body is read: nothing is stored."""
    ds = make_ct(generate_uid(), generate_uid(), generate_uid())
    body, content_type = multipart([part10_bytes(ds)])
    forged = sign(claims(idp, aud="https://other.test/api"), keys["first"])
    response = httpx.post(f"{archive.url}/studies", content=body,
                          headers={**bearer(forged), "Content-Type": content_type})
    assert response.status_code == 401
    admin = bearer(token(idp, "admin"))
    time.sleep(1.0)
    assert httpx.get(f"{archive.url}/studies", headers=admin,
                     params={"StudyInstanceUID": str(ds.StudyInstanceUID)}).content in (b"", b"[]")


def test_the_access_log_names_the_client_of_each_token_and_keeps_refusals(
        archive: Archive, idp: OidcProvider) -> None:
    agent = {"User-Agent": "auth-access-test"}
    assert studies(archive, {**agent, **bearer(token(idp, "reader"))}).status_code == 200
    assert studies(archive, agent).status_code == 401
    wait_until(lambda: len(rows_where(archive, user_agent="auth-access-test")) == 2,
               message="both requests logged", timeout=30)
    rows = {r["status"]: r for r in rows_where(archive, user_agent="auth-access-test")}
    assert (rows[200]["principal"], rows[200]["client_id"]) == ("reader", "reader")
    assert rows[401]["principal"] is None and rows[401]["service"] == "QIDO-RS"
    assert rows[401]["route"] == "/studies"


# -- rights: 403 ------------------------------------------------------------------------
def test_read_scope_cannot_store_and_gets_insufficient_scope(archive: Archive,
                                                             idp: OidcProvider) -> None:
    ds = make_ct(generate_uid(), generate_uid(), generate_uid())
    body, content_type = multipart([part10_bytes(ds)])
    response = httpx.post(f"{archive.url}/studies", content=body, headers={
        **bearer(token(idp, "reader")), "Content-Type": content_type})
    assert response.status_code == 403
    assert 'error="insufficient_scope"' in challenge(response)
    assert 'scope="dicom.admin dicom.write"' in challenge(response)
    stored = httpx.post(f"{archive.url}/studies", content=body, headers={
        **bearer(token(idp, "writer")), "Content-Type": content_type})
    assert stored.status_code == 200


def test_tenant_claim_limits_the_tenants_a_token_reaches(archive: Archive,
                                                         idp: OidcProvider) -> None:
    hosp_root = f"{archive.base}/tenants/{HOSP}/dicomweb"
    default_root = f"{archive.base}/tenants/default/dicomweb"
    hosp, reader, admin = (bearer(token(idp, c)) for c in ("hosp", "reader", "admin"))
    assert studies(archive, hosp, hosp_root).status_code == 200
    for root in (archive.url, default_root):
        refused = studies(archive, hosp, root)
        assert refused.status_code == 403
        assert HOSP not in refused.text or "not valid for tenant 'default'" in refused.text
    assert studies(archive, reader, hosp_root).status_code == 403
    assert studies(archive, reader, archive.url).status_code == 200
    for root in (archive.url, hosp_root):  # tenant "*" with the admin scope
        assert studies(archive, admin, root).status_code == 200


def test_a_token_of_one_tenant_cannot_store_into_another(archive: Archive,
                                                        idp: OidcProvider) -> None:
    ds = make_ct(generate_uid(), generate_uid(), generate_uid())
    body, content_type = multipart([part10_bytes(ds)])
    hosp = {**bearer(token(idp, "hosp")), "Content-Type": content_type}
    for root in (archive.url, f"{archive.base}/tenants/default/dicomweb"):
        assert httpx.post(f"{root}/studies", content=body, headers=hosp).status_code == 403
    stored = httpx.post(f"{archive.base}/tenants/{HOSP}/dicomweb/studies", content=body,
                        headers=hosp)
    assert stored.status_code == 200
    admin = bearer(token(idp, "admin"))
    study = {"StudyInstanceUID": str(ds.StudyInstanceUID)}
    wait_until(lambda: httpx.get(f"{archive.base}/tenants/{HOSP}/dicomweb/studies",
                                 params=study, headers=admin).content not in (b"", b"[]"),
               message="stored in the token's own tenant")
    assert httpx.get(f"{archive.url}/studies", params=study,
                     headers=admin).content in (b"", b"[]")


def test_a_token_without_a_tenant_claim_is_403(archive: Archive, idp: OidcProvider) -> None:
    response = studies(archive, bearer(token(idp, "nobody")))
    assert response.status_code == 403
    assert "tenant" in response.json()["message"]


def test_an_unknown_tenant_is_403_not_404_for_a_token_without_it(archive: Archive,
                                                                  idp: OidcProvider) -> None:
    """Whether a tenant exists is not revealed to a token that may not see it."""
    root = f"{archive.base}/tenants/nosuch/dicomweb"
    assert studies(archive, bearer(token(idp, "reader")), root).status_code == 403
    assert studies(archive, bearer(token(idp, "admin")), root).status_code == 404


def test_browsers_get_cors_on_refusals_and_preflight_needs_no_token(archive: Archive) -> None:
    preflight = httpx.options(f"{archive.url}/studies", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.get(f"{archive.url}/studies", headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN


# -- key rotation -----------------------------------------------------------------------
def test_key_rotation_at_the_provider_is_picked_up_without_a_restart(
        archive: Archive, idp: OidcProvider, keys: dict[str, dict[str, Any]]) -> None:
    old = token(idp, "reader")
    assert studies(archive, bearer(old)).status_code == 200
    idp.restart([keys["second"]])  # the provider now signs with a new EC key only
    try:
        new = token(idp, "reader")
        assert json.loads(base64.urlsafe_b64decode(new.split(".")[0] + "=="))["kid"] == "ec-2"
        assert studies(archive, bearer(new)).status_code == 200
        # the withdrawn key no longer vouches for tokens it signed
        assert studies(archive, bearer(old)).status_code == 401
    finally:
        idp.restart([keys["first"]])
    assert studies(archive, bearer(token(idp, "reader"))).status_code == 200


# -- the Authenticator itself -----------------------------------------------------------
async def test_unknown_kids_refresh_the_key_set_at_most_once_per_interval(
        idp: OidcProvider, keys: dict[str, dict[str, Any]]) -> None:
    auth = Authenticator(AuthSettings(enabled=True, issuer=idp.issuer, audience=(AUDIENCE,),
                                      jwks_refresh_seconds=3600))
    fetches = 0
    fetch = auth._fetch_jwks

    def counting() -> bytes:
        nonlocal fetches
        fetches += 1
        return fetch()

    auth._fetch_jwks = counting  # type: ignore[method-assign]
    principal = await auth.authenticate("Bearer " + token(idp, "reader"))
    assert principal.client_id == "reader" and "dicom.read" in principal.scopes
    assert fetches == 1
    auth._last_fetch -= 7200  # the key set was loaded long ago: a refresh is allowed
    for index in range(50):
        with pytest.raises(Unauthorized):
            await auth.authenticate("Bearer " + sign(claims(idp), keys["first"],
                                                     headers={"kid": f"forged-{index}"}))
    assert fetches == 2  # one refresh for all 50 unknown kids


async def test_an_unreachable_issuer_is_a_backend_error_not_a_401(keys: dict[str, Any]) -> None:
    issuer = f"http://127.0.0.1:{free_port()}"
    auth = Authenticator(AuthSettings(enabled=True, issuer=issuer, audience=(AUDIENCE,),
                                      http_timeout=2))
    token_ = sign({"iss": issuer, "aud": AUDIENCE, "exp": int(time.time()) + 60},
                  keys["first"])
    with pytest.raises(BackendError, match="cannot reach the token issuer"):
        await auth.authenticate("Bearer " + token_)


def test_principal_rights_follow_scopes_and_tenants() -> None:
    settings = AuthSettings(enabled=True, issuer="https://idp.test", audience=("a",))
    from dicomcloud.auth import Principal

    reader = Principal("r", None, frozenset({"dicom.read"}), frozenset({"t1"}), 0)
    reader.may("read", "t1", settings)
    with pytest.raises(Forbidden):
        reader.may("write", "t1", settings)
    with pytest.raises(Forbidden):
        reader.may("read", "t2", settings)
    admin = Principal("a", None, frozenset({"dicom.admin"}), None, 0)
    admin.may("write", "anything", settings)


@pytest.mark.parametrize(("env", "message"), [
    ({"DICOMCLOUD_AUTH__ALGORITHMS": "RS256,HS256"}, "HS256 not allowed"),
    ({"DICOMCLOUD_AUTH__ALGORITHMS": "none"}, "none not allowed"),
    ({"DICOMCLOUD_AUTH__ISSUER": "http://idp.example.org"}, "must be an https:// URL"),
    ({"DICOMCLOUD_AUTH__ISSUER": ""}, "needs auth.issuer"),
    ({"DICOMCLOUD_AUTH__AUDIENCE": ""}, "needs auth.audience"),
])
def test_unsafe_auth_settings_are_refused_at_start(monkeypatch: pytest.MonkeyPatch,
                                                   env: dict[str, str], message: str) -> None:
    monkeypatch.setenv("DICOMCLOUD_AUTH__ENABLED", "true")
    monkeypatch.setenv("DICOMCLOUD_AUTH__ISSUER", "https://idp.example.org")
    monkeypatch.setenv("DICOMCLOUD_AUTH__AUDIENCE", AUDIENCE)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        load_settings()


async def test_the_key_set_is_shared_through_redis(idp: OidcProvider, redis_url: str) -> None:
    """A second process (node) finds the key set in Redis and does not ask the provider."""
    from dicomcloud.backends.rediscache import RedisCache

    settings = AuthSettings(enabled=True, issuer=idp.issuer, audience=(AUDIENCE,))
    url = redis_url + "auth-jwks:"
    async with RedisCache(url) as first_cache, RedisCache(url) as second_cache:
        first, second = Authenticator(settings, first_cache), Authenticator(settings,
                                                                            second_cache)
        fetched: list[str] = []
        for name, auth in (("first", first), ("second", second)):
            original = auth._fetch_jwks

            def counting(name: str = name, original: Any = original) -> bytes:
                fetched.append(name)
                return bytes(original())

            auth._fetch_jwks = counting  # type: ignore[method-assign]
        value = "Bearer " + token(idp, "reader")
        assert (await first.authenticate(value)).client_id == "reader"
        assert (await second.authenticate(value)).client_id == "reader"
        assert fetched == ["first"]


async def test_a_broken_key_set_is_never_cached_and_known_keys_are_kept(
        idp: OidcProvider, keys: dict[str, dict[str, Any]]) -> None:
    from dicomcloud.backends.memcache import MemoryCache

    settings = AuthSettings(enabled=True, issuer=idp.issuer, audience=(AUDIENCE,),
                            jwks_refresh_seconds=0, jwks_cache_seconds=0)
    async with MemoryCache("memory://") as cache:
        auth = Authenticator(settings, cache)
        good = auth._fetch_jwks
        auth._fetch_jwks = lambda: b"<html>maintenance</html>"  # type: ignore[method-assign]
        with pytest.raises(BackendError, match="not a JWK Set"):
            await auth.authenticate("Bearer " + token(idp, "reader"))
        assert await cache.get(auth._cache_key) is None  # nothing broken was shared
        with pytest.raises(BackendError, match="a moment ago"):  # no hammering the issuer
            await auth.authenticate("Bearer " + token(idp, "reader"))
        auth._retry_at = 0.0
        auth._fetch_jwks = good  # type: ignore[method-assign]
        assert (await auth.authenticate("Bearer " + token(idp, "reader"))).client_id == "reader"
        auth._fetch_jwks = lambda: b"{}"  # type: ignore[method-assign]
        # stale keys and a broken issuer: the keys already known still verify
        assert (await auth.authenticate("Bearer " + token(idp, "writer"))).client_id == "writer"
