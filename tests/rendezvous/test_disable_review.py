"""A disable leaves the disabled operator nothing to come back with (review of 4f1a727; both
backends).

A pending invite for its email dies with it (and one made as the disable committed is refused
at enrollment); an audit failure after the disable committed says the operator IS disabled and a
repeat writes the records that are missing; an approver disabled while their approval is being
redeemed does not get the session through; a request parked while the disable commits is
withdrawn; key listings show a key of a disabled creator as revoked; the invite duplicate check
sees every holder of an email under casefold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from protocol.identity import SigningIdentity
from rendezvous.audit_trail import Action
from rendezvous.credentials import (
    hash_secret,
    new_api_key,
    new_invite_code,
    new_registration_key,
)
from rendezvous.errors import ServiceError, ServiceUnavailable
from rendezvous.main import _check_email_free
from rendezvous.store import Store
from rendezvous.store.base import InviteUnusable, UnusableReason
from tests.rendezvous.service_harness import ServiceHarness, harness
from tests.rendezvous.test_approvals import RESTART, _approve, _ask, _park, team_with_policy

pytestmark = pytest.mark.anyio
SIEM_SCOPES = ["sessions:read", "registration_keys:write"]
WEEK = 7 * 86400


async def _with_api_key(service: ServiceHarness, key: str, target: str) -> httpx.Response:
    return await service.http.get(target, headers={"Authorization": f"Bearer {key}"})


async def _enroll(service: ServiceHarness, team: str, email: str, role: str) -> str:
    code = await service.invite(team, role, email=email)
    answer = await service.http.post(
        "/v1/operators/enroll", json=service.enrollment(SigningIdentity.generate(), code)
    )
    assert answer.status_code == 200, answer.text
    operator_id: str = answer.json()["operator_id"]
    return operator_id


async def _second_key_invite(store: Store, team: str, email: str, role: str, now: float) -> str:
    """What `tucdesk-rendezvous invite create TEAM EMAIL ROLE --another-key` does."""
    await _check_email_free(store, team, email, role, now, another_key=True)
    code = new_invite_code()
    await store.create_invite(team, email, role, hash_secret(code), now + WEEK, "admin-command",
                              now)  # fmt: skip
    return code


async def test_a_second_key_invite_for_a_disabled_operator_no_longer_enrolls(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        alice = await service.operator(team, "admin")
        hank = await _enroll(service, team, "hank@alpha.test", "admin")
        code = await _second_key_invite(store, team, "Hank@Alpha.test", "admin", service.clock.now)
        [invite_id] = [i.id for i in await store.list_invites(team) if i.used_at is None]

        answer = await service.call(alice, "POST", f"/v1/operators/{hank}/disable")
        assert answer.status_code == 200, answer.text
        assert answer.json()["revoked_invites"] == [invite_id]

        enrolled = await service.http.post(
            "/v1/operators/enroll", json=service.enrollment(SigningIdentity.generate(), code)
        )
        assert enrolled.status_code != 200, enrolled.text
        revoked = await service.audit_events(team, Action.OPERATOR_REVOKED)
        assert revoked[-1]["context"]["invites"] == [invite_id]
        invite_records = await service.audit_events(team, Action.OPERATOR_INVITE_REVOKED)
        assert [event["target"] for event in invite_records] == [f"invite:{invite_id}"]
        assert invite_records[0]["context"]["reason"] == "operator_disabled"


async def test_an_invite_made_before_a_disable_of_its_email_is_refused_at_enrollment(
    store: Store, tmp_path: Path
) -> None:
    # The invite's request read the clock before the disable committed and stored it after:
    # the disable's expiry missed it, enrollment still refuses it.
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        await service.operator(team, "admin")
        hank = await _enroll(service, team, "hank@alpha.test", "admin")
        made_at = service.clock.now
        await store.disable_operator(team, hank, made_at + 1)
        code = new_invite_code()
        await store.create_invite(team, "HANK@alpha.test", "admin", hash_secret(code),
                                  made_at + WEEK, "admin-command", made_at)  # fmt: skip
        identity = SigningIdentity.generate()
        with pytest.raises(InviteUnusable) as refused:
            await store.enroll_operator(
                hash_secret(code), made_at + 2, identity.public.raw, identity.public.key_id
            )
        assert refused.value.reason is UnusableReason.REVOKED
        # An invite made after the disable is a deliberate re-invitation, and works.
        later = new_invite_code()
        await store.create_invite(team, "hank@alpha.test", "admin", hash_secret(later),
                                  made_at + WEEK, "admin-command", made_at + 3)  # fmt: skip
        operator, _ = await store.enroll_operator(
            hash_secret(later), made_at + 4, identity.public.raw, identity.public.key_id
        )
        assert operator.is_active()


async def test_an_audit_failure_after_the_disable_says_it_is_disabled_and_a_repeat_completes(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        alice = await service.operator(team, "admin")
        hank = await service.operator(team, "admin")
        made = await service.call(hank, "POST", "/v1/api-keys",
                                  {"name": "siem", "scopes": SIEM_SCOPES})  # fmt: skip
        siem = made.json()
        record = service.ctx.audit.record

        async def fail_key_revocations(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("action") == Action.API_KEY_REVOKED:
                raise ServiceUnavailable("the audit log is unavailable")
            return await record(*args, **kwargs)

        monkeypatch.setattr(service.ctx.audit, "record", fail_key_revocations)
        first = await service.call(alice, "POST", f"/v1/operators/{hank.operator_id}/disable")
        assert first.status_code == 503
        assert "IS disabled" in first.json()["message"], first.text
        revoked = await service.audit_events(team, Action.OPERATOR_REVOKED)
        assert revoked[-1]["context"]["api_keys"] == [siem["id"]]
        monkeypatch.setattr(service.ctx.audit, "record", record)
        assert (await _with_api_key(service, siem["key"], "/v1/sessions")).status_code == 401

        again = await service.call(alice, "POST", f"/v1/operators/{hank.operator_id}/disable")
        assert again.status_code == 200, again.text
        assert again.json()["already_disabled"] is True
        key_records = await service.audit_events(team, Action.API_KEY_REVOKED)
        assert [event["target"] for event in key_records] == [f"api_key:{siem['id']}"]
        # A third disable finds the record and writes no second one.
        third = await service.call(alice, "POST", f"/v1/operators/{hank.operator_id}/disable")
        assert third.status_code == 200
        assert len(await service.audit_events(team, Action.API_KEY_REVOKED)) == 1


async def test_an_approver_disabled_during_redemption_does_not_get_the_session_through(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        assert (await _approve(team, team.approver, request_id)).status_code == 200
        record = team.service.ctx.audit.record
        paused, go = trio.Event(), trio.Event()

        async def pause(*args: Any, **kwargs: Any) -> Any:
            # Past the approver check of redeemable_approval, before the session row.
            if kwargs.get("action") == Action.APPROVAL_EXECUTED:
                paused.set()
                await go.wait()
            return await record(*args, **kwargs)

        monkeypatch.setattr(team.service.ctx.audit, "record", pause)
        answers: dict[str, Any] = {}

        async def ask() -> None:
            answers["session"] = await _ask(team, team.operator,
                                            {**RESTART, "approval_id": request_id})  # fmt: skip

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await paused.wait()
            disabled = await team.service.call(
                team.admin, "POST", f"/v1/operators/{team.approver.operator_id}/disable"
            )
            assert disabled.status_code == 200
            go.set()
        assert answers["session"].status_code == 409, answers["session"].text
        assert "was disabled" in answers["session"].json()["message"]
        refused = await team.service.audit_events(team.team_id, Action.SESSION_REFUSED)
        assert refused[-1]["context"]["reason"] == "approver_disabled"


async def test_a_request_parked_while_the_disable_commits_is_withdrawn(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        record = team.service.ctx.audit.record
        paused, go = trio.Event(), trio.Event()

        async def pause(*args: Any, **kwargs: Any) -> Any:
            # The request is stored RECORDING: the disable's withdrawal does not see it.
            if kwargs.get("action") == Action.APPROVAL_REQUESTED:
                paused.set()
                await go.wait()
            return await record(*args, **kwargs)

        monkeypatch.setattr(team.service.ctx.audit, "record", pause)
        answers: dict[str, Any] = {}

        async def ask() -> None:
            answers["park"] = await _ask(team, team.operator, RESTART)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await paused.wait()
            disabled = await team.service.call(
                team.admin, "POST", f"/v1/operators/{team.operator.operator_id}/disable"
            )
            assert disabled.json()["withdrawn_approval_requests"] == 0
            go.set()
        assert answers["park"].status_code == 403, answers["park"].text
        listed = await team.service.call(team.approver, "GET", "/v1/approvals")
        assert listed.json()["approvals"] == []
        withdrawn = await team.service.audit_events(team.team_id, Action.APPROVAL_WITHDRAWN)
        assert [event["context"]["reason"] for event in withdrawn] == ["operator_disabled"]


async def test_keys_a_disabled_operator_made_late_are_listed_as_revoked(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        alice = await service.operator(team, "admin")
        hank = await service.operator(team, "admin")
        await service.call(alice, "POST", f"/v1/operators/{hank.operator_id}/disable")
        now = service.clock.now
        # Stored after the disable by a request authenticated before it.
        late = new_api_key()
        await store.create_api_key(team, "late", SIEM_SCOPES, hash_secret(late),
                                   hank.operator_id, now)  # fmt: skip
        await store.create_registration_key(team, hash_secret(new_registration_key()), [],
                                            now + 600, hank.operator_id, now)  # fmt: skip
        assert (await _with_api_key(service, late, "/v1/sessions")).status_code == 401
        api_keys = (await service.call(alice, "GET", "/v1/api-keys")).json()
        assert [key["revoked_at"] is not None for key in api_keys] == [True]
        registration_keys = (await service.call(alice, "GET", "/v1/registration-keys")).json()
        assert [key["status"] for key in registration_keys] == ["revoked"]


async def test_the_invite_check_folds_case_beyond_ascii(store: Store, tmp_path: Path) -> None:
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        await _enroll(service, team, "ÉVA@alpha.test", "admin")
        with pytest.raises(ServiceError, match="enabled operator"):
            await _check_email_free(store, team, "éva@alpha.test", "auditor",
                                    service.clock.now, another_key=False)  # fmt: skip


async def test_the_invite_check_sees_an_enabled_holder_behind_many_disabled_ones(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        for _ in range(21):
            service.clock.now += 1
            bob = await _enroll(service, team, "bob@alpha.test", "operator")
            await store.disable_operator(team, bob, service.clock.now)
        service.clock.now += 1
        await _enroll(service, team, "bob@alpha.test", "operator")
        with pytest.raises(ServiceError, match="enabled operator"):
            await _check_email_free(store, team, "bob@alpha.test", "admin",
                                    service.clock.now, another_key=False)  # fmt: skip


async def test_a_disabled_operator_is_told_so_by_an_error_code(
    store: Store, tmp_path: Path
) -> None:
    # Clients tell a disabled operator from an expired token by the code, not the English text.
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        alice = await service.operator(team, "admin")
        hank = await service.operator(team, "operator")
        await service.call(alice, "POST", f"/v1/operators/{hank.operator_id}/disable")
        with_token = await service.call(hank, "GET", "/v1/sessions")
        assert (with_token.status_code, with_token.json()["error"]) == (401, "operator_disabled")
        login = await service.http.post(
            "/v1/auth/login", json=await service.login_envelope(hank.identity)
        )
        assert (login.status_code, login.json()["error"]) == (401, "operator_disabled")
