"""`tucdesk policy` and `tucdesk roster` through the whole real stack.

An admin signs the policy with `tucdesk policy set`; the rendezvous countersigns and pushes it;
the agent applies it and enforces it on every session. Each refusal reaches the operator as one
line naming the rule.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator_cli.policy_stack_support import (
    ADMIN_EMAIL,
    OPERATOR_EMAIL,
    PolicyStack,
    policy_stack,
)

pytestmark = pytest.mark.slow

EXIT_CONNECTION_FAILED = 255


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    with policy_stack(tmp_path_factory.mktemp("policy-stack")) as started:
        yield started


def refusal_line(result: object) -> str:
    stderr = result.stderr.decode()  # type: ignore[attr-defined]
    lines = [line for line in stderr.strip().splitlines() if line]
    assert lines and lines[-1].startswith("tucdesk: "), stderr
    return lines[-1]


def test_policy_show_names_the_version_the_signer_and_the_rules(team: PolicyStack) -> None:
    shown = team.tucdesk("policy", "show", home=team.operator_home)
    text = shown.stdout.decode()
    assert shown.returncode == 0, shown.stderr
    assert f"policy version {team.team_version()}" in text
    assert f"signed by {ADMIN_EMAIL}" in text
    assert 'id = "no-shadow"' in text


def test_an_allowed_exec_runs_under_the_signed_policy(team: PolicyStack) -> None:
    result = team.tucdesk("exec", team.stack.agent_name, "--", "echo", "hello",
                          home=team.operator_home)
    assert (result.returncode, result.stdout) == (0, b"hello\n"), result.stderr


def test_a_denied_exec_is_refused_with_the_rule_that_denied_it(team: PolicyStack) -> None:
    result = team.tucdesk("exec", team.stack.agent_name, "--", "cat", "/etc/shadow",
                          home=team.operator_home)
    assert result.returncode == EXIT_CONNECTION_FAILED
    assert "no-shadow" in refusal_line(result)
    assert result.stdout == b""


def test_policy_test_shows_the_decision_and_why(team: PolicyStack) -> None:
    agent = team.stack.agent_name
    denied = team.tucdesk("policy", "test", "--operator", OPERATOR_EMAIL, "--agent", agent,
                          "--action", "exec", "--command", "cat /etc/shadow")
    assert denied.returncode == 0, denied.stderr
    assert denied.stdout.decode().startswith("deny") and b"no-shadow" in denied.stdout

    parked = team.tucdesk("policy", "test", "--operator", OPERATOR_EMAIL, "--agent", agent,
                          "--action", "exec", "--command", "rm -rf /tmp/x")
    assert parked.stdout.decode().startswith("approval_required"), parked.stdout
    assert b"high_risk" in parked.stdout

    allowed = team.tucdesk("policy", "test", "--operator", ADMIN_EMAIL, "--agent", agent,
                           "--action", "shell", "--at", "2026-03-29T02:30:00+02:00")
    assert allowed.stdout.decode().startswith("allow") and b"team-may-work" in allowed.stdout
    shell = team.tucdesk("policy", "test", "--operator", OPERATOR_EMAIL, "--agent", agent,
                         "--action", "shell")
    assert b"alice-shells-need-approval" in shell.stdout


def test_policy_set_refuses_an_invalid_document_naming_the_line(
    team: PolicyStack, tmp_path: Path
) -> None:
    before = team.team_version()
    bad = tmp_path / "bad.toml"
    bad.write_text(f'version = {before + 1}\nmode = "allowlist"\n\n[[rules]]\nid = "x"\n'
                   'outcome = "perhaps"\n')
    result = team.tucdesk("policy", "set", str(bad))
    assert result.returncode == 1
    assert "bad.toml line 6" in refusal_line(result)

    stale = tmp_path / "stale.toml"
    stale.write_text(f'version = {before}\nmode = "allowlist"\n')
    result = team.tucdesk("policy", "set", str(stale))
    assert result.returncode == 1
    assert f"set version = {before + 1}" in refusal_line(result)
    assert team.team_version() == before


def test_only_an_admin_may_set_the_policy(team: PolicyStack, tmp_path: Path) -> None:
    before = team.team_version()
    path = tmp_path / "mine.toml"
    path.write_text(f'version = {before + 1}\nmode = "blocklist"\n')
    result = team.tucdesk("policy", "set", str(path), home=team.operator_home)
    assert result.returncode == 1
    assert "refused" in refusal_line(result)
    assert team.team_version() == before


def test_a_policy_change_reaches_the_agent_and_is_enforced(team: PolicyStack) -> None:
    agent = team.stack.agent_name
    assert team.tucdesk("exec", agent, "--", "echo", "sync-1",
                        home=team.operator_home).returncode == 0
    version = team.set_policy(
        extra='\n[[rules]]\nid = "no-sync"\noutcome = "deny"\ncommands = ["echo sync-*"]\n'
    )
    listed = team.tucdesk("agents")
    assert f"v{version}" in listed.stdout.decode() and "!=" not in listed.stdout.decode()

    result = team.tucdesk("exec", agent, "--", "echo", "sync-1", home=team.operator_home)
    assert result.returncode == EXIT_CONNECTION_FAILED
    assert "no-sync" in refusal_line(result)


def test_a_new_operator_waits_for_an_admin_to_sign_the_roster(team: PolicyStack) -> None:
    agent = team.stack.agent_name
    carol_home = team.base / "carol"
    team.stack.create_operator("carol@demo.localhost", "operator", home=carol_home)

    shown = team.tucdesk("roster", "show")
    assert shown.returncode == 0, shown.stderr
    pending = shown.stdout.decode().split("pending", 1)[-1]
    assert "added" in pending and "carol@demo.localhost" in pending

    refused = team.tucdesk("exec", agent, "--", "echo", "carol", home=carol_home)
    assert refused.returncode == EXIT_CONNECTION_FAILED
    assert "roster" in refusal_line(refused)

    before = team.team_version()
    unconfirmed = team.tucdesk("roster", "sign")  # no terminal and no --yes: nothing signed
    assert unconfirmed.returncode == 1
    assert team.team_version() == before

    signed = team.tucdesk("roster", "sign", "--yes")
    assert signed.returncode == 0, signed.stderr
    assert "carol@demo.localhost" in signed.stdout.decode()
    team.wait_applied(before + 1)
    assert "nothing pending" in team.tucdesk("roster", "show").stdout.decode()
    allowed = team.tucdesk("exec", agent, "--", "echo", "carol", home=carol_home)
    assert (allowed.returncode, allowed.stdout) == (0, b"carol\n"), allowed.stderr


def test_exec_on_a_terminal_needs_a_shell_the_policy_allows_outright(team: PolicyStack) -> None:
    # alice may exec, but her shells need approval: on a terminal a pager or an editor could
    # start one, so the agent refuses her exec -t and says why; run without -t it works.
    agent = team.stack.agent_name
    refused = team.tucdesk("exec", "-tt", agent, "--", "tty", home=team.operator_home)
    assert refused.returncode == EXIT_CONNECTION_FAILED
    line = " ".join(refused.stderr.decode().split())
    assert "exec -t runs the command on a terminal" in line
    assert "a shell here is needs approval (rule alice-shells-need-approval" in line
    assert refused.stdout == b""
    plain = team.tucdesk("exec", agent, "--", "tty", home=team.operator_home)
    assert (plain.returncode, plain.stdout) == (1, b"not a tty\n")
    # The admin may open shells outright: exec -t runs, and the agent records the terminal.
    allowed = team.tucdesk("exec", "-tt", agent, "--", "tty")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith(b"/dev/pts/")
    deadline = time.monotonic() + 30  # the agent's signed record reaches the log shortly after
    while True:
        exported = team.tucdesk("audit", "export", "-o", "-")
        started = [
            line for line in exported.stdout.decode().splitlines()
            if '"session.started"' in line and '"terminal":true' in line.replace(" ", "")
        ]
        if started or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(started) == 1, exported.stderr
