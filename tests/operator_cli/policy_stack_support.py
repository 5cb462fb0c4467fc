"""A LocalStack with a team of three (admin, operator, approver) under a signed policy.

Shared by test_policy_stack.py and test_approvals_stack.py: every step goes through the real
`tucdesk` command line as a subprocess, and the agent enforces what it was sent.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from operator_cli.client import Session
from operator_cli.home import CliHome
from operator_cli.local_stack import LocalStack

ADMIN_EMAIL = "operator@demo.localhost"  # LocalStack's first operator, an admin
OPERATOR_EMAIL = "alice@demo.localhost"
APPROVER_EMAIL = "bob@demo.localhost"
APPLY_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.2

POLICY_TEMPLATE = """# the test team's policy
version = {version}
mode = "allowlist"
high_risk = ["*rm -rf*"]

[[rules]]
id = "team-may-work"
outcome = "allow"
operators = {{ roles = ["operator", "admin"] }}

[[rules]]
id = "no-shadow"
outcome = "deny"
commands = ["cat /etc/shadow*"]

[[rules]]
id = "restarts-need-approval"
outcome = "approval_required"
commands = ["echo restart *"]

[[rules]]
id = "alice-shells-need-approval"
outcome = "approval_required"
actions = ["shell"]
operators = {{ emails = ["alice@demo.localhost"] }}
{extra}"""


class PolicyStack:
    """The stack and the CLI homes of its three operators."""

    def __init__(self, stack: LocalStack, base: Path) -> None:
        self.stack = stack
        self.base = base
        self.admin_home = stack.cli_home
        self.operator_home = base / "alice"
        self.approver_home = base / "bob"

    def start(self) -> None:
        """Start everything, enroll the operator and approver, sign the first policy."""
        self.stack.start()
        self.stack.create_operator(OPERATOR_EMAIL, "operator", home=self.operator_home)
        self.stack.create_operator(APPROVER_EMAIL, "approver", home=self.approver_home)
        self.set_policy()

    def tucdesk(
        self, *args: str, home: Path | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `tucdesk ARGS` as the operator whose home is ``home`` (default: the admin)."""
        return self.stack.run_tucdesk(*args, home=home or self.admin_home, timeout=timeout)

    def api_get(self, path: str, home: Path | None = None) -> Any:
        """An authenticated GET as the operator whose home is ``home``."""
        session = Session.from_home(CliHome(home or self.admin_home))
        try:
            return session.request("GET", path)
        finally:
            session.close()

    def team_version(self) -> int:
        """The team's current signed policy version (0 before the first)."""
        return int(self.api_get("/v1/policy")["version"])

    def set_policy(self, extra: str = "") -> int:
        """Sign and publish the next version with `tucdesk policy set`; wait for the agent."""
        version = self.team_version() + 1
        path = self.base / f"policy-v{version}.toml"
        path.write_text(POLICY_TEMPLATE.format(version=version, extra=extra))
        result = self.tucdesk("policy", "set", str(path))
        assert result.returncode == 0, result.stderr.decode()
        self.wait_applied(version)
        return version

    def agent_policy_version(self) -> object:
        """The policy version the agent reported applying, as `GET /v1/agents` lists it."""
        for agent in self.api_get("/v1/agents")["agents"]:
            if agent["name"] == self.stack.agent_name:
                return agent.get("policy_version")
        raise AssertionError("the agent is not listed")

    def wait_applied(self, version: int) -> None:
        """Poll until the agent reports ``version`` applied; fail after a deadline."""
        deadline = time.monotonic() + APPLY_TIMEOUT_SECONDS
        while self.agent_policy_version() != version:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the agent did not apply policy version {version} within "
                    f"{APPLY_TIMEOUT_SECONDS:.0f}s (it reports {self.agent_policy_version()})"
                )
            time.sleep(POLL_SECONDS)


@contextmanager
def policy_stack(base: Path) -> Iterator[PolicyStack]:
    """A started PolicyStack under ``base``, stopped on exit (logs printed if start fails)."""
    with LocalStack(base) as stack:
        team = PolicyStack(stack, base)
        try:
            team.start()
        except BaseException:
            for log in sorted(stack.log_dir.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
            raise
        yield team
