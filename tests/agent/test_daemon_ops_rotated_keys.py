"""Service keys the daemon follows through a rotation are sealed into its state: ``status``
then lists what ``tucdesk-rendezvous keys show`` does, and a restart does not pin them again."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import trio

from agent.main import STATUS_RUNNING
from rendezvous.key_rotation import rotate_service_key
from rendezvous.store import open_store
from tests.agent.test_control_client import (
    AGENT_COMMAND,
    WAIT_SECONDS,
    daemon_options,
    enrolled_agent,
    free_port,
    rendezvous_on,
)
from tests.agent.test_daemon_process import agent_cli, wait_for_status

pytestmark = pytest.mark.anyio
PURPOSE = "jwt-issuer"
PINNED_LINE = "pinned rotated service key"


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


async def run_daemon_until(
    common: list[str], environment: dict[str, str], log: Path, wanted: str
) -> str:
    """Run ``tucdesk-agent run`` until ``status`` is connected and shows ``wanted``; stop it
    with SIGTERM; return that status."""
    with log.open("wb") as log_handle:
        process = await trio.lowlevel.open_process(
            [AGENT_COMMAND, "run", *common], env=environment, stderr=log_handle
        )
    try:
        with trio.fail_after(WAIT_SECONDS):
            while True:
                out = await wait_for_status(common, environment, STATUS_RUNNING)
                if wanted in out:
                    break
                await trio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT_SECONDS):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
    return out


async def test_followed_rotated_keys_are_saved_shown_and_pinned_once(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    data_dir, port, state_dir = tmp_path / "data", free_port(), tmp_path / "state"
    common, environment = daemon_options(tmp_path, state_dir)
    async with rendezvous_on(data_dir, store_url, port) as url:
        await enrolled_agent(url, store_url, state_dir)
    async with open_store(store_url) as store:
        rotation = await rotate_service_key(
            store, data_dir, PURPOSE, issuer="tucdesk-rendezvous", retire_old_now=False,
            now=time.time(),
        )  # fmt: skip
    new_line = f"{PURPOSE}: {rotation.new_key.fingerprint} kid={rotation.new_key.key_id}"
    async with rendezvous_on(data_dir, store_url, port):
        first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
        out = await run_daemon_until(common, environment, first_log, new_line)
        assert new_line in out
        assert PINNED_LINE in first_log.read_text()
        # Sealed, not only held by the daemon that followed it: check reads it too.
        code, check, err = await agent_cli(["check", *common], environment)
        assert code == 0, err
        assert new_line in check
        # A restarted daemon starts from the saved pins: nothing new to pin, nothing logged.
        await run_daemon_until(common, environment, second_log, new_line)
        text = second_log.read_text()
        assert "control channel to" in text and PINNED_LINE not in text, text
