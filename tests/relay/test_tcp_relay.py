"""The relay over TCP, with real sockets on loopback: pairing, refusals, half-close, limits."""

from __future__ import annotations

import logging
import re
import time

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay import client as relay_client
from relay.client import connect_tcp
from relay.errors import RelayRefusedError
from relay.wire import HELLO_HEADER, HELLO_MAGIC, WIRE_VERSION, Reason, encode_hello

from .harness import RELAY_ID, make_token, running_relay, trio_test, wait_until


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


async def raw_connect(relay_address: tuple[str, int]) -> trio.SocketStream:
    return await trio.open_tcp_stream(*relay_address)


async def read_status(stream: trio.SocketStream) -> str:
    line = b""
    with trio.fail_after(5):
        while not line.endswith(b"\n"):
            data = await stream.receive_some(1)
            if not data:
                return line.decode() + "<eof>"
            line += data
    return line.decode().strip()


async def read_until_eof(stream: trio.SocketStream) -> bytes:
    received = bytearray()
    with trio.fail_after(10):
        while data := await stream.receive_some(65536):
            received += data
    return bytes(received)


async def refusal_of(relay_address: tuple[str, int], token: str) -> Reason:
    with pytest.raises(RelayRefusedError) as refused:
        await connect_tcp(*relay_address, token, pair_timeout=5)
    return refused.value.reason


async def pair(relay_address: tuple[str, int], signer: SigningIdentity, session_id: str):
    results: dict[Side, trio.SocketStream] = {}

    async def join(side: Side) -> None:
        results[side] = await connect_tcp(*relay_address, make_token(signer, session_id, side))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(join, Side.OPERATOR)
        nursery.start_soon(join, Side.AGENT)
    return results[Side.OPERATOR], results[Side.AGENT]


@trio_test
async def test_two_sides_are_paired_and_bytes_flow_both_ways(signer):
    async with running_relay(signer) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "s-1")
        await operator.send_all(b"hello agent")
        assert await agent.receive_some(100) == b"hello agent"
        await agent.send_all(b"hello operator")
        assert await operator.receive_some(100) == b"hello operator"
        assert relay.metrics.registry.get_sample_value(
            "tucdesk_relay_sessions_active", {"transport": "tcp"}
        ) == 1
        await operator.aclose()
        await agent.aclose()
        await wait_until(lambda: not relay.tcp.sessions)
        assert relay.metrics.registry.get_sample_value(
            "tucdesk_relay_bytes_forwarded_total", {"transport": "tcp"}
        ) == len(b"hello agent") + len(b"hello operator")


@trio_test
async def test_first_side_is_told_it_is_waiting_then_paired(signer):
    async with running_relay(signer) as relay:
        first = await raw_connect(relay.tcp_address)
        await first.send_all(encode_hello(make_token(signer, "s-2", Side.AGENT)))
        assert await read_status(first) == "waiting"
        second = await connect_tcp(*relay.tcp_address, make_token(signer, "s-2", Side.OPERATOR))
        assert await read_status(first) == "paired"
        await second.send_all(b"x")
        assert await first.receive_some(10) == b"x"


@trio_test
async def test_expired_token_is_refused(signer):
    async with running_relay(signer) as relay:
        token = make_token(signer, "s-3", Side.AGENT, now=time.time() - 600, lifetime=60)
        assert await refusal_of(relay.tcp_address, token) == Reason.TOKEN_EXPIRED
        assert relay.metrics.refusal_count("tcp", "token_expired") == 1


