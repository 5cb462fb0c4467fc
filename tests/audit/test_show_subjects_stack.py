"""`tucdesk-audit show` on a log the real rendezvous wrote: the auditor's reproduction of who a
revocation and a refused session are about, exported over the API and shown by the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from audit.main import main
from rendezvous.store import open_store
from tests.rendezvous.service_harness import harness


async def _revocation_and_refusal(tmp_path: Path) -> tuple[bytes, bytes, dict[str, str]]:
    async with open_store(f"sqlite:///{tmp_path / 'rendezvous.db'}") as store:
        async with harness(store, tmp_path / "data") as service:
            team = await service.team("alpha")
            admin = await service.operator(team, "admin")
            erin = await service.operator(team, "operator")
            asked = await service.call(
                erin, "POST", "/v1/sessions", {"target": "db-9", "mode": "shell"}
            )
            assert asked.status_code == 404, asked.text
            disable = f"/v1/operators/{erin.operator_id}/disable"
            disabled = await service.call(admin, "POST", disable)
            assert disabled.status_code == 200, disabled.text
            exported = await service.call(admin, "GET", "/v1/audit/export")
            assert exported.status_code == 200, exported.text
            names = {"admin": admin.operator_id, "erin": erin.operator_id}
            return exported.content, service.ctx.keys.audit_signer.public.to_pem(), names


def test_a_revocation_and_a_refused_request_are_shown_as_about_the_operator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, key, ids = trio.run(_revocation_and_refusal, tmp_path)
    (tmp_path / "audit.jsonl").write_bytes(bundle)
    (tmp_path / "audit.pem").write_bytes(key)
    team_email = "operator@"  # the harness invites "<role>@<team id>.test"

    def show(*options: str) -> list[str]:
        code = main(["show", str(tmp_path / "audit.jsonl"), "--key", str(tmp_path / "audit.pem"),
                     *options])  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        return out.splitlines()

    [revoked] = show("--action", "operator.revoked")
    assert f"by=operator:{ids['admin']} (admin@" in revoked
    assert f"operator={team_email}" in revoked and "operator=admin@" not in revoked
    # --operator finds the revocation by whom it is about, by email or id; --actor does not.
    assert any(" operator.revoked " in line for line in show("--operator", ids["erin"]))
    erins = show("--operator", revoked.split("operator=")[1].split()[0])
    assert [line.split()[1] for line in erins] == [
        "operator.invite_used", "operator.login_succeeded", "session.requested",
        "session.decision", "operator.revoked",
    ]
    assert not any(" operator.revoked " in line for line in show("--actor", ids["erin"]))
    # The refusal says so, and which rule (none here: the agent does not exist) decided it.
    [decision] = show("--decision", "deny")
    assert " session.decision " in decision and "decision=deny" in decision
    code = main(["show", str(tmp_path / "audit.jsonl"), "--key", str(tmp_path / "audit.pem"),
                 "--action", "session.decision", "--json"])  # fmt: skip
    [record] = json.loads(capsys.readouterr().out)["records"]
    assert code == 0 and record["policy_result"]["outcome"] == "deny"
    assert record["operator_id"] == ids["erin"] and record["policy_result"]["reason"]
