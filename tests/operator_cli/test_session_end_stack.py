"""An admin ends a session, and removing an agent ends its sessions, through the whole real stack
(rendezvous with TLS, relay, a real agent daemon running the commands).

The incident-response findings this pins: a session on a compromised host could be ended by no
TucDesk command (`agents remove` left alice's exec running 10+ minutes, and disabling her then
reached no agent), and a removed agent's sessions stayed ``accepted`` in the record for ever.
Now `tucdesk sessions end` stops one within seconds (the remote process is gone) without
disabling anyone, and `tucdesk agents remove` stops the agent's sessions before cutting it off,
ending them in the store and the audit log (reason ``agent_removed``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator_cli.policy_stack_support import OPERATOR_EMAIL, PolicyStack, policy_stack
from tests.operator_cli.test_operators_stack import (
    ENDED_WITHIN_SECONDS,
    EXIT_CONNECTION_FAILED,
    ROW_TIMEOUT_SECONDS,
    RunningExec,
    _alive,
)

pytestmark = pytest.mark.slow

LONG_COMMAND = "echo READY $$; exec sleep 600"


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    with policy_stack(tmp_path_factory.mktemp("session-end-stack")) as started:
        yield started


def _started(team: PolicyStack, home: Path) -> tuple[RunningExec, int, str]:
    """Alice's long exec, running: it, its remote pid, its session id."""
    running = RunningExec(team, home, LONG_COMMAND)
    running.wait_for(b"\n")
    remote_pid = int(bytes(running.stdout).split()[1])
    assert _alive(remote_pid)
    sessions = team.api_get("/v1/sessions?limit=50&state=accepted")["sessions"]
    [session] = [s for s in sessions if s.get("operator_email") == OPERATOR_EMAIL]
    return running, remote_pid, str(session["session_id"])


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + ENDED_WITHIN_SECONDS
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the remote command outlived its session"


def _shown_state(team: PolicyStack, session_id: str, expected: bytes) -> bytes:
    deadline = time.monotonic() + ROW_TIMEOUT_SECONDS
    while True:
        shown = team.tucdesk("sessions", "show", session_id)
        assert shown.returncode == 0, shown.stderr.decode()
        if expected in shown.stdout or time.monotonic() > deadline:
            return shown.stdout
        time.sleep(0.2)


def test_an_operator_may_not_end_a_session_and_nothing_ends(team: PolicyStack) -> None:
    running, remote_pid, session_id = _started(team, team.operator_home)
    try:
        refused = team.tucdesk("sessions", "end", session_id, "--yes", home=team.operator_home)
        assert refused.returncode != 0
        assert b"only admins may end a session" in refused.stderr, refused.stderr
        time.sleep(1.0)
        assert _alive(remote_pid) and running.process.poll() is None
    finally:
        running.process.kill()
        running.finish(timeout=10)
        _wait_gone(remote_pid)


def test_an_admin_ends_one_session_within_seconds_and_the_agent_says_why(
    team: PolicyStack,
) -> None:
    running, remote_pid, session_id = _started(team, team.operator_home)
    preview = team.tucdesk("sessions", "end", session_id)  # no terminal, no --yes
    assert preview.returncode != 0 and b"would end:" in preview.stdout
    assert b"nothing ended" in preview.stderr
    assert _alive(remote_pid)

    ended = team.tucdesk("sessions", "end", session_id, "--yes")
    assert ended.returncode == 0, ended.stderr.decode()
    assert f"ended session {session_id}".encode() in ended.stdout
    assert b"the agent was told" in ended.stdout, ended.stdout
    asked_at = time.monotonic()
    code = running.finish(timeout=ENDED_WITHIN_SECONDS + 5)
    assert time.monotonic() - asked_at < ENDED_WITHIN_SECONDS
    assert code == EXIT_CONNECTION_FAILED
    said = bytes(running.stderr).decode()
    assert said.strip().splitlines()[-1] == (
        "tucdesk: the agent ended the session (revoked): an admin ended the session"
    ), said
    _wait_gone(remote_pid)
    shown = _shown_state(team, session_id, b"ended (ended_by_admin)")
    assert b"State:    ended (ended_by_admin)" in shown, shown.decode()
    # Nobody was disabled: alice opens the next one as before.
    again = team.tucdesk("exec", team.stack.agent_name, "--", "true", home=team.operator_home)
    assert again.returncode == 0, again.stderr.decode()


def test_removing_the_agent_ends_its_sessions_on_the_host_and_in_the_record(
    team: PolicyStack, tmp_path: Path
) -> None:
    # Last in this module: the stack's agent is gone afterwards.
    running, remote_pid, session_id = _started(team, team.operator_home)
    agent = team.stack.agent_name
    preview = team.tucdesk("agents", "remove", agent)  # no terminal, no --yes: nothing done
    assert preview.returncode != 0
    assert b"would remove:" in preview.stdout
    assert b"  open sessions that will end: 1\n" in preview.stdout, preview.stdout
    assert _alive(remote_pid)

    removed = team.tucdesk("agents", "remove", agent, "--yes")
    assert removed.returncode == 0, removed.stderr.decode()
    assert b"open sessions ended: 1 (recorded as agent_removed)" in removed.stdout
    assert b"the agent was asked to end them before its channel closed" in removed.stdout
    code = running.finish(timeout=ENDED_WITHIN_SECONDS + 5)
    assert code == EXIT_CONNECTION_FAILED
    assert "this agent was removed from its team by an admin" in bytes(running.stderr).decode()
    _wait_gone(remote_pid)

    shown = team.tucdesk("sessions", "show", session_id)
    assert b"State:    ended (agent_removed)" in shown.stdout, shown.stdout.decode()
    listed = team.tucdesk("sessions", "--agent", agent, "--state", "accepted")
    assert listed.returncode == 0 and session_id.encode() not in listed.stdout
    bundle = tmp_path / "audit.jsonl"
    exported = team.tucdesk("audit", "export", "--output", str(bundle))
    assert exported.returncode == 0, exported.stderr.decode()
    events = [json.loads(line)["event"] for line in bundle.read_text().splitlines()
              if '"seq"' in line]  # fmt: skip
    ended = [e for e in events if e["action"] == "session.ended" and e["session_id"] == session_id]
    # The admin's record; the agent's own may be there too when it made it before its removal.
    assert ended and {e["context"]["reason"] for e in ended} == {"agent_removed"}, ended
    assert [e["actor"]["kind"] for e in ended].count("operator") == 1, ended
