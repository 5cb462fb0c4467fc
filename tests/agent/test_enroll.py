"""Enrollment against a real rendezvous, the sealed state it writes, and the CLI around it."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from agent.config import ENVIRONMENT_PREFIX, load_config
from agent.enrollment import EnrollmentRequest, enroll, grant_signing_keys, parse_service_keys
from agent.errors import ConfigError, EnrollmentError
from agent.machine_identity import read_machine_identifiers
from agent.server_address import check_server_url, control_channel_url
from agent.state_file import StateFileMachineMismatchError, load_state
from agent.status import DaemonStatus, read_status, write_status
from protocol.identity import SigningIdentity, b64url
from rendezvous.credentials import hash_secret, new_registration_key
from rendezvous.store import open_store
from tests.agent.policy_support import ensure_team_admin
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


AGENT_COMMAND = str(Path(sys.executable).parent / "tucdesk-agent")
WAIT_SECONDS = 30


def fake_machine(root: Path, machine_id: str) -> Path:
    """A machine identity tree with just /etc/machine-id."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "machine-id").write_text(machine_id + "\n")
    return root


MACHINE_A = "0123456789abcdef0123456789abcdef"
MACHINE_B = "fedcba9876543210fedcba9876543210"


async def registration_key(database_url: str, team: str = "ops") -> tuple[str, str]:
    """A fresh registration key for ``team``; returns (key, team id)."""
    key = new_registration_key()
    async with open_store(database_url) as store:
        found = await store.get_team_by_name(team) or await store.create_team(team, time.time())
        await store.create_registration_key(
            found.id, hash_secret(key), ["web"], time.time() + 600, "test", time.time()
        )
        await ensure_team_admin(store, found.id)
    return key, found.id


