"""Policy on the rendezvous, both backends: trust at enrollment, PUT/GET/test, decisions, sync."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from protocol.identity import PublicIdentity, SigningIdentity, b64url, b64url_decode
from protocol.policy import (
    PinnedPolicyTrust,
    Roster,
    RosterEntry,
    SignedPolicyBundle,
    accept_policy_bundle,
)
from rendezvous.store import Store, StoredPolicyBundle
from tests.rendezvous.policy_support import (
    current_policy,
    policy_text,
    put_policy,
    set_policy,
    signed_bundle,
)
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness, harness
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance

pytestmark = pytest.mark.anyio


def _pins(service: ServiceHarness, answer: dict[str, Any], team_id: str) -> PinnedPolicyTrust:
    trust = answer["policy_trust"]
    keys = [PublicIdentity(b64url_decode(text, max_size=64)) for text in trust["admin_keys"]]
    policy_key = PublicIdentity(b64url_decode(trust["policy_key"], max_size=64))
    assert policy_key == service.ctx.keys.policy_signer.public
    return PinnedPolicyTrust.at_enrollment(team_id, keys, policy_key)


async def _register(service: ServiceHarness, admin: OperatorSession, name: str) -> dict[str, Any]:
    key = await service.registration_key(admin, tags=["prod"])
    response = await service.register(SigningIdentity.generate(), key["key"], hostname=name)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def test_registration_hands_the_agent_the_team_admins_and_the_policy_key_to_pin(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        await service.operator(team, "operator")
        answer = await _register(service, admin, "web-1")
        pins = _pins(service, answer, team)
        assert set(pins.admin_keys) == {admin.identity.public.key_id}


async def test_an_agent_enrolling_after_a_bundle_can_accept_the_bundle_in_force(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        first_admin = await service.operator(team, "admin")
        second_admin = await service.operator(team, "admin")
        await set_policy(service, first_admin)
        # The first admin hands over: the next roster keeps only the second one as admin.
        state = await current_policy(service, first_admin)
        roster = Roster.of(
            entry if entry.thumbprint != first_admin.identity.public.key_id
            else RosterEntry(entry.public_key, entry.email, "operator")
            for entry in Roster.from_json(state["pending"]["roster"]).entries
        )  # fmt: skip
        await set_policy(service, first_admin, roster=roster)
        answer = await _register(service, second_admin, "late-1")
        pins = _pins(service, answer, team)
        bundle = (await current_policy(service, second_admin))["bundle"]
        accepted = accept_policy_bundle(bundle, pins)
        assert accepted.trust.version == 2
        assert set(accepted.trust.admin_keys) == {second_admin.identity.public.key_id}


async def test_an_admin_signed_bundle_is_countersigned_stored_and_audited_with_both_hashes(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        operator = await service.operator(team, "operator")
        pins = _pins(service, await _register(service, admin, "web-1"), team)
        empty = await current_policy(service, operator)
        assert (empty["bundle"], empty["version"]) == (None, 0)
        assert len(empty["pending"]["roster"]) == 2

        first = await set_policy(service, admin)
        assert (first["version"], first["kind"]) == (1, "policy")
        state = await current_policy(service, operator)
        assert state["version"] == 1
        accepted = accept_policy_bundle(state["bundle"], pins)
        assert accepted.roster.may_open_sessions(operator.identity.public.key_id)

        new_text = policy_text(2, rules='[[rules]]\nid = "only-admins"\noutcome = "allow"\n'
                                     'operators = { roles = ["admin"] }\n')  # fmt: skip
        second = await set_policy(service, admin, text=new_text)
        assert second["version"] == 2
        assert accept_policy_bundle(second["bundle"], accepted.trust).trust.version == 2
        policy_sets = await service.audit_events(team, "policy.set")
        assert [e["context"]["new_version"] for e in policy_sets] == [1, 2]
        assert policy_sets[1]["context"]["old_sha256"] == first["sha256"]
        assert policy_sets[1]["context"]["new_sha256"] == second["sha256"]


async def test_a_change_of_roster_alone_is_audited_as_a_roster_signature(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        await set_policy(service, admin)
        await service.operator(team, "operator")
        answer = await set_policy(service, admin)
        assert answer["kind"] == "roster"
        actions = [event["action"] for event in await service.audit_events(team)]
        assert actions.count("policy.set") == 1 and actions.count("roster.signed") == 1


async def test_bundles_not_signed_by_an_admin_of_the_signed_roster_are_refused(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        operator = await service.operator(team, "operator")
        by_operator = await signed_bundle(service, admin, signer=operator.identity)
        response = await put_policy(service, admin, by_operator.to_json())
        assert response.status_code == 403, response.text
        assert "not signed by a pinned admin" in response.json()["message"]
        own = await signed_bundle(service, operator)
        assert (await put_policy(service, operator, own.to_json())).status_code == 403

        await set_policy(service, admin)
        # An admin the rendezvous knows but no signed roster lists cannot sign the next one.
        newcomer = await service.operator(team, "admin")
        unsigned = await signed_bundle(service, newcomer)
        response = await put_policy(service, newcomer, unsigned.to_json())
        assert response.status_code == 403, response.text
        assert (await current_policy(service, admin))["version"] == 1


async def test_a_bundle_must_be_the_next_version_and_follow_the_one_in_force(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        stale = await signed_bundle(service, admin)
        await set_policy(service, admin)
        response = await put_policy(service, admin, stale.to_json())
        assert response.status_code == 409, response.text
        assert "version 1" in response.json()["message"]


async def test_a_version_lost_to_a_concurrent_put_is_audited_as_not_stored(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both PUTs are checked and audited before either stores: the log must not keep the loser's
    ``policy.set`` as if it took effect."""
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admins = [await service.operator(team, "admin") for _ in range(2)]
        await set_policy(service, admins[0])
        assert await service.audit_events(team, "policy.set_failed") == []
        texts = [  # two different changes of the policy, both next after version 1
            policy_text(2, rules=f'[[rules]]\nid = "only-{role}s"\noutcome = "allow"\n'
                                 f'operators = {{ roles = ["{role}"] }}\n')
            for role in ("admin", "operator")
        ]  # fmt: skip
        bundles = [
            await signed_bundle(service, admin, text=text)
            for admin, text in zip(admins, texts, strict=True)
        ]
        shas = [bundle.content.sha256() for bundle in bundles]
        assert shas[0] != shas[1]

        # The race made certain: each request waits at the store until both have reached it.
        assert service.ctx.store is store
        store_policy_bundle = store.store_policy_bundle
        arrived: list[str] = []
        both_arrived = trio.Event()

        async def store_once_both_arrived(bundle: StoredPolicyBundle) -> StoredPolicyBundle:
            arrived.append(bundle.content_sha256)
            if len(arrived) == 2:
                both_arrived.set()
            with trio.fail_after(10):
                await both_arrived.wait()
            return await store_policy_bundle(bundle)

        monkeypatch.setattr(store, "store_policy_bundle", store_once_both_arrived)
        statuses: dict[str, int] = {}

        async def put(admin: OperatorSession, bundle: SignedPolicyBundle) -> None:
            response = await put_policy(service, admin, bundle.to_json())
            statuses[bundle.content.sha256()] = response.status_code

        async with trio.open_nursery() as nursery:
            for admin, bundle in zip(admins, bundles, strict=True):
                nursery.start_soon(put, admin, bundle)

        assert sorted(statuses.values()) == [200, 409]
        winner = next(sha for sha, status in statuses.items() if status == 200)
        loser = next(sha for sha, status in statuses.items() if status == 409)
        assert (await current_policy(service, admins[0]))["version"] == 2
        events = await service.audit_events(team)
        attempts = [e for e in events if e["action"] == "policy.set"]
        assert {e["context"]["new_sha256"] for e in attempts[1:]} == {winner, loser}
        [failed] = [e for e in events if e["action"] == "policy.set_failed"]
        assert failed["context"]["sha256"] == loser
        assert failed["context"]["version"] == 2
        assert failed["context"]["audited_as"] == "policy.set"
        assert "version 2" in failed["context"]["reason"]
        assert events.index(failed) > max(
            i for i, e in enumerate(events) if e["context"].get("new_sha256") == loser
        )


