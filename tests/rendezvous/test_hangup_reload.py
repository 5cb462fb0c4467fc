"""SIGHUP to `tucdesk-rendezvous serve` reloads the TLS certificate and never stops the service."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509

from rendezvous.main import main
from tests.rendezvous.live_server import make_certificate

START_SECONDS = 60
WAIT_SECONDS = 15


@contextmanager
def tls_service(
    tmp_path: Path, cert: Path, key: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """`serve` over TLS on an ephemeral port; yields (process, port, log)."""
    store = ["--data-dir", str(tmp_path / "data")]
    assert main(["init", *store]) == 0
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "rendezvous.main", "serve", *store, "--listen", "127.0.0.1:0",
             "--tls-cert", str(cert), "--tls-key", str(key)],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_SECONDS
        while not (match := re.search(r"Running on https://127\.0\.0\.1:(\d+)", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield process, int(match.group(1)), log
    finally:
        process.terminate()
        process.wait(WAIT_SECONDS)


def served_certificate(port: int) -> bytes:
    """The DER certificate the service presents to a new connection."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS) as raw:
        with context.wrap_socket(raw) as tls:
            certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def _der(path: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


def _wait_for(log: Path, text: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while text not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_sighup_reloads_a_renewed_certificate_and_keeps_serving(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path / "tls")
    with tls_service(tmp_path, cert, key) as (process, port, log):
        first = served_certificate(port)
        assert first == _der(cert)

        # A bad renewal (key of another certificate) is refused; the current one stays.
        renewed_cert, renewed_key = make_certificate(tmp_path / "renewed")
        cert.write_bytes(renewed_cert.read_bytes())
        process.send_signal(signal.SIGHUP)
        _wait_for(log, "received SIGHUP; kept the current TLS certificate")
        assert "does not match the certificate" in log.read_text()
        assert process.poll() is None
        assert served_certificate(port) == first

        key.write_bytes(renewed_key.read_bytes())
        process.send_signal(signal.SIGHUP)
        _wait_for(log, "received SIGHUP; reloaded TLS certificate")
        assert process.poll() is None
        assert served_certificate(port) == _der(renewed_cert) != first