@trio_test
async def test_a_relay_clock_behind_the_rendezvous_is_named_in_the_refusal_log(signer, caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    async with running_relay(signer) as relay:
        # One such refusal a minute ago (tokens issued together prove nothing: see
        # ClockSkewEstimate), then two now.
        relay.tcp.admission.clock_skew.observe("a-minute-ago", -8.0, time.time() - 60)
        for number in range(2):
            # Issued by a rendezvous whose clock is 8 s ahead of the relay's (leeway: 5 s).
            token = make_token(signer, f"skew-{number}", Side.AGENT, now=time.time() + 8)
            assert await refusal_of(relay.tcp_address, token) == Reason.TOKEN_NOT_YET_VALID
        assert relay.metrics.refusal_count("tcp", "token_not_yet_valid") == 2
        assert relay.metrics.refusal_count("tcp", "token_expired") == 0
    lines = [r.getMessage() for r in caplog.records
             if "reason=token_not_yet_valid" in r.getMessage()]
    assert len(lines) == 2
    assert "sid='skew-0'" in lines[0]
    # iat is whole seconds: 7 to 8 s ahead.
    assert re.search(r"detail=token issued [78] s ahead of the relay's clock$", lines[0])
    assert re.search(
        r"the relay's clock may be off by about [78] s \(behind the rendezvous's\): check NTP$",
        lines[1],
    )


@trio_test
async def test_forged_token_is_refused_as_invalid(signer):
    forger = SigningIdentity.generate()
    async with running_relay(signer) as relay:
        token = make_token(forger, "s-4", Side.AGENT)
        assert await refusal_of(relay.tcp_address, token) == Reason.TOKEN_INVALID
        tampered = make_token(signer, "s-4", Side.AGENT)
        header, payload, signature = tampered.split(".")
        flipped = "AAAA" if signature[-4:] != "AAAA" else "BBBB"
        tampered = ".".join((header, payload, signature[:-4] + flipped))
        assert await refusal_of(relay.tcp_address, tampered) == Reason.TOKEN_INVALID
        assert relay.metrics.refusal_count("tcp", "token_invalid") == 2


@trio_test
async def test_token_for_another_relay_is_refused(signer):
    async with running_relay(signer) as relay:
        token = make_token(signer, "s-5", Side.AGENT, relay_id="relay-elsewhere")
        assert await refusal_of(relay.tcp_address, token) == Reason.WRONG_RELAY
        assert relay.metrics.refusal_count("tcp", "wrong_relay") == 1


@trio_test
async def test_reused_token_is_refused(signer):
    async with running_relay(signer) as relay:
        token = make_token(signer, "s-6", Side.AGENT)
        first = await raw_connect(relay.tcp_address)
        await first.send_all(encode_hello(token))
        assert await read_status(first) == "waiting"
        assert await refusal_of(relay.tcp_address, token) == Reason.TOKEN_REUSED


@trio_test
async def test_same_side_twice_is_refused(signer):
    async with running_relay(signer) as relay:
        first = await raw_connect(relay.tcp_address)
        await first.send_all(encode_hello(make_token(signer, "s-7", Side.OPERATOR)))
        assert await read_status(first) == "waiting"
        again = make_token(signer, "s-7", Side.OPERATOR)
        assert await refusal_of(relay.tcp_address, again) == Reason.SAME_SIDE
        operator, agent = await pair(relay.tcp_address, signer, "s-7b")
        third = make_token(signer, "s-7b", Side.AGENT)
        assert await refusal_of(relay.tcp_address, third) == Reason.SAME_SIDE


@trio_test
async def test_lonely_side_times_out(signer):
    async with running_relay(signer, pair_timeout=0.3) as relay:
        started = trio.current_time()
        assert await refusal_of(relay.tcp_address, make_token(signer, "s-8", Side.AGENT)) == (
            Reason.PAIR_TIMEOUT
        )
        assert trio.current_time() - started >= 0.3
        await wait_until(lambda: relay.tcp.admission.registry.waiting_count == 0)
        assert relay.metrics.refusal_count("tcp", "pair_timeout") == 1


@trio_test
async def test_data_before_pairing_is_refused(signer):
    async with running_relay(signer) as relay:
        waiting = await raw_connect(relay.tcp_address)
        await waiting.send_all(encode_hello(make_token(signer, "s-9", Side.AGENT)))
        assert await read_status(waiting) == "waiting"
        await waiting.send_all(b"too soon")
        assert await read_status(waiting) == "early_data"
        eager = await raw_connect(relay.tcp_address)
        await eager.send_all(encode_hello(make_token(signer, "s-9b", Side.AGENT)) + b"too soon")
        assert await read_status(eager) == "early_data"
        assert relay.metrics.refusal_count("tcp", "early_data") == 2
        await wait_until(lambda: relay.tcp.admission.registry.waiting_count == 0)


@trio_test
async def test_half_close_lets_the_other_direction_finish(signer):
    async with running_relay(signer) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "s-10")
        await operator.send_all(b"request")
        await operator.send_eof()
        assert await read_until_eof(agent) == b"request"
        reply = b"r" * 300_000
        await agent.send_all(reply)
        await agent.send_eof()
        assert await read_until_eof(operator) == reply
        await wait_until(lambda: not relay.tcp.sessions)
        assert relay.metrics.registry.get_sample_value(
            "tucdesk_relay_sessions_closed_total", {"transport": "tcp", "reason": "closed"}
        ) == 1


