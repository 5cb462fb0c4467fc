"""Sealed frames: round trips, tamper and replay refusal, datagram windows, rekeying and limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrameError
from protocol.frames import (
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    MAX_SEALED_FRAME_SIZE,
    FrameOpener,
    FrameSealer,
    FrameType,
    ReceiveMode,
    RekeyLimits,
    SecureChannel,
)
from protocol.session_keys import Role, SessionKeys, derive_session_keys

KEYS = derive_session_keys(bytes(range(32)), bytes(range(32, 64)), b"sess-frames")
OPERATOR_TYPES = [FrameType.DATA, FrameType.CONTROL]
AGENT_TYPES = [FrameType.STDOUT, FrameType.STDERR, FrameType.CONTROL]


def channels(
    mode: ReceiveMode = ReceiveMode.STREAM,
    limits: RekeyLimits | None = None,
    keys: SessionKeys = KEYS,
) -> tuple[SecureChannel, SecureChannel]:
    return (
        SecureChannel(keys, Role.OPERATOR, 0.0, mode, limits),
        SecureChannel(keys, Role.AGENT, 0.0, mode, limits),
    )


def sealed_frames(count: int) -> list[bytes]:
    sealer = FrameSealer(KEYS, Role.OPERATOR, 0.0)
    return [sealer.seal(FrameType.DATA, b"frame %d" % index, 0.0) for index in range(count)]


payloads = st.binary(max_size=200)


@settings(max_examples=60, deadline=None)
@given(
    script=st.lists(
        st.tuples(st.booleans(), st.integers(0, 2), payloads),
        max_size=30,
    )
)
def test_any_sequence_of_frames_round_trips_in_order(
    script: list[tuple[bool, int, bytes]],
) -> None:
    operator, agent = channels()
    for from_operator, type_index, payload in script:
        if from_operator:
            frame_type = OPERATOR_TYPES[type_index % len(OPERATOR_TYPES)]
            opened = agent.open(operator.seal(frame_type, payload, 1.0), 1.0)
        else:
            frame_type = AGENT_TYPES[type_index]
            opened = operator.open(agent.seal(frame_type, payload, 1.0), 1.0)
        assert (opened.type, opened.payload) == (frame_type, payload)
    assert operator.sealer.counter + agent.sealer.counter == len(script)


def test_sealed_frame_does_not_contain_the_plaintext() -> None:
    operator, _ = channels()
    secret = b"export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG"
    assert secret not in operator.seal(FrameType.DATA, secret, 1.0)


@settings(max_examples=200, deadline=None)
@given(payload=payloads, data=st.data())
def test_any_single_bit_flip_in_a_sealed_frame_is_refused(
    payload: bytes, data: st.DataObject
) -> None:
    operator, agent = channels(ReceiveMode.DATAGRAM)
    frame = bytearray(operator.seal(FrameType.DATA, payload, 1.0))
    bit = data.draw(st.integers(0, len(frame) * 8 - 1), label="bit")
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FrameError):
        agent.open(bytes(frame), 1.0)


@settings(max_examples=150, deadline=None)
@given(
    count=st.integers(1, 8),
    deliveries=st.lists(st.integers(0, 7), min_size=1, max_size=12),
)
def test_stream_refuses_any_reorder_drop_or_duplicate_and_then_stays_ended(
    count: int, deliveries: list[int]
) -> None:
    frames = sealed_frames(count)
    opener = FrameOpener(KEYS, Role.AGENT, 0.0, ReceiveMode.STREAM)
    expected = 0
    ended = False
    for index in (index % count for index in deliveries):
        if not ended and index == expected:
            assert opener.open(frames[index], 1.0).payload == b"frame %d" % index
            expected += 1
        else:
            ended = True
            with pytest.raises(FrameError):
                opener.open(frames[index], 1.0)


def test_stream_refuses_even_the_right_frame_after_a_wrong_one() -> None:
    frames = sealed_frames(3)
    opener = FrameOpener(KEYS, Role.AGENT, 0.0)
    opener.open(frames[0], 1.0)
    with pytest.raises(FrameError, match="expected frame 1, got 2"):
        opener.open(frames[2], 1.0)
    with pytest.raises(FrameError, match="session ended"):
        opener.open(frames[1], 1.0)


@pytest.mark.parametrize("mode", list(ReceiveMode))
def test_frame_reflected_back_to_its_sender_is_refused(mode: ReceiveMode) -> None:
    operator, _ = channels(mode)
    frame = operator.seal(FrameType.CONTROL, b"resize", 1.0)
    with pytest.raises(FrameError):
        operator.open(frame, 1.0)


def test_direction_tag_alone_refuses_reflection_even_with_equal_keys() -> None:
    same = SessionKeys(b"sess-frames", bytes(32), bytes(32), bytes(32))
    operator, _ = channels(keys=same)
    frame = operator.seal(FrameType.CONTROL, b"resize", 1.0)
    with pytest.raises(FrameError, match="authentication"):
        operator.open(frame, 1.0)


def test_frame_from_another_session_with_the_same_keys_is_refused() -> None:
    other = SessionKeys(
        b"sess-other", KEYS.operator_to_agent, KEYS.agent_to_operator, KEYS.confirmation
    )
    operator, _ = channels()
    _, agent = channels(keys=other)
    with pytest.raises(FrameError, match="authentication"):
        agent.open(operator.seal(FrameType.DATA, b"x", 1.0), 1.0)


@settings(max_examples=100, deadline=None)
@given(order=st.permutations(list(range(12))), repeats=st.lists(st.integers(0, 11), max_size=5))
def test_datagrams_open_in_any_order_and_repeats_are_refused(
    order: list[int], repeats: list[int]
) -> None:
    frames = sealed_frames(12)
    opener = FrameOpener(KEYS, Role.AGENT, 0.0, ReceiveMode.DATAGRAM)
    for index in order:
        assert opener.open(frames[index], 1.0).counter == index
    for index in repeats:
        with pytest.raises(FrameError, match="replay"):
            opener.open(frames[index], 1.0)


def test_forged_datagram_does_not_mark_its_counter_seen() -> None:
    frames = sealed_frames(2)
    opener = FrameOpener(KEYS, Role.AGENT, 0.0, ReceiveMode.DATAGRAM)
    forged = bytearray(frames[1])
    forged[-1] ^= 1
    with pytest.raises(FrameError, match="authentication"):
        opener.open(bytes(forged), 1.0)
    assert opener.open(frames[1], 1.0).counter == 1
    assert opener.open(frames[0], 1.0).counter == 0


def test_datagram_older_than_the_window_is_refused() -> None:
    sealer = FrameSealer(KEYS, Role.OPERATOR, 0.0)
    frames = [sealer.seal(FrameType.DATA, b"", 0.0) for _ in range(3000)]
    opener = FrameOpener(KEYS, Role.AGENT, 0.0, ReceiveMode.DATAGRAM)
    opener.open(frames[2999], 1.0)
    with pytest.raises(FrameError, match="older than the window"):
        opener.open(frames[0], 1.0)
    assert opener.open(frames[2000], 1.0).counter == 2000


def test_oversized_payload_is_refused_when_sealing() -> None:
    operator, _ = channels()
    with pytest.raises(FrameError, match="exceeds"):
        operator.seal(FrameType.DATA, bytes(MAX_FRAME_PAYLOAD + 1), 1.0)
    assert operator.sealer.counter == 0


def test_maximum_payload_round_trips() -> None:
    operator, agent = channels()
    payload = bytes(MAX_FRAME_PAYLOAD)
    frame = operator.seal(FrameType.DATA, payload, 1.0)
    assert len(frame) == MAX_SEALED_FRAME_SIZE
    assert agent.open(frame, 1.0).payload == payload


@pytest.mark.parametrize("size", [0, HEADER_SIZE, HEADER_SIZE + 15, MAX_SEALED_FRAME_SIZE + 1])
def test_frame_of_impossible_size_is_refused_before_decrypting(size: int) -> None:
    _, agent = channels()
    with pytest.raises(FrameError, match="bytes, got"):
        agent.open(bytes(size), 1.0)


def test_each_side_may_send_only_its_own_frame_types() -> None:
    operator, agent = channels()
    with pytest.raises(FrameError, match="may not be sent"):
        operator.seal(FrameType.STDOUT, b"x", 1.0)
    with pytest.raises(FrameError, match="may not be sent"):
        agent.seal(FrameType.DATA, b"x", 1.0)


def test_nothing_is_sent_or_accepted_after_close() -> None:
    operator, agent = channels()
    agent.open(operator.seal(FrameType.CLOSE, b"", 1.0), 1.0)
    with pytest.raises(FrameError, match="closed"):
        operator.seal(FrameType.DATA, b"late", 1.0)
    # A valid frame with the next counter (sealed by a second sealer on the same keys) is refused.
    second = FrameSealer(KEYS, Role.OPERATOR, 0.0)
    second.seal(FrameType.DATA, b"", 1.0)
    with pytest.raises(FrameError, match="closed"):
        agent.open(second.seal(FrameType.DATA, b"after close", 1.0), 1.0)


SMALL_LIMITS = RekeyLimits(
    rekey_after_messages=3, reject_after_messages=40, rekey_after_time=10.0, reject_after_time=15.0
)


@pytest.mark.parametrize("mode", list(ReceiveMode))
def test_both_sides_rekey_after_the_message_limit_and_keep_talking(mode: ReceiveMode) -> None:
    operator, agent = channels(mode, SMALL_LIMITS)
    for index in range(12):
        assert (
            agent.open(operator.seal(FrameType.DATA, b"in %d" % index, 1.0), 1.0).counter == index
        )
        assert operator.open(agent.seal(FrameType.STDOUT, b"out", 1.0), 1.0).counter == index
    assert operator.sealer.epoch == agent.opener.epoch == 3
    assert agent.sealer.epoch == operator.opener.epoch == 3


def test_rekeyed_frames_are_sealed_under_different_keys() -> None:
    limits = RekeyLimits(rekey_after_messages=1, reject_after_messages=10)
    first, second = (
        FrameSealer(KEYS, Role.OPERATOR, 0.0, limits),
        FrameSealer(KEYS, Role.OPERATOR, 0.0),
    )
    first.seal(FrameType.DATA, b"same", 0.0)
    second.seal(FrameType.DATA, b"same", 0.0)
    # Same counter 1 and payload; only the rekeyed key (and epoch byte) differs.
    assert (
        first.seal(FrameType.DATA, b"same", 0.0)[HEADER_SIZE:]
        != second.seal(FrameType.DATA, b"same", 0.0)[HEADER_SIZE:]
    )


def test_sending_past_the_hard_message_limit_is_refused() -> None:
    limits = RekeyLimits(rekey_after_messages=2, reject_after_messages=5)
    operator, agent = channels(limits=limits)
    for _ in range(5):
        agent.open(operator.seal(FrameType.DATA, b"x", 1.0), 1.0)
    with pytest.raises(FrameError, match="last permitted frame"):
        operator.seal(FrameType.DATA, b"x", 1.0)
    with pytest.raises(FrameError, match="last permitted frame"):
        operator.seal(FrameType.DATA, b"x", 1.0)


def test_receiver_refuses_a_counter_past_the_hard_limit() -> None:
    sealer = FrameSealer(KEYS, Role.OPERATOR, 0.0, RekeyLimits(2, 10))
    frames = [sealer.seal(FrameType.DATA, b"", 1.0) for _ in range(6)]
    opener = FrameOpener(KEYS, Role.AGENT, 0.0, ReceiveMode.DATAGRAM, RekeyLimits(2, 5))
    with pytest.raises(FrameError, match="past the session's limit"):
        opener.open(frames[5], 1.0)


def test_sender_rekeys_when_its_key_reaches_the_age_limit() -> None:
    operator, agent = channels(limits=SMALL_LIMITS)
    agent.open(operator.seal(FrameType.DATA, b"a", 0.0), 0.0)
    agent.open(operator.seal(FrameType.DATA, b"b", 9.9), 9.9)
    assert operator.sealer.epoch == 0
    agent.open(operator.seal(FrameType.DATA, b"c", 10.0), 10.0)
    assert operator.sealer.epoch == agent.opener.epoch == 1
    agent.open(operator.seal(FrameType.DATA, b"d", 500.0), 500.0)  # idle for long: rekey again
    assert operator.sealer.epoch == agent.opener.epoch == 2


def test_receiver_refuses_a_frame_under_a_key_past_its_lifetime() -> None:
    lazy_sender = FrameSealer(
        KEYS, Role.OPERATOR, 0.0, RekeyLimits(rekey_after_time=100.0, reject_after_time=200.0)
    )
    opener = FrameOpener(KEYS, Role.AGENT, 0.0, ReceiveMode.STREAM, SMALL_LIMITS)
    opener.open(lazy_sender.seal(FrameType.DATA, b"", 14.0), 14.0)
    with pytest.raises(FrameError, match="past its lifetime"):
        opener.open(lazy_sender.seal(FrameType.DATA, b"", 16.0), 16.0)


def test_late_datagram_from_the_previous_epoch_opens_until_that_key_expires() -> None:
    sealer = FrameSealer(KEYS, Role.OPERATOR, 0.0, RekeyLimits(2, 100))
    frames = [sealer.seal(FrameType.DATA, b"%d" % index, 0.0) for index in range(8)]
    # Epochs: frames 0-1 -> 0, 2-3 -> 1, 4-5 -> 2, 6-7 -> 3.
    opener = FrameOpener(KEYS, Role.AGENT, 0.0, ReceiveMode.DATAGRAM, SMALL_LIMITS)
    opener.open(frames[0], 1.0)
    opener.open(frames[4], 1.0)  # jumps to epoch 2 across lost frames
    assert opener.epoch == 2
    assert opener.open(frames[3], 1.0).payload == b"3"  # epoch 1, late: still accepted
    with pytest.raises(FrameError, match="epoch 0 is not acceptable"):
        opener.open(frames[1], 1.0)  # two epochs behind: that key is gone
    opener.open(frames[6], 5.0)  # epoch 3; epoch 2's key (adopted at 1.0) becomes the previous
    assert opener.open(frames[5], 15.9).payload == b"5"
    with pytest.raises(FrameError, match="past its lifetime"):
        opener.open(frames[7], 20.1)  # epoch 3's key was adopted at 5.0: expired at 20.0


def test_forged_frame_claiming_a_later_epoch_changes_nothing() -> None:
    sealer = FrameSealer(KEYS, Role.OPERATOR, 0.0, RekeyLimits(2, 100))
    frames = [sealer.seal(FrameType.DATA, b"%d" % index, 0.0) for index in range(4)]
    opener = FrameOpener(KEYS, Role.AGENT, 0.0, ReceiveMode.DATAGRAM, SMALL_LIMITS)
    forged = bytearray(frames[2])  # epoch 1
    forged[20] ^= 0x40
    for _ in range(3):
        with pytest.raises(FrameError, match="authentication"):
            opener.open(bytes(forged), 1.0)
    assert opener.epoch == 0
    assert [opener.open(frames[index], 1.0).payload for index in (0, 3, 1, 2)] == [
        b"0",
        b"3",
        b"1",
        b"2",
    ]
    assert opener.epoch == 1


def test_sealed_parts_concatenated_are_the_wire_frame() -> None:
    operator, agent = channels()
    header, body = operator.seal_parts(FrameType.DATA, b"in two parts", 1.0)
    assert len(header) == HEADER_SIZE
    assert agent.open(header + body, 1.0).payload == b"in two parts"
    sealed = operator.seal(FrameType.DATA, b"in one buffer", 1.0)
    opened = agent.open_parts(sealed[:HEADER_SIZE], memoryview(sealed)[HEADER_SIZE:], 1.0)
    assert (opened.counter, opened.payload) == (1, b"in one buffer")


@pytest.mark.parametrize("split", [HEADER_SIZE - 1, HEADER_SIZE + 1])
def test_parts_split_anywhere_but_after_the_header_are_refused(split: int) -> None:
    operator, agent = channels()
    sealed = operator.seal(FrameType.DATA, b"payload", 1.0)
    with pytest.raises(FrameError, match="frame header is 13 bytes"):
        agent.open_parts(sealed[:split], sealed[split:], 1.0)
    with pytest.raises(FrameError):  # a stream ends at its first refused frame
        agent.open(sealed, 1.0)


def test_tampered_body_part_is_refused() -> None:
    operator, agent = channels()
    header, body = operator.seal_parts(FrameType.DATA, b"payload", 1.0)
    with pytest.raises(FrameError, match="failed authentication"):
        agent.open_parts(header, bytes([body[0] ^ 1]) + body[1:], 1.0)
