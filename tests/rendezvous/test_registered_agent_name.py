"""The ``agent.registered`` record carries the agent's name (what ``tucdesk agents`` and
``tucdesk-agent status`` show), so an auditor pins and filters by the name operators use."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from audit.main import main as audit_main
from protocol.identity import SigningIdentity
from rendezvous.store import Store
from tests.rendezvous.service_harness import harness

pytestmark = pytest.mark.anyio


async def test_an_exported_registration_names_the_agent_and_show_finds_it_by_that_name(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        for hostname in ("web-1", "db-1"):
            key = await service.registration_key(admin)
            response = await service.register(SigningIdentity.generate(), key["key"],
                                               hostname=hostname)  # fmt: skip
            assert response.status_code == 200, response.text
        listed = (await service.call(admin, "GET", "/v1/agents")).json()["agents"]
        web = next(agent for agent in listed if agent["hostname"] == "web-1")
        [registered] = [
            event for event in await service.audit_events(team, "agent.registered")
            if event["target"] == web["id"]
        ]  # fmt: skip
        assert registered["context"]["name"] == web["name"]
        bundle = io.BytesIO()
        await service.ctx.audit.export_to(team, bundle)
        audit_key = service.ctx.audit.audit_key
    path, pem = tmp_path / "export.jsonl", tmp_path / "audit.pem"
    path.write_bytes(bundle.getvalue())
    pem.write_bytes(audit_key.to_pem())
    capsys.readouterr()
    show = ["show", str(path), "--key", str(pem), "--agent", web["name"], "--json"]
    assert audit_main(show) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    assert records and {record["agent_id"] for record in records} == {web["id"]}
    assert "agent.registered" in [record["action"] for record in records]
    assert {record["agent_name"] for record in records} == {web["name"]}
    verify = ["verify", str(path), "--key", str(pem), "--agent-key"]
    assert audit_main([*verify, f"{web['name']}={web['key_fingerprint']}"]) == 0
    other = SigningIdentity.generate().public.fingerprint
    assert audit_main([*verify, f"{web['name']}={other}"]) == 1
    assert "--agent-key pins" in capsys.readouterr().out
