"""End to end through the relay: endpoints seal with protocol/ frames, the relay sees ciphertext.

Both endpoints run an X25519 exchange over the relay, derive session keys with
protocol.session_keys, and seal a plaintext marker with protocol.frames. Everything the relay
forwarded is captured where it arrives (at the receiving sockets); the marker must be absent
from that capture and present in what each endpoint opens.
"""

from __future__ import annotations

import hashlib
import time

import pytest
import trio

from protocol.frames import FrameType, ReceiveMode, SecureChannel
from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from protocol.session_keys import EphemeralKey, Role, derive_session_keys, session_id_bytes
from protocol.stream_framing import StreamDecoder, encode_stream_frame
from relay.client import connect_tcp, connect_udp

from .harness import make_token, running_relay, trio_test

MARKERS = {
    Role.OPERATOR: b"PLAINTEXT-MARKER-typed-by-the-operator: rm -rf /tmp/x",
    Role.AGENT: b"PLAINTEXT-MARKER-printed-by-the-agent: uid=0(root)",
}
SENT_TYPE = {Role.OPERATOR: FrameType.DATA, Role.AGENT: FrameType.STDOUT}


def session_keys_for(role: Role, own: EphemeralKey, peer_public: bytes, session_id: str):
    operator_public, agent_public = (
        (own.public, peer_public) if role is Role.OPERATOR else (peer_public, own.public)
    )
    transcript = hashlib.sha256(b"test-transcript" + operator_public + agent_public).digest()
    return derive_session_keys(
        own.shared_secret(peer_public), transcript, session_id_bytes(session_id)
    )


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


@trio_test
async def test_tcp_relay_forwards_only_ciphertext_that_both_endpoints_open(signer):
    session_id = "e2e-tcp"
    captured = bytearray()
    opened: dict[Role, bytes] = {}
    async with running_relay(signer) as relay:

        async def endpoint(role: Role, side: Side) -> None:
            stream = await connect_tcp(*relay.tcp_address, make_token(signer, session_id, side))
            ephemeral = EphemeralKey()
            await stream.send_all(ephemeral.public)
            peer_public = b""
            while len(peer_public) < 32:
                data = await stream.receive_some(32 - len(peer_public))
                captured.extend(data)
                peer_public += data
            channel = SecureChannel(
                session_keys_for(role, ephemeral, peer_public, session_id), role, time.time(),
                ReceiveMode.STREAM,
            )
            sealed = channel.seal(SENT_TYPE[role], MARKERS[role], time.time())
            await stream.send_all(encode_stream_frame(sealed))
            decoder = StreamDecoder()
            frames: list[bytes] = []
            while not frames:
                data = await stream.receive_some(65536)
                assert data, "relay closed before a frame arrived"
                captured.extend(data)
                frames = decoder.feed(data)
            opened[role] = channel.open(frames[0], time.time()).payload
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(endpoint, Role.OPERATOR, Side.OPERATOR)
            nursery.start_soon(endpoint, Role.AGENT, Side.AGENT)

    assert opened == {Role.OPERATOR: MARKERS[Role.AGENT], Role.AGENT: MARKERS[Role.OPERATOR]}
    assert len(captured) > 64
    for marker in MARKERS.values():
        assert marker not in captured
        assert b"PLAINTEXT-MARKER" not in captured


@trio_test
async def test_udp_relay_forwards_only_ciphertext_that_both_endpoints_open(signer):
    session_id = "e2e-udp"
    captured = bytearray()
    opened: dict[Role, bytes] = {}
    async with running_relay(signer) as relay:

        async def endpoint(role: Role, side: Side) -> None:
            channel_session = await connect_udp(
                *relay.udp_address, make_token(signer, session_id, side), local_host="127.0.0.1"
            )
            ephemeral = EphemeralKey()
            # Datagrams may be lost: resend our key until the peer's key and frame arrive.
            peer_public: bytes | None = None
            channel: SecureChannel | None = None
            sealed = b""
            with trio.fail_after(10):
                while role not in opened:
                    await channel_session.send(b"K" + ephemeral.public)
                    if channel is not None:
                        await channel_session.send(b"F" + sealed)
                    with trio.move_on_after(0.2):
                        while True:
                            datagram = await channel_session.receive()
                            captured.extend(datagram)
                            if datagram[:1] == b"K" and peer_public is None:
                                peer_public = datagram[1:]
                                channel = SecureChannel(
                                    session_keys_for(role, ephemeral, peer_public, session_id),
                                    role, time.time(), ReceiveMode.DATAGRAM,
                                )
                                sealed = channel.seal(SENT_TYPE[role], MARKERS[role], time.time())
                                await channel_session.send(b"F" + sealed)
                            elif datagram[:1] == b"F" and channel is not None:
                                opened[role] = channel.open(datagram[1:], time.time()).payload
                                break
                # Keep answering briefly so the peer gets our frame too.
                with trio.move_on_after(0.5):
                    while True:
                        await channel_session.send(b"F" + sealed)
                        await trio.sleep(0.05)
            await channel_session.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(endpoint, Role.OPERATOR, Side.OPERATOR)
            nursery.start_soon(endpoint, Role.AGENT, Side.AGENT)

    assert opened == {Role.OPERATOR: MARKERS[Role.AGENT], Role.AGENT: MARKERS[Role.OPERATOR]}
    assert b"PLAINTEXT-MARKER" not in captured
