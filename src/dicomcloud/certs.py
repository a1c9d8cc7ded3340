"""A development certificate authority and certificates (``dicomcloud certs``).

For trying HTTPS (and later DICOM TLS, PS3.15 Annex B) without a real PKI: one CA, a
server certificate for the given host names and addresses, and a client certificate, all
ECDSA P-256, written as PEM. Never use them in production: the CA key sits next to them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """Paths of what ``make_development_certs`` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_development_certs(out: Path, hosts: list[str], days: int = 825) -> Issued:
    """Write ``ca.pem``, ``server.pem``/``server-key.pem`` (valid for ``hosts``) and
    ``client.pem``/``client-key.pem`` into ``out``; keys are readable by the owner only."""
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicomcloud development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, key_cert_sign=True, crl_sign=True,
              content_commitment=False, key_encipherment=False, data_encipherment=False,
              key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(name: str, usage: x509.ObjectIdentifier, names: list[str]
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [_general_name(n) for n in names]), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(hosts[0] if hosts else "localhost",
                              ExtendedKeyUsageOID.SERVER_AUTH, hosts)
    client, client_key = leaf("dicomcloud development client",
                              ExtendedKeyUsageOID.CLIENT_AUTH, [])
    issued = Issued(out / "ca.pem", out / "server.pem", out / "server-key.pem",
                    out / "client.pem", out / "client-key.pem")
    issued.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "ca-key.pem").write_bytes(_private(ca_key))
    issued.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    issued.server_key.write_bytes(_private(server_key))
    issued.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    issued.client_key.write_bytes(_private(client_key))
    for key in ("ca-key.pem", "server-key.pem", "client-key.pem"):
        os.chmod(out / key, 0o600)
    return issued


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
