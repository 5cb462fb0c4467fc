"""The last welcomed connection id, kept in the state dir: written safely, read defensively."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from agent.config import AgentConfig
from agent.connection_memory import (
    MAX_CONNECTION_FILE_SIZE,
    is_connection_id,
    load_last_connection,
    parse_connection_file,
    remember_connection,
)
from agent.control_client import ControlClient
from agent.state_file import AgentState
from tests.agent.test_control_client import MACHINE, enrolled_agent, fast_backoff
from tests.rendezvous.live_server import live_service

CONNECTION_ID = "conn_" + "0123456789abcdef01234567"
WAIT_SECONDS = 20


def connection_file(tmp_path: Path) -> Path:
    return AgentConfig(state_dir=tmp_path / "state").connection_file


def test_a_remembered_id_is_read_back_from_a_0600_file_in_a_0700_dir(tmp_path: Path) -> None:
    path = connection_file(tmp_path)
    assert remember_connection(path, CONNECTION_ID)
    assert load_last_connection(path) == CONNECTION_ID
    assert path.read_bytes() == f"{CONNECTION_ID}\n".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["connection"]  # no temporary file left
    other = "conn_" + "f" * 24
    assert remember_connection(path, other)
    assert load_last_connection(path) == other


def test_forgetting_removes_the_file_and_a_missing_file_names_nothing_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = connection_file(tmp_path)
    remember_connection(path, CONNECTION_ID)
    assert remember_connection(path, None)
    assert not path.exists()
    with caplog.at_level(logging.WARNING):
        assert load_last_connection(path) is None
    assert caplog.records == []


@pytest.mark.parametrize(
    "content",
    [b"", b"\n", b"conn_", CONNECTION_ID.upper().encode(), CONNECTION_ID.encode() + b"0",
     CONNECTION_ID.encode() + b"\n\n", CONNECTION_ID.encode() + b" ", b" " + CONNECTION_ID.encode(),
     CONNECTION_ID.encode() + b"\n" + CONNECTION_ID.encode(), CONNECTION_ID.encode() + b"\r\n",
     b"\xff\xfe" + CONNECTION_ID.encode(), b"\x00" * 64,
     CONNECTION_ID.encode() + b"\n" + b" " * MAX_CONNECTION_FILE_SIZE],
)  # fmt: skip
def test_a_garbled_or_oversized_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = connection_file(tmp_path)
    path.parent.mkdir(mode=0o700)
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert load_last_connection(path) is None
    assert "does not hold a connection id" in caplog.text


def test_a_symlink_a_fifo_or_a_directory_is_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(CONNECTION_ID + "\n")
    path = connection_file(tmp_path)
    path.parent.mkdir(mode=0o700)
    path.symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING):
        assert load_last_connection(path) is None
    assert "cannot open it" in caplog.text
    path.unlink()
    os.mkfifo(path)  # opened non-blocking: no writer, and still no hang
    assert load_last_connection(path) is None
    path.unlink()
    path.mkdir()
    assert load_last_connection(path) is None
    assert caplog.text.count("not a regular file") == 2


def test_a_write_that_fails_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the state dir should be")
    with caplog.at_level(logging.WARNING):
        assert not remember_connection(not_a_dir / "connection", CONNECTION_ID)
        assert not remember_connection(tmp_path / "connection", "conn_not-an-id")
    assert caplog.text.count("cannot keep the connection id") == 2
    assert not (tmp_path / "connection").exists()


@given(st.binary(max_size=2 * MAX_CONNECTION_FILE_SIZE))
def test_parsing_any_bytes_gives_nothing_or_a_well_formed_id(data: bytes) -> None:
    parsed = parse_connection_file(data)
    assert parsed is None or is_connection_id(parsed)
    if parsed is not None:
        assert data in (parsed.encode(), parsed.encode() + b"\n")


@given(st.binary(min_size=12, max_size=12))
def test_every_well_formed_id_survives_the_file_format(raw: bytes) -> None:
    connection_id = "conn_" + raw.hex()
    assert parse_connection_file(f"{connection_id}\n".encode()) == connection_id


def offline_state() -> AgentState:
    return AgentState(
        agent_id="agt_test", team_id="team_test", server_url="http://127.0.0.1:9",
        identity_seed=bytes(32),
    )  # fmt: skip


def test_the_client_starts_from_the_remembered_id_or_from_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = connection_file(tmp_path)
    remember_connection(path, CONNECTION_ID)

    def client(file: Path | None) -> ControlClient:
        return ControlClient(offline_state(), MACHINE.fingerprint(), lambda offer: None,
                             connection_file=file)  # fmt: skip

    assert client(path).info.connection_id == CONNECTION_ID
    assert client(None).info.connection_id is None
    path.write_bytes(b"x" * 10_000)
    with caplog.at_level(logging.WARNING):
        assert client(path).info.connection_id is None
    assert "does not hold a connection id" in caplog.text


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


@pytest.mark.anyio
async def test_the_channel_comes_up_even_when_the_id_cannot_be_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    async with live_service(tmp_path / "data", store_url) as (url, _):
        state = await enrolled_agent(url, store_url, tmp_path / "state")
        blocked = tmp_path / "blocked"
        blocked.write_text("a file where a directory should be")
        client = ControlClient(
            state, MACHINE.fingerprint(), lambda offer: None, backoff=fast_backoff(),
            connection_file=blocked / "connection",
        )  # fmt: skip
        with caplog.at_level(logging.WARNING):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)
                with trio.fail_after(WAIT_SECONDS):
                    await client.wait_connected()
                nursery.cancel_scope.cancel()
        assert client.connections == 1
        assert client.info.connection_id is not None
        assert "cannot keep the connection id" in caplog.text
