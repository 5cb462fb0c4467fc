"""`tucdesk` driven from CI jobs and scripts, on a whole stack (real rendezvous, relay, agent):
a parallel fleet run from one address rides out the relay's rate limit, a read-only CLI home
still runs commands on pinned agents, and strict agent key checking with a pinned expected
fingerprint replaces trust on first use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from operator_cli.known_agents import KNOWN_AGENTS_FILE_NAME
from tests.stack.conftest import TappedStack, _logs, _started

pytestmark = pytest.mark.slow

EXEC_TIMEOUT_SECONDS = 60
# A relay much stricter than its defaults (10 a second, a burst of 40), so that a handful of
# parallel execs stands for a fleet run of a hundred: each exec is two connections from
# 127.0.0.1 (its own and, on loopback, the agent's).
RELAY_RATE_LIMIT = 2
RELAY_RATE_BURST = 2
PARALLEL_EXECS = 10  # 20 connections: 18 over the burst, 9 s of the rate


@pytest.fixture(scope="module")
def ci_stack(tmp_path_factory: pytest.TempPathFactory):
    stack = _started(TappedStack(
        tmp_path_factory.mktemp("ci-stack"),
        relay_args=("--rate-limit", str(RELAY_RATE_LIMIT), "--rate-burst", str(RELAY_RATE_BURST)),
    ))
    try:
        yield stack
    finally:
        stack.close()


def fresh_home(stack: TappedStack, path: Path) -> Path:
    """A copy of the stack's logged-in CLI home with no agent pinned (a fresh CI runner)."""
    shutil.copytree(stack.cli_home, path)
    for leftover in path.glob(f"*{KNOWN_AGENTS_FILE_NAME}*"):
        leftover.unlink()
    return path


