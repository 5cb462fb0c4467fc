"""The service over real sockets: TLS 1.2+, loopback-only plain HTTP, health and JWKS."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trio

from rendezvous.config import ServiceConfig
from rendezvous.errors import ConfigError
from rendezvous.server import hypercorn_config
from tests.rendezvous.live_server import live_service, make_certificate

pytestmark = pytest.mark.anyio


async def test_service_serves_tls_and_publishes_its_keys(
    database_url: str, tmp_path: Path
) -> None:
    cert, key = make_certificate(tmp_path / "tls")
    async with live_service(tmp_path / "data", database_url, tls_cert=cert, tls_key=key) as (
        url,
        _,
    ):
        assert url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert)) as client:
            health = await client.get(url + "/healthz")
            jwks = await client.get(url + "/.well-known/jwks.json")
    assert health.status_code == 200
    assert health.json()["backend"] in {"sqlite", "postgres"}
    keys = jwks.json()["keys"]
    assert {k["purpose"] for k in keys} == {
        "jwt-issuer", "audit-signer", "relay-token", "policy-signer"
    }
    assert all(k["kty"] == "OKP" and k["crv"] == "Ed25519" and k["use"] == "sig" for k in keys)


async def _handshake(port: int, cert: Path, newest: ssl.TLSVersion) -> str:
    """Handshake with a client that offers TLS 1.0 up to ``newest``; returns the version used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(cert))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer old versions at all
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = newest
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(stream, context, server_hostname="localhost")
        try:
            await tls.do_handshake()
            return str(tls.version())
        finally:
            await stream.aclose()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls_older_than_1_2_is_refused(database_url: str, tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path / "tls")
    async with live_service(tmp_path / "data", database_url, tls_cert=cert, tls_key=key) as (
        url,
        _,
    ):
        port = int(url.rsplit(":", 1)[1])
        assert await _handshake(port, cert, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        with pytest.raises(trio.BrokenResourceError):
            await _handshake(port, cert, ssl.TLSVersion.TLSv1_1)


async def test_plain_http_is_served_on_loopback_when_asked(
    database_url: str, tmp_path: Path
) -> None:
    async with live_service(tmp_path / "data", database_url) as (url, _):
        async with httpx.AsyncClient() as client:
            response = await client.get(url + "/healthz")
    assert url.startswith("http://127.0.0.1:")
    assert response.status_code == 200


def test_plain_http_without_the_explicit_flag_is_refused(tmp_path: Path) -> None:
    config = ServiceConfig(data_dir=tmp_path, listen="127.0.0.1:8443")
    with pytest.raises(ConfigError, match="--tls-cert"):
        hypercorn_config(config)


def test_plain_http_on_a_non_loopback_address_is_refused(tmp_path: Path) -> None:
    config = ServiceConfig(data_dir=tmp_path, listen="0.0.0.0:8443", insecure_http=True)
    with pytest.raises(ConfigError, match="loopback"):
        hypercorn_config(config)


def test_tls_context_refuses_versions_below_1_2(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path / "tls")
    config = ServiceConfig(data_dir=tmp_path, listen="0.0.0.0:8443", tls_cert=cert, tls_key=key)
    context = hypercorn_config(config).create_ssl_context()
    assert context is not None
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
