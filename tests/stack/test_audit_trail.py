"""A session leaves its audit trail in the team's log: the rendezvous's request and decision, and
the agent's own signed start, command and end records, all verifiable offline from an export."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.stack.conftest import TappedStack

pytestmark = pytest.mark.slow

AUDIT_TIMEOUT_SECONDS = 20.0
SESSION_ACTIONS = (
    "session.requested",
    "session.decision",
    "session.started",
    "session.command",
    "session.ended",
)


def export_records(stack: TappedStack, bundle: Path) -> list[dict[str, Any]]:
    completed = stack.run_tucdesk("audit", "export", "--output", str(bundle))
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in bundle.read_text().splitlines()]
    return [line for line in lines if "seq" in line]


def test_an_exec_session_is_audited_by_the_rendezvous_and_signed_by_the_agent(
    stack: TappedStack, tmp_path: Path
) -> None:
    marker = f"audited-{time.time_ns()}"
    completed = stack.run_tucdesk("exec", stack.agent_name, "--", "echo", marker)
    assert completed.returncode == 0, completed.stderr
    bundle = tmp_path / "audit.jsonl"
    # The agent sends its records over the control channel after the session; wait for them.
    deadline = time.monotonic() + AUDIT_TIMEOUT_SECONDS
    while True:
        records = export_records(stack, bundle)
        commands = [
            r for r in records
            if r["event"]["action"] == "session.command" and marker in json.dumps(r["event"])
        ]  # fmt: skip
        session_id = commands[0]["event"]["session_id"] if commands else None
        session = [r["event"] for r in records if r["event"]["session_id"] == session_id]
        if session_id and {e["action"] for e in session} >= set(SESSION_ACTIONS):
            break
        assert time.monotonic() < deadline, f"incomplete audit trail: {session}"
        time.sleep(0.2)

    actions = [event["action"] for event in session]
    for earlier, later in zip(SESSION_ACTIONS, SESSION_ACTIONS[1:], strict=False):
        assert actions.index(earlier) < actions.index(later), actions
    by_action = {event["action"]: event for event in session}
    assert stack.agent is not None
    for action in ("session.started", "session.command", "session.ended"):
        assert by_action[action]["actor"]["kind"] == "agent"
        assert by_action[action]["actor"]["id"] == stack.agent.id
    for action in ("session.requested", "session.decision"):
        assert by_action[action]["actor"]["kind"] == "operator"

    audit_key = tmp_path / "audit-signer.pem"
    audit_key.write_text(stack.rendezvous_admin("keys", "show", "--pem", "audit-signer"))
    verified = subprocess.run(
        [sys.executable, "-m", "audit.main", "verify", str(bundle), "--key", str(audit_key)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
