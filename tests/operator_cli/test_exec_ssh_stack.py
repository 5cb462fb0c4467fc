"""`tucdesk ssh` as the remote shell of rsync and git, exec's limits and options after the
agent name, close-name suggestions, and a stdout closed early, through the whole real stack
(rendezvous, relay and agent as processes on loopback; the CLI as a subprocess)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from operator_cli.local_stack import LocalStack
from protocol.exec_limits import MAX_COMMAND_ARGUMENTS
from tests.operator_cli.test_sessions_stack import pinned_stack

pytestmark = pytest.mark.slow

TOOL_TIMEOUT_SECONDS = 120
EXIT_STDOUT_CLOSED = 141
EXIT_CONNECTION_FAILED = 255


def _require_programs(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        message = f"these tests drive {', '.join(missing)}, which is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: install it, e.g. scripts/install-system-deps)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with pinned_stack(tmp_path_factory.mktemp("exec-ssh-stack")) as started:
        yield started


@pytest.fixture(scope="module")
def remote_shell(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-word command that is `tucdesk ssh` against this stack, for rsync -e and git."""
    script = tmp_path_factory.mktemp("remote-shell") / "tucdesk-ssh"
    script.write_text(f"#!/bin/sh\nexec {shlex.join(stack.tucdesk_command('ssh'))} \"$@\"\n")
    script.chmod(0o755)
    return str(script)


def _run(argv: list[str], stack: LocalStack, **environment: str) -> subprocess.CompletedProcess[
    bytes
]:
    return subprocess.run(
        argv, capture_output=True, timeout=TOOL_TIMEOUT_SECONDS, check=False,
        env={**stack.cli_env(), **environment},
    )  # fmt: skip


