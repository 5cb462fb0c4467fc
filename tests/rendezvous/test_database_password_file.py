"""database_password_file: read at every new connection, so a rotated PostgreSQL password needs
no restart; refused when group/world readable; never shown. Runs against its own cluster whose
role ``rotator`` must authenticate with scram-sha-256 over TCP."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import trio
import trio_asyncio

from rendezvous.config import load_config
from rendezvous.errors import ConfigError
from rendezvous.main import main
from rendezvous.store import Store, StoreError, StoreUnavailable, open_store
from rendezvous.store.sql_store import SqlStore
from tests.pg_cluster import PostgresCluster, PostgresUnavailable, find_postgres_bin_dir

ROLE = "rotator"
FIRST_PASSWORD = "first-Pa55word-of-rotator"
SECOND_PASSWORD = "second-Pa55word-of-rotator"
NOW = 1_800_000_000.0

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def password_cluster() -> Iterator[PostgresCluster]:
    """A cluster where ROLE logs in over TCP with a scram-sha-256 password (others: trust)."""
    bin_dir = find_postgres_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("PostgreSQL tests need initdb and pg_ctl (CI=true)")
        pytest.skip("PostgreSQL tests need initdb and pg_ctl")
    cluster = PostgresCluster(
        bin_dir, hba_lines=(f"host all {ROLE} 127.0.0.1/32 scram-sha-256",)
    )
    try:
        cluster.start()
    except PostgresUnavailable as exc:
        cluster.stop()
        pytest.fail(f"the password cluster did not start: {exc}")
    try:
        cluster.create_database("rotation")
        trio.run(_as_superuser, cluster, [
            "SET password_encryption = 'scram-sha-256'",
            f"CREATE ROLE {ROLE} LOGIN PASSWORD '{FIRST_PASSWORD}'",
            f"ALTER DATABASE rotation OWNER TO {ROLE}",
        ])  # fmt: skip
        yield cluster
    finally:
        cluster.stop()


async def _as_superuser(cluster: PostgresCluster, statements: list[str]) -> None:
    async with trio_asyncio.open_loop():
        connection = await trio_asyncio.aio_as_trio(asyncpg.connect)(cluster.url("rotation"))
        try:
            for statement in statements:
                await trio_asyncio.aio_as_trio(connection.execute)(statement)
        finally:
            await trio_asyncio.aio_as_trio(connection.close)()


@pytest.fixture(autouse=True)
def _first_password(request: pytest.FixtureRequest) -> None:
    """Each test starts with the role's password FIRST_PASSWORD (a test may rotate it)."""
    if "password_cluster" in request.fixturenames:
        cluster = request.getfixturevalue("password_cluster")
        trio.run(_as_superuser, cluster, [f"ALTER ROLE {ROLE} PASSWORD '{FIRST_PASSWORD}'"])


def _url(cluster: PostgresCluster) -> str:
    return f"postgresql://{ROLE}@127.0.0.1:{cluster.port}/rotation"


def _password_file(tmp_path: Path, password: str, mode: int = 0o600) -> Path:
    path = tmp_path / "db-password"
    path.write_text(password + "\n")
    path.chmod(mode)
    return path


async def _drop_connections(cluster: PostgresCluster, store: Store) -> None:
    """Make the store open new connections: end the ones it has (as a restarted server would)."""
    await _as_superuser(cluster, [
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{ROLE}'"
    ])  # fmt: skip


async def _write_works(store: Store, name: str) -> None:
    # The first statement after the drop may meet a dead shelved connection; the next one
    # must reconnect (with whatever password the file holds then).
    for _ in range(3):
        try:
            await store.create_team(name, NOW)
            return
        except StoreUnavailable:
            await trio.sleep(0.05)
    await store.create_team(name, NOW)


