"""Which configured relays serve, so sessions are not sent to one that is down.

With more than one relay configured, each instance probes every relay every
``relay_check_seconds``: it connects and sends the relay wire protocol's probe hello, which the
relay answers at once with ``ok``, or why it takes no new session: ``shutting_down`` (draining
after a shutdown signal), ``too_many_sessions`` (full) or ``no_keys`` (no relay-token key, or a
JWKS it has not fetched for several refresh intervals) (relay/wire.py; counted by the relay in
tucdesk_relay_probes_total, not logged as a refusal). A relay is up only when it answers within
RELAY_CHECK_TIMEOUT_SECONDS with an answer not in NOT_SERVING_ANSWERS. Such an answer leaves the
relay out of the choice at once (it said so: every new session would be refused); a refused
connect, or a connection the kernel completed for a process that never answers (hung, stopped),
leaves it out after FAILED_CHECKS_FOR_DOWN such checks in a row (a lost SYN does not flap it). One
good check takes it back, as RustDesk's hbbs does with its relays; if none is up, every
relay stays a candidate (the check may be what is wrong: the rendezvous reaches the relays by the
addresses clients use, which it may not be able to). With one relay there is no choice to make
and nothing is checked.

The check cannot tell whether a relay holds the rendezvous's current relay-token key: a relay
started with a static --token-key that was not updated after a rotation answers ``ok`` and
refuses every token (token_invalid). Use --jwks, or update --token-key and send SIGHUP, on every
rotation (docs/self-hosting.md).
"""

from __future__ import annotations

import logging
import secrets
from enum import Enum
from typing import TYPE_CHECKING

import trio

from relay.errors import HelloError
from relay.wire import MAX_STATUS_LINE_SIZE, Reason, encode_probe, parse_status
from rendezvous.config import RelayEndpoint

if TYPE_CHECKING:
    from rendezvous.context import ServiceContext

logger = logging.getLogger(__name__)

RELAY_CHECK_TIMEOUT_SECONDS = 3.0
# Failed checks in a row before a relay is left out; one good check takes it back.
FAILED_CHECKS_FOR_DOWN = 2
# Probe answers that mean "alive, but takes no new session now": states of the whole relay.
NOT_SERVING_ANSWERS = frozenset({Reason.SHUTTING_DOWN, Reason.TOO_MANY_SESSIONS, Reason.NO_KEYS})
# Answers about this one connection, not the relay: too_many_connections is what a hello pushed
# out of a full pending table is told (or one shed while the relay is out of descriptors), so a
# flood of connections can earn it for the probe while the relay serves. Counted as silence.
CONNECTION_ANSWERS = frozenset({Reason.TOO_MANY_CONNECTIONS, Reason.RATE_LIMITED})


class ProbeResult(Enum):
    """What a health check found."""

    SERVING = "serving"
    NOT_SERVING = "not_serving"  # it answered that it takes no new session: down at once
    NO_ANSWER = "no_answer"  # refused, hung or not a relay: down after FAILED_CHECKS_FOR_DOWN


class RelayHealth:
    """The ids of the relays the checks found down (FAILED_CHECKS_FOR_DOWN failures in a row)."""

    def __init__(self) -> None:
        self._down: set[str] = set()
        self._failed_checks: dict[str, int] = {}

    def choose(self, relays: tuple[RelayEndpoint, ...]) -> RelayEndpoint:
        """One relay at random among those not known to be down (among all if every one is)."""
        candidates = [relay for relay in relays if relay.id not in self._down] or list(relays)
        return secrets.choice(candidates)

    @property
    def down(self) -> frozenset[str]:
        """The ids of the relays the checks found down."""
        return frozenset(self._down)

    def mark(self, relay: RelayEndpoint, result: ProbeResult) -> None:
        """Record a check's result; a change of state is logged."""
        if result is ProbeResult.SERVING:
            self._failed_checks.pop(relay.id, None)
            if relay.id in self._down:
                self._down.discard(relay.id)
                logger.info("relay %s at %s:%d answers its health probe again: sessions may "
                            "use it", relay.id, relay.host, relay.port)  # fmt: skip
            return
        failed = self._failed_checks[relay.id] = self._failed_checks.get(relay.id, 0) + 1
        if relay.id in self._down:
            return
        if result is ProbeResult.NOT_SERVING:
            self._down.add(relay.id)
            logger.warning(
                "relay %s at %s:%d answered its health probe that it takes no new session "
                "(draining, full or without a usable relay-token key): new sessions use the other "
                "relays until it serves again", relay.id, relay.host, relay.port,
            )  # fmt: skip
        elif failed >= FAILED_CHECKS_FOR_DOWN:
            self._down.add(relay.id)
            logger.warning(
                "relay %s at %s:%d did not answer its health probe %d times in a row (refused "
                "or hung): new sessions use the other relays until it does",
                relay.id, relay.host, relay.port, failed,
            )  # fmt: skip


async def probe(relay: RelayEndpoint) -> ProbeResult:
    """Send ``relay`` a probe; what it answered within RELAY_CHECK_TIMEOUT_SECONDS."""
    with trio.move_on_after(RELAY_CHECK_TIMEOUT_SECONDS):
        try:
            stream = await trio.open_tcp_stream(relay.host, relay.port)
        except OSError:
            return ProbeResult.NO_ANSWER
        async with stream:
            try:
                await stream.send_all(encode_probe())
                answer = parse_status(await _status_line(stream))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return ProbeResult.NO_ANSWER
            except HelloError:
                # Not a relay's status line (or the connection ended first).
                return ProbeResult.NO_ANSWER
        # ok. A relay older than the probe refuses it as a token (token_invalid): it read the
        # hello, so it serves; only the answers saying it takes no new session count as down.
        if answer in NOT_SERVING_ANSWERS:
            return ProbeResult.NOT_SERVING
        if answer in CONNECTION_ANSWERS:
            return ProbeResult.NO_ANSWER
        return ProbeResult.SERVING
    return ProbeResult.NO_ANSWER


async def _status_line(stream: trio.abc.ReceiveStream) -> bytes:
    """The relay's first status line, ``\\n`` included (what arrived, if it ends sooner)."""
    line = b""
    while not line.endswith(b"\n") and len(line) < MAX_STATUS_LINE_SIZE:
        data = await stream.receive_some(MAX_STATUS_LINE_SIZE - len(line))
        if not data:
            break
        line += data
    return line.split(b"\n", 1)[0] + b"\n" if b"\n" in line else line


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
    ctx.relay_health.mark(relay, await probe(relay))
    ctx.metrics.relays_up.labels(relay.id).set(0 if relay.id in ctx.relay_health.down else 1)
