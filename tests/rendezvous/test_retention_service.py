"""After a prune the service keeps working: open sessions and pending requests are still there,
a pending request is approved and runs, and the audit log (never pruned) still verifies."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from audit.verify import Verdict, verify_bundle
from rendezvous.retention import prune_team_history
from rendezvous.store import Store
from rendezvous.store.base import PrunedHistory
from tests.rendezvous.sessions_support import wait_for_session_state
from tests.rendezvous.test_approvals import RESTART, _approve, _ask, _park, _view, team_with_policy

pytestmark = pytest.mark.anyio

DAY = 86400.0


async def test_the_service_keeps_working_after_a_prune(store: Store, tmp_path: Path) -> None:
    async with team_with_policy(store, tmp_path) as team:
        service = team.service

        async def run_approved(request_id: str) -> str:
            assert (await _approve(team, team.approver, request_id)).status_code == 200
            response = await _ask(team, team.operator, {**RESTART, "approval_id": request_id})
            assert response.status_code == 201, response.text
            offer = await team.channel.receive("session_offer")
            session_id: str = offer["session_id"]
            return session_id

        # History: an approved request whose session the agent refused, a denied request.
        refused_request = await _park(team, team.operator)
        refused = await run_approved(refused_request)
        await team.channel.send({"type": "session_offer_refused", "session_id": refused,
                                 "reason": "local policy"})  # fmt: skip
        await wait_for_session_state(service, team.operator, refused, "refused")
        denied = await _park(team, team.operator)
        response = await service.call(
            team.approver, "POST", f"/v1/approvals/{denied}/deny", {"reason": "no"}
        )
        assert response.status_code == 200, response.text
        # Still in use: a session the agent accepted, a request waiting for a decision.
        open_request = await _park(team, team.operator)
        open_session = await run_approved(open_request)
        await team.channel.send({"type": "session_offer_ack", "session_id": open_session})
        await wait_for_session_state(service, team.operator, open_session, "accepted")
        pending = await _park(team, team.operator)

        # A cutoff past every expiry: only the state of a row keeps it.
        before = service.clock.now + DAY
        # The agent was seen after its sessions ended (it holds no spooled events for them).
        await store.touch_agent(team.team_id, team.agent_id, before + 1)
        pruned = await prune_team_history(
            store, service.ctx.audit, team.team_id, before, batch_rows=1
        )
        assert pruned == PrunedHistory(sessions=1, approval_requests=2)  # not open_request
        plan, record = await service.audit_events(team.team_id, "history.pruned")
        assert plan["context"]["stage"] == "planned" and record["context"]["stage"] == "completed"
        assert record["context"]["sessions"] == 1
        assert record["context"]["approval_requests"] == 2
        assert record["actor"]["kind"] == "service"

        listing = await service.call(team.admin, "GET", "/v1/sessions")
        assert listing.status_code == 200, listing.text
        assert [row["session_id"] for row in listing.json()["sessions"]] == [open_session]
        gone = await service.call(team.admin, "GET", f"/v1/sessions/{refused}")
        assert gone.status_code == 404
        assert (await _view(team, team.operator, open_request))["state"] == "executed"
        assert (await _view(team, team.operator, pending))["state"] == "pending"
        await run_approved(pending)

        bundle = io.BytesIO()
        await service.ctx.audit.export_to(team.team_id, bundle)
        bundle.seek(0)
        result = verify_bundle(bundle, [service.ctx.keys.audit_signer.public])
        assert result.verdict is Verdict.VALID, result.reason
        # The log still tells the pruned sessions' story.
        actions = [
            json.loads(line)["event"]["action"]
            for line in bundle.getvalue().decode().splitlines()[1:-1]
        ]
        assert "session.refused" in actions and "approval.denied" in actions
