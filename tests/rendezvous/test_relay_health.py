"""Sessions avoid a configured relay that refuses connections (rendezvous/relay_health.py)."""

from __future__ import annotations

import logging
import math
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp
from relay.server import Relay
from relay.wire import encode_hello, encode_probe
from rendezvous.config import RelayEndpoint, ServiceConfig
from rendezvous.errors import ConfigError
from rendezvous.relay_health import (
    FAILED_CHECKS_FOR_DOWN,
    RELAY_CHECK_TIMEOUT_SECONDS,
    ProbeResult,
    RelayHealth,
    check_relays_forever,
    probe,
)
from rendezvous.store import Store
from tests.relay.harness import make_token, running_relay, wait_until
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance

pytestmark = pytest.mark.anyio

SESSIONS = 12
WAIT_SECONDS = 10.0


async def reachable(relay: RelayEndpoint) -> bool:
    """Whether ``relay`` answers the probe as serving."""
    return await probe(relay) is ProbeResult.SERVING


@contextmanager
def listening_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel completes them from the backlog)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port held but not listening: a connection to it is refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@contextmanager
def answering_port(answer: bytes) -> Iterator[tuple[int, list[bytes]]]:
    """A loopback port whose server reads what a client sends and answers ``answer`` (a relay
    older than the probe, or one refusing it): (port, what each client sent)."""
    received: list[bytes] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                received.append(conn.recv(4096))
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def endpoint(relay: Relay, name: str = "r") -> RelayEndpoint:
    host, port = relay.tcp_address
    return RelayEndpoint(name, host, port)


async def test_a_serving_relay_answers_the_probe_which_it_counts_and_does_not_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    async with running_relay(SigningIdentity.generate()) as relay:
        for _ in range(3):
            assert await reachable(endpoint(relay))
        await wait_until(lambda: relay.tcp is not None and not relay.tcp.busy)
        assert (
            relay.metrics.registry.get_sample_value("tucdesk_relay_probes_total", {"answer": "ok"})
            == 3
        )
        assert relay.metrics.refusal_count("tcp", "hello_abandoned") == 0
        assert "refused" not in caplog.text


async def test_a_draining_relay_is_down_and_says_so_without_a_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    signer = SigningIdentity.generate()
    async with running_relay(signer, grace=5.0) as relay:
        host, port = relay.tcp_address
        sides = []
        async with trio.open_nursery() as nursery:  # a live session keeps the relay draining

            async def join(side: Side) -> None:
                sides.append(
                    await connect_tcp(host, port, make_token(signer, "live", side), pair_timeout=5)
                )

            nursery.start_soon(join, Side.OPERATOR)
            nursery.start_soon(join, Side.AGENT)
        relay.shutdown()
        await wait_until(lambda: relay.tcp is not None and relay.tcp.admission.shutting_down)
        assert not await reachable(endpoint(relay))
        assert (
            relay.metrics.registry.get_sample_value(
                "tucdesk_relay_probes_total", {"answer": "shutting_down"}
            )
            == 1
        )
        assert "refused" not in caplog.text
        for stream in sides:
            await stream.aclose()


async def test_a_hung_relay_or_a_refused_connection_is_a_failed_check() -> None:
    # A listener nobody serves: the kernel completes the connection, no answer ever comes
    # (a relay that is SIGSTOPped or hung).
    with listening_port() as hung, refusing_port() as refusing:
        started = trio.current_time()
        assert not await reachable(RelayEndpoint("hung", "127.0.0.1", hung))
        assert trio.current_time() - started < RELAY_CHECK_TIMEOUT_SECONDS + 1
        assert not await reachable(RelayEndpoint("down", "127.0.0.1", refusing))


@pytest.mark.parametrize(
    ("answer", "up"),
    [
        (b"token_invalid\n", True),
        (b"bad_hello\n", True),
        (b"shutting_down\n", False),
        (b"too_many_connections\n", False),
        (b"too_many_sessions\n", False),
        (b"no_keys\n", False),
        (b"", False),
        (b"HTTP/1.1 400 Bad Request\r\n", False),
    ],
)
async def test_an_older_relay_that_refuses_the_probe_as_a_token_is_up(
    answer: bytes, up: bool
) -> None:
    with answering_port(answer) as (port, received):
        assert await reachable(RelayEndpoint("old", "127.0.0.1", port)) is up
    assert received == [encode_probe()]


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (b"ok\n", ProbeResult.SERVING),
        (b"shutting_down\n", ProbeResult.NOT_SERVING),
        (b"too_many_sessions\n", ProbeResult.NOT_SERVING),
        (b"no_keys\n", ProbeResult.NOT_SERVING),
        # About the probe's own connection (pushed out of a full hello table by a flood, or
        # shed while out of descriptors): silence, two strikes, not a relay that stopped serving.
        (b"too_many_connections\n", ProbeResult.NO_ANSWER),
        (b"rate_limited\n", ProbeResult.NO_ANSWER),
    ],
)
async def test_only_answers_about_the_whole_relay_take_it_out_at_once(
    answer: bytes, result: ProbeResult
) -> None:
    with answering_port(answer) as (port, _received):
        assert await probe(RelayEndpoint("relay", "127.0.0.1", port)) is result