@pytest.mark.anyio
async def test_a_rotated_password_is_used_by_new_connections_without_a_restart(
    password_cluster: PostgresCluster, tmp_path: Path
) -> None:
    password_file = _password_file(tmp_path, FIRST_PASSWORD)
    async with open_store(_url(password_cluster), password_file=password_file) as store:
        assert isinstance(store, SqlStore)
        await store.create_team("before-rotation", NOW)

        # The DBA rotates the role's password; the file still holds the old one.
        await _as_superuser(password_cluster, [
            f"ALTER ROLE {ROLE} PASSWORD '{SECOND_PASSWORD}'"
        ])  # fmt: skip
        await _drop_connections(password_cluster, store)
        with pytest.raises(StoreError, match="password authentication failed") as refused:
            await _write_works(store, "old-password")
        assert FIRST_PASSWORD not in str(refused.value)
        assert SECOND_PASSWORD not in str(refused.value)

        # The file is updated: the same running store connects with the new password.
        password_file.write_text(SECOND_PASSWORD + "\n")
        await _write_works(store, "after-rotation")
        names = {team.name for team in await store.list_teams()}
    assert {"before-rotation", "after-rotation"} <= names


@pytest.mark.anyio
async def test_a_group_readable_password_file_is_refused_without_showing_it(
    password_cluster: PostgresCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    password_file = _password_file(tmp_path, FIRST_PASSWORD, mode=0o640)
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreUnavailable) as refused:
        async with open_store(_url(password_cluster), password_file=password_file):
            pass
    message = str(refused.value)
    assert "database_password_file" in message and "too open" in message
    assert "chmod 600" in message
    assert FIRST_PASSWORD not in message
    assert FIRST_PASSWORD not in caplog.text


def test_init_and_admin_commands_use_the_password_file(
    password_cluster: PostgresCluster,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password_file = _password_file(tmp_path, FIRST_PASSWORD)
    # The URL has no password at all: without the file the role cannot log in.
    common = ["--data-dir", str(tmp_path / "data"), "--database", _url(password_cluster)]
    with monkeypatch.context() as environment:
        environment.setenv("TUCDESK_DATABASE_PASSWORD_FILE", str(password_file))
        assert main(["init", *common]) == 0
        assert main(["team", "create", "file-auth", *common]) == 0
        assert main(["team", "list", *common]) == 0
        assert "file-auth" in capsys.readouterr().out
    assert main(["team", "list", *common]) == 1
    output = capsys.readouterr()
    assert "password" in output.err
    assert FIRST_PASSWORD not in output.out + output.err


def test_a_password_file_for_sqlite_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="database_password_file is for PostgreSQL"):
        load_config({"data_dir": tmp_path}, {"TUCDESK_DATABASE_PASSWORD_FILE": "/x"})


def test_the_printed_pg_dump_command_works_with_any_password_file_path(
    password_cluster: PostgresCluster,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A path with a space and shell syntax in it, and a password file saved with CRLF: the
    # command used to read the wrong file (or run the $(...)) and send the password with its \r.
    directory = tmp_path / "db secrets $(touch injected)"
    directory.mkdir()
    password_file = directory / "pass word;x"
    password_file.write_bytes(FIRST_PASSWORD.encode() + b"\r\n")
    password_file.chmod(0o600)
    common = ["--data-dir", str(tmp_path / "data"), "--database", _url(password_cluster)]
    monkeypatch.setenv("TUCDESK_DATABASE_PASSWORD_FILE", str(password_file))
    dump = tmp_path / "rendezvous.dump"
    capsys.readouterr()
    assert main(["backup", str(dump), *common]) == 1
    error = capsys.readouterr().err
    assert FIRST_PASSWORD not in error
    command = error.split("`")[1]
    assert command.startswith("PGPASSWORD=") and " pg_dump -Fc " in command

    monkeypatch.chdir(tmp_path)
    environment = {
        "PATH": f"{password_cluster.bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "PGCONNECT_TIMEOUT": "10",
    }
    # As the operator would: the line pasted into a POSIX shell, no other credentials around.
    result = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, timeout=120, env=environment,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert dump.read_bytes().startswith(b"PGDMP")
    assert not (tmp_path / "injected").exists()
