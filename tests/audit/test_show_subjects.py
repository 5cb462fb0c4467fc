"""`tucdesk-audit show` names who acted (``by=``) and whom a record is about (``operator=``):
the target of an operator.* action, the requester of an approval.*, the operator of a session.*;
``--operator`` finds either, ``--actor`` only who acted, and policy results are shown (and
filterable with ``--decision``). Records are shaped as the rendezvous writes them
(rendezvous/routes_operators.py, routes_auth.py, approval_gate.py, session_broker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from audit.actions import Action, ActorKind, PolicyOutcome
from audit.log import AuditLog
from audit.main import main
from audit.record import Actor, PolicyResult
from tests.audit.builders import (
    AGENT_ID,
    AUDIT_KEY,
    SERVICE,
    export_bundle,
    new_log,
    register_agent,
)

ALICE = Actor(ActorKind.OPERATOR, "op-alice", "alice@alpha.test")  # an admin
CAROL = Actor(ActorKind.OPERATOR, "op-carol", "carol@alpha.test")  # an operator
DAVE = Actor(ActorKind.OPERATOR, "op-dave", "dave@alpha.test")  # an approver
ERIN_ID = "op-erin"
HOSTILE_EMAIL = "erin@alpha.test\x1b[2K\rroot"  # what a raw terminal would rewrite


def _log() -> AuditLog:
    log = new_log()

    async def build() -> None:
        await register_agent(log)
        # erin logs in (the token's jti is recorded), then alice revokes that token and erin.
        await log.append(Action.OPERATOR_LOGIN_SUCCEEDED, Actor(ActorKind.OPERATOR, ERIN_ID,
                         HOSTILE_EMAIL), target=f"operator:{ERIN_ID}",
                         context={"jti": "jti-1", "key": "SHA256:x"})  # fmt: skip
        await log.append(Action.OPERATOR_TOKEN_REVOKED, ALICE, target="token:jti-1")
        await log.append(Action.OPERATOR_REVOKED, ALICE, target=f"operator:{ERIN_ID}",
                         context={"email": HOSTILE_EMAIL, "role": "operator"})  # fmt: skip
        # carol's two requests: one approved by dave and executed, one that expired.
        for request_id in ("apr-1", "apr-2"):
            await log.append(
                Action.APPROVAL_REQUESTED, CAROL, target=AGENT_ID,
                policy_result=PolicyResult(PolicyOutcome.APPROVAL_REQUIRED, "prod-needs-ok", ""),
                context={"approval_request": request_id, "mode": "exec", "command": "uptime"},
            )  # fmt: skip
        await log.append(
            Action.APPROVAL_APPROVED, DAVE, target=AGENT_ID,
            policy_result=PolicyResult(PolicyOutcome.APPROVED, "prod-needs-ok", "ok"),
            context={"approval_request": "apr-1", "requester": "carol@alpha.test",
                     "reason": "ok", "policy_version": 3},
        )  # fmt: skip
        await log.append(Action.APPROVAL_EXPIRED, SERVICE, target=AGENT_ID,
                         context={"approval_request": "apr-2"})  # fmt: skip
        await log.append(Action.APPROVAL_EXECUTED, CAROL, target=AGENT_ID, session_id="s-1",
                         context={"approval_request": "apr-1",
                                  "approved_by": "dave@alpha.test"})  # fmt: skip
        # carol's session refused by a deny rule whose id holds an escape sequence.
        await log.append(Action.SESSION_REQUESTED, CAROL, target=AGENT_ID, session_id="s-2",
                         context={"mode": "shell"})  # fmt: skip
        await log.append(
            Action.SESSION_DECISION, CAROL, target=AGENT_ID, session_id="s-2",
            policy_result=PolicyResult(PolicyOutcome.DENY, "no-\x1b[31mprod", "rule denies"),
            context={"policy_version": 3},
        )  # fmt: skip

    trio.run(build)
    return log


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    bundle, key = tmp_path / "e.jsonl", tmp_path / "audit.pem"
    bundle.write_bytes(export_bundle(_log()))
    key.write_bytes(AUDIT_KEY.public.to_pem())
    return bundle, key


def show(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str], *options: str
         ) -> list[str]:  # fmt: skip
    code = main(["show", str(files[0]), "--key", str(files[1]), *options])
    out = capsys.readouterr().out
    assert code == 0, out
    return out.splitlines()


def _actions(lines: list[str]) -> list[str]:
    return [line.split()[1] for line in lines]


def test_a_revocation_names_the_admin_as_by_and_the_revoked_operator(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    [revoked] = show(files, capsys, "--action", "operator.revoked")
    assert "by=operator:op-alice (alice@alpha.test)" in revoked
    assert 'operator="erin@alpha.test\\e[2K\\rroot"' in revoked  # escaped and quoted, never raw
    assert revoked.isprintable() and "operator=alice" not in revoked
    # A revoked token is about the operator it was issued to (joined by its jti).
    [token] = show(files, capsys, "--action", "operator.token_revoked")
    assert "by=operator:op-alice" in token and 'operator="erin@alpha.test' in token


def test_operator_finds_records_by_or_about_them_and_actor_only_by_them(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _actions(show(files, capsys, "--operator", ERIN_ID)) == [
        "operator.login_succeeded", "operator.token_revoked", "operator.revoked"
    ]
    assert _actions(show(files, capsys, "--actor", "alice@alpha.test")) == [
        "operator.token_revoked", "operator.revoked"
    ]
    assert show(files, capsys, "--actor", ERIN_ID) == show(files, capsys, "--actor", "op-erin")
    # Every step of carol's requests, whoever took it, and emails compare case-insensitively.
    assert _actions(show(files, capsys, "--operator", "Carol@Alpha.test")) == [
        "approval.requested", "approval.requested", "approval.approved", "approval.expired",
        "approval.executed", "session.requested", "session.decision",
    ]
    assert _actions(show(files, capsys, "--operator", "dave@alpha.test")) == ["approval.approved"]


def test_an_approval_names_the_approver_as_by_and_the_requester(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    [approved] = show(files, capsys, "--action", "approval.approved")
    assert "by=operator:op-dave (dave@alpha.test)" in approved
    assert "operator=carol@alpha.test" in approved
    assert "decision=approved rule=prod-needs-ok" in approved
    [expired] = show(files, capsys, "--action", "approval.expired")  # joined by request id
    assert "by=service:rendezvous" in expired and "operator=carol@alpha.test" in expired


def test_a_session_decision_shows_its_outcome_and_rule_and_can_be_filtered(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    [denied] = show(files, capsys, "--decision", "deny")
    assert " session.decision " in denied and "operator=carol@alpha.test" in denied
    assert 'decision=deny rule="no-\\e[31mprod"' in denied and denied.isprintable()
    assert show(files, capsys, "--decision", "allow") == []
    code = main(["show", str(files[0]), "--key", str(files[1]), "--json",
                 "--action", "session.decision"])  # fmt: skip
    output = capsys.readouterr().out
    [record] = json.loads(output)["records"]
    assert code == 0 and output.isascii()
    assert record["policy_result"] == {
        "outcome": "deny", "rule_id": "no-\x1b[31mprod", "reason": "rule denies"
    }
    assert record["operator"] == "carol@alpha.test" and record["operator_id"] == "op-carol"
    assert record["actor"] == {"kind": "operator", "id": "op-carol", "display": "carol@alpha.test"}


def test_the_help_says_operator_matches_either_side(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["show", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--operator EMAIL only records by or about this operator" in text
    assert "--actor ID" in text and "--decision OUTCOME" in text
