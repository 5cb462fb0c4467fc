"""The agent's session log lines say who did what, as sshd's "Accepted publickey for" does:
operator, key, mode, local user and program (with a hash of the command line, which can carry
secrets; the whole line at DEBUG) when a session is accepted; how it ended, how long
it took and the bytes each way when it ends. Never payload bytes; never a control character."""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shlex
from pathlib import Path

import pytest
import trio

from agent.session_host import command_digest
from tests.agent.session_helpers import trio_test
from tests.agent.test_session_host import (
    OPERATOR,
    exec_start,
    operator_session,
    session_stack,
    wait_for_sessions_to_end,
)

PAYLOAD = "payload-7f3a"


@trio_test
async def test_session_log_lines_name_the_operator_the_command_and_how_it_ended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    killed = ("sh", "-c", f"echo {PAYLOAD}; kill -9 $$", "\x1b[2Jforged\nsession x: ok")
    exits = ("sh", "-c", "exit 0")
    caplog.set_level(logging.DEBUG, logger="tucdesk.agent.session")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        for session_id, command in (("ses_k", killed), ("ses_e", exits)):
            async with operator_session(
                stack, nursery, session_id=session_id, command=command
            ) as operator:
                await operator.start(exec_start(*command))
                await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    lines = [record.getMessage() for record in caplog.records]
    [accepted] = [line for line in lines if line.startswith("session ses_k: accepted")]
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert "accepted exec for ops@example.test (op_1, key " in accepted
    assert OPERATOR.public.fingerprint in accepted
    assert f"as user {user}" in accepted
    # A command line can carry secrets: at INFO only its program and its hash (the audit log
    # has the command); the whole of it at DEBUG.
    assert f"command sh (sha256 {command_digest(killed)})" in accepted
    assert len(command_digest(killed)) == 12
    assert command_digest(killed) == hashlib.sha256(shlex.join(killed).encode()).hexdigest()[:12]
    info = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    assert not any(PAYLOAD in line or "forged" in line for line in info)
    [command] = [line for line in lines if line.startswith("session ses_k: command ")]
    assert "sh -c 'echo " in command
    # Control characters are shown escaped: nothing forges a log line or drives a terminal.
    assert "\\x1b[2Jforged\\nsession x: ok" in command
    assert not any("\x1b" in line or "\n" in line for line in lines)
    [ended] = [line for line in lines if line.startswith("session ses_k ended")]
    assert "killed by signal 9 (KILL) after " in ended
    assert "bytes in" in ended and "bytes out" in ended and "(exec by ops@example.test)" in ended
    [ended] = [line for line in lines if line.startswith("session ses_e ended")]
    assert "(normal): exit 0 after " in ended
    assert not any(PAYLOAD in line for line in lines if line is not command)
