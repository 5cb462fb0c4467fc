"""The session handshake between the operator and agent state machines, in memory, and every way
it must fail."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import handshake_messages as wire
from protocol.domains import Purpose
from protocol.errors import HandshakeError, TokenError
from protocol.frames import FrameType
from protocol.handshake import (
    AgentHandshake,
    HandshakeRefused,
    OperatorHandshake,
    RefusalCode,
    pin_agent_key,
)
from protocol.identity import PublicIdentity, SigningIdentity

AGENT = SigningIdentity.from_seed(bytes(range(32)))
OPERATOR = SigningIdentity.from_seed(bytes(range(32, 64)))
OTHER = SigningIdentity.from_seed(bytes(range(64, 96)))
SESSION_ID = "sess-0b6c6f1e-5d4e-4b0a-9a51-3c1f0e2a7d11"
GRANT = "eyJhbGciOiJFZERTQSJ9.eyJzaWQiOiJzZXNzLTEifQ.c2lnbmF0dXJl"
DEADLINE = 100.0
LOW_ORDER_POINT = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


@dataclass
class GrantRecorder:
    """A grant check that records what it saw and refuses with a fixed reason if given one."""

    refusal: str | None = None
    seen: list[tuple[str | bytes, PublicIdentity]] = field(default_factory=list)

    def __call__(self, grant: str | bytes, operator: PublicIdentity) -> str | None:
        self.seen.append((grant, operator))
        return self.refusal


def make_pair(
    *,
    pinned: PublicIdentity = AGENT.public,
    check_grant: GrantRecorder | None = None,
    agent_session: str = SESSION_ID,
    grant: str | bytes = GRANT,
) -> tuple[OperatorHandshake, AgentHandshake]:
    operator = OperatorHandshake(OPERATOR, SESSION_ID, grant, pin_agent_key(pinned), DEADLINE)
    agent = AgentHandshake(AGENT, agent_session, check_grant or GrantRecorder(), DEADLINE)
    return operator, agent


def run(operator: OperatorHandshake, agent: AgentHandshake, now: float = 1.0) -> list[bytes]:
    """Run a full handshake; return the four messages."""
    m1 = operator.start(now)
    m2 = agent.receive(m1, now)
    m3 = operator.receive(m2, now)
    assert m3 is not None
    m4 = agent.receive(m3, now)
    assert operator.receive(m4, now) is None
    return [m1, m2, m3, m4]


def test_full_handshake_gives_both_sides_the_same_keys_and_each_others_identity() -> None:
    recorder = GrantRecorder()
    operator, agent = make_pair(check_grant=recorder)
    run(operator, agent)
    assert operator.is_complete and agent.is_complete
    assert operator.session_keys == agent.session_keys
    assert operator.session_keys.session_id == SESSION_ID.encode()
    assert operator.peer_identity == AGENT.public
    assert agent.peer_identity == OPERATOR.public
    assert agent.grant == GRANT
    assert recorder.seen == [(GRANT, OPERATOR.public)]


def test_completed_handshake_channels_carry_frames_both_ways() -> None:
    operator, agent = make_pair()
    run(operator, agent)
    operator_channel, agent_channel = operator.channel(1.0), agent.channel(1.0)
    assert (
        agent_channel.open(operator_channel.seal(FrameType.DATA, b"ls\n", 1.0), 1.0).payload
        == b"ls\n"
    )
    frame = agent_channel.seal(FrameType.STDOUT, b"README\n", 1.0)
    assert operator_channel.open(frame, 1.0).payload == b"README\n"


def test_observer_of_the_handshake_sees_neither_grant_nor_identities() -> None:
    """The relay carries these messages: the grant names the command, so it must stay sealed."""
    messages = b"".join(run(*make_pair()))
    for secret in (GRANT.encode(), AGENT.public.raw, OPERATOR.public.raw):
        assert secret not in messages


def test_message_after_completion_is_refused_without_ending_the_session() -> None:
    operator, agent = make_pair()
    messages = run(operator, agent)
    with pytest.raises(HandshakeError, match="already complete"):
        agent.receive(messages[2], 1.0)
    with pytest.raises(HandshakeError, match="already complete"):
        operator.receive(messages[3], 1.0)
    assert agent.session_keys == operator.session_keys


def test_two_handshakes_derive_different_keys() -> None:
    first, second = make_pair(), make_pair()
    run(*first)
    run(*second)
    assert first[0].session_keys.operator_to_agent != second[0].session_keys.operator_to_agent


def test_binary_grant_reaches_the_grant_check_as_bytes() -> None:
    recorder = GrantRecorder()
    operator, agent = make_pair(check_grant=recorder, grant=b"\x00opaque-grant")
    run(operator, agent)
    assert recorder.seen == [(b"\x00opaque-grant", OPERATOR.public)]


def test_session_keys_are_not_available_before_completion() -> None:
    operator, agent = make_pair()
    operator.start(1.0)
    with pytest.raises(HandshakeError, match="not completed"):
        _ = operator.session_keys
    with pytest.raises(HandshakeError, match="not completed"):
        agent.channel(1.0)


def test_session_keys_never_appear_in_repr() -> None:
    operator, agent = make_pair()
    run(operator, agent)
    keys = operator.session_keys
    text = repr(keys) + str(keys)
    for secret in (keys.operator_to_agent, keys.agent_to_operator, keys.confirmation):
        assert secret.hex() not in text and repr(secret) not in text


def test_wrong_pinned_agent_key_fails_on_the_operator() -> None:
    operator, agent = make_pair(pinned=OTHER.public)
    m2 = agent.receive(operator.start(1.0), 1.0)
    with pytest.raises(HandshakeError, match="pinned") as refused:
        operator.receive(m2, 1.0)
    assert AGENT.public.fingerprint in str(refused.value)
    assert not operator.is_complete


class Impostor:
    """Claims someone else's public key but can only sign with its own private key."""

    def __init__(self, claimed: PublicIdentity, real: SigningIdentity) -> None:
        self.public = claimed
        self._real = real

    def sign(self, purpose: Purpose, message: bytes) -> bytes:
        return self._real.sign(purpose, message)


