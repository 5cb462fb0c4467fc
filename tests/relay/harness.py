"""Shared test scaffolding for the relay: a signer, tokens, and a relay running in-process."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side, issue_relay_token
from relay.config import HostPort, RelayConfig
from relay.keyset import TokenKeySet
from relay.server import Relay

RELAY_ID = "relay-test"
ISSUER = "tucdesk-rendezvous"
TEST_DEADLINE_SECONDS = 30


def trio_test(function: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test function under trio.run, with a hard deadline."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            with trio.fail_after(TEST_DEADLINE_SECONDS):
                await function(*args, **kwargs)

        trio.run(main)

    return wrapper


def relay_config(**overrides: Any) -> RelayConfig:
    """A relay config on loopback ephemeral ports with short timeouts and generous rate limits."""
    values: dict[str, Any] = {
        "listen": HostPort("127.0.0.1", 0),
        "udp": HostPort("127.0.0.1", 0),
        "relay_id": RELAY_ID,
        "token_key": (Path("pinned-in-test"),),
        "hello_timeout": 2.0,  # MIN_HELLO_TIMEOUT_SECONDS
        "pair_timeout": 2.0,
        "idle_timeout": 10.0,
        "grace": 0.5,
        "rate_limit": 1000.0,
        "rate_burst": 1000,
    }
    values.update(overrides)
    return RelayConfig(**values)


def make_token(
    signer: SigningIdentity,
    session_id: str,
    side: Side | str,
    *,
    relay_id: str = RELAY_ID,
    issuer: str = ISSUER,
    now: float | None = None,
    lifetime: int = 60,
) -> str:
    """A relay token for one side of ``session_id``."""
    return issue_relay_token(
        signer,
        session_id=session_id,
        side=side,
        relay_id=relay_id,
        issuer=issuer,
        now=time.time() if now is None else now,
        lifetime=lifetime,
    )


@asynccontextmanager
async def running_relay(signer: SigningIdentity, **overrides: Any) -> AsyncIterator[Relay]:
    """A relay serving on loopback that trusts ``signer``; shut down gracefully on exit."""
    relay = Relay(relay_config(**overrides), TokenKeySet({signer.public.key_id: signer.public}))
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        try:
            yield relay
        finally:
            relay.shutdown()


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``predicate`` until true, failing the test after ``within`` seconds.

    For state the relay changes inside its own tasks, with no event a test could wait on.
    """
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 (bounded poll of another task's state)
            await trio.sleep(0.01)
