"""`tucdesk selfcheck`: prove, on this machine, that the end-to-end protocol core works.

Runs a full operator/agent handshake in memory, seals frames both ways, and checks that a
tampered, replayed or reflected frame, a wrong pinned agent key and a refused grant each fail.
Nothing touches the network; it is what the README's first command runs until sessions land.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from protocol.errors import FrameError, HandshakeError
from protocol.frames import FrameType, SecureChannel
from protocol.handshake import AgentHandshake, OperatorHandshake, pin_agent_key
from protocol.identity import PublicIdentity, SigningIdentity

HANDSHAKE_DEADLINE_SECONDS = 5.0
MARKER = b"tucdesk selfcheck: typed on the operator side"


def _handshake(
    operator: SigningIdentity,
    agent: SigningIdentity,
    pinned: PublicIdentity,
    check_grant: Callable[[str | bytes, PublicIdentity], str | None],
) -> tuple[SecureChannel, SecureChannel]:
    now = time.monotonic()
    deadline = now + HANDSHAKE_DEADLINE_SECONDS
    session_id = "selfcheck-session"
    operator_side = OperatorHandshake(
        operator, session_id, "grant", pin_agent_key(pinned), deadline
    )
    agent_side = AgentHandshake(agent, session_id, check_grant, deadline)
    message_2 = agent_side.receive(operator_side.start(now), now)
    assert message_2 is not None
    message_3 = operator_side.receive(message_2, now)
    assert message_3 is not None
    message_4 = agent_side.receive(message_3, now)
    assert message_4 is not None
    operator_side.receive(message_4, now)
    return operator_side.channel(now), agent_side.channel(now)


def _expect_failure(check: Callable[[], object], error: type[Exception]) -> bool:
    try:
        check()
    except error:
        return True
    return False


def run_selfcheck(emit: Callable[[str], None] = print) -> int:
    """Run every check, print one line each, return 0 when all passed and 1 otherwise."""
    operator = SigningIdentity.generate()
    agent = SigningIdentity.generate()
    emit(f"operator key {operator.public.fingerprint}")
    emit(f"agent key    {agent.public.fingerprint}")

    def fresh() -> tuple[SecureChannel, SecureChannel]:
        return _handshake(operator, agent, agent.public, lambda grant, key: None)

    started = time.perf_counter()
    operator_channel, agent_channel = fresh()
    elapsed_ms = (time.perf_counter() - started) * 1000
    now = time.monotonic()
    sealed = operator_channel.seal(FrameType.DATA, MARKER, now)
    reply = agent_channel.seal(FrameType.STDOUT, b"echo: " + MARKER, now)

    def reflected() -> object:
        sender, _ = fresh()
        return sender.open(sender.seal(FrameType.DATA, MARKER, now), now)

    def bit_flipped() -> object:
        sender, receiver = fresh()
        frame = bytearray(sender.seal(FrameType.DATA, MARKER, now))
        frame[-1] ^= 0x01
        return receiver.open(bytes(frame), now)

    results = {
        f"handshake completes and confirms keys ({elapsed_ms:.2f} ms)": True,
        "frame opens on the agent with the plaintext intact": (
            agent_channel.open(sealed, now).payload == MARKER
        ),
        "plaintext never appears in the sealed frame": MARKER not in sealed,
        "reply opens on the operator": (
            operator_channel.open(reply, now).payload == b"echo: " + MARKER
        ),
        "replayed frame is refused": _expect_failure(
            lambda: agent_channel.open(sealed, now), FrameError
        ),
        "frame reflected back to its sender is refused": _expect_failure(reflected, FrameError),
        "bit-flipped frame is refused": _expect_failure(bit_flipped, FrameError),
        "wrong pinned agent key is refused": _expect_failure(
            lambda: _handshake(
                operator, agent, SigningIdentity.generate().public, lambda grant, key: None
            ),
            HandshakeError,
        ),
        "refused grant is refused with its reason": _expect_failure(
            lambda: _handshake(operator, agent, agent.public, lambda grant, key: "grant expired"),
            HandshakeError,
        ),
    }
    for description, passed in results.items():
        emit(f"{'ok  ' if passed else 'FAIL'} {description}")
    failed = [name for name, passed in results.items() if not passed]
    emit("selfcheck passed" if not failed else f"selfcheck FAILED: {len(failed)} check(s)")
    return 0 if not failed else 1