def test_rsync_over_tucdesk_ssh_writes_into_a_directory_with_a_space(
    stack: LocalStack, remote_shell: str, tmp_path: Path
) -> None:
    _require_programs("rsync")
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a file.txt").write_bytes(b"first\n")
    (source / "sub" / "b.bin").write_bytes(bytes(range(256)) * 64)
    target = tmp_path / "x" / "sp dst"
    target.parent.mkdir()
    completed = _run(
        ["rsync", "-a", "-e", remote_shell, f"{source}/", f"{stack.agent_name}:{target}/"], stack
    )
    assert completed.returncode == 0, completed.stderr.decode()
    # The words ssh would join and hand to a shell: not a directory literally named `sp\ dst`.
    assert not (tmp_path / "x" / "sp\\ dst").exists()
    assert (target / "a file.txt").read_bytes() == b"first\n"
    assert (target / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 64


def test_rsync_with_a_user_is_refused_with_the_reason(
    stack: LocalStack, remote_shell: str, tmp_path: Path
) -> None:
    _require_programs("rsync")
    (tmp_path / "src").mkdir()
    completed = _run(
        ["rsync", "-a", "-e", remote_shell, f"{tmp_path}/src/",
         f"root@{stack.agent_name}:{tmp_path}/dst/"], stack,
    )  # fmt: skip
    assert completed.returncode != 0
    assert b"-l root: there is no login choice" in completed.stderr
    assert not (tmp_path / "dst").exists()


def test_git_clone_with_tucdesk_ssh_as_git_ssh_command(
    stack: LocalStack, remote_shell: str, tmp_path: Path
) -> None:
    _require_programs("git")
    work = tmp_path / "work"
    identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.test",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.test"}
    for argv in (["git", "init", "-q", str(work)],
                 ["git", "-C", str(work), "commit", "-q", "--allow-empty", "-m", "first one"],
                 ["git", "clone", "-q", "--bare", str(work), str(tmp_path / "remote repo.git")]):
        assert _run(argv, stack, **identity).returncode == 0
    clone = tmp_path / "clone"
    completed = _run(
        ["git", "clone", "-q", f"{stack.agent_name}:{tmp_path}/remote repo.git", str(clone)],
        stack, GIT_SSH_COMMAND=remote_shell,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr.decode()
    log = _run(["git", "-C", str(clone), "log", "--format=%s"], stack)
    assert log.stdout == b"first one\n"


def test_ssh_joins_the_words_and_runs_them_with_a_shell(stack: LocalStack) -> None:
    completed = stack.run_tucdesk("ssh", stack.agent_name, "echo", "a  b", "|", "tr", "a", "z")
    assert (completed.returncode, completed.stdout) == (0, b"z b\n"), completed.stderr


def test_exec_takes_options_between_the_agent_and_the_double_dash(stack: LocalStack) -> None:
    completed = stack.run_tucdesk("exec", stack.agent_name, "-n", "--", "echo", "hi")
    assert (completed.returncode, completed.stdout) == (0, b"hi\n"), completed.stderr
    # Without an option first, a -- belongs to the command, as it always did.
    completed = stack.run_tucdesk("exec", stack.agent_name, "echo", "--", "-n")
    assert (completed.returncode, completed.stdout) == (0, b"-- -n\n"), completed.stderr


def test_exec_runs_a_command_of_the_most_arguments_a_session_carries(stack: LocalStack) -> None:
    numbers = [str(number) for number in range(1, MAX_COMMAND_ARGUMENTS)]
    completed = stack.run_tucdesk("exec", stack.agent_name, "--", "echo", *numbers)
    assert completed.returncode == 0, completed.stderr.decode()
    assert completed.stdout == (" ".join(numbers) + "\n").encode()


def test_a_mistyped_agent_name_is_answered_with_the_close_names(stack: LocalStack) -> None:
    for typed in (stack.agent_name.upper(), stack.agent_name[:-1]):
        completed = stack.run_tucdesk("exec", typed, "--", "true")
        assert completed.returncode == EXIT_CONNECTION_FAILED
        assert completed.stderr.decode() == (
            f"tucdesk: no agent named {typed!r} in your team; did you mean "
            f"{stack.agent_name}? (see tucdesk agents)\n"
        )


def test_agents_tag_filter_ignores_case(stack: LocalStack) -> None:
    assert stack.run_tucdesk("agents", "tag", stack.agent_name, "--add", "web").returncode == 0
    completed = stack.run_tucdesk("agents", "--tag", "WEB", "--json")
    assert completed.returncode == 0, completed.stderr.decode()
    assert [agent["name"] for agent in json.loads(completed.stdout)] == [stack.agent_name]


@pytest.mark.parametrize("listing", [["agents", "--json"], ["sessions", "--json"]])
def test_a_reader_that_leaves_early_ends_the_listing_quietly_with_141(
    stack: LocalStack, listing: list[str]
) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the CLI writes its first byte, as `| head -0`
    try:
        completed = subprocess.run(
            stack.tucdesk_command(*listing), stdout=writer, stderr=subprocess.PIPE,
            timeout=TOOL_TIMEOUT_SECONDS, env=stack.cli_env(), check=False,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert (completed.returncode, completed.stderr) == (EXIT_STDOUT_CLOSED, b"")


def test_exec_by_tag_runs_on_each_tagged_agent_with_prefixed_lines_and_a_summary(
    tmp_path: Path,
) -> None:
    with pinned_stack(tmp_path / "fleet") as fleet:
        first = fleet.agent_name
        fleet.enroll_agent("web-b", state_dir=tmp_path / "web-b")
        fleet.start_agent(tmp_path / "web-b", name="agent-b")
        fleet.wait_agent_online("web-b")
        fleet.enroll_agent("web-c", state_dir=tmp_path / "web-c")  # never started: offline
        fleet.agent_name = first
        for name in (first, "web-b", "web-c"):
            assert fleet.run_tucdesk("agents", "tag", name, "--add", "fleet").returncode == 0
        script = 'echo "out $TUCDESK_SESSION_ID"; echo err >&2; test "$(hostname)" = never'
        completed = fleet.run_tucdesk("exec", "--tag", "FLEET", "--", "sh", "-c", script)
        assert completed.returncode == 1
        width = len(max(first, "web-b", key=len))
        out = completed.stdout.decode().splitlines()
        assert sorted(line.split(": ")[0].strip() for line in out) == sorted([first, "web-b"])
        assert all(line.split(": ", 1)[1].startswith("out ses_") for line in out)
        err = completed.stderr.decode()
        assert f"{'web-b':<{width}}: err\n" in err
        assert err.endswith(
            "tucdesk: 0 of 3 agents succeeded\n"
            f"  {first:<{width}}  exit 1\n  {'web-b':<{width}}  exit 1\n"
            f"  {'web-c':<{width}}  offline: not run\n"
        )
        fleet.run_tucdesk("agents", "tag", "web-c", "--remove", "fleet")
        completed = fleet.run_tucdesk("exec", "--tag", "fleet", "--", "true")
        assert completed.returncode == 0, completed.stderr.decode()
        assert completed.stderr.decode().startswith("tucdesk: 2 of 2 agents succeeded\n")
        # The command's own 255 is its status, not a session that could not be set up.
        completed = fleet.run_tucdesk("exec", "--tag", "fleet", "--", "sh", "-c", "exit 255")
        assert completed.returncode == 1
        assert completed.stderr.decode() == (
            "tucdesk: 0 of 2 agents succeeded\n"
            f"  {first:<{width}}  exit 255\n  {'web-b':<{width}}  exit 255\n"
        )


def test_exec_by_tag_tells_a_lost_connection_from_a_session_never_set_up(
    tmp_path: Path,
) -> None:
    with pinned_stack(tmp_path / "lossy") as lossy:
        tagged = lossy.run_tucdesk("agents", "tag", lossy.agent_name, "--add", "lossy")
        assert tagged.returncode == 0, tagged.stderr.decode()
        running = subprocess.Popen(
            lossy.tucdesk_command("exec", "--tag", "lossy", "--", "sh", "-c",
                                  "echo started; exec sleep 60"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=lossy.cli_env(),
        )  # fmt: skip
        try:
            assert running.stdout is not None
            assert running.stdout.readline() == f"{lossy.agent_name}: started\n".encode()
            lossy.kill_relay()  # the session ran; its exit status will never come
            _, err = running.communicate(timeout=TOOL_TIMEOUT_SECONDS)
        finally:
            running.kill()
        assert running.returncode == 1
        assert err.decode().endswith(
            "tucdesk: 0 of 1 agents succeeded\n"
            f"  {lossy.agent_name}  exit 255 (ended without an exit status)\n"
        ), err.decode()
