"""Registering an agent under a name another agent of the team already has succeeds, but the
answer carries a warning naming the other agent (cloned images share a host name)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.identity import SigningIdentity
from rendezvous.store import Store, StoreUnavailable
from tests.rendezvous.service_harness import harness

pytestmark = pytest.mark.anyio


async def test_a_second_agent_with_a_taken_name_is_registered_with_a_warning(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        answers = []
        for hostname in ("vm", "vm", "db-1"):
            key = await service.registration_key(admin)
            response = await service.register(SigningIdentity.generate(), key["key"],
                                              hostname=hostname)
            assert response.status_code == 200, response.text
            answers.append(response.json())
        first, second, other = answers
        assert first["warnings"] == [] and other["warnings"] == []
        [warning] = second["warnings"]
        assert "another agent of this team is already called vm" in warning
        assert first["agent_id"] in warning and "--name" in warning


async def test_a_failed_namesake_lookup_loses_only_the_warning(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookup runs after the registration is committed and audited (the key spent): its
    failure must not turn the answer into an error, or the agent would write no state."""
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        key = await service.registration_key(admin)

        async def unavailable(*_: object, **__: object) -> None:
            raise StoreUnavailable("the database went away")

        monkeypatch.setattr(service.store, "agent_listing", unavailable)
        response = await service.register(SigningIdentity.generate(), key["key"], hostname="vm")
        assert response.status_code == 200, response.text
        assert response.json()["warnings"] == []
