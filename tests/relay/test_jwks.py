"""Relay-token keys fetched from a JWKS over TLS (a loopback HTTPS server with a test CA)."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import logging
import socket
import ssl
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocol.identity import SigningIdentity, b64url
from protocol.relay_token import Side
from relay.client import connect_tcp
from relay.errors import KeySetError, RelayRefusedError
from relay.keyset import (
    JWKS_STALE_INTERVALS,
    JwksRefresher,
    TokenKeySet,
    fetch_jwks,
    parse_jwks,
    unknown_key_refetch_for,
)
from relay.metrics import RelayMetrics
from relay.server import Relay
from relay.wire import Reason, encode_hello, encode_probe
from rendezvous.routes_meta import router as rendezvous_meta_routes
from rendezvous.service_keys import KEY_ROLES, ServiceKeys

from .harness import make_token, relay_config, trio_test, wait_until

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "relay" / "relay.example.toml"


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


def jwks_document(*signers: SigningIdentity, purpose: str = "relay-token") -> bytes:
    return json.dumps(
        {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64url(s.public.raw), "use": "sig",
                   "kid": s.public.key_id, "purpose": purpose}
                  for s in signers]}
    ).encode()


def rendezvous_service_keys() -> ServiceKeys:
    return ServiceKeys(*(SigningIdentity.generate() for _ in KEY_ROLES))


async def serve_jwks(
    cert_file, key_file, body: bytes | list[bytes], nursery, requests: list[bytes] | None = None,
    delay: float | list[float] = 0.0,
) -> int:
    """Serve ``body`` (or, for a list, its last item at the time of each request); each request
    is appended to ``requests``, if given; each answer comes ``delay`` seconds later (for a list,
    the n-th request's is its n-th item, its last one for any later request)."""
    answered = 0
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
            nonlocal answered
            if requests is not None:
                requests.append(request)
            # The answer is what the server has when the request comes, however late it lands.
            served = body[-1] if isinstance(body, list) else body
            delays = delay if isinstance(delay, list) else [delay]
            answered += 1
            await trio.sleep(delays[min(answered, len(delays)) - 1])
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(served)).encode() + b"\r\nConnection: close\r\n\r\n" + served
            )
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1")
    )
    return listeners[0].transport_listener.socket.getsockname()[1]


async def pair_with(
    relay: Relay, signer: SigningIdentity, session_id: str,
    agent_signer: SigningIdentity | None = None,
) -> None:
    streams = []

    async def join(key: SigningIdentity, side: Side) -> None:
        streams.append(await connect_tcp(*relay.tcp_address, make_token(key, session_id, side)))

    async with trio.open_nursery() as pair:
        pair.start_soon(join, signer, Side.OPERATOR)
        pair.start_soon(join, agent_signer or signer, Side.AGENT)
    assert len(streams) == 2
    for stream in streams:
        await stream.aclose()


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
        await pair_with(relay, signer, "j-1", rotated)
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
        with pytest.raises(KeySetError, match="TLS certificate not trusted by --jwks-ca"):
            await fetch_jwks(f"https://127.0.0.1:{port}/jwks", str(other_cert))
        nursery.cancel_scope.cancel()


@trio_test
async def test_jwks_fetch_from_a_closed_port_says_connection_refused():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(KeySetError, match="connection refused"):
        await fetch_jwks(f"https://127.0.0.1:{port}/jwks", None)


@trio_test
async def test_relay_trusts_only_the_relay_token_key_of_the_rendezvous_jwks(tmp_path):
    service_keys = rendezvous_service_keys()
    body = json.dumps(service_keys.jwks()).encode()
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, body, nursery)
        url = f"https://127.0.0.1:{port}/.well-known/jwks.json"
        config = relay_config(token_key=(), jwks=url, jwks_ca=str(cert_file))
        relay = Relay(config)
        await nursery.start(relay.serve)
        assert relay.key_set is not None
        assert set(relay.key_set.keys.values()) == {service_keys.relay_token.public}
        await pair_with(relay, service_keys.relay_token, "k-relay-token")
        for role, other in service_keys.by_role().items():
            if role == "relay-token":
                continue
            with pytest.raises(RelayRefusedError) as refused:
                await connect_tcp(*relay.tcp_address, make_token(other, f"k-{role}", Side.AGENT))
            assert refused.value.reason == Reason.TOKEN_INVALID
        relay.shutdown()
        nursery.cancel_scope.cancel()