def test_agent_impostor_without_the_private_key_fails_on_the_operator() -> None:
    operator = OperatorHandshake(OPERATOR, SESSION_ID, GRANT, pin_agent_key(AGENT.public), DEADLINE)
    impostor = AgentHandshake(Impostor(AGENT.public, OTHER), SESSION_ID, GrantRecorder(), DEADLINE)  # type: ignore[arg-type]
    m2 = impostor.receive(operator.start(1.0), 1.0)
    with pytest.raises(HandshakeError, match="signature does not verify"):
        operator.receive(m2, 1.0)


def test_operator_impostor_without_the_private_key_is_refused_and_told_so() -> None:
    recorder = GrantRecorder()
    impostor = OperatorHandshake(
        Impostor(OPERATOR.public, OTHER),  # type: ignore[arg-type]
        SESSION_ID,
        GRANT,
        pin_agent_key(AGENT.public),
        DEADLINE,
    )
    agent = AgentHandshake(AGENT, SESSION_ID, recorder, DEADLINE)
    m3 = impostor.receive(agent.receive(impostor.start(1.0), 1.0), 1.0)
    assert m3 is not None
    with pytest.raises(HandshakeRefused) as on_agent:
        agent.receive(m3, 1.0)
    assert on_agent.value.code == RefusalCode.OPERATOR_AUTHENTICATION_FAILED
    assert recorder.seen == []  # the grant is never even looked at
    assert on_agent.value.reply is not None
    with pytest.raises(HandshakeRefused, match="operator-authentication-failed"):
        impostor.receive(on_agent.value.reply, 1.0)


def test_agent_key_check_may_raise_a_protocol_error() -> None:
    def refuse(presented: PublicIdentity) -> str | None:
        raise TokenError("agent is not in known_hosts")

    operator = OperatorHandshake(OPERATOR, SESSION_ID, GRANT, refuse, DEADLINE)
    agent = AgentHandshake(AGENT, SESSION_ID, GrantRecorder(), DEADLINE)
    m2 = agent.receive(operator.start(1.0), 1.0)
    with pytest.raises(HandshakeError, match="known_hosts"):
        operator.receive(m2, 1.0)


def test_grant_refused_by_the_callback_shows_the_reason_to_the_operator() -> None:
    operator, agent = make_pair(check_grant=GrantRecorder(refusal="grant expired"))
    m3 = operator.receive(agent.receive(operator.start(1.0), 1.0), 1.0)
    assert m3 is not None
    with pytest.raises(HandshakeRefused) as on_agent:
        agent.receive(m3, 1.0)
    assert on_agent.value.code == RefusalCode.GRANT_REFUSED
    assert on_agent.value.reply is not None
    with pytest.raises(HandshakeRefused, match="grant expired") as on_operator:
        operator.receive(on_agent.value.reply, 1.0)
    assert on_operator.value.code == "grant-refused"
    assert on_operator.value.reason == "grant expired"
    assert not operator.is_complete and not agent.is_complete


