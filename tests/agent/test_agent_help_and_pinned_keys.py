"""What `tucdesk-agent --help`, `check` and `status` tell a host admin: every setting, and the
service keys pinned at enrollment, comparable with `tucdesk-rendezvous keys show`."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import trio

from agent.config import SYSTEM_STATE_DIR, AgentConfig
from agent.main import build_parser
from protocol.config_file import read_config_table
from tests.agent.test_control_client import daemon_options
from tests.agent.test_enroll import registration_key, run_agent_cli
from tests.rendezvous.live_server import live_service

REPOSITORY = Path(__file__).resolve().parents[2]
KEY_LINE = re.compile(r"^\s*([a-z-]+: SHA256:\S+ kid=\S+)$", re.MULTILINE)


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


@pytest.mark.parametrize("command", [[], ["run"], ["check"], ["enroll"], ["recordings", "prune"]])
def test_help_lists_every_setting_with_its_environment_variable(command: list[str]) -> None:
    parser = build_parser()
    for name in command:
        parser = next(
            action.choices[name] for action in parser._actions  # noqa: SLF001
            if isinstance(action.choices, dict) and name in action.choices
        )
    text = parser.format_help()
    for item in dataclasses.fields(AgentConfig):
        assert f"  {item.name}, TUCDESK_AGENT_{item.name.upper()}\n" in text, item.name
    assert "handshake_timeout_seconds" in text and "default 15\n" in text
    assert "reconnect_cap_seconds" in text and "default 30\n" in text


@pytest.mark.anyio
async def test_check_and_status_print_the_pinned_service_keys_as_keys_show_does(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    common, _ = daemon_options(tmp_path, tmp_path / "state")
    async with live_service(tmp_path / "data", store_url) as (url, _):
        key, _ = await registration_key(store_url)
        code, _, err = await run_agent_cli(
            "enroll", "--server", url, *common, env={"TUCDESK_REGISTRATION_KEY": key}
        )
        assert code == 0, err
        shown = await trio.run_process(
            [sys.executable, "-m", "rendezvous.main", "keys", "show",
             "--data-dir", str(tmp_path / "data"), "--database", store_url],
            capture_stdout=True, check=True,
        )  # fmt: skip
    service_keys = KEY_LINE.findall(shown.stdout.decode())
    assert len(service_keys) >= 3
    _, status, _ = await run_agent_cli("status", *common)
    code, check, err = await run_agent_cli("check", *common)
    assert (
        "Service keys: pinned at enrollment or followed since through signed rotations; "
        "compare with tucdesk-rendezvous keys show"
    ) in status
    assert sorted(KEY_LINE.findall(status)) == sorted(service_keys)
    assert sorted(KEY_LINE.findall(check)) == sorted(service_keys)
    assert re.search(r"^Handshake: +at most 15s \(handshake_timeout_seconds\)$", check, re.M)
    assert re.search(r"^Reconnect: +waits at most 30s .*\(reconnect_cap_seconds\)$", check, re.M)


def test_the_systemd_unit_and_the_example_config_use_one_state_dir() -> None:
    unit = (REPOSITORY / "deploy" / "agent" / "tucdesk-agent.service").read_text()
    # An environment setting would outrank agent.toml's state_dir for run but not for enroll.
    assert not [line for line in unit.splitlines() if line.startswith("Environment=TUCDESK_AGENT")]
    example = read_config_table(
        REPOSITORY / "deploy" / "agent" / "agent.example.toml", "agent", 64 * 1024, ValueError
    )
    assert Path(example["state_dir"]) == SYSTEM_STATE_DIR
    assert "--server https://rendezvous.example.com:8443 " in unit
