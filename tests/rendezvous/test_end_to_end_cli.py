"""The whole account flow through the real commands, over TLS, on SQLite and PostgreSQL.

init -> team create -> invite create -> serve -> `tucdesk login --invite` -> `tucdesk login`
-> `tucdesk keys create` -> an agent registers with protocol/ directly -> `tucdesk agents --json`
-> `tucdesk api-keys create/list/revoke` -> `tucdesk audit export` -> `tucdesk-audit verify`.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from operator_cli.home import CliHome
from protocol.domains import Purpose
from protocol.identity import SigningIdentity, b64url
from protocol.signed_payload import create_signed_payload
from tests.rendezvous.live_server import make_certificate

BIN = Path(sys.executable).parent
START_TIMEOUT_SECONDS = 30
COMMAND_TIMEOUT_SECONDS = 60
pytestmark = pytest.mark.slow


def _run(
    *command: str, home: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TUCDESK_HOME": str(home)} if home else dict(os.environ)
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        env=environment,
    )
    if check:
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    return result


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[tuple[str, Path, Path, str]]:
    """A `tucdesk-rendezvous serve` process over TLS; yields (url, data dir, CA file, db url)."""
    data = tmp_path / "data"
    cert, key = make_certificate(tmp_path / "tls")
    store = ["--data-dir", str(data), "--database", database_url]
    _run("tucdesk-rendezvous", "init", *store)
    _run("tucdesk-rendezvous", "init", *store)  # safe to run twice
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                str(BIN / "tucdesk-rendezvous"), "serve", *store, "--listen", "127.0.0.1:0",
                "--tls-cert", str(cert), "--tls-key", str(key),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        url = None
        while url is None:
            match = re.search(r"Running on (https://127\.0\.0\.1:\d+)", log_path.read_text())
            if match:
                url = match.group(1)
            elif process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start: {log_path.read_text()}")
            else:
                time.sleep(0.05)
        yield url, data, cert, database_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _register_agent(url: str, ca_file: Path, registration_key: str) -> dict:
    agent = SigningIdentity.generate()
    payload = create_signed_payload(
        agent,
        Purpose.REGISTER,
        {
            "registration_key": registration_key,
            "public_key": b64url(agent.public.raw),
            "machine_fingerprint": "machine-e2e",
            "hostname": "web-e2e",
        },
        time.time(),
    )
    with httpx.Client(verify=ssl.create_default_context(cafile=ca_file)) as client:
        response = client.post(url + "/v1/agents/register", json=payload)
    assert response.status_code == 200, response.text
    return response.json()


def test_admin_and_operator_commands_work_end_to_end(
    server: tuple[str, Path, Path, str], tmp_path: Path
) -> None:
    url, data, ca_file, database_url = server
    store = ["--data-dir", str(data), "--database", database_url]
    home = tmp_path / "cli-home"

    _run("tucdesk-rendezvous", "team", "create", "ops", *store)
    invite = _run(
        "tucdesk-rendezvous", "invite", "create", "--team", "ops", "--email", "ada@example.test",
        "--role", "admin", *store,
    ).stdout.strip().splitlines()[-1]
    assert invite.startswith("inv_")

    enrolled = _run(
        "tucdesk", "login", "--server", url, "--invite", invite, "--ca-file", str(ca_file),
        home=home,
    )
    assert "enrolled ada@example.test as admin" in enrolled.stdout
    key_file = home / "operator.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (home / "token.json").stat().st_mode & 0o777 == 0o600

    reused = _run(
        "tucdesk", "login", "--server", url, "--invite", invite, "--ca-file", str(ca_file),
        home=tmp_path / "other-home", check=False,
    )
    assert reused.returncode == 1
    assert len(reused.stderr.strip().splitlines()) == 1
    assert "Traceback" not in reused.stderr

    _run("tucdesk", "login", home=home)
    assert "ada@example.test (admin) in team ops" in _run("tucdesk", "whoami", home=home).stdout

    # An expiring token is refreshed transparently by signing a new challenge.
    cli_home = CliHome(home)
    stale = cli_home.load_token()
    assert stale is not None
    cli_home.save_token({**stale, "expires_at": time.time() + 5})
    assert _run("tucdesk", "whoami", home=home).returncode == 0
    refreshed = cli_home.load_token()
    assert refreshed is not None and refreshed["access_token"] != stale["access_token"]

    created = _run("tucdesk", "keys", "create", "--tags", "web,prod", "--ttl", "1h", home=home)
    registration_key = created.stdout.strip().splitlines()[-1]
    assert registration_key.startswith("rk_live_")
    listed = _run("tucdesk", "keys", "list", home=home).stdout
    assert "usable" in listed and registration_key not in listed

    registered = _register_agent(url, ca_file, registration_key)
    assert {k["purpose"] for k in registered["service_keys"]["keys"]} >= {"jwt-issuer"}
    agents = json.loads(_run("tucdesk", "agents", "--json", home=home).stdout)
    assert [a["id"] for a in agents] == [registered["agent_id"]]
    assert agents[0]["tags"] == ["web", "prod"]
    assert "web-e2e" in _run("tucdesk", "agents", home=home).stdout
    used = [line for line in _run("tucdesk", "keys", "list", home=home).stdout.splitlines()
            if " used " in line]
    assert len(used) == 1 and registered["agent_id"] in used[0]  # which host the key enrolled

    second = _run("tucdesk", "keys", "create", home=home).stdout
    key_id = re.search(r"registration key (rk_[a-z0-9]+) ", second).group(1)
    _run("tucdesk", "keys", "revoke", key_id, home=home)
    assert "revoked" in _run("tucdesk", "keys", "list", home=home).stdout

    # An API key for an integration: only its scope, shown once, refused once revoked.
    created_api_key = _run(
        "tucdesk", "api-keys", "create", "siem", "--scope", "sessions:read", home=home
    ).stdout
    api_key = created_api_key.strip().splitlines()[-1]
    assert api_key.startswith("sk_live_")
    api_key_id = re.search(r"API key (\S+) 'siem' scopes=sessions:read;", created_api_key).group(1)
    listed_api_keys = _run("tucdesk", "api-keys", "list", home=home).stdout
    assert re.search(rf"{api_key_id} +active .* siem +sessions:read", listed_api_keys)
    assert api_key not in listed_api_keys
    bearer = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(verify=ssl.create_default_context(cafile=ca_file)) as client:
        assert client.get(url + "/v1/sessions", headers=bearer).json() == {
            "sessions": [], "next_after": None,
        }
        assert client.get(url + "/v1/agents", headers=bearer).status_code == 403
        _run("tucdesk", "api-keys", "revoke", api_key_id, home=home)
        assert client.get(url + "/v1/sessions", headers=bearer).status_code == 401
    listed_api_keys = _run("tucdesk", "api-keys", "list", home=home).stdout
    assert re.search(rf"{api_key_id} +revoked", listed_api_keys)
    unknown_scope = _run(
        "tucdesk", "api-keys", "create", "x", "--scope", "sessions:write", home=home, check=False
    )
    assert unknown_scope.returncode == 1
    assert unknown_scope.stderr.count("\n") == 1 and "unknown scopes" in unknown_scope.stderr

    export = tmp_path / "audit.jsonl"
    _run("tucdesk", "audit", "export", "-o", str(export), home=home)
    audit_key = tmp_path / "audit.pem"
    audit_key.write_text(
        _run("tucdesk-rendezvous", "keys", "show", "--pem", "audit-signer", *store).stdout
    )
    verified = _run("tucdesk-audit", "verify", str(export), "--key", str(audit_key))
    assert verified.stdout.startswith("OK")
    actions = [
        json.loads(line)["event"]["action"]
        for line in export.read_text().splitlines()[1:-1]
    ]
    for action in (
        "operator.invite_created", "operator.invite_used", "operator.login_succeeded",
        "registration_key.created", "registration_key.used", "agent.registered",
        "registration_key.revoked", "api_key.created", "api_key.revoked", "audit.exported",
    ):
        assert action in actions, action

    _run("tucdesk", "logout", home=home)
    after = _run("tucdesk", "whoami", home=home, check=False)
    assert after.returncode == 1
    assert "not logged in" in after.stderr

