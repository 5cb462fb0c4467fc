"""Admission under abuse, with real sockets on loopback: separate TCP and UDP budgets, the
hello-phase caps (per source, and dropping the oldest hello when the table is full), and sources
grouped by network."""

from __future__ import annotations

import ipaddress
import math
import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from protocol.identity import SigningIdentity
from protocol.rate_limits import source_block
from protocol.relay_token import Side
from relay.admission import Admission, PendingHellos
from relay.client import connect_tcp
from relay.datagram import HELLO
from relay.keyset import TokenKeySet
from relay.metrics import RelayMetrics
from relay.wire import Reason, encode_hello

from .harness import make_token, relay_config, running_relay, trio_test, wait_until


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


async def status_line(stream: trio.SocketStream) -> str:
    line = b""
    with trio.fail_after(5):
        while not line.endswith(b"\n"):
            data = await stream.receive_some(1)
            if not data:
                return line.decode() + "<eof>"
            line += data
    return line.decode().strip()


async def hello_and_status(address: tuple[str, int], token: str, local: str | None = None) -> str:
    stream = await trio.open_tcp_stream(*address, local_address=local)
    await stream.send_all(encode_hello(token))
    status = await status_line(stream)
    await stream.aclose()
    return status


def metric(relay, name: str, **labels: str) -> float:
    return relay.metrics.registry.get_sample_value(name, labels) or 0.0


@trio_test
async def test_spoofable_udp_hellos_never_spend_the_tcp_budget_of_an_address(signer):
    async with running_relay(signer, rate_limit=0.001, rate_burst=2) as relay:
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind(("127.0.0.1", 0))
        for _ in range(20):  # what an off-path attacker sends with the victim's source address
            await udp.sendto(bytes([HELLO, 0, 0, 0]), relay.udp_address)
        await wait_until(lambda: metric(
            relay, "tucdesk_relay_refusals_total", transport="udp", reason="rate_limited") >= 18)
        udp.close()
        for number in range(2):
            token = make_token(signer, f"budget-{number}", Side.AGENT)
            assert await hello_and_status(relay.tcp_address, token) == "waiting"
        assert relay.metrics.refusal_count("tcp", "rate_limited") == 0


def test_ipv6_sources_are_grouped_by_network_and_ipv4_by_address():
    assert source_block("2001:db8:1:2:aaaa::1") == source_block("2001:db8:1:2:bbbb::7")
    assert source_block("2001:db8:1:2::1") != source_block("2001:db8:1:3::1")
    assert source_block("2001:db8:1:2::1", ipv6_prefix=48) == source_block("2001:db8:1:3::1",
                                                                           ipv6_prefix=48)
    assert source_block("2001:db8::1", ipv6_prefix=128) != source_block("2001:db8::2",
                                                                        ipv6_prefix=128)
    assert source_block("192.0.2.1") != source_block("192.0.2.2")
    assert source_block("192.0.2.1", ipv4_prefix=24) == source_block("192.0.2.200",
                                                                     ipv4_prefix=24)
    # A dual-stack listener sees IPv4 clients as mapped addresses: the same source.
    assert source_block("::ffff:192.0.2.1") == source_block("192.0.2.1")


def test_one_ipv6_host_cannot_multiply_its_rate_budget_with_the_addresses_of_its_64():
    admission = Admission(relay_config(rate_limit=0.001, rate_burst=3), TokenKeySet({}),
                          RelayMetrics(), 0.0)
    admitted = [
        admission.admit_connection((f"2001:db8:0:1::{index:x}", 4000), 0.0)
        for index in range(1, 10)
    ]
    assert sum(not isinstance(result, Reason) for result in admitted) == 3
    assert admitted[3:] == [Reason.RATE_LIMITED] * 6
    other_network = admission.admit_connection(("2001:db8:0:2::1", 4000), 0.0)
    assert not isinstance(other_network, Reason)
    admission.close()


def test_hello_table_shortens_hellos_over_a_source_cap_and_drops_the_oldest_when_full():
    table = PendingHellos(capacity=3, per_source=2, over_cap_seconds=1.0)
    first, _ = table.open("a", ("a", 1), 10.0)
    second, _ = table.open("a", ("a", 2), 10.0)
    assert first.scope.deadline == second.scope.deadline == math.inf
    third, dropped = table.open("a", ("a", 3), 10.0)
    assert dropped is None and third.over_source_cap and third.scope.deadline == 11.0
    newcomer, dropped = table.open("b", ("b", 1), 10.5)
    assert dropped is first and not newcomer.over_source_cap
    assert first.dropped and first.scope.cancel_called
    assert len(table) == 3 and table.from_source("a") == 2
    table.close(first)  # its task ends later: nothing counted twice
    table.close(second)
    assert len(table) == 2 and table.from_source("a") == 1


