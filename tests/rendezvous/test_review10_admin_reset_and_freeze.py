"""Review 10 (roster freeze and policy reset): numbering goes on across ``team reset-policy``, so
nothing decided under the retired chain passes for the new one; a PUT whose roster names no
active admin is refused like the disable that would freeze it; and a disable that freezes the
roster says so in its ``operator.revoked`` record. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.policy import (
    PolicyBundleContent,
    Roster,
    RosterEntry,
    sign_policy_bundle,
)
from protocol.policy.roster import Role
from rendezvous.main import main
from rendezvous.store import Store, StoredPolicyBundle, open_store
from tests.rendezvous.policy_support import (
    current_policy,
    policy_text,
    put_policy,
    set_policy,
    signed_bundle,
)
from tests.rendezvous.service_harness import harness
from tests.rendezvous.test_approvals import RESTART, team_with_policy
from tests.rendezvous.test_approvals import _approve as approve
from tests.rendezvous.test_approvals import _ask as ask
from tests.rendezvous.test_approvals import _park as park

pytestmark = pytest.mark.anyio


async def test_an_approval_of_the_retired_chain_is_not_redeemed_under_the_new_chain(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await park(team, team.operator)
        assert (await approve(team, team.approver, request_id)).status_code == 200
        # team reset-policy's store step, then the team's admin signs a new first policy.
        assert await store.retire_policy_bundles(team.team_id, team.service.clock.now) == 1
        answer = await set_policy(team.service, team.admin)
        assert answer["version"] == 2  # not 1 again: the approval names version 1
        response = await ask(team, team.operator, {**RESTART, "approval_id": request_id})
        assert response.status_code == 409, response.text
        assert "policy changed" in response.json()["message"]


async def test_the_new_first_bundle_after_a_reset_follows_the_retired_version(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        await set_policy(service, admin)
        await set_policy(service, admin)
        await store.retire_policy_bundles(team, service.clock.now)
        state = await current_policy(service, admin)
        assert state["bundle"] is None and state["version"] == 2  # what `policy set` follows
        listed = await service.call(admin, "GET", "/v1/agents")
        assert listed.json()["policy_version"] == 0  # no bundle in force, not the retired 2
        first = sign_policy_bundle(
            PolicyBundleContent(
                team_id=team, version=1, issued_at=int(service.clock.now),
                policy_text=policy_text(1), roster=Roster.from_json(state["pending"]["roster"]),
                agent_tags={},
                previous_sha256=None,
            ),
            admin.identity,
        )  # fmt: skip
        refused = await put_policy(service, admin, first.to_json())
        assert refused.status_code == 409, refused.text
        assert "retired at version 2" in refused.json()["message"]
        assert "must be version 3" in refused.json()["message"]
        assert (await set_policy(service, admin))["version"] == 3


async def test_a_put_whose_roster_names_no_active_admin_is_refused_unless_told_to_freeze(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        await service.operator(team, "admin")
        await set_policy(service, admin)
        outsider = SigningIdentity.generate()
        roster = Roster.of([RosterEntry(outsider.public, "nobody@example.com", Role.ADMIN)])
        bundle = await signed_bundle(service, admin, roster=roster)
        refused = await put_policy(service, admin, bundle.to_json())
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "roster_would_freeze"
        assert "--freeze-roster" in refused.json()["message"]
        assert (await current_policy(service, admin))["version"] == 1
        [failed] = await service.audit_events(team, "policy.set_failed")
        assert failed["context"]["reason"] == "roster_would_freeze"
        assert failed["context"]["version"] == 2
        assert await service.audit_events(team, "roster.signed") == []
        # Told to freeze (a compromised key): stored, and the record says so.
        frozen = await service.call(
            admin, "PUT", "/v1/policy?freeze_roster=true", {"bundle": bundle.to_json()}
        )
        assert frozen.status_code == 200, frozen.text
        [last] = await service.audit_events(team, "roster.signed")  # same rules, new roster
        assert last["context"]["freeze_roster"] is True
        assert last["context"]["roster_frozen"] is True
        # A roster that keeps an active admin needs no flag, and carries no mark.
        async with harness(store, tmp_path / "other") as other:
            other_team = await other.team("dev")
            other_admin = await other.operator(other_team, "admin")
            await set_policy(other, other_admin)
            [set_record] = await other.audit_events(other_team, "policy.set")
            assert "freeze_roster" not in set_record["context"]


async def test_a_freeze_roster_disable_is_marked_in_operator_revoked(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        signer = await service.operator(team, "admin")
        other = await service.operator(team, "admin")
        roster = Roster.of([RosterEntry(signer.identity.public, "a@example.com", Role.ADMIN)])
        await set_policy(service, signer, roster=roster)
        target = f"/v1/operators/{signer.operator_id}/disable"
        refused = await service.call(other, "POST", target)
        assert refused.status_code == 409, refused.text
        frozen = await service.call(other, "POST", target + "?freeze_roster=true")
        assert frozen.status_code == 200, frozen.text
        [revoked] = await service.audit_events(team, "operator.revoked")
        assert revoked["context"]["freeze_roster"] is True
        assert revoked["context"]["roster_frozen"] is True


def test_the_server_admins_disable_of_the_last_roster_admin_is_marked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--data-dir", str(tmp_path / "data")]
    assert main(["init", *flags]) == 0
    assert main(["team", "create", "ops", *flags]) == 0
    assert main(["invite", "create", "--team", "ops", "--email", "ada@example.com",
                 "--role", "admin", *flags]) == 0  # fmt: skip
    code = capsys.readouterr().out.strip().splitlines()[-1]
    identity = SigningIdentity.generate()
    url = f"sqlite:///{tmp_path / 'data' / 'rendezvous.db'}"

    async def enroll_and_sign() -> str:
        async with open_store(url) as opened:
            digest = hashlib.sha256(code.encode()).digest()
            operator, _ = await opened.enroll_operator(
                digest, time.time(), identity.public.raw, identity.public.key_id
            )
            roster = Roster.of([RosterEntry(identity.public, "ada@example.com", Role.ADMIN)])
            content = PolicyBundleContent(
                team_id=operator.team_id, version=1, issued_at=int(time.time()),
                policy_text=policy_text(1), roster=roster, agent_tags={}, previous_sha256=None,
            )  # fmt: skip
            signed = sign_policy_bundle(content, identity)
            await opened.store_policy_bundle(
                StoredPolicyBundle(
                    team_id=operator.team_id, version=1, content_sha256=content.sha256(),
                    policy_sha256=content.policy_sha256, bundle=json.dumps(signed.to_json()),
                    admin_key_id=identity.public.key_id, created_by=operator.id,
                    created_at=time.time(),
                )
            )  # fmt: skip
            return operator.team_id

    team_id = trio.run(enroll_and_sign)
    assert main(["operator", "disable", "--team", "ops", "ada@example.com", *flags]) == 0
    assert "no active admin of team ops's signed roster is left" in capsys.readouterr().out

    async def revoked_context() -> dict[str, object]:
        async with open_store(url) as opened:
            records = await opened.audit.read_records(team_id, 0, 100)
        events = [json.loads(record.canonical)["event"] for record in records]
        [revoked] = [event for event in events if event["action"] == "operator.revoked"]
        context: dict[str, object] = revoked["context"]
        return context

    context = trio.run(revoked_context)
    assert context["freeze_roster"] is True and context["roster_frozen"] is True