@trio_test
async def test_reload_refetches_the_jwks_at_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    old, new = SigningIdentity.generate(), SigningIdentity.generate()
    bodies = [jwks_document(old)]
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, bodies, nursery)
        config = relay_config(token_key=(), jwks=f"https://127.0.0.1:{port}/jwks",
                              jwks_ca=str(cert_file), jwks_refresh=3600)
        relay = Relay(config)
        await nursery.start(relay.serve)
        bodies.append(jwks_document(new))
        relay.reload()
        with trio.fail_after(5):
            while new.public not in relay.key_set.keys.values():  # noqa: ASYNC110 (refresher)
                await trio.sleep(0.02)
        assert old.public not in relay.key_set.keys.values()
        assert f"jwks_keys_changed keys={new.public.fingerprint}" in caplog.text
        with trio.fail_after(5):
            while reloads(relay, "ok") < 1:  # noqa: ASYNC110 (counted by the refresher)
                await trio.sleep(0.02)
        assert "changed=yes" in caplog.text
        # A failed SIGHUP reload in JWKS mode is logged and counted as the README says.
        bodies.append(b"not json")
        relay.reload()
        with trio.fail_after(5):
            while reloads(relay, "failed") < 1:  # noqa: ASYNC110 (counted by the refresher)
                await trio.sleep(0.02)
        assert relay.key_set.fingerprints() == [new.public.fingerprint]
        failed = [r.getMessage() for r in caplog.records if "reload_failed" in r.getMessage()]
        assert len(failed) == 1 and "JWKS is not JSON" in failed[0]
        assert f"keeping={new.public.fingerprint}" in failed[0]
        assert reloads(relay, "ok") == 1
        relay.shutdown()
        nursery.cancel_scope.cancel()


def reloads(relay: Relay, result: str) -> float:
    value = relay.metrics.registry.get_sample_value(
        "tucdesk_relay_key_reloads_total", {"result": result}
    )
    return value or 0.0


@trio_test
async def test_the_jwks_is_fetched_once_at_start_then_every_interval(tmp_path):
    signer = SigningIdentity.generate()
    cert_file, key_file = self_signed_certificate(tmp_path)
    requests: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, jwks_document(signer), nursery, requests)
        config = relay_config(token_key=(), jwks=f"https://127.0.0.1:{port}/jwks",
                              jwks_ca=str(cert_file), jwks_refresh=1)
        relay = Relay(config)
        await nursery.start(relay.serve)
        await trio.sleep(0.6)  # the refresher has started; its first refetch is due at 1 s
        assert len(requests) == 1
        with trio.fail_after(5):
            while len(requests) < 2:  # noqa: ASYNC110 (the refresher's next fetch)
                await trio.sleep(0.02)
        relay.shutdown()
        nursery.cancel_scope.cancel()


def test_jwks_without_a_relay_token_key_is_refused():
    others = rendezvous_service_keys().jwks()
    others["keys"] = [key for key in others["keys"] if key["purpose"] != "relay-token"]
    with pytest.raises(KeySetError, match="no relay-token key"):
        parse_jwks(json.dumps(others).encode())
    with pytest.raises(KeySetError, match="no relay-token key"):
        parse_jwks(jwks_document(SigningIdentity.generate(), purpose="jwt-issuer"))


@trio_test
async def test_failed_refreshes_keep_the_keys_are_counted_and_logged_once(tmp_path, caplog):
    signer = SigningIdentity.generate()
    key_set = TokenKeySet(parse_jwks(jwks_document(signer)))
    metrics = RelayMetrics()
    cert_file, key_file = self_signed_certificate(tmp_path)
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    async with trio.open_nursery() as nursery:
        body = jwks_document(SigningIdentity.generate(), purpose="audit-signer")
        port = await serve_jwks(cert_file, key_file, body, nursery)
        refresher = JwksRefresher(
            key_set, f"https://127.0.0.1:{port}/jwks", str(cert_file), 0.02,
            metrics.jwks_refresh_failures.inc,
        )
        nursery.start_soon(refresher.run)
        with trio.fail_after(10):
            while metrics.registry.get_sample_value(  # noqa: ASYNC110 (the refresher's count)
                "tucdesk_relay_jwks_refresh_failures_total"
            ) < 3:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert key_set.fingerprints() == [signer.public.fingerprint]
    failures = [r for r in caplog.records if "jwks_refresh_failed" in r.getMessage()]
    assert len(failures) == 1
    assert "no relay-token key" in failures[0].getMessage()
    assert signer.public.fingerprint in failures[0].getMessage()


