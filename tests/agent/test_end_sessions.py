"""``end_sessions`` from the rendezvous (an admin disabled the operator) ends sessions at once.

Through a real relay with the operator side driven by hand (tests/agent/test_session_host.py's
stack): a running exec or shell session is torn down, the operator is told why in a Close, and
the signed ``session.ended`` carries the reason; a session not started yet is abandoned and
audited as refused; a malformed message ends nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.session_host import (
    END_SESSIONS_REASONS,
    MAX_END_SESSION_IDS,
    EndedSessionIds,
    EndSessions,
    EndSessionsRefused,
)
from audit.actions import Action
from protocol.control import Close
from protocol.frames import FrameType
from tests.agent.session_helpers import pid_is_gone, trio_test
from tests.agent.test_session_host import (
    Stack,
    exec_start,
    offer_message,
    operator_session,
    session_stack,
    shell_start,
    wait_for_sessions_to_end,
)

REASON = "operator_disabled"
SAID = "the operator was disabled by an admin"


def _end(*ids: str, reason: str = REASON) -> dict[str, Any]:
    return {"type": "end_sessions", "ids": list(ids), "reason": reason}


def _closes(controls: list[Any]) -> list[Close]:
    return [control for control in controls if isinstance(control, Close)]


async def _wait_gone(pid: int) -> None:
    with trio.fail_after(15):
        while not pid_is_gone(pid):  # noqa: ASYNC110 - another process: no event to wait on
            await trio.sleep(0.02)


def _ended_reason(stack: Stack) -> object:
    ended = [event for event in stack.audit if event.event.action is Action.SESSION_ENDED]
    assert len(ended) == 1
    ended[0].verify(stack.agent.public)
    return ended[0].event.context["reason"]


@trio_test
async def test_a_running_exec_session_ends_at_once_and_the_operator_is_told_why(
    tmp_path: Path,
) -> None:
    command = ("sh", "-c", "sleep 60 & echo $! $$; wait")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_stdout_contains(b"\n")
            pids = [int(pid) for pid in bytes(operator.stdout).split()]
            # Unknown ids (another agent's, or long over) are ignored.
            assert stack.host.end_sessions(_end("ses_other", "ses_1")) == 1
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
        for pid in pids:
            await _wait_gone(pid)
    assert [(c.reason, c.message) for c in _closes(operator.controls)] == [("revoked", SAID)]
    assert operator.exit_status() is None
    assert _ended_reason(stack) == REASON


@trio_test
async def test_a_running_shell_ends_at_once_through_the_offer_callback(tmp_path: Path) -> None:
    async with session_stack(tmp_path, shell="/bin/sh") as stack, trio.open_nursery() as nursery:
        on_message = stack.host.offer_handler(nursery)
        async with operator_session(stack, nursery, mode="shell", command=None) as operator:
            await operator.start(shell_start())
            await operator.send(FrameType.DATA, b"echo pid=$$:$((1+1))\n")
            await operator.until_stdout_contains(b":2\r\n")  # not in the echo of the line
            found = re.search(rb"pid=(\d+):2", bytes(operator.stdout))
            assert found is not None
            pid = int(found.group(1))
            on_message(_end("ses_1"))  # what the control channel hands over
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
        await _wait_gone(pid)
    assert [(c.reason, c.message) for c in _closes(operator.controls)] == [("revoked", SAID)]
    assert _ended_reason(stack) == REASON


@trio_test
async def test_a_session_not_started_yet_is_abandoned_and_audited_as_refused(
    tmp_path: Path,
) -> None:
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery) as operator:
            # Handshake done, no SessionStart sent yet.
            assert stack.host.end_sessions(_end("ses_1")) == 1
            await wait_for_sessions_to_end(stack)
            with trio.fail_after(15):
                while await operator.next_frame() is not None:
                    pass
    actions = stack.actions()
    assert actions == [Action.SESSION_REFUSED]
    refused = stack.audit[0].event
    assert refused.context["code"] == REASON
    assert refused.policy_result is not None and refused.policy_result.reason == SAID


@trio_test
async def test_an_offer_ended_right_after_its_ack_never_connects(tmp_path: Path) -> None:
    async with session_stack(tmp_path) as stack:
        offer = stack.host.accept_offer(offer_message(stack, "ses_1"))
        assert offer is not None
        # The message may arrive before the session's task first runs.
        assert stack.host.end_sessions(_end("ses_1")) == 1
        with trio.fail_after(5):
            await stack.host.run_offer(offer)
        assert stack.host.live_session_ids() == frozenset()
    assert stack.actions() == [Action.SESSION_REFUSED]
    assert stack.audit[0].event.context["code"] == REASON


MALFORMED: list[dict[str, Any]] = [
    {"type": "end_sessions", "ids": "ses_1", "reason": REASON},  # not a list
    {"type": "end_sessions", "ids": [], "reason": REASON},  # empty
    {"type": "end_sessions", "ids": ["ses_1"] * (MAX_END_SESSION_IDS + 1), "reason": REASON},
    {"type": "end_sessions", "ids": ["ses_1", 7], "reason": REASON},
    {"type": "end_sessions", "ids": ["ses_1", "x" * 129], "reason": REASON},
    {"type": "end_sessions", "ids": ["ses_1", ""], "reason": REASON},
    {"type": "end_sessions", "ids": ["ses_1"]},  # no reason
    {"type": "end_sessions", "ids": ["ses_1"], "reason": "because"},  # an unknown reason
    {"type": "end_sessions", "ids": ["ses_1"], "reason": ["operator_disabled"]},
]


@trio_test
async def test_a_malformed_end_sessions_message_is_refused_and_ends_nothing(
    tmp_path: Path,
) -> None:
    command = ("sh", "-c", "read line; echo got $line")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            for message in MALFORMED:
                assert stack.host.end_sessions(message) == 0, message
            await trio.sleep(0.2)
            await operator.send(FrameType.DATA, b"on\n")
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    assert bytes(operator.stdout) == b"got on\n"
    status = operator.exit_status()
    assert status is not None and status.code == 0
    assert not _closes(operator.controls)
    assert _ended_reason(stack) == "normal"


@pytest.mark.parametrize("message", MALFORMED)
def test_each_malformed_shape_is_refused_by_the_parser(message: dict[str, Any]) -> None:
    with pytest.raises(EndSessionsRefused):
        EndSessions.from_message(message)


# Long lists (past MAX_END_SESSION_IDS) of short ids: big examples are slow to make on a loaded
# machine, which is no failure of the parser.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    st.dictionaries(
        st.sampled_from(["type", "ids", "reason", "extra"]),
        st.none() | st.integers() | st.text(max_size=200)
        | st.lists(st.text(max_size=12) | st.integers(), max_size=300)
        | st.sampled_from(sorted(END_SESSIONS_REASONS)),
    )
)
def test_any_end_sessions_message_parses_or_is_refused(message: dict[str, Any]) -> None:
    try:
        parsed = EndSessions.from_message(message)
    except EndSessionsRefused:
        return
    assert 0 < len(parsed.session_ids) <= MAX_END_SESSION_IDS
    assert parsed.reason in END_SESSIONS_REASONS


@trio_test
async def test_an_offer_arriving_after_its_end_sessions_is_refused_and_audited(
    tmp_path: Path,
) -> None:
    # The operator was disabled while the rendezvous brokered the session: end_sessions can
    # overtake the offer (another instance, or a slow broker), and the offer must not run then.
    async with session_stack(tmp_path) as stack:
        assert stack.host.end_sessions(_end("ses_1")) == 0
        assert stack.host.accept_offer(offer_message(stack, "ses_1")) is None
        assert stack.host.live_session_ids() == frozenset()
        # Other ids are not affected.
        other = stack.host.accept_offer(offer_message(stack, "ses_2"))
        assert other is not None
    refusals = [m for m in stack.control if m["type"] == "session_offer_refused"]
    assert refusals == [{"type": "session_offer_refused", "session_id": "ses_1", "reason": SAID}]
    assert stack.actions() == [Action.SESSION_REFUSED]
    assert stack.audit[0].event.session_id == "ses_1"
    assert stack.audit[0].event.context["code"] == REASON


def test_ended_session_ids_are_forgotten_after_their_time_and_when_full() -> None:
    ended = EndedSessionIds(ttl=10.0, capacity=3)
    for number in range(4):
        ended.remember(f"ses_{number}", REASON, now=100.0 + number)
    assert len(ended) == 3
    assert ended.reason("ses_0", now=104.0) is None  # the oldest went when it was full
    assert ended.reason("ses_1", now=111.0) == REASON
    assert ended.reason("ses_1", now=111.5) is None  # past its time
    assert ended.reason("ses_3", now=113.0) == REASON
