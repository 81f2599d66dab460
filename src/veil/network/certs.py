"""A self-signed TLS certificate for trying the server out (``veil certs``).

Writes ``cert.pem`` (the certificate, which devices pass as ``--ca-file`` to trust
it) and ``key.pem`` (its private key, readable by the owner only) with the
``cryptography`` library: an ECDSA P-256 key, valid for the given host names and IP
addresses, for ``days`` days. A self-signed certificate proves nothing to a device
that did not receive it through a trusted channel; in a deployment use a certificate
from a CA the devices already trust.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from veil.errors import ConfigError

__all__ = ["write_self_signed"]


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def write_self_signed(
    folder: str | Path,
    hosts: list[str] | None = None,
    days: int = 30,
    *,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` into ``folder``; return their paths.

    Args:
        folder: where to write (created).
        hosts: names and IP addresses the certificate is valid for; default
            ``["localhost", "127.0.0.1"]``.
        days: validity from now, >= 1.
        overwrite: replace a pair already in ``folder``. Off by default: a server
            may be using that key, and devices trust that certificate.

    Raises:
        ConfigError: ``days`` < 1, or ``folder`` already holds ``cert.pem`` or
            ``key.pem`` and ``overwrite`` is off (nothing is written).
    """
    if days < 1:
        raise ConfigError(f"days must be >= 1, got {days}")
    out = Path(folder)
    cert_path, key_path = out / "cert.pem", out / "key.pem"
    existing = [p.name for p in (cert_path, key_path) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{out} already holds {' and '.join(existing)}; a server may be using "
            "that key and devices may trust that certificate. Choose another folder, "
            "or replace them on purpose (overwrite=True, `veil certs --force`)"
        )
    hosts = hosts or ["localhost", "127.0.0.1"]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    return cert_path, key_path
