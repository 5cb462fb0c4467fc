"""A disable leaves the disabled operator nothing to come back with (review of 4f1a727 and
159ff19; both backends).

A pending invite for its email dies with it, and a re-invite made after it enrolls whatever the
clocks; the operator.revoked record is the one statement of what a disable takes away (no
per-key records, none written twice by two disables at once); a failure after the disable
committed says the operator IS disabled and a repeat completes it; an approver disabled while
their approval is being redeemed does not get the session through; a request parked while the
disable commits is withdrawn; key listings show a key of a disabled creator as revoked; the
invite duplicate check sees every holder of an email under casefold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from protocol.identity import SigningIdentity
from rendezvous import routes_operators
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
from tests.rendezvous.service_harness import ServiceHarness, harness
from tests.rendezvous.test_approvals import (
    RESTART,
    _approve,
    _ask,
    _park,
    _view,
    team_with_policy,
)

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
        assert await service.audit_events(team, Action.OPERATOR_INVITE_REVOKED) == []


async def test_a_reinvite_whose_clock_is_behind_the_disable_enrolls(
    store: Store, tmp_path: Path
) -> None:
    # `invite create` ran on a host whose clock is behind the instance that disabled: the
    # invite's created_at is earlier than disabled_at, yet it is a deliberate re-invite.
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        await service.operator(team, "admin")
        hank = await _enroll(service, team, "hank@alpha.test", "admin")
        disabled_at = service.clock.now
        await store.disable_operator(team, hank, disabled_at)
        code = new_invite_code()
        behind = disabled_at - 0.3
        await store.create_invite(team, "HANK@alpha.test", "admin", hash_secret(code),
                                  disabled_at + WEEK, "admin-command", behind)  # fmt: skip
        identity = SigningIdentity.generate()
        operator, _ = await store.enroll_operator(
            hash_secret(code), disabled_at + 1, identity.public.raw, identity.public.key_id
        )
        assert operator.is_active() and operator.email == "HANK@alpha.test"
        # A repeated disable of the old record leaves a re-invite alone.
        again = new_invite_code()
        await store.create_invite(team, "hank@alpha.test", "operator", hash_secret(again),
                                  disabled_at + WEEK, "admin-command", disabled_at + 2)  # fmt: skip
        repeat = await store.disable_operator_and_holdings(team, hank, disabled_at + 3)
        assert repeat.already_disabled and repeat.revoked_invites == ()
        unused = [i for i in await store.list_invites(team) if i.used_at is None]
        assert [i.expires_at for i in unused] == [disabled_at + WEEK]


async def test_a_failure_after_the_disable_says_it_is_disabled_and_a_repeat_completes(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        service = team.service
        request_id = await _park(team, team.operator)
        record = service.ctx.audit.record

        async def fail_withdrawals(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("action") == Action.APPROVAL_WITHDRAWN:
                raise ServiceUnavailable("the audit log is unavailable")
            return await record(*args, **kwargs)

        monkeypatch.setattr(service.ctx.audit, "record", fail_withdrawals)
        target = f"/v1/operators/{team.operator.operator_id}/disable"
        first = await service.call(team.admin, "POST", target)
        assert first.status_code == 503
        message = first.json()["message"]
        assert "IS disabled" in message and "missing records" not in message, first.text
        monkeypatch.setattr(service.ctx.audit, "record", record)

        again = await service.call(team.admin, "POST", target)
        assert again.status_code == 200, again.text
        assert again.json()["already_disabled"] is True
        assert again.json()["withdrawn_approval_requests"] == 1
        assert (await _view(team, team.approver, request_id))["state"] == "withdrawn"
        third = await service.call(team.admin, "POST", target)
        assert third.status_code == 200 and third.json()["withdrawn_approval_requests"] == 0
        # The log: one operator.revoked, one withdrawal, and nothing per key.
        revoked = await service.audit_events(team.team_id, Action.OPERATOR_REVOKED)
        assert [event["target"] for event in revoked] == [f"operator:{team.operator.operator_id}"]
        withdrawn = await service.audit_events(team.team_id, Action.APPROVAL_WITHDRAWN)
        assert len(withdrawn) == 1
        actions = {event["action"] for event in await service.audit_events(team.team_id)}
        assert not actions & {"api_key.revoked", "registration_key.revoked",
                              "operator.invite_revoked"}  # fmt: skip


async def test_two_disables_at_once_leave_one_statement_of_what_was_revoked(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A commits and pauses before finishing; B then finds the operator disabled and adds
    # nothing to the log (it used to write every revocation record a second time).
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        alice = await service.operator(team, "admin")
        bob = await service.operator(team, "admin")
        hank = await service.operator(team, "admin")
        made = await service.call(hank, "POST", "/v1/api-keys",
                                  {"name": "siem", "scopes": SIEM_SCOPES})  # fmt: skip
        siem = made.json()["id"]
        spare = (await service.registration_key(hank))["id"]
        committed, go = trio.Event(), trio.Event()
        withdraw = routes_operators.withdraw_requests_of_disabled

        async def pause_the_first(*args: Any, **kwargs: Any) -> Any:
            if not committed.is_set():
                committed.set()
                await go.wait()
            return await withdraw(*args, **kwargs)

        monkeypatch.setattr(routes_operators, "withdraw_requests_of_disabled", pause_the_first)
        target = f"/v1/operators/{hank.operator_id}/disable"
        answers: dict[str, Any] = {}

        async def first() -> None:
            answers["a"] = await service.call(alice, "POST", target)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await committed.wait()
            answers["b"] = await service.call(bob, "POST", target)
            go.set()
        a, b = answers["a"].json(), answers["b"].json()
        assert (a["already_disabled"], b["already_disabled"]) == (False, True), (a, b)
        assert (a["revoked_api_keys"], b["revoked_api_keys"]) == ([siem], [])
        [revoked] = await service.audit_events(team, Action.OPERATOR_REVOKED)
        assert revoked["context"]["api_keys"] == [siem]
        assert revoked["context"]["registration_keys"] == [spare]
        actions = [event["action"] for event in await service.audit_events(team)]
        assert "api_key.revoked" not in actions and "registration_key.revoked" not in actions


async def test_two_disables_that_both_saw_the_operator_active_withdraw_one_statement(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both record operator.revoked before either commits; the one that commits second
    # revoked nothing, and says so with operator.revoke_failed (already_disabled).
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        alice = await service.operator(team, "admin")
        bob = await service.operator(team, "admin")
        hank = await service.operator(team, "admin")
        made = await service.call(hank, "POST", "/v1/api-keys",
                                  {"name": "siem", "scopes": SIEM_SCOPES})  # fmt: skip
        siem = made.json()["id"]
        record = service.ctx.audit.record
        first_recorded, go = trio.Event(), trio.Event()

        async def hold_the_first(*args: Any, **kwargs: Any) -> Any:
            stored = await record(*args, **kwargs)
            if kwargs.get("action") == Action.OPERATOR_REVOKED and not first_recorded.is_set():
                first_recorded.set()
                await go.wait()
            return stored

        monkeypatch.setattr(service.ctx.audit, "record", hold_the_first)
        target = f"/v1/operators/{hank.operator_id}/disable"
        answers: dict[str, Any] = {}

        async def first() -> None:
            answers["alice"] = await service.call(alice, "POST", target)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await first_recorded.wait()
            answers["bob"] = await service.call(bob, "POST", target)
            go.set()
        late, won = answers["alice"].json(), answers["bob"].json()
        assert (won["already_disabled"], late["already_disabled"]) == (False, True)
        assert (won["revoked_api_keys"], late["revoked_api_keys"]) == ([siem], [])
        events = [
            (event["actor"]["id"], event["action"], event["context"].get("reason"))
            for event in await service.audit_events(team)
            if event["action"] in ("operator.revoked", "operator.revoke_failed")
        ]  # fmt: skip
        assert events == [
            (alice.operator_id, "operator.revoked", None),
            (bob.operator_id, "operator.revoked", None),
            (alice.operator_id, "operator.revoke_failed", "already_disabled"),
        ]


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