async def test_a_store_failure_after_the_audit_record_is_audited_as_not_stored(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        bundle = await signed_bundle(service, admin)
        async with store._autocommit() as session:  # a real failure, not a stand-in
            if database_url.startswith("sqlite"):
                await session.execute(
                    "CREATE TRIGGER refuse_bundles BEFORE INSERT ON policy_bundles "
                    "BEGIN SELECT RAISE(ABORT, 'the disk is failing'); END"
                )
            else:
                await session.execute(
                    "CREATE FUNCTION refuse_bundles() RETURNS trigger LANGUAGE plpgsql AS "
                    "'BEGIN RAISE EXCEPTION ''the disk is failing''; END'"
                )
                await session.execute(
                    "CREATE TRIGGER refuse_bundles BEFORE INSERT ON policy_bundles "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_bundles()"
                )
        response = await put_policy(service, admin, bundle.to_json())
        assert response.status_code == 503, response.text
        assert (await current_policy(service, admin))["version"] == 0
        events = await service.audit_events(team)
        assert [e["action"] for e in events][-2:] == ["policy.set", "policy.set_failed"]
        failed = events[-1]["context"]
        assert failed["sha256"] == bundle.content.sha256() == events[-2]["context"]["new_sha256"]
        assert "did not confirm" in failed["reason"]


async def test_a_policy_that_does_not_parse_is_refused_naming_its_line(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        bundle = (await signed_bundle(service, admin)).to_json()
        broken = policy_text(1) + '\n[[rules]]\nid = "x"\noutcome = "perhaps"\n'
        bundle["content"]["policy_toml"] = broken
        bundle["content"]["policy_sha256"] = hashlib.sha256(broken.encode()).hexdigest()
        response = await put_policy(service, admin, bundle)
        assert response.status_code == 400, response.text
        message = response.json()["message"]
        assert "line" in message and "outcome" in message


async def test_policy_test_explains_each_decision(store: Store, tmp_path: Path) -> None:
    async with harness(store, tmp_path) as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        operator = await service.operator(team, "operator")
        await _register(service, admin, "web-1")
        email = f"operator@{team}.test"

        async def ask(**body: Any) -> dict[str, Any]:
            body.setdefault("operator", email)
            body.setdefault("agent", "web-1")
            response = await service.call(operator, "POST", "/v1/policy/test", body)
            assert response.status_code == 200, response.text
            result: dict[str, Any] = response.json()
            return result

        interim = await ask(action="shell")
        assert (interim["result"], interim["version"]) == ("allow", 0)
        await set_policy(service, admin)
        assert (await ask(action="shell"))["rule_id"] == "ops-may-connect"
        denied = await ask(action="exec", command=["reboot", "now"])
        assert (denied["result"], denied["rule_id"], denied["version"]) == (
            "deny", "never-reboot", 1,
        )  # fmt: skip
        risky = await ask(action="exec", command=["rm", "-rf", "/tmp/x"])
        assert (risky["result"], risky["rule_id"]) == ("approval_required", "high_risk")
        stranger = await ask(action="shell", operator="nobody@example.com")
        assert stranger["result"] == "deny" and "not in the signed roster" in stranger["reason"]
        windowed = policy_text(2, rules=(
            '[[rules]]\nid = "office"\noutcome = "allow"\n'
            '[rules.when]\ndays = ["mon"]\nhours = "09:00-17:00"\ntimezone = "Europe/Berlin"\n'
        ))  # fmt: skip
        await set_policy(service, admin, text=windowed)
        monday_morning = datetime(2026, 11, 23, 8, 30, tzinfo=UTC).isoformat()
        monday_evening = datetime(2026, 11, 23, 16, 0, tzinfo=UTC).isoformat()
        assert (await ask(action="shell", at=monday_morning))["result"] == "allow"
        assert (await ask(action="shell", at=monday_evening))["result"] == "deny"


async def test_sessions_are_decided_by_the_signed_policy_and_roster(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        operator = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        await set_policy(service, admin)
        late = await service.operator(team, "operator")
        async with agent_channel(url, agent):
            reboot = {"target": "web-1", "mode": "exec", "command": ["reboot"]}
            response = await service.call(operator, "POST", "/v1/sessions", reboot)
            assert response.status_code == 403, response.text
            assert "never-reboot" in response.json()["message"]
            shell = {"target": "web-1", "mode": "shell"}
            response = await service.call(late, "POST", "/v1/sessions", shell)
            assert response.status_code == 403, response.text
            assert "tucdesk roster sign" in response.json()["message"]
            response = await service.call(operator, "POST", "/v1/sessions", shell)
            assert response.status_code == 201, response.text
        decisions = [
            event for event in await service.audit_events(team)
            if event["action"] == "session.decision"
        ]  # fmt: skip
        assert [d["policy_result"]["rule_id"] for d in decisions] == [
            "never-reboot", "signed-roster", "ops-may-connect",
        ]  # fmt: skip
        assert all(d["context"]["policy_version"] == 1 for d in decisions)


async def test_agents_get_the_bundle_on_connect_and_on_change_and_their_version_is_listed(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        await set_policy(service, admin)
        async with agent_channel(url, agent) as channel:
            first = await channel.receive("policy_bundle")
            assert SignedPolicyBundle.from_json(first["bundle"]).content.version == 1
            await channel.send({"type": "policy_applied", "version": 1})
            await set_policy(service, admin)
            second = await channel.receive("policy_bundle")
            assert SignedPolicyBundle.from_json(second["bundle"]).content.version == 2
            await channel.send(
                {"type": "policy_refused", "version": 2, "reason": "not signed by a pinned admin"}
            )
            # A heartbeat round trip: the answers before it have been handled.
            await channel.send({"type": "heartbeat"})
            await channel.ws.get_message()
        listing = (await service.call(admin, "GET", "/v1/agents")).json()
        assert listing["policy_version"] == 2
        [view] = listing["agents"]
        assert view["policy_version"] == 1
        assert view["policy_refusal"] == "not signed by a pinned admin"
        refusals = [
            event for event in await service.audit_events(team)
            if event["action"] == "policy.refused"
        ]  # fmt: skip
        assert refusals[0]["context"]["version"] == 2
        assert refusals[0]["target"] == agent.agent_id
        assert b64url(agent.identity.public.raw)  # the agent stayed registered throughout