@trio_test
async def test_idle_session_is_closed(signer):
    async with running_relay(signer, idle_timeout=0.4) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "s-11")
        await operator.send_all(b"ping")
        assert await agent.receive_some(10) == b"ping"
        assert await read_until_eof(agent) == b""
        assert await read_until_eof(operator) == b""
        assert relay.metrics.registry.get_sample_value(
            "tucdesk_relay_sessions_closed_total", {"transport": "tcp", "reason": "idle_timeout"}
        ) == 1


@pytest.mark.parametrize("forwarding", ["splice", "copy"])
@pytest.mark.parametrize(("cap_option", "burst_fraction"), [("session_bandwidth", 0.25),
                                                            ("total_bandwidth", 1.0)])
@trio_test
async def test_bandwidth_caps_are_enforced(signer, forwarding, cap_option, burst_fraction):
    cap = 200_000.0
    async with running_relay(signer, forwarding=forwarding, **{cap_option: cap}) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "s-12")
        payload = b"b" * 600_000
        started = trio.current_time()

        async def send() -> None:
            await operator.send_all(payload)
            await operator.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            received = await read_until_eof(agent)
        elapsed = trio.current_time() - started
        assert received == payload
        # After the burst, the rest must take at least (size - burst - one chunk) / cap seconds.
        burst = max(cap * burst_fraction, 65536)
        assert elapsed >= (len(payload) - burst - burst) / cap
        assert elapsed < 5


@trio_test
async def test_uncapped_forwarding_moves_a_large_transfer_intact(signer):
    async with running_relay(signer) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "s-13")
        payload = bytes(range(256)) * 40_000

        async def send() -> None:
            await operator.send_all(payload)
            await operator.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            assert await read_until_eof(agent) == payload


@trio_test
async def test_oversized_hello_is_refused(signer):
    async with running_relay(signer) as relay:
        stream = await raw_connect(relay.tcp_address)
        await stream.send_all(HELLO_HEADER.pack(HELLO_MAGIC, WIRE_VERSION, 60_000))
        assert await read_status(stream) == "hello_too_large"
        assert relay.metrics.refusal_count("tcp", "hello_too_large") == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        HELLO_HEADER.pack(b"TDR9", WIRE_VERSION, 10) + b"x" * 10,
        HELLO_HEADER.pack(HELLO_MAGIC, 7, 10) + b"x" * 10,
        HELLO_HEADER.pack(HELLO_MAGIC, WIRE_VERSION, 0),
        HELLO_HEADER.pack(HELLO_MAGIC, WIRE_VERSION, 4) + b"\x00\xff\x01\x02",
    ],
)
@trio_test
async def test_garbage_hello_is_refused(signer, garbage):
    async with running_relay(signer) as relay:
        stream = await raw_connect(relay.tcp_address)
        await stream.send_all(garbage)
        assert await read_status(stream) == "bad_hello"


