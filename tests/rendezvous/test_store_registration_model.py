"""Registration keys as a state machine: any sequence of registrations, revocations and clock
moves gives the same outcomes on both backends as a small in-memory model.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rendezvous.store import RegistrationKeyUnusable, UnusableReason, open_store

NOW = 1_800_000_000.0
KEYS = 3

operations = st.lists(
    st.one_of(
        st.tuples(st.just("register"), st.integers(0, KEYS - 1), st.integers(0, 40)),
        st.tuples(st.just("register_as_other_team"), st.integers(0, KEYS - 1), st.just(0)),
        st.tuples(st.just("revoke"), st.integers(0, KEYS - 1), st.just(0)),
    ),
    max_size=12,
)


@dataclass
class ModelKey:
    expires_at: float
    used: bool = False
    revoked: bool = False

    def refusal(self, now: float) -> UnusableReason | None:
        if self.revoked:
            return UnusableReason.REVOKED
        if self.used:
            return UnusableReason.USED
        if now >= self.expires_at:
            return UnusableReason.EXPIRED
        return None


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ttls=st.lists(st.integers(1, 100), min_size=KEYS, max_size=KEYS), steps=operations)
def test_registration_outcomes_match_the_model(
    database_url: str, ttls: list[int], steps: list[tuple[str, int, int]]
) -> None:
    trio.run(_check_against_model, database_url, ttls, steps)


async def _check_against_model(
    database_url: str, ttls: list[int], steps: list[tuple[str, int, int]]
) -> None:
    # Each example gets its own teams and secrets, so examples can share one database.
    async with open_store(database_url) as store:
        team = await store.create_team(f"model-{uuid.uuid4().hex}", NOW)
        other_team = await store.create_team(f"other-{uuid.uuid4().hex}", NOW)
        secrets = [uuid.uuid4().bytes for _ in range(KEYS)]
        hashes = [hashlib.sha256(secret).digest() for secret in secrets]
        models = [ModelKey(NOW + ttl) for ttl in ttls]
        ids = [
            (await store.create_registration_key(team.id, hashes[i], [f"t{i}"], NOW + ttls[i],
                                                 "op", NOW)).id
            for i in range(KEYS)
        ]  # fmt: skip
        now = NOW
        registered = 0
        for action, index, advance in steps:
            now += advance
            if action == "revoke":
                await store.revoke_registration_key(team.id, ids[index], now)
                models[index].revoked = True
                continue
            expected_team = other_team.id if action == "register_as_other_team" else team.id
            expected = (
                UnusableReason.UNKNOWN if expected_team != team.id else models[index].refusal(now)
            )
            try:
                agent, key = await store.register_agent(
                    hashes[index], now, os.urandom(32), "fp", "machine", "host", "host",
                    expected_team_id=expected_team,
                )  # fmt: skip
            except RegistrationKeyUnusable as refused:
                assert refused.reason is expected
            else:
                assert expected is None
                assert agent.tags == (f"t{index}",) and key.used_by_agent == agent.id
                models[index].used = True
                registered += 1
        assert len(await store.list_agents(team.id)) == registered
        assert await store.list_agents(other_team.id) == []
        for key in await store.list_registration_keys(team.id):
            model = models[ids.index(key.id)]
            assert (key.used_at is not None) == model.used
            assert (key.revoked_at is not None) == model.revoked
