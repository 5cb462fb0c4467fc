"""Approvals, the roster and a disabled approver through the whole real stack (`tucdesk` as a
subprocess, a real agent enforcing the signed policy).

`roster sign` says how many approvals in flight it voids before it asks; an approval whose
approver was disabled since does not run, and the disable says the roster still needs signing.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.operator_cli.policy_stack_support import APPROVER_EMAIL, PolicyStack, policy_stack

pytestmark = pytest.mark.slow

EXIT_CONNECTION_FAILED = 255
EXIT_DECLINED = 1


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    with policy_stack(tmp_path_factory.mktemp("disable-holdings-stack")) as started:
        yield started


def _last_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert lines and lines[-1].startswith("tucdesk: "), result.stderr
    return lines[-1]


def _park(team: PolicyStack, *command: str) -> str:
    result = team.tucdesk("exec", "--no-wait", team.stack.agent_name, "--", *command,
                          home=team.operator_home)  # fmt: skip
    assert result.returncode == 0, result.stderr
    request_id = result.stdout.decode().strip()
    assert request_id.startswith("apr_"), result.stdout
    return request_id


def _approve(team: PolicyStack, request_id: str) -> None:
    approved = team.tucdesk("approve", "--yes", request_id, home=team.approver_home)
    assert approved.returncode == 0, approved.stderr


def test_roster_sign_says_how_many_approvals_it_voids_before_it_asks(team: PolicyStack) -> None:
    pending = _park(team, "echo", "restart", "api")
    approved = _park(team, "echo", "restart", "web")
    _approve(team, approved)
    team.stack.create_operator("dave@demo.localhost", "operator", home=team.base / "dave")

    declined = team.tucdesk("roster", "sign")  # no terminal and no --yes: asks, so declines

    assert declined.returncode == EXIT_DECLINED
    shown = declined.stdout.decode()
    assert "approvals it voids: 1 pending request(s) and 1 approved but unused approval(s)" in (
        shown
    ), shown
    assert team.api_get(f"/v1/approvals/{pending}")["state"] == "pending"
    signed = team.tucdesk("roster", "sign", "--yes")
    assert signed.returncode == 0, signed.stderr
    assert "approvals it voids: 1 pending" in signed.stdout.decode()
    team.wait_applied(team.team_version())


def test_an_approval_whose_approver_was_disabled_since_does_not_run(team: PolicyStack) -> None:
    request_id = _park(team, "echo", "restart", "db")
    _approve(team, request_id)

    disabled = team.tucdesk("operators", "disable", "--yes", APPROVER_EMAIL)

    assert disabled.returncode == 0, disabled.stderr
    said = disabled.stdout.decode()
    assert "agents still accept this operator's key" in said and "`tucdesk roster sign`" in said
    used = team.tucdesk("exec", "--approval", request_id, team.stack.agent_name, "--", "echo",
                        "restart", "db", home=team.operator_home)  # fmt: skip
    assert used.returncode == EXIT_CONNECTION_FAILED
    assert "was disabled; ask again" in _last_line(used)
    assert b"restart db" not in used.stdout