@trio_test
async def test_one_source_cannot_hold_more_than_its_share_of_half_open_connections(signer):
    async with running_relay(signer, max_pending_per_source=3, hello_timeout=10) as relay:
        silent = [await trio.open_tcp_stream(*relay.tcp_address) for _ in range(3)]
        await wait_until(lambda: relay.tcp.pending == 3)
        fourth = await trio.open_tcp_stream(*relay.tcp_address)
        # Over its source's cap a hello must come at once; this one never does.
        started = trio.current_time()
        assert await status_line(fourth) == "too_many_connections"
        assert trio.current_time() - started < 3
        assert metric(relay, "tucdesk_relay_pending_dropped_total", reason="per_source_cap") == 1
        # A client over the cap whose hello comes at once is let in.
        token = make_token(signer, "share-1", Side.AGENT)
        assert await hello_and_status(relay.tcp_address, token) == "waiting"
        assert relay.tcp.pending == 3
        for stream in silent:
            await stream.aclose()


@trio_test
async def test_the_per_source_cap_counts_a_whole_network_when_configured(signer):
    async with running_relay(signer, max_pending_per_source=2, hello_timeout=10,
                             source_ipv4_prefix=24) as relay:
        silent = [await trio.open_tcp_stream(*relay.tcp_address, local_address=f"127.0.0.{n}")
                  for n in (2, 3)]
        await wait_until(lambda: relay.tcp.pending == 2)
        third = await trio.open_tcp_stream(*relay.tcp_address, local_address="127.0.0.4")
        assert await status_line(third) == "too_many_connections"
        for stream in silent:
            await stream.aclose()


@trio_test
async def test_a_slow_flood_of_half_open_connections_cannot_lock_clients_out(signer):
    async with running_relay(signer, max_pending=3, hello_timeout=10) as relay:
        silent = [await trio.open_tcp_stream(*relay.tcp_address) for _ in range(3)]
        await wait_until(lambda: relay.tcp.pending == 3)
        streams = {}

        async def join(side: Side) -> None:
            streams[side] = await connect_tcp(
                *relay.tcp_address, make_token(signer, "flooded", side), pair_timeout=5
            )

        async with trio.open_nursery() as nursery:
            for side in Side:
                nursery.start_soon(join, side)
        await streams[Side.OPERATOR].send_all(b"through")
        assert await streams[Side.AGENT].receive_some(100) == b"through"
        # The oldest half-open connections made room, and were told why.
        assert await status_line(silent[0]) == "too_many_connections"
        assert metric(relay, "tucdesk_relay_pending_dropped_total", reason="oldest_dropped") >= 2
        for stream in [*silent, *streams.values()]:
            await stream.aclose()


@trio_test
async def test_a_connection_closed_before_its_hello_is_counted_and_logged(signer, caplog):
    caplog.set_level("INFO", logger="tucdesk.relay")
    async with running_relay(signer) as relay:
        stream = await trio.open_tcp_stream(*relay.tcp_address)
        await stream.send_all(b"TDR1")
        await wait_until(lambda: relay.tcp.pending == 1)
        await stream.aclose()
        await wait_until(lambda: relay.metrics.refusal_count("tcp", "hello_abandoned") == 1)
        assert metric(relay, "tucdesk_relay_connections_accepted_total") == 1
    assert "refused transport=tcp reason=hello_abandoned peer=127.0.0.1:" in caplog.text


@trio_test
async def test_start_up_log_states_the_admission_limits_in_force(signer, caplog):
    caplog.set_level("INFO", logger="tucdesk.relay")
    async with running_relay(signer, max_pending=77, max_pending_per_source=7):
        pass
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("relay_limits"))
    assert "max_sessions=10000" in line and "max_pending=77" in line
    assert "max_pending_per_source=7" in line and "rate_limit=1000/s rate_burst=1000" in line
    assert "source_prefix=/32,/64" in line


def test_the_sessions_an_open_file_limit_allows_are_computed_from_the_actual_limit():
    config = relay_config(max_sessions=10_000, max_pending=1_024)
    assert config.sessions_allowed_by(1_024) == 0
    assert config.sessions_allowed_by(4_096) == (4_096 - 1_024 - 64) // 2
    assert config.sessions_allowed_by(1_000_000) == 10_000


@given(
    address=st.ip_addresses(),
    ipv4_prefix=st.integers(min_value=8, max_value=32),
    ipv6_prefix=st.integers(min_value=16, max_value=128),
)
def test_a_source_block_is_the_network_of_the_configured_prefix(address, ipv4_prefix, ipv6_prefix):
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    expected = str(address) if prefix == address.max_prefixlen else str(network)
    assert source_block(str(address), ipv4_prefix, ipv6_prefix) == expected
