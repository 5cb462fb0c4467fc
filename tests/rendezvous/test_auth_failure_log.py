"""Each refused authentication leaves one log line with the client's address and the reason,
never the credential, and a flood of them cannot drown the log (as sshd's lines, for fail2ban).

A soak audit sent 205 requests with bogus tokens and 30 malformed login challenges: the log
stayed silent, only a counter without addresses moved.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest

from rendezvous.metrics import (
    AUTH_REFUSAL_LOGGER,
    MAX_TRACKED_REFUSAL_ADDRESSES,
    REFUSAL_LINES_PER_ADDRESS,
    REFUSAL_LINES_PER_WINDOW,
    REFUSAL_WINDOW_SECONDS,
    RefusedAuthenticationLog,
)
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio

# The documented format (docs/self-hosting.md), which a fail2ban filter matches.
REFUSAL_LINE = re.compile(r"^authentication refused from (?P<host>\S+): reason=(?P<reason>\S+)$")
BOGUS_TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJzZWNyZXQtc3ViamVjdCJ9.c2lnbmF0dXJlLXNlY3JldA"
BOGUS_API_KEY = "sk_live_QWERTYUIOPASDFGHJKLZXCVBNM234567abcdefgh"
FLOOD = 1000


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


def _refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == AUTH_REFUSAL_LOGGER]


async def test_refused_credentials_are_logged_with_address_and_reason_and_no_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with live_service(tmp_path / "data", f"sqlite:///{tmp_path / 'rv.db'}") as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            token = await http.get("/v1/agents", headers={"Authorization": f"Bearer {BOGUS_TOKEN}"})
            key = await http.get("/v1/agents", headers={"Authorization": f"Bearer {BOGUS_API_KEY}"})
            challenge = await http.post("/v1/auth/challenge", json={"key_thumbprint": 7})
    assert (token.status_code, key.status_code) == (401, 401)
    assert challenge.status_code in (400, 422)
    lines = _refusal_lines(caplog)
    matches = [REFUSAL_LINE.match(line) for line in lines]
    assert len(lines) == 3 and all(matches), lines
    assert {m.group("host") for m in matches if m} == {"127.0.0.1"}
    reasons = [m.group("reason") for m in matches if m]
    assert reasons[2] == "malformed_login_request"
    everything = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    for secret in (BOGUS_TOKEN, BOGUS_API_KEY):
        for part in (secret, secret[:12], secret[-12:], secret.split(".")[-1][:12]):
            assert part not in everything


class _Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_from_one_address_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=AUTH_REFUSAL_LOGGER)
    clock = _Clock()
    log = RefusedAuthenticationLog(clock=clock)
    for _ in range(FLOOD):
        log.refused("invalid_token", "203.0.113.9")
        clock.now += 0.01  # 1,000 in 10 s
    lines = _refusal_lines(caplog)
    assert len(lines) == REFUSAL_LINES_PER_ADDRESS + 1  # the cap, and its notice
    clock.now += REFUSAL_WINDOW_SECONDS
    log.refused("invalid_token", "203.0.113.9")
    lines = _refusal_lines(caplog)
    assert f"suppressed {FLOOD - REFUSAL_LINES_PER_ADDRESS} more" in lines[-2]
    assert REFUSAL_LINE.match(lines[-1])


def test_a_flood_from_many_addresses_is_bounded_in_lines_and_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=AUTH_REFUSAL_LOGGER)
    log = RefusedAuthenticationLog(clock=_Clock())
    for number in range(3 * MAX_TRACKED_REFUSAL_ADDRESSES):
        log.refused("invalid_api_key", f"2001:db8::{number:x}")
    assert len(_refusal_lines(caplog)) <= REFUSAL_LINES_PER_WINDOW + 1
    assert len(log._windows) <= MAX_TRACKED_REFUSAL_ADDRESSES