def test_example_config_names_the_jwks_path_the_rendezvous_serves():
    served = {route.path for route in rendezvous_meta_routes.routes}
    jwks_lines = [line for line in EXAMPLE_CONFIG.read_text().splitlines()
                  if line.lstrip("# ").startswith("jwks =")]
    assert jwks_lines
    for line in jwks_lines:
        url = line.split("=", 1)[1].strip().strip('"')
        assert "/" + url.split("/", 3)[3] in served


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


@trio_test
async def test_a_token_signed_with_a_rotated_key_is_accepted_at_once(tmp_path, caplog):
    # keys rotate relay-token + SIGHUP: the rendezvous publishes and signs with the new key at
    # the same moment, long before the relay's next periodic refresh.
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    old, new = SigningIdentity.generate(), SigningIdentity.generate()
    bodies = [jwks_document(old)]
    requests: list[bytes] = []
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, bodies, nursery, requests)
        config = relay_config(token_key=(), jwks=f"https://127.0.0.1:{port}/jwks",
                              jwks_ca=str(cert_file), jwks_refresh=3600)
        relay = Relay(config)
        await nursery.start(relay.serve)
        bodies.append(jwks_document(old, new))
        await pair_with(relay, new, "rotated-1")
        assert len(requests) == 2  # the start-up fetch and one refetch for the new key id
        changed = [r.getMessage() for r in caplog.records
                   if r.getMessage().startswith("jwks_keys_changed")]
        assert len(changed) == 1 and new.public.fingerprint in changed[0]
        assert "token_invalid" not in caplog.text
        relay.shutdown()
        nursery.cancel_scope.cancel()


@trio_test
async def test_tokens_with_unknown_key_ids_refetch_the_jwks_at_most_once_per_interval(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    signer = SigningIdentity.generate()
    requests: list[bytes] = []
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, jwks_document(signer), nursery, requests)
        config = relay_config(token_key=(), jwks=f"https://127.0.0.1:{port}/jwks",
                              jwks_ca=str(cert_file), jwks_refresh=3600)
        relay = Relay(config)
        await nursery.start(relay.serve)
        strangers = [SigningIdentity.generate() for _ in range(20)]
        started = trio.current_time()

        async def attempt(stranger: SigningIdentity, number: int) -> None:
            token = make_token(stranger, f"unknown-{number}", Side.OPERATOR)
            with pytest.raises(RelayRefusedError) as refused:
                await connect_tcp(*relay.tcp_address, token, pair_timeout=5)
            assert refused.value.reason == Reason.TOKEN_INVALID

        async with trio.open_nursery() as flood:
            for number, stranger in enumerate(strangers):
                flood.start_soon(attempt, stranger, number)
        async with trio.open_nursery() as second_flood:
            for number, stranger in enumerate(strangers):
                second_flood.start_soon(attempt, stranger, 100 + number)
        # Start-up, then one refetch for the twenty concurrent made-up key ids, and at most
        # one per unknown_key_refetch_for(hello_timeout) seconds after that.
        spacing = unknown_key_refetch_for(config.hello_timeout)
        assert len(requests) <= 2 + (trio.current_time() - started) / spacing
        refusals = [r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("refused transport=tcp reason=token_invalid")]
        assert refusals
        assert all("detail=unknown key id " in line for line in refusals)
        assert any(f"unknown key id {s.public.key_id}" in refusals[0] for s in strangers)
        relay.shutdown()
        nursery.cancel_scope.cancel()


@trio_test
async def test_tokens_arriving_during_a_refetch_wait_for_that_one_fetch(tmp_path):
    old, new = SigningIdentity.generate(), SigningIdentity.generate()
    key_set = TokenKeySet(parse_jwks(jwks_document(old)))
    requests: list[bytes] = []
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, jwks_document(old, new), nursery, requests,
                                delay=0.3)
        refresher = JwksRefresher(key_set, f"https://127.0.0.1:{port}/jwks", str(cert_file), 3600)
        nursery.start_soon(refresher.run)
        token = make_token(new, "single-flight", Side.AGENT)
        answers: list[bool] = []

        async def wait() -> None:
            answers.append(await key_set.wait_for_unknown_key(token, trio.current_time() + 10))

        async with trio.open_nursery() as waiters:
            for _ in range(10):
                waiters.start_soon(wait)
                await trio.sleep(0.01)
        assert answers == [True] * 10
        assert len(requests) == 1
        # Known now: no fetch, no wait.
        assert not await key_set.wait_for_unknown_key(token, trio.current_time() + 10)
        assert len(requests) == 1
        nursery.cancel_scope.cancel()


