"""A real OpenID Connect provider for tests (npm ``oidc-provider``, see tests/oidc/).

Usage::

    key = rsa_jwk("k1")
    clients = [{"client_id": "c1", "client_secret": "s1",
                "scope": "dicom.read dicom.write", "tenant": "a"}]
    with OidcProvider.start(free_port(), "https://dicomcloud.test/api", [key], clients) as idp:
        token = idp.token("c1", "s1")          # JWT access token (client credentials)
        idp.restart([rsa_jwk("k2")])            # key rotation, same port/issuer

Access tokens are RFC 9068 JWTs (header ``typ: at+jwt``, ``kid`` of the first key) with
claims ``iss``, ``aud`` (= audience), ``sub`` (= client_id), ``client_id``, ``scope``
(space separated; absent if no scope was granted), ``iat``, ``exp``, ``jti`` and
``tenant`` (string or list, only for clients configured with one).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, rsa

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
PROVIDER_JS = OIDC_DIR / "provider.mjs"
READY_TIMEOUT = 30.0

_PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


# -- installation -----------------------------------------------------------------------------


def ensure_installed() -> Path:
    """Install tests/oidc's node dependencies (``npm ci``) if needed; return the directory."""
    if (OIDC_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        return OIDC_DIR
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError(
            "the OIDC test provider needs Node.js (>= 18 LTS) and npm on PATH: install them, "
            f"then run `npm ci` in {OIDC_DIR}"
        )
    proc = subprocess.run(
        [npm, "ci", "--silent", "--no-audit", "--no-fund"],
        cwd=OIDC_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"`npm ci` in {OIDC_DIR} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return OIDC_DIR


# -- keys -------------------------------------------------------------------------------------


def _b64(n: int, length: int | None = None) -> str:
    if length is None:
        length = max(1, (n.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(n.to_bytes(length, "big")).rstrip(b"=").decode("ascii")


def rsa_jwk(kid: str, bits: int = 2048) -> dict[str, Any]:
    """A new private RSA JWK (RS256, use=sig)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    priv = key.private_numbers()
    pub = priv.public_numbers
    return {
        "kty": "RSA",
        "kid": kid,
        "alg": "RS256",
        "use": "sig",
        "n": _b64(pub.n),
        "e": _b64(pub.e),
        "d": _b64(priv.d),
        "p": _b64(priv.p),
        "q": _b64(priv.q),
        "dp": _b64(priv.dmp1),
        "dq": _b64(priv.dmq1),
        "qi": _b64(priv.iqmp),
    }


def ec_jwk(kid: str) -> dict[str, Any]:
    """A new private P-256 JWK (ES256, use=sig)."""
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_numbers()
    pub = priv.public_numbers
    return {
        "kty": "EC",
        "kid": kid,
        "alg": "ES256",
        "use": "sig",
        "crv": "P-256",
        "x": _b64(pub.x, 32),
        "y": _b64(pub.y, 32),
        "d": _b64(priv.private_value, 32),
    }


def public_jwk(private: dict[str, Any]) -> dict[str, Any]:
    """The public part of a private JWK."""
    return {k: v for k, v in private.items() if k not in _PRIVATE_MEMBERS}


def sign(
    claims: dict[str, Any],
    private_jwk: dict[str, Any] | str | bytes,
    alg: str = "RS256",
    headers: dict[str, Any] | None = None,
) -> str:
    """Forge a JWS with python-jose (for negative tests). ``kid`` defaults to the key's kid."""
    from jose import jwt

    hdrs: dict[str, Any] = {}
    if isinstance(private_jwk, dict) and "kid" in private_jwk:
        hdrs["kid"] = private_jwk["kid"]
    hdrs.update(headers or {})
    return str(jwt.encode(claims, private_jwk, algorithm=alg, headers=hdrs))


# -- provider process -------------------------------------------------------------------------


class OidcProvider:
    """A running ``node tests/oidc/provider.mjs`` on 127.0.0.1:port."""

    def __init__(
        self,
        port: int,
        audience: str,
        keys: list[dict[str, Any]],
        clients: list[dict[str, Any]],
        access_token_ttl: int = 300,
    ) -> None:
        self.port = port
        self.audience = audience
        self.keys = list(keys)
        self.clients = [dict(c) for c in clients]
        self.access_token_ttl = access_token_ttl
        self.issuer = f"http://127.0.0.1:{port}"
        self._proc: subprocess.Popen[str] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._stderr: Any = None

    # lifecycle

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> OidcProvider:
        """A provider made with the constructor's arguments, running."""
        self = cls(*args, **kwargs)
        self._spawn()
        return self

    def _config(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "issuer": self.issuer,
            "audience": self.audience,
            "keys": {"keys": self.keys},
            "clients": self.clients,
            "access_token_ttl": self.access_token_ttl,
        }

    def _spawn(self) -> None:
        if self._proc is not None:
            raise RuntimeError("provider already running")
        if not self.keys:
            raise ValueError("at least one key is required")
        ensure_installed()
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("the OIDC test provider needs Node.js on PATH")
        self._tmpdir = tempfile.TemporaryDirectory(prefix="oidc-provider-")
        cfg = Path(self._tmpdir.name) / "config.json"
        cfg.write_text(json.dumps(self._config()))
        self._stderr = open(Path(self._tmpdir.name) / "stderr.log", "w+")  # noqa: SIM115
        env = dict(os.environ, DEBUG="", NODE_ENV="test")
        self._proc = subprocess.Popen(
            [node, str(PROVIDER_JS), str(cfg)],
            cwd=OIDC_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        stdout = self._proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, name="oidc-provider-stdout", daemon=True).start()

        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"did not print READY within {READY_TIMEOUT:.0f}s")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._proc.wait(timeout=5)
                self._fail(f"exited with {self._proc.returncode} before READY")
            if line.startswith("READY "):
                return

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return str(self._stderr.read())

    def _fail(self, why: str) -> None:
        err = ""
        with contextlib.suppress(Exception):
            self._terminate()
            err = self._stderr_text()
        self._cleanup()
        raise RuntimeError(f"OIDC provider on port {self.port} {why}; stderr:\n{err}")

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    def _cleanup(self) -> None:
        self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def stop(self) -> None:
        try:
            self._terminate()
        finally:
            self._cleanup()

    def restart(self, keys: list[dict[str, Any]] | None = None) -> None:
        """Stop, then start again on the same port (same issuer), optionally with new keys."""
        self.stop()
        if keys is not None:
            self.keys = list(keys)
        self._spawn()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def stderr(self) -> str:
        return self._stderr_text()

    def __enter__(self) -> OidcProvider:
        if self._proc is None:
            self._spawn()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # endpoints

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks"

    def token(
        self,
        client_id: str,
        client_secret: str,
        scope: str | None = None,
        resource: str | None = None,
    ) -> str:
        """Client-credentials grant; return the (JWT) access token.

        ``scope=None`` requests the client's full registered scope (oidc-provider itself
        grants no scope at all when none is requested). Pass ``scope=""`` to request none.
        ``resource`` is optional: the provider defaults it to the audience.
        """
        client = next((c for c in self.clients if c["client_id"] == client_id), None)
        if scope is None:
            scope = client.get("scope", "") if client else ""
        data = {"grant_type": "client_credentials"}
        if scope:
            data["scope"] = scope
        if resource is not None:
            data["resource"] = resource
        headers = {"Accept": "application/json"}
        method = (client or {}).get("token_endpoint_auth_method", "client_secret_basic")
        if method == "client_secret_post":
            data.update(client_id=client_id, client_secret=client_secret)
        else:
            raw = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
        with httpx.Client(trust_env=False, timeout=10) as http:
            resp = http.post(self.token_endpoint, data=data, headers=headers)
        if resp.status_code != 200:
            raise RuntimeError(f"token request failed: HTTP {resp.status_code}: {resp.text}")
        body = resp.json()
        if "access_token" not in body:
            raise RuntimeError(f"token response without access_token: {resp.text}")
        return str(body["access_token"])
