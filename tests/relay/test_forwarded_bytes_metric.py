"""tucdesk_relay_bytes_forwarded_total over TCP: the data path counts per session only (no
locked metric update per forwarded message), and the metric is exact whenever it is scraped,
mid-session and after the session ended."""

from __future__ import annotations

from contextlib import AbstractContextManager

import pytest
import trio

from protocol.identity import SigningIdentity
from relay.metrics import RelayMetrics

from .harness import running_relay, trio_test, wait_until
from .lock_calls import calls_to
from .test_tcp_relay import pair

MESSAGES = 20


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


def scraped_bytes(metrics: RelayMetrics) -> float:
    """The TCP bytes-forwarded figure as a scrape of /metrics reports it."""
    for line in metrics.exposition().decode().splitlines():
        if line.startswith('tucdesk_relay_bytes_forwarded_total{transport="tcp"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no tcp bytes_forwarded sample in the exposition")


def metric_updates() -> AbstractContextManager[list[str]]:
    """Record every prometheus_client value update (inc/set) made in the block."""
    return calls_to(frozenset({"inc", "set"}), lambda path: "prometheus_client" in path.parts)


async def round_trips(operator: trio.SocketStream, agent: trio.SocketStream, count: int) -> int:
    """Send ``count`` small messages each way, one at a time; return the bytes sent."""
    sent = 0
    for index in range(count):
        key = b"key %d" % index
        await operator.send_all(key)
        assert await agent.receive_some(100) == key
        echo = b"echo %d!" % index
        await agent.send_all(echo)
        assert await operator.receive_some(100) == echo
        sent += len(key) + len(echo)
    return sent


@trio_test
async def test_forwarding_small_messages_updates_no_metric(signer):
    async with running_relay(signer) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "m-1")
        await round_trips(operator, agent, 2)
        with metric_updates() as updates:
            await round_trips(operator, agent, MESSAGES)
        assert updates == []
        await operator.aclose()
        await agent.aclose()


@trio_test
async def test_forwarded_bytes_are_exact_when_scraped_mid_session_and_after(signer):
    async with running_relay(signer) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "m-2")
        other_operator, other_agent = await pair(relay.tcp_address, signer, "m-3")
        assert scraped_bytes(relay.metrics) == 0
        first = await round_trips(operator, agent, MESSAGES)
        assert scraped_bytes(relay.metrics) == first
        assert scraped_bytes(relay.metrics) == first  # a scrape counts nothing twice
        second = await round_trips(other_operator, other_agent, 3)
        third = await round_trips(operator, agent, 5)
        assert scraped_bytes(relay.metrics) == first + second + third
        fourth = await round_trips(operator, agent, 7)
        for stream in (operator, agent):
            await stream.aclose()
        await wait_until(lambda: len(relay.tcp.sessions) == 1)
        expected = first + second + third + fourth
        assert relay.metrics.registry.get_sample_value(
            "tucdesk_relay_bytes_forwarded_total", {"transport": "tcp"}
        ) == expected  # told when the session ended, without a scrape
        assert scraped_bytes(relay.metrics) == expected
        fifth = await round_trips(other_operator, other_agent, 4)
        for stream in (other_operator, other_agent):
            await stream.aclose()
        await wait_until(lambda: not relay.tcp.sessions)
        assert scraped_bytes(relay.metrics) == expected + fifth
