"""Which configured relays answer, so sessions are not sent to one that is down.

With more than one relay configured, each instance opens a TCP connection to every relay every
``relay_check_seconds`` and closes it at once (the relay counts it as a connection closed before
its hello). A relay that does not accept within ``RELAY_CHECK_TIMEOUT_SECONDS`` is left out of
the choice until it accepts again, as RustDesk's hbbs does with its relays; if none accepts,
every relay stays a candidate (the check may be what is wrong: the rendezvous reaches the relays
by the addresses clients use, which it may not be able to). With one relay there is no choice to
make and nothing is checked.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import trio

from rendezvous.config import RelayEndpoint

if TYPE_CHECKING:
    from rendezvous.context import ServiceContext

logger = logging.getLogger(__name__)

RELAY_CHECK_TIMEOUT_SECONDS = 3.0


class RelayHealth:
    """The ids of the relays the last check could not reach."""

    def __init__(self) -> None:
        self._down: set[str] = set()

    def choose(self, relays: tuple[RelayEndpoint, ...]) -> RelayEndpoint:
        """One relay at random among those not known to be down (among all if every one is)."""
        candidates = [relay for relay in relays if relay.id not in self._down] or list(relays)
        return secrets.choice(candidates)

    @property
    def down(self) -> frozenset[str]:
        """The ids of the relays the last check could not reach."""
        return frozenset(self._down)

    def mark(self, relay: RelayEndpoint, reachable: bool) -> None:
        """Record a check's result; a change is logged."""
        if reachable and relay.id in self._down:
            self._down.discard(relay.id)
            logger.info("relay %s at %s:%d accepts connections again: sessions may use it",
                        relay.id, relay.host, relay.port)  # fmt: skip
        elif not reachable and relay.id not in self._down:
            self._down.add(relay.id)
            logger.warning(
                "relay %s at %s:%d does not accept connections: new sessions use the other "
                "relays until it does", relay.id, relay.host, relay.port,
            )  # fmt: skip


async def reachable(relay: RelayEndpoint) -> bool:
    """Whether ``relay`` accepts a TCP connection within RELAY_CHECK_TIMEOUT_SECONDS (closed at
    once)."""
    with trio.move_on_after(RELAY_CHECK_TIMEOUT_SECONDS):
        try:
            stream = await trio.open_tcp_stream(relay.host, relay.port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


async def check_relays_forever(ctx: ServiceContext) -> None:
    """Check every configured relay each ``relay_check_seconds`` (nothing with fewer than two
    relays, or with the check turned off)."""
    relays = ctx.config.relays
    interval = ctx.config.relay_check_seconds
    if len(relays) < 2 or interval <= 0:
        return
    while True:
        async with trio.open_nursery() as nursery:
            for relay in relays:
                nursery.start_soon(_check_one, ctx, relay)
        await trio.sleep(interval)


async def _check_one(ctx: ServiceContext, relay: RelayEndpoint) -> None:
    up = await reachable(relay)
    ctx.relay_health.mark(relay, up)
    ctx.metrics.relays_up.labels(relay.id).set(1 if up else 0)
