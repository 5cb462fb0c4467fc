"""POST /v1/sessions end to end on both backends: a real agent WebSocket receives the offer."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from audit.actions import Action
from audit.verify import verify_bundle
from protocol.identity import b64url
from protocol.relay_token import Side, verify_relay_token
from protocol.session_grant import SessionMode, verify_session_grant
from rendezvous.errors import ServiceUnavailable
from rendezvous.store import Store
from tests.rendezvous.sessions_support import (
    agent_channel,
    enroll_agent,
    jwt_issuer_keys,
    relay_token_keys,
    served_instance,
    wait_for_session_state,
)

pytestmark = pytest.mark.anyio


async def test_exec_session_is_offered_to_the_online_agent_with_tokens_that_verify(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        operator = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            body = {"target": "web-1", "mode": "exec", "command": ["uname", "-a"]}
            response = await service.call(operator, "POST", "/v1/sessions", body)
            assert response.status_code == 201, response.text
            answer = response.json()
            offer = await channel.receive("session_offer")
            now = service.clock.now

            session_id = answer["session_id"]
            assert session_id.startswith("ses_")
            assert offer["session_id"] == session_id
            assert offer["relay"] == answer["relay"] == {
                "id": "relay-1", "host": "127.0.0.1", "port": 7000, "udp_port": 7001,
            }
            assert answer["agent"] == {
                "id": agent.agent_id,
                "name": "web-1",
                "public_key": b64url(agent.identity.public.raw),
                "fingerprint": agent.identity.public.fingerprint,
            }
            issuer = service.config.issuer
            agent_side = verify_relay_token(
                offer["relay_token"], relay_token_keys(service), relay_id="relay-1",
                issuer=issuer, now=now,
            )  # fmt: skip
            operator_side = verify_relay_token(
                answer["relay_token"], relay_token_keys(service), relay_id="relay-1",
                issuer=issuer, now=now,
            )  # fmt: skip
            assert (agent_side.session_id, agent_side.side) == (session_id, Side.AGENT)
            assert (operator_side.session_id, operator_side.side) == (session_id, Side.OPERATOR)
            grant = verify_session_grant(
                answer["grant"], jwt_issuer_keys(service), issuer=issuer,
                agent_id=agent.agent_id, team_id=team, session_id=offer["session_id"],
                operator_key_thumbprint=operator.identity.public.key_id, now=now,
            )  # fmt: skip
            assert grant.mode is SessionMode.EXEC
            assert grant.command == ("uname", "-a")
            assert grant.operator_id == operator.operator_id
            assert grant.role == "operator"
            assert grant.policy_result == "allow"
            assert answer["expires_at"] == grant.expires_at

            await channel.send({"type": "session_offer_ack", "session_id": session_id})
            await wait_for_session_state(service, operator, session_id, "accepted")


async def test_shell_grant_carries_no_command(store: Store, tmp_path: Path) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            body = {"target": agent.agent_id, "mode": "shell", "rows": 40, "cols": 120}
            response = await service.call(admin, "POST", "/v1/sessions", body)
            assert response.status_code == 201, response.text
            await channel.receive("session_offer")
        grant = verify_session_grant(
            response.json()["grant"], jwt_issuer_keys(service), issuer=service.config.issuer,
            agent_id=agent.agent_id, team_id=team, session_id=response.json()["session_id"],
            operator_key_thumbprint=admin.identity.public.key_id, now=service.clock.now,
        )  # fmt: skip
        assert grant.mode is SessionMode.SHELL and grant.command is None
        assert grant.role == "admin"


async def test_request_and_decision_are_audited_before_the_offer_reaches_the_agent(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            body = {"target": "web-1", "mode": "exec", "command": ["id"]}
            response = await service.call(admin, "POST", "/v1/sessions", body)
            assert response.status_code == 201, response.text
            offer = await channel.receive("session_offer")
            # What the log held when the agent got its offer:
            events = [
                event for event in await service.audit_events(team)
                if event["session_id"] == offer["session_id"]
            ]  # fmt: skip
        assert [event["action"] for event in events] == ["session.requested", "session.decision"]
        requested, decision = events
        assert requested["target"] == agent.agent_id
        assert requested["context"]["command"] == "id"
        assert decision["policy_result"]["outcome"] == "allow"
        assert decision["policy_result"]["rule_id"]


async def test_target_in_another_team_is_not_found(store: Store, tmp_path: Path) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        ops, other = await service.team("ops"), await service.team("other")
        other_admin = await service.operator(other, "admin")
        foreign = await enroll_agent(service, other_admin)
        operator = await service.operator(ops, "operator")
        async with agent_channel(url, foreign):
            for target in (foreign.agent_id, foreign.name):
                body = {"target": target, "mode": "shell"}
                response = await service.call(operator, "POST", "/v1/sessions", body)
                assert response.status_code == 404, response.text
                assert response.json()["error"] == "agent_not_found"
        assert "session.decision" in await service.audit_actions(ops)
        assert "session.requested" not in await service.audit_actions(other)


async def test_offline_agent_is_refused_with_409_and_audited(store: Store, tmp_path: Path) -> None:
    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        await enroll_agent(service, admin)
        response = await service.call(admin, "POST", "/v1/sessions", {"target": "web-1",
                                                                       "mode": "shell"})
        assert response.status_code == 409, response.text
        assert response.json()["error"] == "agent_offline"
        actions = await service.audit_actions(team)
        assert actions[-3:] == ["session.requested", "session.decision", "session.refused"]


async def test_a_refusal_that_cannot_be_audited_leaves_no_refused_row(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No audit, no action: the refused row is written only once its audit record is."""
    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        await enroll_agent(service, admin)
        record = service.ctx.audit.record

        async def refusals_unauditable(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("action") == Action.SESSION_REFUSED:
                raise ServiceUnavailable("the audit log is unavailable; send the event again")
            return await record(*args, **kwargs)

        monkeypatch.setattr(service.ctx.audit, "record", refusals_unauditable)
        response = await service.call(admin, "POST", "/v1/sessions", {"target": "web-1",
                                                                       "mode": "shell"})
        assert response.status_code == 503, response.text
        monkeypatch.undo()
        listed = await service.call(admin, "GET", "/v1/sessions?state=refused")
        assert listed.status_code == 200, listed.text
        assert listed.json()["sessions"] == []
        assert "session.refused" not in await service.audit_actions(team)


async def test_sessions_the_rendezvous_refuses_are_listed_with_their_reason(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        auditor = await service.operator(team, "auditor")
        agent = await enroll_agent(service, admin)
        offline = await service.call(admin, "POST", "/v1/sessions", {"target": "web-1",
                                                                      "mode": "shell"})
        assert offline.status_code == 409, offline.text
        async with agent_channel(url, agent):
            body = {"target": "web-1", "mode": "exec", "command": ["reboot"]}
            denied = await service.call(auditor, "POST", "/v1/sessions", body)
            assert denied.status_code == 403, denied.text
        unknown = await service.call(admin, "POST", "/v1/sessions", {"target": "nope",
                                                                      "mode": "shell"})
        assert unknown.status_code == 404, unknown.text
        listed = await service.call(admin, "GET", "/v1/sessions?state=refused")
        assert listed.status_code == 200, listed.text
        views = listed.json()["sessions"]
        # An unknown target has no agent to list it under (the audit log has it).
        assert sorted(
            (view["reason"], view["policy_result"], view["mode"], view["command"])
            for view in views
        ) == [
            ("agent_offline", "allow", "shell", None),
            ("policy_denied", "deny", "exec", ["reboot"]),
        ]
        assert {view["agent_name"] for view in views} == {"web-1"}
        assert all(view["relay_id"] is None for view in views)
        one = await service.call(admin, "GET", f"/v1/sessions/{views[0]['session_id']}")
        assert one.json()["state"] == "refused", one.text


async def test_session_request_without_a_request_proof_is_unauthorized(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent):
            body = {"target": "web-1", "mode": "shell"}
            response = await service.call(admin, "POST", "/v1/sessions", body, with_proof=False)
        assert response.status_code == 401, response.text
        assert "session.requested" not in await service.audit_actions(team)


@pytest.mark.parametrize("role", ["auditor", "approver"])
async def test_roles_other_than_operator_and_admin_are_forbidden(
    store: Store, tmp_path: Path, role: str
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        caller = await service.operator(team, role)
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            body = {"target": "web-1", "mode": "exec", "command": ["true"]}
            response = await service.call(caller, "POST", "/v1/sessions", body)
            assert response.status_code == 403, response.text
            assert response.json()["error"] == "forbidden"
            assert role in response.json()["message"]
            # No offer went out: the next message the agent sees is its heartbeat answer.
            await channel.send({"type": "heartbeat"})
            assert json.loads(await channel.ws.get_message()) == {"type": "heartbeat_ack"}
        events = await service.audit_events(team)
        decision = [event for event in events if event["action"] == "session.decision"][-1]
        assert decision["policy_result"]["outcome"] == "deny"


async def test_rendezvous_without_a_relay_answers_503_no_relay(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data", relays=()) as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent):
            body = {"target": "web-1", "mode": "shell"}
            response = await service.call(admin, "POST", "/v1/sessions", body)
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "no_relay"
        listed = await service.call(admin, "GET", "/v1/sessions?state=refused")
        assert [view["reason"] for view in listed.json()["sessions"]] == ["no_relay"]


@pytest.mark.parametrize(
    "body",
    [
        {"target": "web-1", "mode": "shell", "command": ["ls"]},
        {"target": "web-1", "mode": "exec"},
        {"target": "web-1", "mode": "exec", "command": []},
        {"target": "web-1", "mode": "exec", "command": ["a\x00b"]},
        {"target": "web-1", "mode": "tunnel"},
        {"target": "web-1", "mode": "shell", "rows": 0},
        {"target": "web-1", "mode": "shell", "team_id": "tm_other"},
        {"target": "web-1", "mode": "exec", "command": ["x"] * 257},
        {"target": "web-1", "mode": "exec", "command": ["x" * 4093]},
    ],
)
async def test_malformed_session_request_is_refused(
    store: Store, tmp_path: Path, body: dict[str, Any]
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        response = await service.call(admin, "POST", "/v1/sessions", body)
        assert response.status_code in (400, 422), response.text


@pytest.mark.parametrize(
    ("command", "said"),
    [(["echo", *(str(number) for number in range(1, 1001))], "the command has 1001 arguments"),
     (["sh", "-c", "x" * 4090], "the command is 4104 bytes as sent")],
)
async def test_a_command_no_grant_can_carry_is_refused_saying_which_limit_and_what_to_do(
    store: Store, tmp_path: Path, command: list[str], said: str
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        body = {"target": "web-1", "mode": "exec", "command": command}
        response = await service.call(admin, "POST", "/v1/sessions", body)
        assert response.status_code == 400, response.text
        message = response.json()["message"]
        assert message.startswith(said) and "fit in a session" in message
        assert message.endswith("tucdesk exec AGENT -- sh -s < script.sh")


async def test_oversized_session_request_is_refused(store: Store, tmp_path: Path) -> None:
    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        body = {"target": "web-1", "mode": "exec", "command": ["x" * 4000] * 5}
        response = await service.call(admin, "POST", "/v1/sessions", body)
        assert response.status_code == 413, response.text


async def test_agent_refusing_an_offer_is_visible_to_the_operator_and_audited(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            response = await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "shell"})
            session_id = response.json()["session_id"]
            await channel.receive("session_offer")
            await channel.send({"type": "session_offer_refused", "session_id": session_id,
                                "reason": "local policy forbids shells"})
            view = await wait_for_session_state(service, admin, session_id, "refused")
        assert view["reason"] == "local policy forbids shells"
        actions = await service.audit_actions(team)
        assert actions[actions.index("session.decision") + 1] == "session.refused"


async def test_session_view_is_private_to_its_operator_admins_and_auditors(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        owner = await service.operator(team, "operator")
        colleague = await service.operator(team, "operator")
        auditor = await service.operator(team, "auditor")
        outsider = await service.operator(await service.team("other"), "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            response = await service.call(owner, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "shell"})
            await channel.receive("session_offer")
        path = f"/v1/sessions/{response.json()['session_id']}"
        assert (await service.call(owner, "GET", path)).status_code == 200
        assert (await service.call(admin, "GET", path)).status_code == 200
        assert (await service.call(auditor, "GET", path)).status_code == 200
        assert (await service.call(colleague, "GET", path)).status_code == 403
        assert (await service.call(outsider, "GET", path)).status_code == 404


async def test_agent_audit_events_are_appended_and_the_export_verifies(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            response = await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "exec", "command": ["id"]})
            session_id = response.json()["session_id"]
            await channel.receive("session_offer")
            await channel.send({"type": "session_offer_ack", "session_id": session_id})
            for number, (action, context) in enumerate(
                [
                    (Action.SESSION_STARTED, {"mode": "exec"}),
                    (Action.SESSION_COMMAND, {"command": "id"}),
                    (Action.SESSION_ENDED, {"exit_code": 0, "bytes_out": 12}),
                ]
            ):
                answer = await channel.send_event(
                    action, session_id=session_id, context=context, event_id=f"e{number}"
                )
                assert answer == {"type": "audit_event_ack", "id": f"e{number}"}
        events = await service.audit_events(team)
        agent_events = [event for event in events if event["actor"]["kind"] == "agent"
                        and event["session_id"] == session_id]
        assert [event["action"] for event in agent_events] == [
            "session.started", "session.command", "session.ended",
        ]
        assert all(event["signer"] == agent.identity.public.key_id for event in agent_events)
        view = (await service.call(admin, "GET", f"/v1/sessions/{session_id}")).json()
        assert view["state"] == "ended"
        bundle = io.BytesIO()
        await service.ctx.audit.export_to(team, bundle)
        result = verify_bundle(io.BytesIO(bundle.getvalue()), [service.ctx.audit.audit_key])
        assert result.ok, result.summary()


async def test_agent_audit_events_claiming_someone_else_are_refused(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        other = await enroll_agent(service, admin, hostname="web-2")
        other_team = await service.team("other")
        async with agent_channel(url, other) as other_channel:
            response = await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-2", "mode": "shell"})
            others_session = response.json()["session_id"]
            await other_channel.receive("session_offer")
        before = await service.audit_actions(team)
        async with agent_channel(url, agent) as channel:
            response = await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "shell"})
            own_session = response.json()["session_id"]
            await channel.receive("session_offer")
            attempts: list[dict[str, Any]] = [
                # as another agent
                dict(action=Action.SESSION_STARTED, session_id=None, actor_id=other.agent_id),
                # into another team's log
                dict(action=Action.SESSION_STARTED, session_id=None, team_id=other_team),
                # signed by another key
                dict(action=Action.SESSION_STARTED, session_id=None, signer=other.identity),
                # about a session offered to another agent
                dict(action=Action.SESSION_STARTED, session_id=others_session),
                # writing what only the rendezvous writes
                dict(action=Action.SESSION_DECISION, session_id=others_session),
                dict(action=Action.AGENT_REGISTERED, session_id=None),
                # actions outside the agent's allowlist, even about its own session
                dict(action=Action.SESSION_DECISION, session_id=own_session),
                dict(action=Action.POLICY_SET, session_id=own_session),
                dict(action=Action.POLICY_SET, session_id=None),
                dict(action=Action.AGENT_CLONE_ANOMALY, session_id=own_session),
            ]
            for attempt in attempts:
                answer = await channel.send_event(**attempt)
                assert answer["type"] == "audit_event_refused", attempt
            # The channel survives refusals.
            await channel.send({"type": "heartbeat"})
            await channel.ws.get_message()
        after = await service.audit_actions(team)
        agent_written = {"session.started", "session.command", "session.ended", "session.refused",
                         "policy.set", "agent.registered", "agent.clone_anomaly"}
        assert [a for a in after[len(before):] if a in agent_written] == []


async def test_agent_list_exposes_each_agents_public_key(store: Store, tmp_path: Path) -> None:
    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        listed = (await service.call(admin, "GET", "/v1/agents")).json()["agents"]
        assert listed[0]["public_key"] == b64url(agent.identity.public.raw)
        assert listed[0]["key_fingerprint"] == agent.identity.public.fingerprint


async def test_api_keys_cannot_open_sessions(store: Store, tmp_path: Path) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        created = await service.call(
            admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["agents:read"]}
        )
        assert created.status_code == 201, created.text
        async with agent_channel(url, agent):
            response = await service.call(
                admin, "POST", "/v1/sessions", {"target": "web-1", "mode": "shell"},
                token=created.json()["key"], with_proof=False,
            )  # fmt: skip
        assert response.status_code == 403, response.text
        assert "operator key" in response.json()["message"]
