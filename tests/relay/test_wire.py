"""The relay's wire formats (TCP hello, status lines, UDP datagrams): round trips and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.relay_token import Side
from relay.datagram import (
    CLOSE,
    REBIND,
    encode_credential_proof,
    encode_status_datagram,
    encode_udp_hello,
    parse_credential_proof,
    parse_status_datagram,
    parse_udp_hello,
)
from relay.errors import HelloError
from relay.wire import (
    MAX_HELLO_TOKEN_SIZE,
    Reason,
    encode_hello,
    encode_status,
    parse_hello,
    parse_status,
)

tokens = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
    max_size=MAX_HELLO_TOKEN_SIZE,
)


@settings(max_examples=100)
@given(tokens)
def test_hello_round_trips(token):
    assert parse_hello(encode_hello(token)) == token
    assert parse_udp_hello(encode_udp_hello(token)) == token


@settings(max_examples=300)
@given(st.binary(max_size=MAX_HELLO_TOKEN_SIZE + 64))
def test_arbitrary_bytes_parse_or_fail_with_a_reason(data):
    for parser in (parse_hello, parse_udp_hello, parse_status, parse_status_datagram,
                   parse_credential_proof):
        try:
            parser(data)
        except HelloError as error:
            assert error.reason in (Reason.BAD_HELLO, Reason.HELLO_TOO_LARGE)


def test_token_too_large_for_a_hello_is_refused_before_sending():
    with pytest.raises(HelloError) as refused:
        encode_hello("x" * (MAX_HELLO_TOKEN_SIZE + 1))
    assert refused.value.reason == Reason.HELLO_TOO_LARGE


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_round_trips_as_a_status(reason):
    assert parse_status(encode_status(reason)) == reason
    assert parse_status_datagram(encode_status_datagram(reason)) == reason


@settings(max_examples=100)
@given(
    kind=st.sampled_from([REBIND, CLOSE]),
    session_id=st.text(min_size=1, max_size=40),
    side=st.sampled_from(list(Side)),
    counter=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_credential_proof_round_trips(kind, session_id, side, counter):
    proof = parse_credential_proof(
        encode_credential_proof(kind, b"k" * 32, session_id=session_id, side=side, counter=counter)
    )
    assert (proof.kind, proof.session_id, proof.side, proof.counter) == (
        kind, session_id, side, counter
    )
    assert len(proof.mac) == 16
