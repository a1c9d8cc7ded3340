"""Smoke test for the OIDC test rig (tests/oidc_provider.py + tests/oidc/provider.mjs)."""

from __future__ import annotations

import time

import httpx
import pytest
from jose import jwt
from jose.exceptions import JOSEError

from tests.oidc_provider import (
    OidcProvider,
    ec_jwk,
    public_jwk,
    rsa_jwk,
    sign,
)
from tests.support import free_port

AUDIENCE = "https://dicomcloud.test/api"
CLIENTS = [
    {
        "client_id": "tenant-a-client",
        "client_secret": "s3cret-a",
        "scope": "dicom.read dicom.write",
        "tenant": "a",
    },
    {
        "client_id": "reader",
        "client_secret": "s3cret-r",
        "scope": "dicom.read",
        "token_endpoint_auth_method": "client_secret_post",
    },
]


def _get_json(url: str) -> dict:
    with httpx.Client(trust_env=False, timeout=10) as http:
        resp = http.get(url)
    resp.raise_for_status()
    return resp.json()


def _verify(token: str, jwks: dict, issuer: str) -> dict:
    return jwt.decode(
        token,
        jwks,
        algorithms=["RS256", "ES256"],
        audience=AUDIENCE,
        issuer=issuer,
    )


def test_oidc_rig_tokens_and_rotation() -> None:
    key1 = rsa_jwk("key-1")
    with OidcProvider.start(free_port(), AUDIENCE, [key1], CLIENTS, access_token_ttl=120) as idp:
        token = idp.token("tenant-a-client", "s3cret-a", "dicom.read dicom.write")

        disco = _get_json(idp.discovery_url)
        assert disco["issuer"] == idp.issuer
        assert disco["token_endpoint"] == f"{idp.issuer}/token"
        jwks = _get_json(disco["jwks_uri"])
        assert [k["kid"] for k in jwks["keys"]] == ["key-1"]
        assert "d" not in jwks["keys"][0]

        assert jwt.get_unverified_header(token)["kid"] == "key-1"
        assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
        claims = _verify(token, jwks, idp.issuer)
        assert claims["iss"] == idp.issuer
        assert claims["aud"] == AUDIENCE
        assert claims["client_id"] == "tenant-a-client"
        assert claims["sub"] == "tenant-a-client"
        assert claims["scope"] == "dicom.read dicom.write"
        assert claims["tenant"] == "a"
        assert claims["exp"] - claims["iat"] == 120
        assert abs(claims["iat"] - time.time()) < 60

        # default scope = the client's registered scope; narrower scope is honoured
        assert _verify(idp.token("tenant-a-client", "s3cret-a"), jwks, idp.issuer)["scope"] == (
            "dicom.read dicom.write"
        )
        narrow = _verify(idp.token("tenant-a-client", "s3cret-a", "dicom.read"), jwks, idp.issuer)
        assert narrow["scope"] == "dicom.read"

        # client without tenant, client_secret_post, explicit resource indicator
        reader = _verify(idp.token("reader", "s3cret-r", resource=AUDIENCE), jwks, idp.issuer)
        assert reader["scope"] == "dicom.read"
        assert "tenant" not in reader

        # scope outside the client's allow-list and bad secrets are refused
        with pytest.raises(RuntimeError, match="invalid_scope"):
            idp.token("reader", "s3cret-r", "dicom.write")
        with pytest.raises(RuntimeError, match="invalid_client"):
            idp.token("reader", "wrong")

        # forged token (sign helper) verifies only against its own key
        forged = sign({**claims, "tenant": "b"}, rsa_jwk("key-1"))
        with pytest.raises(jwt.JWTError):
            _verify(forged, jwks, idp.issuer)

        # key rotation: same issuer/port, new (EC) signing key
        key2 = ec_jwk("key-2")
        idp.restart([key2])
        token2 = idp.token("tenant-a-client", "s3cret-a")
        assert jwt.get_unverified_header(token2)["kid"] == "key-2"
        assert jwt.get_unverified_header(token2)["alg"] == "ES256"
        jwks2 = _get_json(_get_json(idp.discovery_url)["jwks_uri"])
        assert [k["kid"] for k in jwks2["keys"]] == ["key-2"]
        assert jwks2["keys"][0] == public_jwk(key2) | jwks2["keys"][0]
        assert _verify(token2, jwks2, idp.issuer)["tenant"] == "a"
        # NB python-jose raises JWKError (not JWTError) when no JWKS key matches the alg's kty
        with pytest.raises(JOSEError):
            _verify(token, jwks2, idp.issuer)
    assert not idp.running
