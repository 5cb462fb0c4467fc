"""Relay-token keys fetched from a JWKS over TLS (a loopback HTTPS server with a test CA)."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import ssl

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocol.identity import SigningIdentity, b64url
from protocol.relay_token import Side
from relay.client import connect_tcp
from relay.errors import KeySetError
from relay.keyset import TokenKeySet, fetch_jwks, parse_jwks
from relay.server import Relay

from .harness import make_token, relay_config, trio_test


def self_signed_certificate(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def jwks_document(*signers: SigningIdentity) -> bytes:
    return json.dumps(
        {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64url(s.public.raw), "use": "sig"}
                  for s in signers]}
    ).encode()


async def serve_jwks(cert_file, key_file, body: bytes, nursery) -> int:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)

    async def handler(stream: trio.SSLStream) -> None:
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                data = await stream.receive_some(4096)
                if not data:
                    return
                request += data
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1")
    )
    return listeners[0].transport_listener.socket.getsockname()[1]


@trio_test
async def test_relay_verifies_tokens_with_keys_fetched_from_the_jwks(tmp_path):
    signer, rotated = SigningIdentity.generate(), SigningIdentity.generate()
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, jwks_document(signer, rotated), nursery)
        config = relay_config(
            token_key=(), jwks=f"https://127.0.0.1:{port}/jwks", jwks_ca=str(cert_file)
        )
        relay = Relay(config)
        await nursery.start(relay.serve)
        streams = []

        async def join(key: SigningIdentity, side: Side) -> None:
            streams.append(await connect_tcp(*relay.tcp_address, make_token(key, "j-1", side)))

        async with trio.open_nursery() as pair:
            pair.start_soon(join, signer, Side.OPERATOR)
            pair.start_soon(join, rotated, Side.AGENT)
        assert len(streams) == 2
        relay.shutdown()
        nursery.cancel_scope.cancel()


@trio_test
async def test_jwks_from_a_server_the_ca_does_not_vouch_for_is_refused(tmp_path):
    cert_file, key_file = self_signed_certificate(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed_certificate(tmp_path / "other")
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, jwks_document(SigningIdentity.generate()),
                                nursery)
        with pytest.raises(KeySetError):
            await fetch_jwks(f"https://127.0.0.1:{port}/jwks", str(other_cert))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"keys": 5}', b'{"keys": []}',
     b'{"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]}',
     b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]}'],
)
def test_malformed_or_empty_jwks_is_refused(body):
    with pytest.raises(KeySetError):
        parse_jwks(body)


def test_key_set_keeps_its_keys_when_a_refresh_brings_none():
    signer = SigningIdentity.generate()
    key_set = TokenKeySet(parse_jwks(jwks_document(signer)))
    with pytest.raises(KeySetError):
        key_set.replace({})
    assert signer.public.key_id in key_set.keys
