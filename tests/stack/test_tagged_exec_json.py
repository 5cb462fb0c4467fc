"""`tucdesk exec --tag` for scripts, through the whole real stack (rendezvous, relay and agents
as processes on loopback; the CLI as a subprocess): a --json result on stdout alone, --parallel
bounding how many sessions run at once, and a clear word when several tags match nobody."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from operator_cli.local_stack import LocalStack
from tests.operator_cli.test_sessions_stack import pinned_stack

pytestmark = pytest.mark.slow

EXIT_SOME_FAILED = 1
EXIT_CONNECTION_FAILED = 255
# Each agent's command: when it started and ended (one clock: the agents share this host).
TIMED = 'echo "start $(date +%s.%N)"; sleep 1.5; echo "end $(date +%s.%N)"'


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A stack with two online agents and one offline, all tagged fleet."""
    base = tmp_path_factory.mktemp("tagged-exec-json")
    with pinned_stack(base / "stack") as stack:
        first = stack.agent_name
        stack.enroll_agent("web-b", state_dir=base / "web-b")
        stack.start_agent(base / "web-b", name="agent-b")
        stack.wait_agent_online("web-b")
        stack.enroll_agent("web-c", state_dir=base / "web-c")  # never started: offline
        stack.agent_name = first
        for name in (first, "web-b", "web-c"):
            assert stack.run_tucdesk("agents", "tag", name, "--add", "fleet").returncode == 0
        yield stack


def test_json_puts_one_document_on_stdout_and_the_output_on_stderr(fleet: LocalStack) -> None:
    completed = fleet.run_tucdesk("exec", "--tag", "fleet", "--json", "--", "sh", "-c",
                                  "echo out; echo err >&2; exit 3")
    assert completed.returncode == EXIT_SOME_FAILED  # unchanged by --json
    document = json.loads(completed.stdout)  # stdout is the document alone
    first = fleet.agent_name
    ids = {agent["name"]: agent["id"] for agent in json.loads(
        fleet.run_tucdesk("agents", "--json").stdout)}
    assert document == {
        "succeeded": 0,
        "total": 3,
        "agents": [
            {"name": name, "id": ids[name], "online": True, "exit_status": 3, "note": None}
            for name in sorted([first, "web-b"])
        ] + [{"name": "web-c", "id": ids["web-c"], "online": False, "exit_status": None,
              "note": "offline: not run"}],
    }
    err = completed.stderr.decode()
    width = len(max(first, "web-b", key=len))
    for name in (first, "web-b"):
        assert f"{name:<{width}}: out\n" in err and f"{name:<{width}}: err\n" in err
    assert "tucdesk: 0 of 3 agents succeeded\n" in err  # the summary stays, for the job's log


def _intervals(stdout: bytes) -> list[tuple[float, float]]:
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    for line in stdout.decode().splitlines():
        name, said = line.split(": ", 1)
        word, when = said.split()
        (starts if word == "start" else ends)[name.strip()] = float(when)
    return sorted((starts[name], ends[name]) for name in starts)


def test_parallel_one_runs_the_agents_one_after_the_other(fleet: LocalStack) -> None:
    fleet.run_tucdesk("agents", "tag", "web-c", "--remove", "fleet")
    try:
        completed = fleet.run_tucdesk("exec", "--tag", "fleet", "--parallel", "1", "--",
                                      "sh", "-c", TIMED)
        assert completed.returncode == 0, completed.stderr.decode()
        (first_start, first_end), (second_start, _) = _intervals(completed.stdout)
        assert first_start < first_end <= second_start  # the default (8) would overlap them
    finally:
        fleet.run_tucdesk("agents", "tag", "web-c", "--add", "fleet")


def test_several_tags_matching_no_agent_say_every_tag_is_needed(fleet: LocalStack) -> None:
    completed = fleet.run_tucdesk("exec", "--tag", "fleet", "--tag", "db", "--", "true")
    assert completed.returncode == EXIT_CONNECTION_FAILED
    assert completed.stderr.decode() == (
        "tucdesk: no agent of your team carries every tag: fleet, db "
        "(see tucdesk agents --tag TAG)\n"
    )
    assert completed.stdout == b""
