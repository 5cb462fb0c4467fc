"""TLS certificate and key problems are named by file and fault before the service starts."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rendezvous.main import main
from tests.rendezvous.live_server import make_certificate


def _certificate(directory: Path, not_after: datetime.datetime) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_after - datetime.timedelta(days=90)).not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    cert, key_file = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    return cert, key_file


def _serve(tmp_path: Path, cert: Path, key: Path) -> int:
    store = ["--data-dir", str(tmp_path / "data")]
    assert main(["init", *store]) == 0
    return main(["serve", *store, "--listen", "127.0.0.1:0", "--tls-cert", str(cert),
                 "--tls-key", str(key)])  # fmt: skip


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    return error


def test_missing_certificate_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, key = make_certificate(tmp_path / "tls")
    missing = tmp_path / "tls" / "nope.pem"
    assert _serve(tmp_path, missing, key) == 1
    assert f"TLS certificate {missing} cannot be read: No such file or directory" in _error(capsys)


def test_certificate_that_is_not_pem_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = make_certificate(tmp_path / "tls")
    cert.write_text("not a certificate\n")
    assert _serve(tmp_path, cert, key) == 1
    assert f"TLS certificate {cert} is not a PEM certificate" in _error(capsys)


def test_key_that_is_not_pem_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = make_certificate(tmp_path / "tls")
    key.write_bytes(cert.read_bytes())  # a common mix-up: the certificate given twice
    assert _serve(tmp_path, cert, key) == 1
    assert f"TLS key {key} is not a PEM private key" in _error(capsys)


def test_key_of_another_certificate_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, _ = make_certificate(tmp_path / "one")
    _, other_key = make_certificate(tmp_path / "two")
    assert _serve(tmp_path, cert, other_key) == 1
    assert f"TLS key {other_key} does not match the certificate {cert}" in _error(capsys)


def test_expired_certificate_is_refused_with_the_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expired = datetime.datetime(2020, 1, 2, 3, 4, tzinfo=datetime.UTC)
    cert, key = _certificate(tmp_path / "tls", expired)
    assert _serve(tmp_path, cert, key) == 1
    error = _error(capsys)
    assert f"TLS certificate {cert} expired on 2020-01-02 03:04 UTC" in error
    assert "refuses to start" in error


def test_certificate_expiring_within_two_weeks_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from rendezvous.config import ServiceConfig
    from rendezvous.server import hypercorn_config

    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    cert, key = _certificate(tmp_path / "tls", soon)
    caplog.set_level(logging.WARNING, logger="tucdesk.rendezvous")
    config = ServiceConfig(data_dir=tmp_path, listen="127.0.0.1:0", tls_cert=cert, tls_key=key)
    hypercorn_config(config)
    assert f"TLS certificate {cert} expires on" in caplog.text and "in 3.0 days" in caplog.text
    caplog.clear()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    cert, key = _certificate(tmp_path / "tls", later)
    hypercorn_config(config)
    assert "expires" not in caplog.text
