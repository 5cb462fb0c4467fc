"""A streamed request (`tucdesk audit export`) whose cached token the server refuses.

The 401 of a streamed request used to be closed unread, and the login that followed went out on
the same connection and read the refusal's body as its status line ("BadStatusLine:
{"error":"unauthorized"...}HTTP/1.1 200"), on every retry. Both cases run against the real
service: a token it no longer accepts (as after a jwt-issuer rotation with --retire-old-now) is
refreshed and the export retried; a disabled operator reads the same message as `whoami` gives.
Over TLS, as deployed (and as reported): there the refusal's body arrives in a TLS record of its
own and was left on the connection, where over plain HTTP the read-ahead happened to swallow it.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from audit.verify import verify_bundle
from operator_cli.home import TOKEN_FILE
from operator_cli.http import HttpClient
from operator_cli.main import main
from rendezvous.credentials import hash_secret, new_invite_code
from rendezvous.service_keys import load_service_keys
from rendezvous.store import open_store
from tests.rendezvous.live_server import live_service, make_certificate

pytestmark = pytest.mark.timeout(60)
EMAIL = "auditor@example.test"


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def _team_with_invite(database: str) -> tuple[str, str]:
    """A team with an auditor's invite; returns (team id, invite code)."""
    async with open_store(database) as store:
        team = await store.create_team("ops", time.time())
        invite = new_invite_code()
        now = time.time()
        await store.create_invite(
            team.id, EMAIL, "auditor", hash_secret(invite), now + 600, "test", now
        )
    return team.id, invite


def _spoil_cached_token(home: Path) -> str:
    """Make the cached token one the server refuses though it looks fresh; return it."""
    path = home / TOKEN_FILE
    record = json.loads(path.read_text())
    header, claims, signature = record["access_token"].split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    record["access_token"] = f"{header}.{claims}.{flipped}"
    path.write_text(json.dumps(record))
    return str(record["access_token"])


def _tls(tmp_path: Path) -> tuple[dict[str, Path], list[str]]:
    """Service settings for TLS and the login options trusting its certificate."""
    cert, key = make_certificate(tmp_path / "tls")
    return {"tls_cert": cert, "tls_key": key}, ["--ca-file", str(cert)]


async def _run(command: list[str]) -> int:
    return await trio.to_thread.run_sync(main, command)


@pytest.mark.anyio
async def test_a_refused_token_on_an_export_is_refreshed_and_the_export_lands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    _, invite = await _team_with_invite(database)
    home, target = tmp_path / "home", tmp_path / "audit.jsonl"
    settings, trust = _tls(tmp_path)
    async with live_service(tmp_path / "data", database, **settings) as (url, config):
        login = ["--home", str(home), "login", "--server", url, *trust, "--invite", invite]
        assert await _run(login) == 0
        spoiled = _spoil_cached_token(home)
        capsys.readouterr()
        code = await _run(["--home", str(home), "audit", "export", "-o", str(target)])
        err = capsys.readouterr().err
    assert code == 0, err
    assert "BadStatusLine" not in err and "cannot reach" not in err
    assert f"wrote {target}" in err
    refreshed = json.loads((home / TOKEN_FILE).read_text())["access_token"]
    assert refreshed != spoiled
    verified = verify_bundle(target, [load_service_keys(config.data_dir).audit_signer.public])
    assert verified.ok, verified.summary()


@pytest.mark.anyio
async def test_a_disabled_operator_exporting_reads_what_whoami_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    team_id, invite = await _team_with_invite(database)
    home, target = tmp_path / "home", tmp_path / "audit.jsonl"
    settings, trust = _tls(tmp_path)
    async with live_service(tmp_path / "data", database, **settings) as (url, _config):
        login = ["--home", str(home), "login", "--server", url, *trust, "--invite", invite]
        assert await _run(login) == 0
        async with open_store(database) as store:
            (operator,) = await store.operators_matching(team_id, EMAIL)
            await store.disable_operator(team_id, operator.id, time.time())
        capsys.readouterr()
        export = ["--home", str(home), "audit", "export", "-o", str(target)]
        assert await _run(export) == 1
        export_err = capsys.readouterr().err
        assert await _run(export) == 1  # and again: the retry is not a different failure
        retry_err = capsys.readouterr().err
        assert await _run(["--home", str(home), "whoami"]) == 1
        whoami_err = capsys.readouterr().err
    expected = "tucdesk: the server refused: this operator is disabled (operator_disabled)\n"
    assert whoami_err == expected
    assert export_err == expected and retry_err == expected
    assert not target.exists()


class _BigBodyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b"x" * (4 * 1024 * 1024)  # far more than any read-ahead buffer holds

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            self.wfile.write(self.body)
        except OSError:
            pass  # the client closed its part-read response


def test_a_stream_closed_before_its_end_does_not_spoil_the_next_request() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BigBodyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with HttpClient(f"http://127.0.0.1:{server.server_address[1]}") as client:
            first = client.request("GET", "/export", stream=True)
            assert len(next(first.iter_bytes())) > 0
            first.close()  # as `audit export` does when it stops early
            second = client.request("GET", "/again")
            assert second.status_code == 200 and second.content == _BigBodyHandler.body
    finally:
        server.shutdown()
        server.server_close()
