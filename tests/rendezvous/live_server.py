"""Run the real service (Hypercorn's trio worker) on an ephemeral loopback port inside a test."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from rendezvous.config import ServiceConfig
from rendezvous.server import run_service
from rendezvous.service_keys import create_missing_keys

START_TIMEOUT_SECONDS = 30


def make_certificate(
    directory: Path,
    *,
    rsa_key: bool = False,
    common_name: str = "localhost",
    valid_from: datetime.timedelta = datetime.timedelta(minutes=-5),
    valid_until: datetime.timedelta = datetime.timedelta(days=1),
) -> tuple[Path, Path]:
    """A self-signed CA certificate for 127.0.0.1 and localhost (an EC key, or ``rsa_key``)
    named ``common_name``, valid from now plus ``valid_from`` to now plus ``valid_until``;
    returns (cert, key) paths. Give certificates that share one CA file different names:
    OpenSSL cannot tell same-named CAs apart."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_from)
        .not_valid_after(now + valid_until)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@asynccontextmanager
async def live_service(
    data_dir: Path, database_url: str, **settings: Any
) -> AsyncIterator[tuple[str, ServiceConfig]]:
    """Serve on 127.0.0.1 with an ephemeral port; yields (base URL, config); stops on exit."""
    create_missing_keys(data_dir)
    settings.setdefault("insecure_http", "tls_cert" not in settings)
    config = ServiceConfig(
        data_dir=data_dir, database=database_url, listen="127.0.0.1:0", **settings
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT_SECONDS):
            binds = await nursery.start(run_service, config)
        yield binds[0], config
        nursery.cancel_scope.cancel()