def test_grant_check_raising_a_token_error_refuses_with_its_message() -> None:
    def check(grant: str | bytes, operator: PublicIdentity) -> str | None:
        raise TokenError("token has expired")

    operator = OperatorHandshake(OPERATOR, SESSION_ID, GRANT, pin_agent_key(AGENT.public), DEADLINE)
    agent = AgentHandshake(AGENT, SESSION_ID, check, DEADLINE)
    m3 = operator.receive(agent.receive(operator.start(1.0), 1.0), 1.0)
    assert m3 is not None
    with pytest.raises(HandshakeRefused) as on_agent:
        agent.receive(m3, 1.0)
    assert on_agent.value.reply is not None
    with pytest.raises(HandshakeRefused, match="token has expired"):
        operator.receive(on_agent.value.reply, 1.0)


def test_refusal_reason_is_stripped_of_terminal_control_characters() -> None:
    operator, agent = make_pair(check_grant=GrantRecorder(refusal="bad\x1b[2Jgrant\n"))
    m3 = operator.receive(agent.receive(operator.start(1.0), 1.0), 1.0)
    assert m3 is not None
    with pytest.raises(HandshakeRefused) as on_agent:
        agent.receive(m3, 1.0)
    assert on_agent.value.reply is not None
    with pytest.raises(HandshakeRefused) as on_operator:
        operator.receive(on_agent.value.reply, 1.0)
    assert on_operator.value.reason == "bad?[2Jgrant?"


def test_operator_hello_for_another_session_is_refused() -> None:
    operator, agent = make_pair(agent_session="sess-other")
    with pytest.raises(HandshakeError, match="different session"):
        agent.receive(operator.start(1.0), 1.0)


def test_unsupported_handshake_version_is_refused() -> None:
    hello = wire.encode_operator_hello(
        wire.OperatorHello(2, SESSION_ID.encode(), bytes([9]) + bytes(31), bytes(32))
    )
    _, agent = make_pair()
    with pytest.raises(HandshakeError, match="version 2"):
        agent.receive(hello, 1.0)