@trio_test
async def test_well_formed_hello_with_a_non_token_is_refused(signer):
    async with running_relay(signer) as relay:
        assert await refusal_of(relay.tcp_address, "not.a.token") == Reason.TOKEN_INVALID


@trio_test
async def test_slow_hello_times_out(signer):
    async with running_relay(signer, hello_timeout=2.0) as relay:
        stream = await raw_connect(relay.tcp_address)
        await stream.send_all(encode_hello(make_token(signer, "s-14", Side.AGENT))[:10])
        assert await read_status(stream) == "hello_timeout"
        assert relay.metrics.refusal_count("tcp", "hello_timeout") == 1


@trio_test
async def test_connections_over_the_per_address_rate_are_refused(signer, monkeypatch):
    # The client retries a rate-limited hello (tests/relay/test_client_retry*.py): here only the
    # refusal matters, so its retries are cut short.
    monkeypatch.setattr(relay_client, "MAX_RETRY_SECONDS", 0.5)
    async with running_relay(signer, rate_limit=0.001, rate_burst=2) as relay:
        for _ in range(2):
            stream = await raw_connect(relay.tcp_address)
            await stream.aclose()
        assert await refusal_of(relay.tcp_address, make_token(signer, "s-15", Side.AGENT)) == (
            Reason.RATE_LIMITED
        )


@trio_test
async def test_waiting_sides_and_sessions_are_capped(signer):
    async with running_relay(signer, max_waiting=1, max_sessions=2) as relay:
        first = await raw_connect(relay.tcp_address)
        await first.send_all(encode_hello(make_token(signer, "s-16", Side.AGENT)))
        assert await read_status(first) == "waiting"
        token = make_token(signer, "s-17", Side.AGENT)
        assert await refusal_of(relay.tcp_address, token) == Reason.TOO_MANY_WAITING
        partner = await connect_tcp(*relay.tcp_address, make_token(signer, "s-16", Side.OPERATOR))
        assert await read_status(first) == "paired"
        second = await raw_connect(relay.tcp_address)
        await second.send_all(encode_hello(make_token(signer, "s-18", Side.AGENT)))
        assert await read_status(second) == "waiting"
        token = make_token(signer, "s-19", Side.AGENT)
        assert await refusal_of(relay.tcp_address, token) == Reason.TOO_MANY_SESSIONS
        await partner.aclose()


@trio_test
async def test_graceful_shutdown_refuses_newcomers_and_lets_sessions_drain(signer):
    async with running_relay(signer, grace=5.0) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "s-20")
        lonely = await raw_connect(relay.tcp_address)
        await lonely.send_all(encode_hello(make_token(signer, "s-21", Side.AGENT)))
        assert await read_status(lonely) == "waiting"
        relay.shutdown()
        assert await read_status(lonely) == "shutting_down"
        # The paired session still works during the grace period.
        await operator.send_all(b"still here")
        assert await agent.receive_some(100) == b"still here"
        await operator.aclose()
        await agent.aclose()


@trio_test
async def test_a_newcomer_during_the_grace_period_is_refused_at_once(signer):
    async with running_relay(signer, grace=20.0) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "s-23")
        relay.shutdown()
        await wait_until(lambda: relay.tcp.admission.shutting_down)
        with trio.fail_after(2):
            token = make_token(signer, "s-24", Side.AGENT)
            assert await refusal_of(relay.tcp_address, token) == Reason.SHUTTING_DOWN
        await operator.aclose()
        await agent.aclose()


@trio_test
async def test_sessions_still_open_after_the_grace_period_are_closed(signer):
    async with running_relay(signer, grace=0.2) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "s-22")
        relay.shutdown()
        assert await read_until_eof(agent) == b""
        await wait_until(lambda: not relay.tcp.sessions)
        assert relay.metrics.registry.get_sample_value(
            "tucdesk_relay_sessions_closed_total", {"transport": "tcp", "reason": "shutting_down"}
        ) == 1


def test_relay_id_in_harness_is_the_audience():
    assert RELAY_ID == "relay-test"
