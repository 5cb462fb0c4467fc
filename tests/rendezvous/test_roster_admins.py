"""Who can sign a team's next policy stays with an active admin: the store refuses (under the team
lock, so two concurrent disables cannot both pass) to disable the last active admin the signed
roster names, and ``retire_policy_bundles`` (``team reset-policy``) starts a new chain whose
numbering follows the retired one.

Store tests run on SQLite and PostgreSQL (the ``store`` fixture is parametrized); the whole
flow on a real stack is tests/stack/test_roster_recovery.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from rendezvous.main import main
from rendezvous.store import AlreadyExists, Operator, Store, StoredPolicyBundle, Team
from rendezvous.store.base import LastRosterSigner

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0
HOUR = 3600.0


async def _admin(store: Store, team: Team, email: str) -> Operator:
    code = os.urandom(8).hex()
    digest = hashlib.sha256(code.encode()).digest()
    await store.create_invite(team.id, email, "admin", digest, NOW + HOUR, "admin", NOW)
    raw = os.urandom(32)
    operator, _ = await store.enroll_operator(digest, NOW, raw, "jkt-" + raw.hex()[:20])
    return operator


def _bundle(team: Team, version: int) -> StoredPolicyBundle:
    return StoredPolicyBundle(
        team_id=team.id, version=version, content_sha256=f"{version:064x}",
        policy_sha256=f"{version:064x}", bundle="{}", admin_key_id="jkt-x",
        created_by="op_x", created_at=NOW,
    )  # fmt: skip


async def test_the_last_active_admin_of_the_signed_roster_is_kept(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    signer, other = await _admin(store, team, "a@x.y"), await _admin(store, team, "b@x.y")
    roster = frozenset({signer.key_thumbprint})
    with pytest.raises(LastRosterSigner):
        await store.disable_operator_and_holdings(team.id, signer.id, NOW, keep_a_signer=roster)
    assert (await store.get_operator(team.id, signer.id)).is_active()  # type: ignore[union-attr]
    # An admin the roster does not name can go; without the check (--freeze-roster) so can a.
    await store.disable_operator_and_holdings(team.id, other.id, NOW, keep_a_signer=roster)
    disabled = await store.disable_operator_and_holdings(team.id, signer.id, NOW)
    assert not disabled.operator.is_active()


async def test_two_roster_admins_disabling_each_other_cannot_both_succeed(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    first, second = await _admin(store, team, "a@x.y"), await _admin(store, team, "b@x.y")
    roster = frozenset({first.key_thumbprint, second.key_thumbprint})
    refused: list[str] = []

    async def disable(operator: Operator) -> None:
        try:
            await store.disable_operator_and_holdings(
                team.id, operator.id, NOW, keep_a_signer=roster
            )
        except LastRosterSigner:
            refused.append(operator.id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(disable, first)
        nursery.start_soon(disable, second)
    assert len(refused) == 1
    active = [op for op in await store.list_operators(team.id) if op.is_active()]
    assert [op.id for op in active] == refused


async def test_retiring_the_policy_chain_keeps_its_numbering(store: Store) -> None:
    team, other = await store.create_team("ops", NOW), await store.create_team("dev", NOW)
    for version in (1, 2):
        await store.store_policy_bundle(_bundle(team, version))
    await store.store_policy_bundle(_bundle(other, 1))
    assert await store.retire_policy_bundles(team.id, NOW) == 2
    assert await store.latest_policy_bundle(team.id) is None
    assert await store.newest_policy_version(team.id) == 2
    assert await store.retire_policy_bundles(team.id, NOW) == 0  # nothing in force to retire
    with pytest.raises(AlreadyExists):  # the new chain's first bundle follows the retired one
        await store.store_policy_bundle(_bundle(team, 1))
    await store.store_policy_bundle(_bundle(team, 3))
    assert (await store.latest_policy_bundle(team.id)).version == 3  # type: ignore[union-attr]
    assert (await store.latest_policy_bundle(other.id)).version == 1  # type: ignore[union-attr]


def test_reset_policy_of_a_team_without_a_signed_policy_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--data-dir", str(tmp_path / "data")]
    assert main(["init", *flags]) == 0
    assert main(["team", "create", "ops", *flags]) == 0
    capsys.readouterr()
    assert main(["team", "reset-policy", "--team", "ops", *flags]) == 1
    assert "has no signed policy" in capsys.readouterr().err
