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

from rendezvous.config import ServiceConfig
from rendezvous.errors import ConfigError
from rendezvous.main import main
from rendezvous.server import hypercorn_config, reload_tls
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


def _negotiated_certificate(server: ssl.SSLContext, ciphers: str) -> bytes:
    """The DER certificate ``server`` presents to a TLS 1.2 client offering only ``ciphers``
    (a real handshake over memory buffers); ssl.SSLError if they cannot agree."""
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    client_context.maximum_version = ssl.TLSVersion.TLSv1_2
    client_context.set_ciphers(ciphers)
    to_server, to_client, from_server, from_client = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(to_client, from_client)
    service = server.wrap_bio(to_server, from_server, server_side=True)
    for _ in range(10):
        done = []
        for end in (client, service):
            try:
                end.do_handshake()
                done.append(end)
            except ssl.SSLWantReadError:
                pass
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        if client in done:
            certificate = client.getpeercert(binary_form=True)
            assert certificate is not None
            return certificate
    raise AssertionError("the handshake did not finish")


ECDSA_ONLY, RSA_ONLY = "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"


def test_a_reload_that_changes_the_key_type_is_refused_and_the_current_certificate_kept(
    tmp_path: Path,
) -> None:
    cert, key = make_certificate(tmp_path / "tls")
    config = ServiceConfig(data_dir=tmp_path, listen="127.0.0.1:0", tls_cert=cert, tls_key=key)
    hyper = hypercorn_config(config)
    context = hyper.create_ssl_context()
    assert context is not None
    first = _der(cert)
    assert _negotiated_certificate(context, ECDSA_ONLY) == first

    renewed_cert, renewed_key = make_certificate(tmp_path / "rsa", rsa_key=True)
    cert.write_bytes(renewed_cert.read_bytes())
    key.write_bytes(renewed_key.read_bytes())
    with pytest.raises(ConfigError, match="is RSA, the served one is EC: restart to change"):
        reload_tls(config, hyper)
    # Nothing of the RSA renewal was loaded: EC clients get the current certificate, and no
    # client is handed the new one beside it.
    assert _negotiated_certificate(context, ECDSA_ONLY) == first
    with pytest.raises(ssl.SSLError):
        _negotiated_certificate(context, RSA_ONLY)
    # A renewal of the same kind still reloads.
    same_cert, same_key = make_certificate(tmp_path / "ec")
    cert.write_bytes(same_cert.read_bytes())
    key.write_bytes(same_key.read_bytes())
    reload_tls(config, hyper)
    assert _negotiated_certificate(context, ECDSA_ONLY) == _der(same_cert) != first


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_a_sighup_during_start_up_does_not_end_the_service(tmp_path: Path) -> None:
    """Hangups from the start line on (before the instance listens for them) are ignored."""
    store = ["--data-dir", str(tmp_path / "data")]
    assert main(["init", *store]) == 0
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "rendezvous.main", "serve", *store, "--listen", "127.0.0.1:0",
             "--insecure-http"],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_SECONDS
        hangups = 0
        while True:
            text = log.read_text()  # once per look: a fast start must still get a hangup
            assert process.poll() is None, text
            assert time.monotonic() < deadline, text
            if " starting: " in text:
                process.send_signal(signal.SIGHUP)
                hangups += 1
            if "Running on http://" in text:
                break
            time.sleep(0.01)
        assert hangups > 0
        process.send_signal(signal.SIGHUP)
        _wait_for(log, "received SIGHUP; serving plain HTTP, there is no TLS certificate to reload")
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(WAIT_SECONDS)