@pytest.mark.parametrize("message_index", [0, 1, 2, 3])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tampered_transcript_fails_the_handshake(message_index: int, data: st.DataObject) -> None:
    """Any single bit flipped in any handshake message stops both sides from completing."""
    operator, agent = make_pair()
    messages: list[bytes] = []

    def deliver(message: bytes) -> bytes:
        if len(messages) == message_index:
            bit = data.draw(st.integers(0, len(message) * 8 - 1), label="bit")
            tampered = bytearray(message)
            tampered[bit // 8] ^= 1 << (bit % 8)
            message = bytes(tampered)
        messages.append(message)
        return message

    with pytest.raises(HandshakeError):
        m2 = agent.receive(deliver(operator.start(1.0)), 1.0)
        m3 = operator.receive(deliver(m2), 1.0)
        assert m3 is not None
        try:
            m4 = agent.receive(deliver(m3), 1.0)
        except HandshakeRefused as refused:
            assert refused.reply is not None
            m4 = refused.reply
        operator.receive(deliver(m4), 1.0)
    assert not operator.is_complete


def test_changed_random_in_the_hello_fails_key_confirmation() -> None:
    """A man in the middle rewrites a field of message 1 into another valid message."""
    operator, agent = make_pair()
    fields = msgpack.unpackb(operator.start(1.0))
    fields["r"] = bytes(32)
    m2 = agent.receive(msgpack.packb(fields), 1.0)
    with pytest.raises(HandshakeError, match="key confirmation failed"):
        operator.receive(m2, 1.0)


def test_accepted_result_with_the_wrong_session_key_confirmation_fails() -> None:
    """An agent that derived different session keys (simulated: it seals a wrong tag)."""
    operator, agent = make_pair()
    m3 = operator.receive(agent.receive(operator.start(1.0), 1.0), 1.0)
    assert m3 is not None
    agent.receive(m3, 1.0)
    wrong = agent._seal_result(wire.Accepted(bytes(wire.CONFIRMATION_TAG_SIZE)))
    with pytest.raises(HandshakeError, match="different session keys"):
        operator.receive(wrong, 1.0)
    assert not operator.is_complete


@pytest.mark.parametrize("replayed", [1, 2, 3])
def test_replayed_handshake_message_from_an_earlier_handshake_is_refused(replayed: int) -> None:
    earlier = run(*make_pair())
    operator, agent = make_pair()
    m1 = operator.start(2.0)
    with pytest.raises(HandshakeError):
        m2 = earlier[1] if replayed == 1 else agent.receive(m1, 2.0)
        m3 = operator.receive(m2, 2.0)
        assert m3 is not None
        m4 = agent.receive(earlier[2] if replayed == 2 else m3, 2.0)
        operator.receive(earlier[3] if replayed == 3 else m4, 2.0)
    assert not operator.is_complete
    # A replayed result only comes after the agent accepted a genuine message 3.
    assert agent.is_complete == (replayed == 3)


def test_replayed_hello_and_authentication_do_not_get_an_attacker_a_session() -> None:
    earlier = run(*make_pair())
    _, agent = make_pair()
    agent.receive(earlier[0], 2.0)  # the agent cannot tell a replayed hello from a fresh one...
    with pytest.raises(HandshakeRefused, match="key confirmation failed"):
        agent.receive(earlier[2], 2.0)  # ...but the old authentication does not fit its new key
    assert not agent.is_complete


def test_operator_past_its_deadline_fails() -> None:
    operator, agent = make_pair()
    m2 = agent.receive(operator.start(1.0), 1.0)
    with pytest.raises(HandshakeError, match="deadline"):
        operator.receive(m2, DEADLINE + 0.001)
    with pytest.raises(HandshakeError):
        operator.receive(m2, 1.0)  # a failed handshake stays failed


def test_agent_past_its_deadline_fails() -> None:
    operator, agent = make_pair()
    m3 = operator.receive(agent.receive(operator.start(1.0), 1.0), 1.0)
    assert m3 is not None
    with pytest.raises(HandshakeError, match="deadline"):
        agent.receive(m3, DEADLINE + 1)
    assert not agent.is_complete


def test_operator_cannot_start_after_its_deadline() -> None:
    operator, _ = make_pair()
    with pytest.raises(HandshakeError, match="deadline"):
        operator.start(DEADLINE + 1)


def test_low_order_operator_ephemeral_is_refused_by_the_agent() -> None:
    hello = wire.encode_operator_hello(
        wire.OperatorHello(1, SESSION_ID.encode(), LOW_ORDER_POINT, bytes(32))
    )
    _, agent = make_pair()
    with pytest.raises(HandshakeError, match="low-order"):
        agent.receive(hello, 1.0)


@pytest.mark.parametrize("point", [bytes(32), LOW_ORDER_POINT])
def test_low_order_agent_ephemeral_is_refused_by_the_operator(point: bytes) -> None:
    operator, agent = make_pair()
    m2 = wire.decode_agent_hello(agent.receive(operator.start(1.0), 1.0))
    forged = wire.encode_agent_hello(wire.AgentHello(point, m2.box))
    with pytest.raises(HandshakeError, match="low-order"):
        operator.receive(forged, 1.0)


def test_messages_out_of_order_are_refused() -> None:
    operator, agent = make_pair()
    m1 = operator.start(1.0)
    with pytest.raises(
        HandshakeError, match=r"expected operator hello \(message 1\), got message 3"
    ):
        AgentHandshake(AGENT, SESSION_ID, GrantRecorder(), DEADLINE).receive(
            wire.encode_operator_auth(wire.OperatorAuth(b"x" * 40)), 1.0
        )
    with pytest.raises(HandshakeError):
        operator.receive(m1, 1.0)  # its own hello reflected back
    with pytest.raises(HandshakeError, match="unexpected"):
        make_pair()[0].receive(agent.receive(m1, 1.0), 1.0)  # never started


def test_oversized_grant_is_refused_before_sending() -> None:
    with pytest.raises(HandshakeError, match="grant"):
        make_pair(grant="g" * (wire.MAX_GRANT_SIZE + 1))


DECODERS = [
    wire.decode_operator_hello,
    wire.decode_agent_hello,
    wire.decode_operator_auth,
    wire.decode_agent_result,
    wire.decode_agent_proof,
    wire.decode_operator_proof,
    wire.decode_result,
]

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.floats(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=8,
)
field_names = st.sampled_from(
    ["t", "v", "sid", "e", "r", "box", "id", "sig", "grant", "ok", "code", "message", "confirm"]
)
plausible_messages = st.dictionaries(
    field_names,
    msgpack_values | st.binary(min_size=32, max_size=32) | st.integers(1, 4),
    max_size=6,
).map(lambda fields: msgpack.packb(fields, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300) | plausible_messages)
def test_handshake_decoders_raise_only_handshake_error(data: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(data)
        except HandshakeError:
            pass


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300) | plausible_messages)
def test_state_machines_raise_only_handshake_error_on_arbitrary_bytes(data: bytes) -> None:
    operator, agent = make_pair()
    operator.start(1.0)
    for receive in (operator.receive, agent.receive):
        try:
            receive(data, 1.0)
        except HandshakeError:
            pass


def test_oversized_handshake_message_is_refused_before_parsing() -> None:
    with pytest.raises(HandshakeError, match="exceeds"):
        wire.decode_operator_hello(b"\x80" * (wire.MAX_HANDSHAKE_MESSAGE_SIZE + 1))


def test_handshake_message_with_an_extra_field_is_refused() -> None:
    operator, _ = make_pair()
    fields = msgpack.unpackb(operator.start(1.0))
    fields["extra"] = 1
    with pytest.raises(HandshakeError, match="expected fields"):
        wire.decode_operator_hello(msgpack.packb(fields))
