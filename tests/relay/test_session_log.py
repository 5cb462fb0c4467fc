"""What the relay logs about a session: ids, sides, counts, duration, reason; never content."""

from __future__ import annotations

import logging

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp, connect_udp
from relay.session_log import (
    blur_byte_count,
    blur_duration,
    session_end_line,
    session_paired_line,
    shown_peer,
)

from .harness import make_token, running_relay, trio_test, wait_until


def test_blurring_rounds_counts_up_to_powers_of_two_and_durations_to_ten_seconds():
    assert [blur_byte_count(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [
        0, 1, 2, 4, 1024, 1024, 2048,
    ]
    assert [blur_duration(s) for s in (0, 0.1, 10, 10.5)] == [0, 10, 10, 20]
    line = session_end_line(
        transport="tcp", session_id="s", bytes_from_operator=1000, bytes_from_agent=5,
        duration=3.2, reason="closed", blur=True,
    )
    assert "bytes_from_operator=1024 bytes_from_agent=8 duration_s=10" in line


@trio_test
async def test_session_log_has_counts_and_reason_but_no_payload_or_token(caplog):
    signer = SigningIdentity.generate()
    caplog.set_level(logging.DEBUG, logger="tucdesk.relay")
    tokens = {side: make_token(signer, "log-1", side) for side in Side}
    async with running_relay(signer, blur_logs=False) as relay:
        streams = {}

        async def join(side: Side) -> None:
            streams[side] = await connect_tcp(*relay.tcp_address, tokens[side])

        async with trio.open_nursery() as nursery:
            for side in Side:
                nursery.start_soon(join, side)
        await streams[Side.OPERATOR].send_all(b"SECRET-KEYSTROKES")
        assert await streams[Side.AGENT].receive_some(100) == b"SECRET-KEYSTROKES"
        for stream in streams.values():
            await stream.aclose()
        await wait_until(lambda: not relay.tcp.sessions)
    text = caplog.text
    assert "session_closed transport=tcp sid='log-1'" in text
    assert "bytes_from_operator=17 bytes_from_agent=0" in text
    assert "SECRET-KEYSTROKES" not in text
    for token in tokens.values():
        assert token not in text and token.split(".")[2] not in text


def test_blurred_peer_addresses_keep_only_their_network():
    peers = {"operator": ("192.0.2.77", 51000), "agent": ("2001:db8:7:8::1", 443, 0, 0)}
    line = session_end_line(
        transport="tcp", session_id="s", bytes_from_operator=1, bytes_from_agent=1,
        duration=1.0, reason="closed", blur=True, peers=peers,
    )
    assert line.endswith("operator_peer=192.0.2.0/24 agent_peer=2001:db8:7::/48")
    assert "51000" not in line
    clear = session_paired_line(transport="udp", session_id="s", peers=peers, blur=False)
    assert clear == (
        "session_paired transport=udp sid='s' operator_peer=192.0.2.77:51000 "
        "agent_peer=[2001:db8:7:8::1]:443"
    )
    assert shown_peer(("::ffff:198.51.100.9", 1), blur=True) == "198.51.100.0/24"
    assert shown_peer(None, blur=False) == "unknown"


@pytest.mark.parametrize("blur", [False, True])
@trio_test
async def test_pairing_and_closing_log_both_sides_addresses(caplog, blur):
    signer = SigningIdentity.generate()
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    async with running_relay(signer, blur_logs=blur) as relay:
        streams = {}

        async def join(side: Side) -> None:
            streams[side] = await connect_tcp(*relay.tcp_address, make_token(signer, "peers", side))

        async with trio.open_nursery() as nursery:
            for side in Side:
                nursery.start_soon(join, side)
        ports = {side: stream.socket.getsockname()[1] for side, stream in streams.items()}
        for stream in streams.values():
            await stream.aclose()
        await wait_until(lambda: not relay.tcp.sessions)
    messages = [record.getMessage() for record in caplog.records]
    paired = next(m for m in messages if m.startswith("session_paired"))
    closed = next(m for m in messages if m.startswith("session_closed"))
    if blur:
        expected = " operator_peer=127.0.0.0/24 agent_peer=127.0.0.0/24"
    else:
        expected = (f" operator_peer=127.0.0.1:{ports[Side.OPERATOR]} "
                    f"agent_peer=127.0.0.1:{ports[Side.AGENT]}")
    assert paired == "session_paired transport=tcp sid='peers'" + expected
    assert closed.endswith(expected)


@trio_test
async def test_udp_pairing_and_closing_log_both_sides_addresses(caplog):
    signer = SigningIdentity.generate()
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    async with running_relay(signer, blur_logs=False) as relay:
        sessions = {}

        async def join(side: Side) -> None:
            sessions[side] = await connect_udp(
                *relay.udp_address, make_token(signer, "udp-peers", side), local_host="127.0.0.1"
            )

        async with trio.open_nursery() as nursery:
            for side in Side:
                nursery.start_soon(join, side)
        ports = {side: session.local_address[1] for side, session in sessions.items()}
        await sessions[Side.OPERATOR].close()
        await wait_until(lambda: not relay.udp.busy)
    expected = (f" operator_peer=127.0.0.1:{ports[Side.OPERATOR]} "
                f"agent_peer=127.0.0.1:{ports[Side.AGENT]}")
    messages = [record.getMessage() for record in caplog.records]
    assert "session_paired transport=udp sid='udp-peers'" + expected in messages
    assert any(m.startswith("session_closed transport=udp") and m.endswith(expected)
               for m in messages)