def test_relay_token_keys_from_files_never_refetch():
    signer, stranger = SigningIdentity.generate(), SigningIdentity.generate()
    key_set = TokenKeySet({signer.public.key_id: signer.public})
    token = make_token(stranger, "files", Side.AGENT)
    assert key_set.unknown_key_id(token) == stranger.public.key_id
    assert key_set.ask_for_unknown_key(token) is None
    assert key_set.refusal_detail(token) == f"unknown key id {stranger.public.key_id}"
    assert key_set.refusal_detail(make_token(signer, "files", Side.AGENT)) is None
    assert key_set.unknown_key_id("not.a.token") is None


@trio_test
async def test_only_so_many_connections_wait_for_a_refetch(tmp_path, monkeypatch):
    monkeypatch.setattr("relay.keyset.MAX_TOKENS_WAITING_FOR_KEYS", 2)
    old, new = SigningIdentity.generate(), SigningIdentity.generate()
    key_set = TokenKeySet(parse_jwks(jwks_document(old)))
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, jwks_document(old, new), nursery, delay=0.3)
        refresher = JwksRefresher(key_set, f"https://127.0.0.1:{port}/jwks", str(cert_file), 3600)
        nursery.start_soon(refresher.run)
        token = make_token(new, "capped", Side.AGENT)
        answers: list[tuple[bool, float]] = []

        async def wait() -> None:
            started = trio.current_time()
            known = await key_set.wait_for_unknown_key(token, trio.current_time() + 10)
            answers.append((known, trio.current_time() - started))

        async with trio.open_nursery() as waiters:
            for _ in range(5):
                waiters.start_soon(wait)
        refused_at_once = [took for known, took in answers if not known]
        assert len(refused_at_once) == 3 and max(refused_at_once) < 0.1
        assert [known for known, _ in answers].count(True) == 2
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_made_up_key_id_does_not_get_a_rotated_key_refused_within_the_refetch_limit(
    tmp_path,
):
    # A token with a made-up kid spends the unknown-key refetch; the rendezvous then rotates
    # its key, and a genuine token signed with the new one arrives within the refetch limit:
    # it waits for the next refetch (due within its hello_timeout) instead of being refused.
    old, new, stranger = (SigningIdentity.generate() for _ in range(3))
    bodies = [jwks_document(old)]
    requests: list[bytes] = []
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, bodies, nursery, requests)
        relay = Relay(relay_config(token_key=(), jwks=f"https://127.0.0.1:{port}/jwks",
                                   jwks_ca=str(cert_file), jwks_refresh=3600))
        await nursery.start(relay.serve)
        with pytest.raises(RelayRefusedError) as refused:
            await connect_tcp(*relay.tcp_address, make_token(stranger, "made-up", Side.OPERATOR),
                              pair_timeout=5)
        assert refused.value.reason == Reason.TOKEN_INVALID
        assert len(requests) == 2
        await trio.sleep(0.2)
        bodies.append(jwks_document(old, new))
        await pair_with(relay, new, "rotated-after-a-made-up-kid")
        assert len(requests) == 3
        relay.shutdown()
        nursery.cancel_scope.cancel()


