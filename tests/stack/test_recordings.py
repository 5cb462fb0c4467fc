"""A recorded session on the whole stack: the agent's recording file checks out against the
team's exported audit log with `tucdesk-audit recording`, and an edited copy does not."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.stack.conftest import TappedStack, _started

pytestmark = pytest.mark.slow

AUDIT_TIMEOUT_SECONDS = 20.0


@pytest.fixture(scope="module")
def recording_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TappedStack]:
    """A started SQLite stack whose agent records sessions."""
    stack = TappedStack(
        tmp_path_factory.mktemp("stack"), extra_env={"TUCDESK_AGENT_RECORD_SESSIONS": "true"}
    )
    started = _started(stack)
    try:
        yield started
    finally:
        started.close()


def _ended_with_recording(stack: TappedStack, bundle: Path, marker: str) -> dict[str, Any]:
    deadline = time.monotonic() + AUDIT_TIMEOUT_SECONDS
    while True:
        completed = stack.run_tucdesk("audit", "export", "--output", str(bundle))
        assert completed.returncode == 0, completed.stderr
        records = [json.loads(line) for line in bundle.read_text().splitlines()]
        events = [record["event"] for record in records if "seq" in record]
        commands = [
            e for e in events if e["action"] == "session.command" and marker in json.dumps(e)
        ]
        if commands:
            session_id = commands[0]["session_id"]
            ended = [
                e for e in events
                if e["action"] == "session.ended" and e["session_id"] == session_id
            ]  # fmt: skip
            if ended:
                found: dict[str, Any] = ended[0]
                return found
        assert time.monotonic() < deadline, "the session's session.ended record never arrived"
        time.sleep(0.2)


def _audit_recording(recording: Path, bundle: Path, key: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audit.main", "recording", str(recording),
         "--export", str(bundle), "--key", str(key)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_recorded_exec_session_verifies_against_the_exported_log(
    recording_stack: TappedStack, tmp_path: Path
) -> None:
    stack = recording_stack
    marker = f"recorded-{time.time_ns()}"
    completed = stack.run_tucdesk("exec", stack.agent_name, "--", "echo", marker)
    assert completed.returncode == 0, completed.stderr
    bundle = tmp_path / "audit.jsonl"
    ended = _ended_with_recording(stack, bundle, marker)
    recording = ended["context"]["recording"]
    path = stack.agent_state_dir / "recordings" / recording["file"]
    assert path.name == f"{ended['session_id']}.cast"
    assert marker in path.read_text()
    assert recording["bytes"] == path.stat().st_size
    key = tmp_path / "audit-signer.pem"
    key.write_text(stack.rendezvous_admin("keys", "show", "--pem", "audit-signer"))

    checked = _audit_recording(path, bundle, key)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "matches record" in checked.stdout

    edited = tmp_path / path.name
    edited.write_bytes(path.read_bytes().replace(marker.encode(), marker.upper().encode()))
    checked = _audit_recording(edited, bundle, key)
    assert checked.returncode == 1
    assert "SHA-256 differs" in checked.stderr
