"""What the host admin sees when something is wrong: one line that names the real reason."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from agent.config import SYSTEM_CONFIG_FILE, load_config
from agent.connection_failure import describe_connection_failure
from agent.control_client import ControlClient, _describe
from agent.enrollment import EnrollmentRequest, check_registration_key, enroll
from agent.errors import ConfigError, ControlChannelError, EnrollmentError
from agent.main import EXIT_CONFIG
from agent.main import main as agent_main
from agent.state_file import AgentState, save_state
from protocol.config_file import read_config_table
from tests.agent.test_control_client import (
    AGENT_COMMAND,
    MACHINE,
    WAIT_SECONDS,
    daemon_options,
    fast_backoff,
    free_port,
)
from tests.agent.test_enroll import registration_key, run_agent_cli
from tests.rendezvous.live_server import live_service, make_certificate

pytestmark = pytest.mark.anyio
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- 2, 11: enroll --force tells the truth; no httpx chatter -----------------------------------


async def test_forced_enroll_says_the_old_registration_stays_until_an_admin_removes_it(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    common, environment = daemon_options(tmp_path, tmp_path / "state")
    async with live_service(tmp_path / "data", store_url) as (url, _):
        first_key, _ = await registration_key(store_url)
        code, out, err = await run_agent_cli(
            "enroll", "--server", url, *common, env={"TUCDESK_REGISTRATION_KEY": first_key}
        )
        assert code == 0, err
        assert "HTTP Request" not in err and err == ""
        old_id = re.search(r"Enrolled agent (agt_\w+)", out)
        assert old_id is not None
        second_key, _ = await registration_key(store_url)
        code, out, err = await run_agent_cli(
            "enroll", "--server", url, *common, env={"TUCDESK_REGISTRATION_KEY": second_key}
        )
        assert code == 1
        assert "tucdesk agents remove" in one_line(err) and "stops working" not in err
        code, out, err = await run_agent_cli(
            "enroll", "--server", url, "--force", *common,
            env={"TUCDESK_REGISTRATION_KEY": second_key},
        )
    assert code == 0, err
    assert f"tucdesk agents remove {old_id.group(1)}" in out
    assert "stays listed" in out and "could still connect" in out


def test_a_malformed_registration_key_names_the_real_command() -> None:
    with pytest.raises(EnrollmentError, match=r"'tucdesk keys create'\)$"):
        check_registration_key("not-a-key")


# ---- 3: connection failures name their cause ---------------------------------------------------


async def test_enroll_over_tls_names_the_certificate_verification_failure(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    cert, key = make_certificate(tmp_path / "tls")
    other_ca, _ = make_certificate(tmp_path / "other")
    async with live_service(tmp_path / "data", store_url, tls_cert=cert, tls_key=key) as (
        url, _,
    ):
        registration, _ = await registration_key(store_url)
        request = EnrollmentRequest(url, registration, tmp_path / "s" / "agent.state")
        with pytest.raises(EnrollmentError) as refused:
            await enroll(request, MACHINE)
        assert "TLS: certificate verify failed: " in str(refused.value)
        assert "pass --ca-file" in str(refused.value)
        assert refused.value.__cause__ is not None  # --debug shows the whole chain
        common, _ = daemon_options(tmp_path, tmp_path / "s2")
        code, _, err = await run_agent_cli(
            "enroll", "--server", url, "--ca-file", str(other_ca), *common,
            env={"TUCDESK_REGISTRATION_KEY": registration},
        )
        # The key was not spent by the failures: it still enrolls with the right CA.
        await enroll(
            EnrollmentRequest(url, registration, request.state_file, ca_file=cert), MACHINE
        )
    assert code == 1
    line = one_line(err)
    assert "TLS: certificate verify failed: " in line
    assert "is --ca-file the CA that signed the rendezvous certificate?" in line
    assert registration not in err


async def test_control_channel_to_a_stopped_rendezvous_says_connection_refused() -> None:
    state = AgentState(
        agent_id="agt_1", team_id="tm_1", server_url=f"http://127.0.0.1:{free_port()}",
        identity_seed=bytes(32),
    )
    client = ControlClient(state, MACHINE.fingerprint(), lambda o: None, backoff=fast_backoff())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        with trio.fail_after(WAIT_SECONDS):
            while client.last_error is None:  # noqa: ASYNC110 - set by the client's loop
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert client.last_error.startswith("connection refused"), client.last_error


def test_failures_wrapped_in_exception_groups_and_causes_are_unwrapped() -> None:
    assert _describe(ExceptionGroup("x", [ControlChannelError("no word for 60s")])) == (
        "no word for 60s"
    )
    closed = ConnectionClosed(None)
    assert _describe(ExceptionGroup("x", [closed])) == "closed by the rendezvous"
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as error:
            raise ValueError("") from error
    except ValueError as wrapped:
        text = describe_connection_failure(BaseExceptionGroup("x", [wrapped]))
    assert text.startswith("connection refused")
    assert describe_connection_failure(ExceptionGroup("y", [RuntimeError("")])) == (
        "RuntimeError"
    )


# ---- 4: one line, never a traceback ----------------------------------------------------------


def https_state_dir(tmp_path: Path, ca_file: str | None) -> tuple[list[str], dict[str, str]]:
    """A state dir enrolled (as far as the agent can tell) with an https rendezvous."""
    state_dir = tmp_path / "state"
    common, environment = daemon_options(tmp_path, state_dir)
    state = AgentState(
        agent_id="agt_1", team_id="tm_1", server_url="https://127.0.0.1:9",
        identity_seed=bytes(32), ca_file=ca_file,
    )
    save_state(state_dir / "agent.state", state, MACHINE)
    return common, environment


@pytest.mark.parametrize("how", ["flag", "moved"])
async def test_an_unusable_ca_file_stops_run_with_one_line(tmp_path: Path, how: str) -> None:
    moved = tmp_path / "moved-ca.pem"
    common, environment = https_state_dir(tmp_path, str(moved) if how == "moved" else None)
    extra = ["--ca-file", str(tmp_path / "nope.pem")] if how == "flag" else []
    code, _, err = await run_agent_cli("run", *common, *extra, env=environment)
    assert code == EXIT_CONFIG
    assert "cannot load the CA file" in one_line(err)


async def test_a_state_file_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    common, environment = daemon_options(tmp_path, tmp_path / "state")
    (tmp_path / "state" / "agent.state").mkdir(parents=True)
    for command, expected in (("status", 1), ("run", EXIT_CONFIG)):
        code, _, err = await run_agent_cli(command, *common, env=environment)
        assert code == expected
        assert "agent.state: not a regular file" in one_line(err)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [(errno.EIO, 1), (errno.EMFILE, 1), (errno.EACCES, EXIT_CONFIG)],
)
def test_run_exits_78_only_for_a_state_error_that_a_restart_would_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: int, expected: int
) -> None:
    # 78 stops systemd's restarts (RestartPreventExitStatus): an I/O error or a full fd table
    # may pass, so it exits 1 and is retried; a refused permission would only repeat.
    common, environment = https_state_dir(tmp_path, None)
    state_file = str(tmp_path / "state" / "agent.state")
    real_open = os.open

    def failing_open(path: object, *args: object, **kwargs: object) -> int:
        if os.fspath(path) == state_file:  # type: ignore[arg-type]
            raise OSError(failure, os.strerror(failure), state_file)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", failing_open)
    assert agent_main(["run", *common], environment) == expected


SETPRIV = shutil.which("setpriv")
# Without these capabilities even root is refused by a directory's permissions.
NO_FILE_OVERRIDES = "-dac_override,-dac_read_search"


@pytest.mark.skipif(SETPRIV is None, reason="needs setpriv (util-linux)")
async def test_an_unreadable_state_dir_is_one_line(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o000)
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("TUCDESK_AGENT_")
    }
    for command in (["status"], ["recordings", "list"]):
        with trio.fail_after(WAIT_SECONDS):
            result = await trio.run_process(
                [str(SETPRIV), "--bounding-set", NO_FILE_OVERRIDES, "--inh-caps",
                 NO_FILE_OVERRIDES, AGENT_COMMAND, *command, "--state-dir", str(state_dir)],
                capture_stdout=True, capture_stderr=True, check=False, env=environment,
            )
        err = result.stderr.decode()
        assert result.returncode == 1, err
        assert f"{state_dir}/" in one_line(err) and "Permission denied" in err


@pytest.mark.parametrize(
    ("line", "setting"),
    [
        ("max_sessions = inf", "max_sessions"),
        ("max_recording_bytes = 1e400", "max_recording_bytes"),
        ("max_sessions = 5.7", "max_sessions"),
    ],
)
def test_non_integer_numbers_are_refused_not_truncated(
    tmp_path: Path, line: str, setting: str
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f"[agent]\n{line}\n")
    with pytest.raises(ConfigError, match=f"not a valid value for {setting} .*whole number"):
        load_config({}, {}, config)


# ---- 5: the systemd unit and the default config file -----------------------------------------


def test_the_system_config_file_is_read_only_when_present(tmp_path: Path) -> None:
    system_file = tmp_path / "agent.toml"
    assert load_config({}, {}, None, system_file).max_sessions == 64
    system_file.write_text("[agent]\nmax_sessions = 7\n")
    expected = 7 if os.geteuid() == 0 else 64
    assert load_config({}, {}, None, system_file).max_sessions == expected
    with pytest.raises(ConfigError, match="no such config file"):
        load_config({}, {}, tmp_path / "named-but-missing.toml", system_file)


def test_the_systemd_unit_runs_without_a_config_file_and_stops_on_config_errors() -> None:
    unit = (REPOSITORY / "deploy" / "agent" / "tucdesk-agent.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "--config" not in exec_start
    assert f"RestartPreventExitStatus={EXIT_CONFIG}" in unit
    assert str(SYSTEM_CONFIG_FILE) in unit
    docs = (REPOSITORY / "docs" / "self-hosting.md").read_text()
    assert "/etc/tucdesk-agent/agent.toml" not in docs and str(SYSTEM_CONFIG_FILE) in docs


# ---- 6: the state dir is checked before the one-time key is spent -----------------------------


@pytest.mark.parametrize("broken", ["state dir is a file", "state file is a directory"])
async def test_enroll_checks_the_state_dir_before_spending_the_key(
    tmp_path: Path, broken: str
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    state_dir = tmp_path / "state"
    if broken == "state dir is a file":
        state_dir.write_text("")
        expected = "the state directory is a file, not a directory"
    else:
        (state_dir / "agent.state").mkdir(parents=True)
        expected = "agent.state: exists and is not a regular file"
    common, _ = daemon_options(tmp_path, state_dir)
    async with live_service(tmp_path / "data", store_url) as (url, _):
        key, _ = await registration_key(store_url)
        code, _, err = await run_agent_cli(
            "enroll", "--server", url, "--force", *common, env={"TUCDESK_REGISTRATION_KEY": key}
        )
        assert code == 1
        assert expected in one_line(err) and "File exists" not in err
        # The key is still unused.
        await enroll(EnrollmentRequest(url, key, tmp_path / "good" / "agent.state"), MACHINE)


# ---- 8: configuration checks and `check` ------------------------------------------------------


def test_keys_outside_the_agent_table_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("max_sessions = 3\nshell = '/bin/sh'\n[agent]\nuser = 'root'\n")
    with pytest.raises(ConfigError, match=r"max_sessions, shell must go inside the \[agent\]"):
        load_config({}, {}, config)
    config.write_text("max_sessions = 3\n")  # no [agent] table: the top level is the table
    assert load_config({}, {}, config).max_sessions == 3


def test_a_config_file_shared_with_the_relay_is_read_as_the_relay_reads_it(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tucdesk.toml"
    config.write_text("[agent]\nmax_sessions = 7\n[relay]\nlisten = '0.0.0.0:1'\n")
    assert load_config({}, {}, config).max_sessions == 7
    # The relay's reader (relay/config.py) of the same file.
    assert read_config_table(config, "relay", 1 << 16, ConfigError) == {"listen": "0.0.0.0:1"}


def test_unknown_agent_environment_variables_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="tucdesk.agent.config"):
        load_config({}, {"TUCDESK_AGENT_MAX_SESSION": "3", "TUCDESK_AGENT_USER": "root"})
    assert caplog.messages == [
        "ignoring unknown environment variable TUCDESK_AGENT_MAX_SESSION (did you mean "
        "TUCDESK_AGENT_MAX_SESSIONS?)"
    ]


async def test_run_refuses_a_session_user_that_does_not_exist(tmp_path: Path) -> None:
    common, environment = https_state_dir(tmp_path, None)
    code, _, err = await run_agent_cli(
        "run", *common, "--user", "no-such-user-here", env=environment
    )
    assert code == EXIT_CONFIG
    assert "user 'no-such-user-here' does not exist" in one_line(err)


async def test_check_prints_what_run_would_use_and_exits_by_the_outcome(tmp_path: Path) -> None:
    common, environment = https_state_dir(tmp_path, None)
    code, out, err = await run_agent_cli("check", *common, env=environment)
    assert code == 0, out + err
    assert "State:         agent agt_1" in out and "Configuration OK" in out
    assert "CA file:       the system CAs" in out
    code, out, err = await run_agent_cli(
        "check", *common, "--user", "no-such-user-here", "--ca-file", "/nonexistent.pem",
        env=environment,
    )
    assert code == 1
    assert "Configuration OK" not in out
    assert "does not exist" in err and "cannot load the CA file" in err


# ---- 11: the status file's write failure says why ----------------------------------------------


def test_a_status_file_that_cannot_be_written_is_logged_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "not-a-dir").write_text("")
    state = AgentState(
        agent_id="agt_1", team_id="tm_1", server_url="http://127.0.0.1:1",
        identity_seed=bytes(32),
    )
    client = ControlClient(
        state, MACHINE.fingerprint(), lambda o: None,
        status_file=tmp_path / "not-a-dir" / "status.json",
    )
    with caplog.at_level(logging.WARNING, logger="tucdesk.agent.control"):
        client._write_status()
    assert "cannot write the status file" in caplog.text and "Not a directory" in caplog.text
