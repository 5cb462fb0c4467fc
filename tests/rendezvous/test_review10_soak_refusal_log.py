"""The refusal log stays useful to fail2ban under evasion: decoys cannot spend the budget that
hides a guesser, IPv6 is limited per /64, throttling is not logged as a refused credential,
the documented failregex matches only wrong credentials, and guessed registration keys and
``Authorization: Basic`` are logged too."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from protocol.identity import SigningIdentity
from rendezvous.credentials import new_registration_key
from rendezvous.metrics import (
    AUTH_REFUSAL_LOGGER,
    CREDENTIAL_REFUSAL_REASONS,
    MAX_TRACKED_REFUSAL_ADDRESSES,
    REFUSAL_LINES_PER_ADDRESS,
    REFUSAL_WINDOW_SECONDS,
    RefusedAuthenticationLog,
)
from rendezvous.store import Store
from tests.rendezvous.live_server import live_service
from tests.rendezvous.service_harness import ServiceHarness, harness

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parents[2] / "docs" / "self-hosting.md"
GUESSER = "198.51.100.7"


def _documented_failregex() -> re.Pattern[str]:
    """The fail2ban failregex of docs/self-hosting.md, with <HOST> as fail2ban expands it."""
    match = re.search(r"^failregex = (.+)$", DOCS.read_text(), re.MULTILINE)
    assert match is not None
    return re.compile(match.group(1).replace("<HOST>", r"(?P<host>\S+)"))


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name} {r.getMessage()}" for r in caplog.records if r.name == AUTH_REFUSAL_LOGGER]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_decoy_addresses_cannot_spend_the_budget_that_would_log_a_guesser(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=AUTH_REFUSAL_LOGGER)
    clock = _Clock()
    log = RefusedAuthenticationLog(clock=clock)
    for minute in range(10):
        start = 1000.0 + REFUSAL_WINDOW_SECONDS * minute
        clock.now = start
        for decoy in range(60):  # 60 decoy IPv4 addresses x 5 refusals spend 300 lines
            for _ in range(5):
                log.refused("invalid_token", f"203.0.{minute}.{decoy}")
        caplog.clear()
        for _ in range(1000):  # then the real guesser, 1,000 a minute
            log.refused("bad_signature", GUESSER)
            clock.now += 0.055
        failregex = _documented_failregex()
        named = [line for line in _lines(caplog) if (m := failregex.search(line))
                 and m.group("host") == GUESSER]  # fmt: skip
        assert len(named) >= 1, f"minute {minute}: the guesser left no line"


def test_an_address_forgotten_from_a_full_table_logs_again_when_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=AUTH_REFUSAL_LOGGER)
    log = RefusedAuthenticationLog(clock=_Clock())
    log.refused("invalid_token", GUESSER)
    for number in range(MAX_TRACKED_REFUSAL_ADDRESSES + 10):  # forgets the guesser
        log.refused("invalid_token", f"10.{number >> 16}.{(number >> 8) & 255}.{number & 255}")
    caplog.clear()
    log.refused("invalid_token", GUESSER)
    assert any(GUESSER in line for line in _lines(caplog))
    assert len(log._windows) <= MAX_TRACKED_REFUSAL_ADDRESSES


def test_ipv6_addresses_are_limited_per_64_and_logged_in_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=AUTH_REFUSAL_LOGGER)
    log = RefusedAuthenticationLog(clock=_Clock())
    for host in range(200):  # one /64, 200 interface ids
        log.refused("invalid_token", f"2001:db8:1:2::{host + 1:x}")
    lines = _lines(caplog)
    refusals = [line for line in lines if "reason=" in line]
    assert len(refusals) == REFUSAL_LINES_PER_ADDRESS
    assert refusals[0].endswith("authentication refused from 2001:db8:1:2::1: reason=invalid_token")
    # Another /64 has its own budget.
    log.refused("invalid_token", "2001:db8:1:3::1")
    assert _lines(caplog)[-1].endswith("from 2001:db8:1:3::1: reason=invalid_token")


def test_documented_failregex_matches_only_wrong_credentials() -> None:
    failregex = _documented_failregex()
    line = "tucdesk.rendezvous.auth authentication refused from 203.0.113.9: reason={}"
    for reason in CREDENTIAL_REFUSAL_REASONS:
        assert failregex.search(line.format(reason)), reason
    for reason in ("rate_limited", "malformed_login_request", "operator_disabled",
                   "bad_challenge", "invalid_tokenX"):  # fmt: skip
        assert not failregex.search(line.format(reason)), reason
    throttled = "tucdesk.rendezvous.auth requests throttled from 203.0.113.9: reason=rate_limited"
    assert not failregex.search(throttled)


@pytest.fixture
def anyio_backend() -> str:
    """Run the live-server tests on trio, the project's concurrency library."""
    return "trio"


async def test_throttled_requests_from_one_address_do_not_match_the_failregex(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with live_service(
        tmp_path / "data", f"sqlite:///{tmp_path / 'rv.db'}", auth_rate_limit=1.0,
        auth_rate_burst=3,
    ) as (url, _):  # fmt: skip
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            codes = [(await http.post("/v1/agents/register", json={})).status_code
                     for _ in range(10)]  # fmt: skip
    assert codes.count(429) >= 5, codes
    lines = _lines(caplog)
    failregex = _documented_failregex()
    assert not [line for line in lines if failregex.search(line)], lines
    assert any("requests throttled from 127.0.0.1: reason=rate_limited" in line for line in lines)


@pytest.fixture
async def service(store: Store, tmp_path: Path) -> AsyncIterator[ServiceHarness]:
    async with harness(store, tmp_path / "data") as running:
        yield running


async def test_guessed_registration_key_is_logged_as_a_refused_credential(
    service: ServiceHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUTH_REFUSAL_LOGGER)
    guess = new_registration_key()  # well-formed, never issued
    response = await service.register(SigningIdentity.generate(), guess)
    assert response.status_code == 401, response.text
    lines = _lines(caplog)
    assert any(line.endswith("reason=registration_key_unknown") for line in lines), lines
    assert _documented_failregex().search(lines[-1])
    assert guess not in caplog.text


async def test_basic_authorization_is_logged_as_a_refused_credential(
    service: ServiceHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUTH_REFUSAL_LOGGER)
    response = await service.http.get(
        "/v1/agents", headers={"Authorization": "Basic YWRtaW46aHVudGVyMg=="}
    )
    assert response.status_code == 401
    lines = _lines(caplog)
    assert lines and lines[-1].endswith("reason=malformed_token"), lines
    assert "YWRtaW46aHVudGVyMg" not in caplog.text
    # No credential at all is not a guess: not logged.
    caplog.clear()
    assert (await service.http.get("/v1/agents")).status_code == 401
    assert _lines(caplog) == []
