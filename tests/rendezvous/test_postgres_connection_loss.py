"""PostgreSQL connections lost under a running instance (server restart, terminated backends).

The offer bus listens again and the agent channels stay up; the store drops connections the
server closed instead of failing a statement on them, or crashing on a detached pool proxy.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import urllib.parse
from pathlib import Path

import pytest
import trio

from rendezvous.store import Store, open_store, postgres
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.sessions_support import (
    WAIT_SECONDS,
    agent_channel,
    enroll_agent,
    served_instance,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

_numbers = itertools.count(1)
LISTENERS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND query LIKE 'LISTEN%'"
)


@pytest.fixture
def shared_database(postgres_cluster: PostgresCluster) -> str:
    """A fresh PostgreSQL database for two instances to share."""
    return postgres_cluster.create_database(f"bus_{os.getpid()}_{next(_numbers)}")


async def _listener_pids(store: Store) -> set[int]:
    return {row["pid"] for row in await store._fetch(LISTENERS)}  # noqa: SLF001 - raw SQL


async def test_terminated_listen_connection_is_replaced_and_offers_still_arrive(
    shared_database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tucdesk.rendezvous.offers")
    data = tmp_path / "data"
    async with (
        open_store(shared_database) as store_a,
        open_store(shared_database) as store_b,
        open_store(shared_database) as admin_store,
        served_instance(store_a, data) as (instance_a, _),
        served_instance(store_b, data) as (instance_b, url_b),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with agent_channel(url_b, agent) as channel:
            before = await _listener_pids(admin_store)
            assert len(before) == 2
            # What `pg_terminate_backend` on the LISTEN sessions (or a server restart) does.
            await admin_store._fetch(  # noqa: SLF001 - raw SQL
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
            with trio.fail_after(WAIT_SECONDS):
                while True:
                    after = await _listener_pids(admin_store)
                    if len(after) == 2 and not after & before:
                        break
                    await trio.sleep(0.05)
            assert "listening for session offers failed" in caplog.text

            # B's agent channel survived, and B hears A's offer on its new LISTEN connection.
            response = await instance_a.call(admin, "POST", "/v1/sessions",
                                             {"target": "web-1", "mode": "shell"})
            assert response.status_code == 201, response.text
            offer = await channel.receive("session_offer")
            assert offer["session_id"] == response.json()["session_id"]
    assert instance_b.ctx.instance_id


async def test_store_skips_idle_connections_the_server_closed(shared_database: str) -> None:
    async with (
        open_store(shared_database) as store,
        open_store(shared_database) as admin_store,
    ):
        # Several statements at once leave several idle connections on the store's shelf.
        async with trio.open_nursery() as nursery:
            for number in range(4):
                nursery.start_soon(store.create_team, f"team-{number}", 1.0)
        terminated = [
            row["pid"]
            for row in await admin_store._fetch(  # noqa: SLF001 - raw SQL
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]
        with trio.fail_after(WAIT_SECONDS):
            # The store's connections notice the server closed them (asynchronously). Only the
            # terminated ones are waited for: the shared database may have other clients.
            while await admin_store._fetch(  # noqa: SLF001, ASYNC110 - the server's state
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])", terminated
            ):
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        for number in range(4, 8):
            team = await store.create_team(f"team-{number}", 1.0)
            assert await store.get_team(team.id) == team


# asyncpg's LISTEN "channel" (not the UNLISTEN it resets every released connection with).
LISTEN_STATEMENT = re.compile(rb'(?<!UN)LISTEN "')


class SilencingRelay:
    """A TCP relay to PostgreSQL that can silence the connections that ran LISTEN without
    closing them: what a NAT or firewall that forgets an idle connection does."""

    def __init__(self, target: str) -> None:
        parts = urllib.parse.urlsplit(target)
        self._target = target
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 5432
        self._listening: set[int] = set()
        self._silenced: set[int] = set()
        self._numbers = itertools.count(1)
        self.port = 0

    def url(self) -> str:
        """The target URL with the relay's address in place of PostgreSQL's."""
        return self._target.replace(f":{self._port}/", f":{self.port}/", 1)

    def silence_listening_connections(self) -> None:
        """From now on, drop every byte of the connections that ran LISTEN so far."""
        self._silenced |= self._listening

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        number = next(self._numbers)
        async with await trio.open_tcp_stream(self._host, self._port) as server, client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, number, True, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, number, False, nursery.cancel_scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, number: int, upstream: bool,
        relayed: trio.CancelScope,
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in source:
                if upstream and LISTEN_STATEMENT.search(chunk):
                    self._listening.add(number)
                if number not in self._silenced:
                    await sink.send_all(chunk)
        relayed.cancel()  # one side closed: close the other, as a plain TCP path would


async def test_a_silently_dropped_listen_connection_is_found_by_its_probe_and_replaced(
    shared_database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe_seconds = 0.5
    monkeypatch.setattr(postgres, "LISTEN_PROBE_SECONDS", probe_seconds, raising=False)
    monkeypatch.setattr(postgres, "LISTEN_PROBE_TIMEOUT_SECONDS", probe_seconds, raising=False)
    caplog.set_level(logging.WARNING, logger="tucdesk.rendezvous.offers")
    data = tmp_path / "data"
    relay = SilencingRelay(shared_database)
    async with trio.open_nursery() as relays:
        await relays.start(relay.serve)
        async with (
            open_store(shared_database) as store_a,
            open_store(relay.url()) as store_b,
            served_instance(store_a, data) as (instance_a, _),
            served_instance(store_b, data) as (_instance_b, url_b),
        ):
            team = await instance_a.team("ops")
            admin = await instance_a.operator(team, "admin")
            agent = await enroll_agent(instance_a, admin)
            async with agent_channel(url_b, agent) as channel:
                relay.silence_listening_connections()
                # Nothing is logged by the dropped connection itself: only a probe can tell.
                with trio.fail_after(probe_seconds * 2 + WAIT_SECONDS / 3):
                    while "did not answer a probe" not in caplog.text:  # noqa: ASYNC110 - a log
                        await trio.sleep(0.05)
                assert "listening for session offers failed" in caplog.text
                # B listens again on a live connection and hears A's offer.
                with trio.fail_after(WAIT_SECONDS):
                    while True:
                        response = await instance_a.call(
                            admin, "POST", "/v1/sessions", {"target": "web-1", "mode": "shell"}
                        )
                        assert response.status_code == 201, response.text
                        with trio.move_on_after(1):
                            offer = await channel.receive("session_offer")
                            break
                assert offer["session_id"] == response.json()["session_id"]
        relays.cancel_scope.cancel()


async def test_an_error_asyncio_reports_outside_any_statement_is_logged_and_the_store_goes_on(
    postgres_cluster: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend ended while a connection was being set up leaves asyncpg's future holding
    ConnectionError('unexpected connection_lost() call') with nobody awaiting it; asyncio
    reports it when the future is collected. trio-asyncio's own handler re-raised that into the
    loop and ended the store (a serving instance with it): it is logged now, and nothing that
    report quotes beside the error itself (a callback's arguments may hold a password)."""
    caplog.set_level(logging.WARNING, logger="tucdesk.rendezvous.store")
    url = postgres_cluster.create_database(f"reports_{os.getpid()}_{next(_numbers)}")
    password = "Pa55word-in-a-callback-argument"
    async with open_store(url) as store:
        assert isinstance(store, postgres.PostgresStore)
        loop = store._bridge.loop  # noqa: SLF001 - the store's own asyncio loop

        def abandon_a_failed_future() -> None:
            future = loop.create_future()
            future.set_exception(ConnectionError("unexpected connection_lost() call"))

        abandon_a_failed_future()  # collected here: asyncio reports "never retrieved"
        loop.call_exception_handler({
            "message": f"Exception in callback connect(password={password!r})",
            "exception": OSError("connection reset"),
        })  # fmt: skip
        await trio.sleep(0.2)
        await store.create_team("still-serving", 1_800_000_000.0)
        assert "still-serving" in {team.name for team in await store.list_teams()}
    assert "unexpected connection_lost() call" in caplog.text
    assert "OSError: connection reset" in caplog.text
    assert password not in caplog.text


async def test_a_statement_on_a_connection_whose_backend_just_ended_is_store_unavailable(
    postgres_cluster: PostgresCluster,
) -> None:
    """A shelved connection whose backend was just terminated (its FATAL error read, the close
    not yet) answers the next statement with asyncpg's InternalClientError ("cannot switch to
    state 12; another operation (2) is in progress"). It is a lost connection like any other:
    StoreUnavailable, so the caller's retry takes another one, not an error of no kind the
    service knows (it was a 500; the password-rotation test failed 5 runs in 25)."""
    url = postgres_cluster.create_database(f"internal_{os.getpid()}_{next(_numbers)}")
    async with open_store(url) as store:
        assert isinstance(store, postgres.PostgresStore)
        bridge = store._bridge  # noqa: SLF001 - the store's own loop bridge

        async def consuming_an_error() -> None:
            raise postgres.asyncpg.InternalClientError(
                "cannot switch to state 12; another operation (2) is in progress"
            )

        with pytest.raises(postgres.StoreUnavailable, match="InternalClientError"):
            await bridge.call(consuming_an_error)