def test_a_relay_is_down_after_two_failed_checks_in_a_row_and_up_after_one_good_one() -> None:
    relay = RelayEndpoint("a", "127.0.0.1", 1)
    health = RelayHealth()
    health.mark(relay, ProbeResult.NO_ANSWER)  # one lost SYN
    assert health.down == frozenset()
    health.mark(relay, ProbeResult.SERVING)
    health.mark(relay, ProbeResult.NO_ANSWER)
    assert health.down == frozenset()
    health.mark(relay, ProbeResult.NO_ANSWER)
    assert health.down == {"a"}
    health.mark(relay, ProbeResult.SERVING)
    assert health.down == frozenset()


def test_a_relay_that_answers_it_takes_no_new_session_is_down_at_once() -> None:
    # Draining, full or without keys: it said so, and every new session would be refused.
    relay = RelayEndpoint("a", "127.0.0.1", 1)
    health = RelayHealth()
    health.mark(relay, ProbeResult.NOT_SERVING)
    assert health.down == {"a"}
    health.mark(relay, ProbeResult.SERVING)
    assert health.down == frozenset()


async def test_a_full_relay_answers_too_many_sessions_and_is_not_serving() -> None:
    signer = SigningIdentity.generate()
    async with running_relay(signer, max_sessions=1) as relay:
        host, port = relay.tcp_address
        assert await probe(endpoint(relay)) is ProbeResult.SERVING
        first = await trio.open_tcp_stream(host, port)
        await first.send_all(encode_hello(make_token(signer, "only", Side.OPERATOR)))
        assert await first.receive_some(64) == b"waiting\n"
        assert await probe(endpoint(relay)) is ProbeResult.NOT_SERVING
        assert (
            relay.metrics.registry.get_sample_value(
                "tucdesk_relay_probes_total", {"answer": "too_many_sessions"}
            )
            == 1
        )
        await first.aclose()


def test_when_every_relay_is_down_every_relay_stays_a_candidate() -> None:
    relays = (RelayEndpoint("a", "127.0.0.1", 1), RelayEndpoint("b", "127.0.0.1", 2))
    health = RelayHealth()
    for _ in range(FAILED_CHECKS_FOR_DOWN):
        health.mark(relays[0], ProbeResult.NO_ANSWER)
    assert {health.choose(relays).id for _ in range(40)} == {"b"}
    for _ in range(FAILED_CHECKS_FOR_DOWN):
        health.mark(relays[1], ProbeResult.NO_ANSWER)
    assert {health.choose(relays).id for _ in range(40)} == {"a", "b"}
    health.mark(relays[0], ProbeResult.SERVING)
    assert {health.choose(relays).id for _ in range(40)} == {"a"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_relay_check_interval_is_refused(value: float) -> None:
    # NaN < 0 is False: it passed the range check and killed the instance at trio.sleep(nan).
    with pytest.raises(ConfigError, match="relay_check_seconds must be a finite number"):
        ServiceConfig(relay_check_seconds=value).validate()


async def test_sessions_go_only_to_the_relay_that_answers_its_probe(
    store: Store, tmp_path: Path
) -> None:
    with refusing_port() as down:
        async with running_relay(SigningIdentity.generate()) as relay:
            up = relay.tcp_address[1]
            relays = (f"relay-up=127.0.0.1:{up}", f"relay-down=127.0.0.1:{down}")
            async with (
                served_instance(
                    store, tmp_path / "data", relays=relays, relay_check_seconds=0.2
                ) as (service, url),
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(check_relays_forever, service.ctx)
                team = await service.team("ops")
                admin = await service.operator(team, "admin")
                operator = await service.operator(team, "operator")
                agent = await enroll_agent(service, admin)
                with trio.fail_after(WAIT_SECONDS):
                    while "relay-down" not in service.ctx.relay_health.down:  # noqa: ASYNC110 - the check task sets it
                        await trio.sleep(0.05)
                chosen = set()
                async with agent_channel(url, agent) as channel:
                    for _ in range(SESSIONS):
                        body = {"target": "web-1", "mode": "exec", "command": ["true"]}
                        response = await service.call(operator, "POST", "/v1/sessions", body)
                        assert response.status_code == 201, response.text
                        chosen.add(response.json()["relay"]["id"])
                        await channel.receive("session_offer")
                nursery.cancel_scope.cancel()
    assert chosen == {"relay-up"}
