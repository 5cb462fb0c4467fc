"""--total-bandwidth is shared fairly: bulk sessions that saturate it do not slow a light one.

Real sockets on loopback through an in-process relay.
"""

from __future__ import annotations

import pytest
import trio

from protocol.identity import SigningIdentity
from relay.fair_share import MIN_FAIR_SHARE_BURST, FairShare

from .harness import running_relay, trio_test, wait_until
from .test_tcp_relay import pair
from .test_udp_relay import pair_udp

TOTAL_CAP = 400_000.0
BULK_SESSIONS = 4
BULK_CHUNK = b"x" * 65536
REQUEST = b"r" * 100
ROUND_TRIPS = 20
SLOW_ROUND_TRIP_SECONDS = 1.0


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


@trio_test
async def test_a_light_session_is_not_slowed_by_bulk_sessions_saturating_the_total_cap(signer):
    async with running_relay(signer, total_bandwidth=TOTAL_CAP) as relay:
        bulk_received = [0]

        async def bulk(number: int) -> None:
            sender, receiver = await pair(relay.tcp_address, signer, f"bulk-{number}")

            async def send_forever() -> None:
                while True:
                    await sender.send_all(BULK_CHUNK)

            async with trio.open_nursery() as both:
                both.start_soon(send_forever)
                while data := await receiver.receive_some(1 << 20):
                    bulk_received[0] += len(data)

        async with trio.open_nursery() as nursery:
            for number in range(BULK_SESSIONS):
                nursery.start_soon(bulk, number)
            operator, agent = await pair(relay.tcp_address, signer, "light")
            await trio.sleep(1.5)  # the bulk sessions have spent the burst and are in debt

            async def echo() -> None:
                while data := await agent.receive_some(65536):
                    await agent.send_all(data)

            nursery.start_soon(echo)
            window_started, bytes_before = trio.current_time(), bulk_received[0]
            round_trips = []
            for _ in range(ROUND_TRIPS):
                started = trio.current_time()
                with trio.move_on_after(SLOW_ROUND_TRIP_SECONDS):
                    await operator.send_all(REQUEST)
                    echoed = b""
                    while len(echoed) < len(REQUEST):
                        echoed += await operator.receive_some(65536)
                round_trips.append(trio.current_time() - started)
                if round_trips[-1] >= SLOW_ROUND_TRIP_SECONDS:
                    break  # stuck behind the bulk sessions: no need to wait out the rest
                await trio.sleep(0.1)  # measured over about 2 s
            window = trio.current_time() - window_started
            bulk_rate = (bulk_received[0] - bytes_before) / window
            nursery.cancel_scope.cancel()
    round_trips.sort()
    # Without fair sharing each round trip waited out the bulk sessions' debt (seconds).
    assert len(round_trips) == ROUND_TRIPS, round_trips
    assert round_trips[len(round_trips) * 9 // 10] < 0.1, round_trips
    # ... and the bulk sessions still get (about) the whole cap between them.
    assert 0.6 * TOTAL_CAP < bulk_rate < 1.3 * TOTAL_CAP, bulk_rate


def test_a_session_within_its_share_is_within_and_one_above_it_is_not():
    share = 100_000.0
    light, heavy = FairShare(0.0), FairShare(0.0)
    for tick in range(1, 101):
        now = tick * 0.01
        assert light.within(500, now, share)  # 50 kB/s
        heavy.within(5_000, now, share)  # 500 kB/s
    assert not heavy.within(5_000, 1.01, share)


def test_a_busy_session_that_calms_down_is_within_its_share_again_soon():
    share = 100_000.0
    session = FairShare(0.0)
    for tick in range(1, 1001):  # ten seconds far above the share
        session.within(10_000, tick * 0.01, share)
    burst = max(share * 0.5, MIN_FAIR_SHARE_BURST)
    # Its debt is bounded by one burst: after burst / share seconds (plus a request) it is light.
    calm = 10.0 + burst / share + 0.01
    assert session.within(100, calm, share)


@trio_test
async def test_a_light_udp_session_keeps_its_datagrams_while_bulk_tcp_saturates_the_cap(signer):
    async with running_relay(signer, total_bandwidth=TOTAL_CAP) as relay:

        async def bulk(number: int) -> None:
            sender, receiver = await pair(relay.tcp_address, signer, f"bulk-{number}")

            async def send_forever() -> None:
                while True:
                    await sender.send_all(BULK_CHUNK)

            async with trio.open_nursery() as both:
                both.start_soon(send_forever)
                while await receiver.receive_some(1 << 20):
                    pass

        async with trio.open_nursery() as nursery:
            for number in range(BULK_SESSIONS):
                nursery.start_soon(bulk, number)
            operator, agent = await pair_udp(relay, signer, "light-udp")
            # UDP sessions count in the fair share, as TCP ones do.
            assert relay.tcp.admission.udp_sessions_paired == 1
            await trio.sleep(1.5)  # the bulk sessions have spent the burst and are in debt
            assert relay.tcp.admission.total_bandwidth.balance(trio.current_time()) < 0
            received = 0
            for _ in range(ROUND_TRIPS):
                await operator.send(REQUEST)
                with trio.move_on_after(0.5):
                    assert await agent.receive() == REQUEST
                    received += 1
            await operator.close()
            await wait_until(lambda: relay.tcp.admission.udp_sessions_paired == 0)
            nursery.cancel_scope.cancel()
    # Without fair sharing every datagram was dropped while the total was in debt.
    assert received >= ROUND_TRIPS - 2, received
