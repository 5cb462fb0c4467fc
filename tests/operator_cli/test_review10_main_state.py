"""main() leaves no process-wide setting behind for a later main() in the same process (tests,
scripts that import the CLI): neither an --approval-timeout nor --strict-agent-keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from operator_cli import approval_wait
from operator_cli.known_agents import STRICT_AGENT_KEYS_ENV
from operator_cli.main import main


def test_an_ssh_after_an_exec_with_an_approval_timeout_waits_unbounded(tmp_path: Path) -> None:
    home = str(tmp_path / "home")  # never logged in: both commands stop after their options
    assert main(["--home", home, "exec", "--approval-timeout", "5s", "web1", "--", "true"]) == 255
    assert approval_wait._approval_timeout_seconds == 5
    assert main(["--home", home, "ssh", "web1", "true"]) == 255
    assert approval_wait._approval_timeout_seconds is None


def test_strict_agent_keys_lasts_for_its_own_command_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STRICT_AGENT_KEYS_ENV, raising=False)
    home = str(tmp_path / "home")
    main(["--home", home, "--strict-agent-keys", "agents"])
    assert STRICT_AGENT_KEYS_ENV not in os.environ


@pytest.mark.parametrize("before", ["0", "1"])
def test_a_strict_agent_keys_setting_made_before_main_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: str
) -> None:
    monkeypatch.setenv(STRICT_AGENT_KEYS_ENV, before)
    main(["--home", str(tmp_path / "home"), "--strict-agent-keys", "agents"])
    assert os.environ[STRICT_AGENT_KEYS_ENV] == before