def tucdesk(stack: TappedStack, home: Path, *args: str, env: dict[str, str] | None = None,
            read_only: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run `tucdesk --home HOME ARGS`; with ``read_only`` on a read-only mount of HOME."""
    command = stack.tucdesk_command(*args, home=home)
    if read_only:
        command = read_only_command(home, command)
    return subprocess.run(
        command, input=b"", capture_output=True, timeout=EXEC_TIMEOUT_SECONDS,
        env={**stack.cli_env(home), **(env or {})}, check=False,
    )


def read_only_command(directory: Path, command: list[str]) -> list[str]:
    """``command`` run with ``directory`` read-only: a read-only bind mount in a private mount
    namespace (root ignores permissions), else without write permission."""
    if os.geteuid() != 0:
        for path in [directory, *directory.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return command
    if shutil.which("unshare") is None or subprocess.run(
        ["unshare", "-m", "true"], capture_output=True, check=False
    ).returncode != 0:
        pytest.skip("no unshare -m here to mount the CLI home read-only")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh", str(directory), *command]


def test_parallel_execs_over_the_relay_rate_limit_all_succeed(ci_stack: TappedStack) -> None:
    # The first exec pins the agent, so that the parallel ones only check the pin.
    assert ci_stack.run_tucdesk("exec", ci_stack.agent_name, "--", "true").returncode == 0
    runs = [
        subprocess.Popen(
            ci_stack.tucdesk_command("exec", ci_stack.agent_name, "--", "sh", "-c",
                                     f"echo run-{index}"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=ci_stack.cli_env(),
        )
        for index in range(PARALLEL_EXECS)
    ]
    results = [(run.wait(EXEC_TIMEOUT_SECONDS), run.stdout, run.stderr) for run in runs]
    outcomes = []
    for code, out, err in results:
        assert out is not None and err is not None
        outcomes.append((code, out.read(), err.read()))
        out.close()
        err.close()
    failed = [(index, outcome) for index, outcome in enumerate(outcomes)
              if outcome[:2] != (0, b"run-%d\n" % index)]
    assert not failed, (failed, _logs(ci_stack)[-3000:])
    # The relay did refuse some of them (rate_limited) and they came back: the logs say so.
    assert "rate_limited" in (ci_stack.log_dir / "relay.log").read_text(errors="replace")


def test_a_read_only_home_runs_commands_on_pinned_agents(
    ci_stack: TappedStack, tmp_path: Path
) -> None:
    home = fresh_home(ci_stack, tmp_path / "ci1")
    assert tucdesk(ci_stack, home, "exec", ci_stack.agent_name, "--", "true").returncode == 0
    done = tucdesk(ci_stack, home, "exec", ci_stack.agent_name, "--", "echo", "hi",
                   read_only=True)
    assert (done.returncode, done.stdout) == (0, b"hi\n"), done.stderr


def test_a_first_pin_on_a_read_only_home_fails_naming_the_file(
    ci_stack: TappedStack, tmp_path: Path
) -> None:
    home = fresh_home(ci_stack, tmp_path / "ci2")
    done = tucdesk(ci_stack, home, "exec", ci_stack.agent_name, "--", "echo", "hi",
                   read_only=True)
    assert done.returncode == 255
    error = done.stderr.decode()
    assert str(home / KNOWN_AGENTS_FILE_NAME) in error
    assert "cannot pin the key of agent" in error
    assert "Read-only file system" in error or "Permission denied" in error
    assert done.stdout == b""


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_strict_agent_keys_refuse_an_agent_not_pinned_and_pin_nothing(
    ci_stack: TappedStack, tmp_path: Path, how: str
) -> None:
    home = fresh_home(ci_stack, tmp_path / "ci3")
    args = ["exec", ci_stack.agent_name, "--", "echo", "ran"]
    done = (tucdesk(ci_stack, home, "--strict-agent-keys", *args) if how == "flag"
            else tucdesk(ci_stack, home, *args, env={"TUCDESK_STRICT_AGENT_KEYS": "1"}))
    assert done.returncode == 255
    assert done.stdout == b""
    error = done.stderr.decode()
    assert "no key is pinned for agent" in error and "strict" in error
    assert f"tucdesk agents trust {ci_stack.agent_name} --fingerprint SHA256:" in error
    assert not (home / KNOWN_AGENTS_FILE_NAME).exists()


def test_trust_with_an_expected_fingerprint_pins_only_that_key_for_strict_runs(
    ci_stack: TappedStack, tmp_path: Path
) -> None:
    home = fresh_home(ci_stack, tmp_path / "ci4")
    agent = ci_stack.find_agent()
    assert agent is not None
    strict = {"TUCDESK_STRICT_AGENT_KEYS": "1"}
    garbled = tucdesk(ci_stack, home, "agents", "trust", agent.name, "--fingerprint",
                      agent.fingerprint[:-1])
    assert garbled.returncode == 1 and b"is not a key fingerprint" in garbled.stderr
    wrong = "SHA256:" + "A" * 43
    refused = tucdesk(ci_stack, home, "agents", "trust", agent.name, "--fingerprint", wrong)
    assert refused.returncode == 1
    assert agent.fingerprint in refused.stderr.decode() and wrong in refused.stderr.decode()
    assert not (home / KNOWN_AGENTS_FILE_NAME).exists()

    pinned = tucdesk(ci_stack, home, "agents", "trust", agent.name, "--fingerprint",
                     agent.fingerprint)
    assert pinned.returncode == 0, pinned.stderr
    pins = json.loads((home / KNOWN_AGENTS_FILE_NAME).read_text())
    assert list(pins["agents"]) == [agent.id]
    again = tucdesk(ci_stack, home, "agents", "trust", agent.name, "--fingerprint",
                    agent.fingerprint)
    assert again.returncode == 0 and b"already trusted" in again.stdout

    done = tucdesk(ci_stack, home, "exec", agent.name, "--", "echo", "ran", env=strict)
    assert (done.returncode, done.stdout) == (0, b"ran\n"), done.stderr
    assert b"Pinned" not in done.stderr


def test_a_read_only_home_with_an_expired_token_signs_in_again_for_the_command(
    ci_stack: TappedStack, tmp_path: Path
) -> None:
    home = fresh_home(ci_stack, tmp_path / "ci-expired")
    assert tucdesk(ci_stack, home, "exec", ci_stack.agent_name, "--", "true").returncode == 0
    token_file = home / "token.json"
    record = json.loads(token_file.read_text())
    record["expires_at"] = 1  # long expired: the next command must sign in again
    token_file.write_text(json.dumps(record))
    done = tucdesk(ci_stack, home, "exec", ci_stack.agent_name, "--", "echo", "hi",
                   read_only=True)
    assert (done.returncode, done.stdout) == (0, b"hi\n"), done.stderr
    warning = done.stderr.decode()
    assert "cannot cache the new access token: " in warning and str(token_file) in warning
    assert warning.count("cannot cache") == 1  # the fresh token served the whole command
    assert json.loads(token_file.read_text())["expires_at"] == 1  # nothing written
