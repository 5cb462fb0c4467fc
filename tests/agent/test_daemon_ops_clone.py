"""A cloned agent (a VM template: same state, same machine) is named in the rendezvous's log,
not only in the audit export: the agent id and where each copy connects from."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from agent.control_client import ControlClient
from tests.agent.test_control_client import MACHINE, WAIT_SECONDS, enrolled_agent
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


async def test_a_second_live_copy_of_an_agent_is_logged_as_a_warning_naming_both_peers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    with caplog.at_level(logging.WARNING, "tucdesk"):
        async with live_service(tmp_path / "data", store_url) as (url, _):
            state = await enrolled_agent(url, store_url, tmp_path / "state")
            original = ControlClient(state, MACHINE.fingerprint(), lambda offer: None)
            # The clone booted from the template: same state, same machine, no connection
            # of its own to name.
            clone = ControlClient(state, MACHINE.fingerprint(), lambda offer: None)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(original.run)
                with trio.fail_after(WAIT_SECONDS):
                    await original.wait_connected()
                nursery.start_soon(clone.run)
                with trio.fail_after(WAIT_SECONDS):
                    await clone.wait_connected()
                nursery.cancel_scope.cancel()
    warnings = [
        record.getMessage() for record in caplog.records
        if record.levelno == logging.WARNING and "clone anomaly" in record.getMessage()
    ]  # fmt: skip
    assert len(warnings) == 1, warnings
    [warning] = warnings
    assert warning.startswith(
        f"clone anomaly (concurrent_connection): agent {state.agent_id} of team "
        f"{state.team_id} connected as {clone.info.connection_id} from 127.0.0.1:"
    ), warning
    assert f"also live: {original.info.connection_id} from 127.0.0.1:" in warning
    assert "re-enroll the clone" in warning