async def run_agent_cli(
    *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run ``tucdesk-agent`` as a real process; returns (exit code, stdout, stderr)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(ENVIRONMENT_PREFIX)}
    environment.update(env or {})
    with trio.fail_after(WAIT_SECONDS):
        result = await trio.run_process(
            [AGENT_COMMAND, *args], capture_stdout=True, capture_stderr=True, check=False,
            env=environment,
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_enroll_registers_pins_service_keys_and_seals_state_to_this_machine(
    tmp_path: Path,
) -> None:
    database_url = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    machine = read_machine_identifiers(fake_machine(tmp_path / "machine-a", MACHINE_A))
    state_file = tmp_path / "state" / "agent.state"
    async with live_service(tmp_path / "data", database_url) as (url, _):
        key, team_id = await registration_key(database_url)
        state = await enroll(EnrollmentRequest(url, key, state_file, name="web-1"), machine)
        async with open_store(database_url) as store:
            registered = await store.get_agent(team_id, state.agent_id)
        async with httpx.AsyncClient() as client:
            jwks = (await client.get(url + "/.well-known/jwks.json")).json()
    assert registered is not None
    assert registered.public_key == state.identity().public.raw
    assert registered.machine_fingerprint == machine.fingerprint()
    assert state.team_id == team_id and state.name == "web-1"
    assert state.service_keys == jwks
    assert list(grant_signing_keys(state)) == [
        key["kid"] for key in jwks["keys"] if key["purpose"] == "jwt-issuer"
    ]
    assert state_file.stat().st_mode & 0o777 == 0o600
    assert load_state(state_file, machine) == state
    assert key.encode() not in state_file.read_bytes()


async def test_reused_registration_key_is_refused_with_the_servers_reason(
    tmp_path: Path,
) -> None:
    database_url = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    machine = read_machine_identifiers(fake_machine(tmp_path / "m", MACHINE_A))
    async with live_service(tmp_path / "data", database_url) as (url, _):
        key, _ = await registration_key(database_url)
        await enroll(EnrollmentRequest(url, key, tmp_path / "one" / "agent.state"), machine)
        with pytest.raises(EnrollmentError, match="registration key is used"):
            await enroll(EnrollmentRequest(url, key, tmp_path / "two" / "agent.state"), machine)
    assert not (tmp_path / "two" / "agent.state").exists()


async def test_existing_enrollment_is_kept_unless_forced(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    machine = read_machine_identifiers(fake_machine(tmp_path / "m", MACHINE_A))
    state_file = tmp_path / "state" / "agent.state"
    async with live_service(tmp_path / "data", database_url) as (url, _):
        first_key, _ = await registration_key(database_url)
        first = await enroll(EnrollmentRequest(url, first_key, state_file), machine)
        second_key, _ = await registration_key(database_url)
        with pytest.raises(EnrollmentError, match="already enrolled; pass --force"):
            await enroll(EnrollmentRequest(url, second_key, state_file), machine)
        assert load_state(state_file, machine).agent_id == first.agent_id
        second = await enroll(EnrollmentRequest(url, second_key, state_file, force=True), machine)
    assert second.agent_id != first.agent_id
    assert load_state(state_file, machine).agent_id == second.agent_id


async def test_cli_enroll_prints_the_key_fingerprint_and_never_the_registration_key(
    tmp_path: Path,
) -> None:
    database_url = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    root = fake_machine(tmp_path / "machine-a", MACHINE_A)
    state_dir = tmp_path / "state"
    async with live_service(tmp_path / "data", database_url) as (url, _):
        key, team_id = await registration_key(database_url)
        code, out, err = await run_agent_cli(
            "enroll", "--server", url, "--name", "db-1", "--state-dir", str(state_dir),
            "--machine-root", str(root),
            env={"TUCDESK_REGISTRATION_KEY": key},
        )
        assert code == 0, err
        state = load_state(state_dir / "agent.state", read_machine_identifiers(root))
        assert state.identity().public.fingerprint in out
        assert state.agent_id in out and team_id in out
        assert key not in out and key not in err

        code, out, err = await run_agent_cli(
            "status", "--state-dir", str(state_dir), "--machine-root", str(root)
        )
    assert code == 3, err  # LSB "not running"
    assert "Enrolled:     yes" in out
    assert state.agent_id in out and state.identity().public.fingerprint in out
    assert "Daemon:       not running" in out


async def test_cli_reads_the_registration_key_from_a_file(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    root = fake_machine(tmp_path / "machine-a", MACHINE_A)
    key_file = tmp_path / "key.txt"
    async with live_service(tmp_path / "data", database_url) as (url, _):
        key, _ = await registration_key(database_url)
        key_file.write_text(key + "\n")
        code, out, err = await run_agent_cli(
            "enroll", "--server", url, "--registration-key-file", str(key_file),
            "--state-dir", str(tmp_path / "state"), "--machine-root", str(root),
        )
    assert code == 0, err
    assert "Enrolled agent agt_" in out


async def test_state_moved_to_another_machine_refuses_to_open_with_one_clear_line(
    tmp_path: Path,
) -> None:
    database_url = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    machine_a = read_machine_identifiers(fake_machine(tmp_path / "machine-a", MACHINE_A))
    machine_b_root = fake_machine(tmp_path / "machine-b", MACHINE_B)
    state_dir = tmp_path / "state"
    async with live_service(tmp_path / "data", database_url) as (url, _):
        key, _ = await registration_key(database_url)
        await enroll(EnrollmentRequest(url, key, state_dir / "agent.state"), machine_a)
    with pytest.raises(StateFileMachineMismatchError):
        load_state(state_dir / "agent.state", read_machine_identifiers(machine_b_root))
    for command, expected_code in (("status", 1), ("run", 78)):
        code, out, err = await run_agent_cli(
            command, "--state-dir", str(state_dir), "--machine-root", str(machine_b_root)
        )
        assert code == expected_code
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "made on another machine" in lines[0] and "re-enroll" in lines[0]
        assert "Traceback" not in err


async def test_status_of_an_unenrolled_host_says_so(tmp_path: Path) -> None:
    code, out, _ = await run_agent_cli("status", "--state-dir", str(tmp_path / "nothing"))
    assert code == 3
    assert "Enrolled:     no" in out


async def test_unreachable_server_is_reported_in_one_line(tmp_path: Path) -> None:
    root = fake_machine(tmp_path / "m", MACHINE_A)
    code, _, err = await run_agent_cli(
        "enroll", "--server", "http://127.0.0.1:9", "--state-dir", str(tmp_path / "s"),
        "--machine-root", str(root), env={"TUCDESK_REGISTRATION_KEY": "rk_live_" + "a" * 40},
    )
    assert code == 1
    assert "cannot reach the rendezvous" in err and len(err.strip().splitlines()) == 1
    assert "rk_live_" not in err


def test_plain_http_is_refused_except_to_loopback() -> None:
    assert check_server_url("http://127.0.0.1:8443/") == "http://127.0.0.1:8443"
    assert check_server_url("https://rv.example.com") == "https://rv.example.com"
    with pytest.raises(ConfigError, match="plain HTTP"):
        check_server_url("http://rv.example.com")
    with pytest.raises(ConfigError, match="credentials"):
        check_server_url("https://user:pw@rv.example.com")
    assert control_channel_url("https://rv.example.com") == "wss://rv.example.com/v1/agents/connect"
    assert control_channel_url("http://localhost:1") == "ws://localhost:1/v1/agents/connect"


def test_service_key_whose_kid_is_not_its_thumbprint_is_refused() -> None:
    key = SigningIdentity.generate().public
    entry = {"kty": "OKP", "crv": "Ed25519", "x": b64url(key.raw), "purpose": "jwt-issuer"}
    assert list(parse_service_keys({"keys": [{**entry, "kid": key.key_id}]})["jwt-issuer"]) == [
        key.key_id
    ]
    with pytest.raises(EnrollmentError, match="does not match"):
        parse_service_keys({"keys": [{**entry, "kid": "someone-else"}]})
    with pytest.raises(EnrollmentError, match="jwt-issuer"):
        parse_service_keys({"keys": [{**entry, "kid": key.key_id, "purpose": "audit-signer"}]})


def test_configuration_precedence_is_flags_then_environment_then_file(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        '[agent]\nshell = "/bin/bash"\nuser = "file-user"\nmax_sessions = 3\n'
        f'state_dir = "{tmp_path / "from-file"}"\n'
    )
    environ = {"TUCDESK_AGENT_USER": "env-user", "TUCDESK_AGENT_MAX_SESSIONS": "5"}
    config = load_config({"max_sessions": 7, "shell": None}, environ, config_file)
    assert config.shell == "/bin/bash"
    assert config.user == "env-user"
    assert config.max_sessions == 7
    assert config.state_dir == tmp_path / "from-file"
    with pytest.raises(ConfigError, match="unknown setting"):
        config_file.write_text("colour = 1\n")
        load_config({}, {}, config_file)
    with pytest.raises(ConfigError, match="max_sessions"):
        load_config({"max_sessions": 0}, {}, None)
    with pytest.raises(ConfigError, match="absolute path"):
        load_config({"shell": "bash"}, {}, None)


def test_the_example_config_in_deploy_loads() -> None:
    example = Path(__file__).parents[2] / "deploy" / "agent" / "agent.example.toml"
    config = load_config({}, {}, example)
    assert config.state_dir == Path("/var/lib/tucdesk-agent")
    assert config.max_sessions == 64


def test_status_file_content_is_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status(path, DaemonStatus(os.getpid(), "https://x", True, 1.0, 2.0, None))
    assert json.loads(path.read_text())["connected"] is True
    status = read_status(path)
    assert status is not None and status.is_running() and status.connected
    path.write_text("{not json")
    assert read_status(path) is None
