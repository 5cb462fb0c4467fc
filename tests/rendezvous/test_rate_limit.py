"""Unauthenticated endpoints are rate limited per address before they touch the store."""

from __future__ import annotations

import pytest

from protocol.identity import SigningIdentity
from rendezvous.config import ServiceConfig
from rendezvous.errors import ConfigError
from tests.rendezvous.service_harness import harness

pytestmark = pytest.mark.anyio

BURST = 3


async def _challenge(service, identity: SigningIdentity):
    return await service.http.post(
        "/v1/auth/challenge", json={"key_thumbprint": identity.public.key_id}
    )


async def test_challenges_over_the_burst_are_refused_with_429_and_write_nothing(store, tmp_path):
    async with harness(store, tmp_path, auth_rate_limit=0.001, auth_rate_burst=BURST) as service:
        identity = SigningIdentity.generate()
        for _ in range(BURST):
            assert (await _challenge(service, identity)).status_code == 200
        refused = await _challenge(service, identity)
        assert refused.status_code == 429
        assert refused.json()["error"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        # Only the allowed challenges were stored: pruning far in the future finds exactly them.
        assert await store.prune_expired(service.clock.now + 10**6) == BURST
        metrics = (await service.http.get("/metrics")).text
        assert 'tucdesk_auth_failures_total{reason="rate_limited"} 1.0' in metrics


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/auth/login", {"payload": "x", "signature": "y"}),
        ("/v1/operators/enroll", {"payload": "x", "signature": "y"}),
        ("/v1/agents/register", {"payload": "x", "signature": "y"}),
    ],
)
async def test_every_unauthenticated_endpoint_shares_the_limit(store, tmp_path, path, body):
    async with harness(store, tmp_path, auth_rate_limit=0.001, auth_rate_burst=BURST) as service:
        identity = SigningIdentity.generate()
        for _ in range(BURST):
            await _challenge(service, identity)
        refused = await service.http.post(path, json=body)
        assert refused.status_code == 429, refused.text


async def test_authenticated_requests_are_not_limited_by_it(store, tmp_path):
    # Enrolling and logging in spend the whole burst (enroll, challenge, login).
    async with harness(store, tmp_path, auth_rate_limit=0.001, auth_rate_burst=3) as service:
        operator = await service.operator(await service.team("acme"))
        assert (await _challenge(service, operator.identity)).status_code == 429
        for _ in range(5):
            response = await service.call(operator, "GET", "/v1/agents")
            assert response.status_code == 200, response.text


@pytest.mark.parametrize("setting", [{"auth_rate_limit": 0}, {"auth_rate_burst": 0}])
def test_rate_limit_settings_must_be_positive(setting):
    with pytest.raises(ConfigError):
        ServiceConfig(**setting).validate()
