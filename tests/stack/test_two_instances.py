"""Two rendezvous processes on one PostgreSQL database behave as one: an operator served by
instance B reaches an agent whose control channel is held by instance A, with real processes."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from operator_cli.home import CliHome
from tests.stack.conftest import StackFactory

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_an_operator_on_one_instance_reaches_an_agent_on_the_other(
    stack_factory: StackFactory,
) -> None:
    stack = stack_factory("postgres")  # instance A holds the agent's control channel
    instance_b = stack.start_rendezvous(name="rendezvous-b")
    assert instance_b != stack.server_url
    # The same admin, whose key the agent pinned at enrollment, now talking to instance B.
    home_b = stack.base_dir / "cli-b"
    shutil.copytree(stack.cli_home, home_b)
    settings = CliHome(home_b).load_settings()
    assert settings is not None
    CliHome(home_b).save_settings(dataclasses.replace(settings, server=instance_b))
    listed = stack.find_agent(home=home_b)
    assert listed is not None and listed.online, "instance B should see the agent online via A"
    completed = stack.run_tucdesk(
        "exec", stack.agent_name, "--", "sh", "-c", "echo reached via B; exit 4", home=home_b
    )
    assert completed.returncode == 4, completed.stderr
    assert completed.stdout == b"reached via B\n"
