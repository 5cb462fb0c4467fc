"""--token-key files: only public keys are accepted, and SIGHUP (Relay.reload) re-reads them."""

from __future__ import annotations

import logging

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.errors import KeySetError
from relay.keyset import TokenKeySet
from relay.server import Relay
from relay.wire import encode_hello

from .harness import make_token, relay_config, trio_test


def test_a_private_key_file_is_refused_with_the_command_for_the_public_key(tmp_path):
    private_key = tmp_path / "relay-token.key"
    SigningIdentity.generate().save(private_key)  # 0600, as the rendezvous keeps it
    with pytest.raises(KeySetError) as refused:
        TokenKeySet.from_files([private_key])
    message = str(refused.value)
    assert f"{private_key} holds a private key" in message
    assert "tucdesk-rendezvous keys show --pem relay-token" in message
    assert "PRIVATE" not in message


def test_a_public_key_file_is_accepted(tmp_path):
    signer = SigningIdentity.generate()
    public_key = tmp_path / "relay-token.pub"
    public_key.write_bytes(signer.public.to_pem())
    assert dict(TokenKeySet.from_files([public_key]).keys) == {signer.public.key_id: signer.public}


async def paired(relay: Relay, signer: SigningIdentity, session_id: str) -> bool:
    """Whether the relay accepts a token from ``signer`` (the first status line says so)."""
    stream = await trio.open_tcp_stream(*relay.tcp_address)
    try:
        await stream.send_all(encode_hello(make_token(signer, session_id, Side.AGENT)))
        line = b""
        with trio.fail_after(5):
            while not line.endswith(b"\n"):
                line += await stream.receive_some(1)
    finally:
        await stream.aclose()
    assert line in (b"waiting\n", b"token_invalid\n")
    return line == b"waiting\n"


def reloads(relay: Relay, result: str) -> float:
    value = relay.metrics.registry.get_sample_value(
        "tucdesk_relay_key_reloads_total", {"result": result}
    )
    return value or 0.0


@trio_test
async def test_reload_rereads_the_key_files_and_keeps_them_on_any_error(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    old, new = SigningIdentity.generate(), SigningIdentity.generate()
    key_file = tmp_path / "relay-token.pub"
    key_file.write_bytes(old.public.to_pem())
    relay = Relay(relay_config(token_key=(key_file,), pair_timeout=1.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        assert await paired(relay, old, "r-1")

        key_file.write_bytes(new.public.to_pem())
        relay.reload()
        assert await paired(relay, new, "r-2")
        assert not await paired(relay, old, "r-3")
        assert reloads(relay, "ok") == 1
        assert new.public.fingerprint in caplog.text

        for attempt, broken in enumerate((b"not a key", None, "private")):
            if broken is None:
                key_file.unlink()
            elif broken == "private":
                new.save(key_file)
            else:
                key_file.write_bytes(broken)
            relay.reload()
            assert await paired(relay, new, f"r-kept-{attempt}")
        assert reloads(relay, "failed") == 3
        assert "holds a private key" in caplog.text
        relay.shutdown()
