"""What the relay logs about a session: ids, sides, counts, duration, reason; never content."""

from __future__ import annotations

import logging

import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp
from relay.session_log import blur_byte_count, blur_duration, session_end_line

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
