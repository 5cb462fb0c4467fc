"""The relay over UDP on loopback: pairing, forwarding, refusals, and authenticated rebinding."""

from __future__ import annotations

import socket

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side, read_own_relay_token
from relay.client import UdpRelaySession, connect_udp
from relay.datagram import (
    DATA,
    REBIND,
    STATUS,
    encode_credential_proof,
    encode_udp_hello,
    parse_status_datagram,
)
from relay.errors import RelayRefusedError
from relay.wire import Reason

from .harness import make_token, running_relay, trio_test, wait_until


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


async def udp_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock


async def pair_udp(relay, signer, session_id) -> tuple[UdpRelaySession, UdpRelaySession]:
    results: dict[Side, UdpRelaySession] = {}

    async def join(side: Side) -> None:
        results[side] = await connect_udp(
            *relay.udp_address, make_token(signer, session_id, side), local_host="127.0.0.1"
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(join, Side.OPERATOR)
        nursery.start_soon(join, Side.AGENT)
    return results[Side.OPERATOR], results[Side.AGENT]


async def next_status(sock: trio.socket.SocketType) -> Reason:
    with trio.fail_after(5):
        while True:
            data, _ = await sock.recvfrom(65536)
            if data[:1] == bytes([STATUS]):
                return parse_status_datagram(data)


async def nothing_arrives(sock: trio.socket.SocketType, within: float = 0.3) -> bool:
    with trio.move_on_after(within):
        await sock.recvfrom(65536)
        return False
    return True


@trio_test
async def test_udp_sides_are_paired_and_datagrams_flow_both_ways(signer):
    async with running_relay(signer) as relay:
        operator, agent = await pair_udp(relay, signer, "u-1")
        await operator.send(b"to agent")
        with trio.fail_after(5):
            assert await agent.receive() == b"to agent"
        await agent.send(b"to operator")
        with trio.fail_after(5):
            assert await operator.receive() == b"to operator"
        await operator.close()
        await wait_until(lambda: not relay.udp.by_session)
        assert relay.metrics.registry.get_sample_value(
            "tucdesk_relay_sessions_closed_total", {"transport": "udp", "reason": "closed"}
        ) == 1
        with trio.fail_after(5), pytest.raises(RelayRefusedError):
            await agent.receive()


@trio_test
async def test_udp_resent_hello_is_not_a_reuse_but_a_new_address_with_it_is(signer):
    async with running_relay(signer) as relay:
        token = make_token(signer, "u-2", Side.AGENT)
        first = await udp_socket()
        await first.sendto(encode_udp_hello(token), relay.udp_address)
        assert await next_status(first) == Reason.WAITING
        await first.sendto(encode_udp_hello(token), relay.udp_address)
        assert await next_status(first) == Reason.WAITING
        other = await udp_socket()
        await other.sendto(encode_udp_hello(token), relay.udp_address)
        assert await next_status(other) == Reason.TOKEN_REUSED


@pytest.mark.parametrize(
    ("token_kind", "reason"),
    [("forged", Reason.TOKEN_INVALID), ("other_relay", Reason.WRONG_RELAY),
     ("expired", Reason.TOKEN_EXPIRED)],
)
@trio_test
async def test_udp_bad_tokens_are_refused(signer, token_kind, reason):
    async with running_relay(signer) as relay:
        if token_kind == "forged":
            token = make_token(SigningIdentity.generate(), "u-3", Side.AGENT)
        elif token_kind == "other_relay":
            token = make_token(signer, "u-3", Side.AGENT, relay_id="another-relay")
        else:
            token = make_token(signer, "u-3", Side.AGENT, now=1_000_000, lifetime=60)
        with pytest.raises(RelayRefusedError) as refused:
            await connect_udp(*relay.udp_address, token, local_host="127.0.0.1")
        assert refused.value.reason == reason
        assert relay.metrics.refusal_count("udp", reason.value) == 1


@trio_test
async def test_udp_same_side_twice_is_refused(signer):
    async with running_relay(signer) as relay:
        first = await udp_socket()
        await first.sendto(
            encode_udp_hello(make_token(signer, "u-4", Side.AGENT)), relay.udp_address
        )
        assert await next_status(first) == Reason.WAITING
        with pytest.raises(RelayRefusedError) as refused:
            await connect_udp(
                *relay.udp_address, make_token(signer, "u-4", Side.AGENT), local_host="127.0.0.1"
            )
        assert refused.value.reason == Reason.SAME_SIDE


@trio_test
async def test_udp_lonely_side_times_out(signer):
    async with running_relay(signer, pair_timeout=0.3) as relay:
        with pytest.raises(RelayRefusedError) as refused:
            await connect_udp(
                *relay.udp_address, make_token(signer, "u-5", Side.AGENT), local_host="127.0.0.1"
            )
        assert refused.value.reason == Reason.PAIR_TIMEOUT
        assert not relay.udp.by_session and not relay.udp.by_address


@trio_test
async def test_udp_data_before_pairing_is_refused(signer):
    async with running_relay(signer) as relay:
        sock = await udp_socket()
        hello = encode_udp_hello(make_token(signer, "u-6", Side.AGENT))
        await sock.sendto(hello, relay.udp_address)
        assert await next_status(sock) == Reason.WAITING
        await sock.sendto(bytes([DATA]) + b"too soon", relay.udp_address)
        assert await next_status(sock) == Reason.EARLY_DATA
        assert not relay.udp.by_session


@trio_test
async def test_udp_data_from_an_unknown_address_is_dropped_not_learned(signer):
    async with running_relay(signer) as relay:
        operator, agent = await pair_udp(relay, signer, "u-7")
        stranger = await udp_socket()
        await stranger.sendto(bytes([DATA]) + b"spoof", relay.udp_address)
        await agent.send(b"for the operator")
        with trio.fail_after(5):
            assert await operator.receive() == b"for the operator"
        assert await nothing_arrives(stranger)
        assert relay.metrics.registry.get_sample_value(
            "tucdesk_relay_datagrams_dropped_total", {"reason": "unknown_source"}
        ) == 1


@trio_test
async def test_udp_rebinding_is_accepted_only_with_the_credential(signer):
    async with running_relay(signer) as relay:
        operator_token = make_token(signer, "u-8", Side.OPERATOR)
        agent_token = make_token(signer, "u-8", Side.AGENT)
        async with trio.open_nursery() as nursery:
            sessions: dict[str, UdpRelaySession] = {}

            async def join(name: str, token: str) -> None:
                sessions[name] = await connect_udp(
                    *relay.udp_address, token, local_host="127.0.0.1"
                )

            nursery.start_soon(join, "operator", operator_token)
            nursery.start_soon(join, "agent", agent_token)
        operator, agent = sessions["operator"], sessions["agent"]
        own = read_own_relay_token(operator_token)

        # An attacker at a new address: a proof with the wrong key, then a replayed counter.
        attacker = await udp_socket()
        wrong_key = encode_credential_proof(
            REBIND, b"\x00" * 32, session_id="u-8", side=Side.OPERATOR, counter=100
        )
        await attacker.sendto(wrong_key, relay.udp_address)
        await agent.send(b"one")
        with trio.fail_after(5):
            assert await operator.receive() == b"one"
        assert await nothing_arrives(attacker)

        # The real operator moves to a new socket and proves it.
        new_socket = await udp_socket()
        await operator.rebind(new_socket)
        assert operator.local_address == new_socket.getsockname()
        await agent.send(b"two")
        with trio.fail_after(5):
            assert await operator.receive() == b"two"
        await operator.send(b"three")
        with trio.fail_after(5):
            assert await agent.receive() == b"three"

        # Replaying an old, genuine proof (counter 1) from elsewhere is refused as stale.
        replay = encode_credential_proof(
            REBIND, own.udp_credential, session_id="u-8", side=Side.OPERATOR, counter=1
        )
        await attacker.sendto(replay, relay.udp_address)
        await agent.send(b"four")
        with trio.fail_after(5):
            assert await operator.receive() == b"four"
        assert await nothing_arrives(attacker)
        sample = relay.metrics.registry.get_sample_value
        assert sample("tucdesk_relay_datagrams_dropped_total", {"reason": "bad_credential"}) == 1
        assert sample("tucdesk_relay_datagrams_dropped_total", {"reason": "stale_counter"}) == 1


@trio_test
async def test_udp_idle_session_is_closed(signer):
    async with running_relay(signer, idle_timeout=0.3) as relay:
        operator, agent = await pair_udp(relay, signer, "u-9")
        with trio.fail_after(5), pytest.raises(RelayRefusedError) as ended:
            await agent.receive()
        assert ended.value.reason == Reason.IDLE_TIMEOUT
        assert not relay.udp.by_session


@pytest.mark.parametrize("garbage", [b"", b"\x01", b"\x01\xff\xff" + b"x" * 10, b"\x07junk"])
@trio_test
async def test_udp_garbage_never_creates_state(signer, garbage):
    async with running_relay(signer) as relay:
        sock = await udp_socket()
        await sock.sendto(garbage, relay.udp_address)
        await sock.sendto(b"\x01" + (5000).to_bytes(2, "big") + b"x" * 5000, relay.udp_address)
        while (status := await next_status(sock)) != Reason.HELLO_TOO_LARGE:
            assert status == Reason.BAD_HELLO
        assert not relay.udp.by_address and not relay.udp.by_session


@trio_test
async def test_udp_status_replies_never_amplify(signer):
    async with running_relay(signer) as relay:
        sock = await udp_socket()
        await sock.sendto(b"\x01\x00", relay.udp_address)  # 2 bytes: a reply would be larger
        assert await nothing_arrives(sock)
        assert relay.metrics.refusal_count("udp", "bad_hello") == 1


@trio_test
async def test_udp_newcomer_during_the_grace_period_is_refused_at_once(signer):
    async with running_relay(signer, grace=20.0) as relay:
        operator, agent = await pair_udp(relay, signer, "u-90")
        relay.shutdown()
        await wait_until(lambda: relay.udp.admission.shutting_down)
        with trio.fail_after(2), pytest.raises(RelayRefusedError) as refused:
            await connect_udp(
                *relay.udp_address, make_token(signer, "u-91", Side.AGENT), local_host="127.0.0.1"
            )
        assert refused.value.reason == Reason.SHUTTING_DOWN
        # The paired session still forwards during the grace period.
        await operator.send(b"draining")
        with trio.fail_after(2):
            assert await agent.receive() == b"draining"
        await operator.close()