@trio_test
async def test_connections_waiting_for_a_refetch_are_pending_hellos_bounded_by_hello_timeout(
    tmp_path,
):
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        # A refetch that takes longer than the hello timeout.
        port = await serve_jwks(cert_file, key_file, jwks_document(SigningIdentity.generate()),
                                nursery, delay=6.0)
        relay = Relay(relay_config(token_key=(), jwks=f"https://127.0.0.1:{port}/jwks",
                                   jwks_ca=str(cert_file), jwks_refresh=3600, hello_timeout=2.0,
                                   max_pending=8))
        await nursery.start(relay.serve)
        clients = []
        for number in range(5):
            token = make_token(SigningIdentity.generate(), f"waiting-{number}", Side.OPERATOR)
            client = await trio.open_tcp_stream(*relay.tcp_address)
            await client.send_all(encode_hello(token))
            clients.append(client)
        await trio.sleep(0.3)
        assert relay.tcp.pending == 5
        assert relay.metrics.registry.get_sample_value("tucdesk_relay_connections_pending") == 5
        assert len(relay.tcp.admission.pending) == 5  # within max_pending
        with trio.fail_after(2.5):  # the rest of the 2 s hello timeout, not the 6 s fetch
            for client in clients:
                assert await client.receive_some(64) == b"token_invalid\n"
        assert relay.tcp.pending == 0
        for client in clients:
            await client.aclose()
        relay.shutdown()
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_rotated_key_token_that_found_a_stale_refetch_running_waits_for_the_next(
    tmp_path,
):
    # A made-up kid starts a refetch; the rendezvous rotates while it is on its way (its answer
    # is the old set); a genuine token signed with the new key arrives meanwhile. It waited for
    # that refetch and was refused token_invalid; it now asks for the next one and is admitted.
    old, new, stranger = (SigningIdentity.generate() for _ in range(3))
    bodies = [jwks_document(old)]
    requests: list[bytes] = []
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, bodies, nursery, requests, delay=0.5)
        relay = Relay(relay_config(token_key=(), jwks=f"https://127.0.0.1:{port}/jwks",
                                   jwks_ca=str(cert_file), jwks_refresh=3600, hello_timeout=5.0))
        await nursery.start(relay.serve)

        async def made_up_kid() -> None:
            with pytest.raises(RelayRefusedError):
                await connect_tcp(*relay.tcp_address,
                                  make_token(stranger, "made-up", Side.OPERATOR), pair_timeout=5)

        nursery.start_soon(made_up_kid)
        await wait_until(lambda: len(requests) == 2)  # the start-up fetch, then the refetch
        bodies.append(jwks_document(old, new))
        with trio.fail_after(5):
            await pair_with(relay, new, "rotated-during-a-refetch")
        assert len(requests) == 3
        relay.shutdown()
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_token_waits_for_a_refetch_due_at_its_wait_cap_until_that_fetch_can_end(
    tmp_path, monkeypatch,
):
    # With refetches spaced by the whole wait cap (hello_timeout >= 20 s: 10 s and 10 s), a
    # token arriving just after one waited only until the next one started, then was refused.
    monkeypatch.setattr("relay.keyset.UNKNOWN_KEY_WAIT_SECONDS", 2.0)
    old, new, stranger = (SigningIdentity.generate() for _ in range(3))
    key_set = TokenKeySet(parse_jwks(jwks_document(old)))
    bodies = [jwks_document(old)]
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, bodies, nursery, delay=[0.0, 0.5])
        refresher = JwksRefresher(key_set, f"https://127.0.0.1:{port}/jwks", str(cert_file),
                                  3600, unknown_key_refetch=2.0)
        nursery.start_soon(refresher.run)
        made_up = make_token(stranger, "made-up", Side.AGENT)
        assert not await key_set.wait_for_unknown_key(made_up, trio.current_time() + 10)
        bodies.append(jwks_document(old, new))
        started = trio.current_time()
        genuine = make_token(new, "genuine", Side.AGENT)
        assert await key_set.wait_for_unknown_key(genuine, trio.current_time() + 10)
        assert 1.5 < trio.current_time() - started < 4
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_relay_whose_jwks_has_not_been_fetched_for_three_intervals_answers_no_keys(
    tmp_path,
):
    signer = SigningIdentity.generate()
    bodies = [jwks_document(signer)]
    cert_file, key_file = self_signed_certificate(tmp_path)
    async with trio.open_nursery() as nursery:
        port = await serve_jwks(cert_file, key_file, bodies, nursery)
        relay = Relay(relay_config(token_key=(), jwks=f"https://127.0.0.1:{port}/jwks",
                                   jwks_ca=str(cert_file), jwks_refresh=1))
        await nursery.start(relay.serve)
        assert await probe_answer(relay) == b"ok\n"
        started = trio.current_time()
        bodies.append(b"not json")  # every refresh fails from now on; the old keys are kept
        assert await probe_answer(relay) == b"ok\n"
        await probe_answer_becomes(relay, b"no_keys\n", within=JWKS_STALE_INTERVALS * 1 + 3)
        assert trio.current_time() - started > JWKS_STALE_INTERVALS * 1 - 1
        assert relay.metrics.registry.get_sample_value(
            "tucdesk_relay_probes_total", {"answer": "no_keys"}
        ) == 1
        # Its keys still verify the tokens signed with them: only the probe says otherwise.
        await pair_with(relay, signer, "stale-but-kept")
        bodies.append(jwks_document(signer))
        await probe_answer_becomes(relay, b"ok\n", within=4)
        relay.shutdown()
        nursery.cancel_scope.cancel()


async def probe_answer(relay: Relay) -> bytes:
    stream = await trio.open_tcp_stream(*relay.tcp_address)
    async with stream:
        await stream.send_all(encode_probe())
        return await stream.receive_some(64)


async def probe_answer_becomes(relay: Relay, answer: bytes, within: float) -> None:
    with trio.fail_after(within):
        while await probe_answer(relay) != answer:  # noqa: ASYNC110 (bounded poll)
            await trio.sleep(0.2)
