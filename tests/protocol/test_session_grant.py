"""Session grants: the round trip, and each way an agent refuses one, one test per refusal."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import TokenError
from protocol.exec_limits import CommandTooLargeError, check_exec_command, command_size
from protocol.identity import SigningIdentity
from protocol.session_grant import (
    MAX_COMMAND_ARGUMENTS,
    MAX_COMMAND_SIZE,
    SESSION_GRANT_LEEWAY_SECONDS,
    GrantExpiredError,
    GrantOperatorKeyMismatchError,
    GrantWrongAgentError,
    GrantWrongSessionError,
    GrantWrongTeamError,
    SessionGrant,
    SessionGrantError,
    SessionMode,
    issue_session_grant,
    verify_session_grant,
)
from protocol.tokens import ACCESS_TOKEN_TYPE, MAX_TOKEN_SIZE, SESSION_GRANT_TYPE, issue_token

NOW = 1_800_000_000
ISSUER = "https://rendezvous.test"
RENDEZVOUS = SigningIdentity.from_seed(bytes(range(32)))
INTRUDER = SigningIdentity.from_seed(bytes(range(100, 132)))
OPERATOR = SigningIdentity.from_seed(bytes(range(50, 82)))
OTHER_OPERATOR = SigningIdentity.from_seed(bytes(range(150, 182)))
KEYS = {RENDEZVOUS.public.key_id: RENDEZVOUS.public}


def _issue(signer: SigningIdentity = RENDEZVOUS, **changes: Any) -> str:
    arguments: dict[str, Any] = {
        "issuer": ISSUER,
        "session_id": "ses_1",
        "team_id": "team_1",
        "agent_id": "agt_1",
        "operator_id": "opr_1",
        "operator_email": "ada@example.test",
        "role": "operator",
        "operator_key_thumbprint": OPERATOR.public.key_id,
        "mode": "exec",
        "command": ["uname", "-a"],
        "policy_result": "allow",
        "policy_rule_id": None,
        "policy_version": None,
        "approval": None,
        "now": NOW,
    }
    arguments.update(changes)
    return issue_session_grant(signer, **arguments)


def _verify(token: str, **changes: Any) -> SessionGrant:
    arguments: dict[str, Any] = {
        "issuer": ISSUER,
        "agent_id": "agt_1",
        "team_id": "team_1",
        "session_id": "ses_1",
        "operator_key_thumbprint": OPERATOR.public.key_id,
        "now": NOW + 1,
    }
    arguments.update(changes)
    return verify_session_grant(token, KEYS, **arguments)


def test_grant_round_trips_its_claims() -> None:
    approval = {"statement": {"request_id": "apr_1"}, "signature": "c2ln"}
    grant = _verify(_issue(policy_rule_id="ops-exec", policy_version=3, approval=approval))
    assert grant.session_id == "ses_1"
    assert grant.team_id == "team_1"
    assert grant.agent_id == "agt_1"
    assert grant.operator_id == "opr_1"
    assert grant.operator_email == "ada@example.test"
    assert grant.role == "operator"
    assert grant.operator_key_thumbprint == OPERATOR.public.key_id
    assert grant.mode is SessionMode.EXEC
    assert grant.command == ("uname", "-a")
    assert (grant.policy_result, grant.policy_rule_id, grant.policy_version) == (
        "allow", "ops-exec", 3,
    )
    assert grant.approval == approval
    assert grant.expires_at == NOW + 60
    assert grant.grant_id


def test_shell_grant_carries_no_command() -> None:
    grant = _verify(_issue(mode="shell", command=None))
    assert grant.mode is SessionMode.SHELL
    assert grant.command is None


def test_grant_has_the_contract_header_and_audience() -> None:
    token = _issue()
    header = jwt.get_unverified_header(token)
    assert header["typ"] == SESSION_GRANT_TYPE == "tucdesk-grant+jwt"
    assert header["kid"] == RENDEZVOUS.public.key_id
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == "agt_1"
    assert claims["cnf"] == {"jkt": OPERATOR.public.key_id}
    assert claims["operator"] == {"id": "opr_1", "email": "ada@example.test"}


def test_grant_for_another_agent_is_refused_as_wrong_agent() -> None:
    with pytest.raises(GrantWrongAgentError, match="another agent"):
        _verify(_issue(agent_id="agt_2"))


def test_grant_for_another_team_is_refused_as_wrong_team() -> None:
    with pytest.raises(GrantWrongTeamError, match="another team"):
        _verify(_issue(team_id="team_2"))


def test_grant_for_another_session_is_refused_as_wrong_session() -> None:
    with pytest.raises(GrantWrongSessionError, match="another session"):
        _verify(_issue(session_id="ses_2"))


def test_grant_bound_to_another_operator_key_is_refused() -> None:
    with pytest.raises(GrantOperatorKeyMismatchError, match="operator key"):
        _verify(_issue(), operator_key_thumbprint=OTHER_OPERATOR.public.key_id)


def test_expired_grant_is_refused_as_expired() -> None:
    token = _issue()
    _verify(token, now=NOW + 60 + SESSION_GRANT_LEEWAY_SECONDS)
    with pytest.raises(GrantExpiredError, match="expired"):
        _verify(token, now=NOW + 60 + SESSION_GRANT_LEEWAY_SECONDS + 1)


def test_grant_from_the_future_is_refused() -> None:
    with pytest.raises(GrantExpiredError, match="not valid yet"):
        _verify(_issue(now=NOW + 600))


def test_forged_grant_is_refused_as_plainly_invalid() -> None:
    # Signed by a key the agent did not pin: unknown kid.
    with pytest.raises(SessionGrantError) as caught:
        _verify(_issue(signer=INTRUDER))
    assert type(caught.value) is SessionGrantError
    assert "unknown key" in str(caught.value)


def test_grant_with_a_swapped_signature_is_refused_even_if_it_names_another_agent() -> None:
    # A forged grant for another agent must not be reported as merely "for another agent".
    genuine = _issue(agent_id="agt_2")
    forged_claims = jwt.decode(genuine, options={"verify_signature": False})
    forged = jwt.encode(
        forged_claims, INTRUDER.to_cryptography(), algorithm="EdDSA",
        headers={"kid": RENDEZVOUS.public.key_id, "typ": SESSION_GRANT_TYPE},
    )
    with pytest.raises(SessionGrantError) as caught:
        _verify(forged)
    assert type(caught.value) is SessionGrantError
    assert "signature does not verify" in str(caught.value)


def test_tampered_grant_is_refused() -> None:
    header, payload, signature = _issue().split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    with pytest.raises(SessionGrantError):
        _verify(".".join((header, payload, flipped)))


def test_access_token_cannot_pass_as_a_grant() -> None:
    token = issue_token(
        RENDEZVOUS, typ=ACCESS_TOKEN_TYPE, issuer=ISSUER, audience="agt_1", subject="opr_1",
        issued_at=NOW, lifetime_seconds=60, claims={"sid": "ses_1"},
    )
    with pytest.raises(SessionGrantError, match="type"):
        _verify(token)


def test_grant_from_another_issuer_is_refused() -> None:
    with pytest.raises(SessionGrantError, match="issuer"):
        _verify(_issue(issuer="https://elsewhere.test"))


def test_grant_with_an_overlong_lifetime_is_refused() -> None:
    claims = jwt.decode(_issue(), options={"verify_signature": False})
    claims["exp"] = claims["iat"] + 3600
    token = jwt.encode(
        claims, RENDEZVOUS.to_cryptography(), algorithm="EdDSA",
        headers={"kid": RENDEZVOUS.public.key_id, "typ": SESSION_GRANT_TYPE},
    )
    with pytest.raises(SessionGrantError, match="lifetime"):
        _verify(token)


def test_grant_lacking_the_operator_key_binding_is_refused() -> None:
    claims = jwt.decode(_issue(), options={"verify_signature": False})
    del claims["cnf"]
    token = jwt.encode(
        claims, RENDEZVOUS.to_cryptography(), algorithm="EdDSA",
        headers={"kid": RENDEZVOUS.public.key_id, "typ": SESSION_GRANT_TYPE},
    )
    with pytest.raises(SessionGrantError, match="cnf"):
        _verify(token)


def test_exec_grant_without_a_command_cannot_be_issued() -> None:
    with pytest.raises(SessionGrantError, match="command"):
        _issue(command=None)
    with pytest.raises(SessionGrantError, match="command"):
        _issue(command=["x"] * (MAX_COMMAND_ARGUMENTS + 1))


LONG_ISSUER = "https://" + "i" * 120
# Ids as rendezvous.store.base.new_id mints them: a prefix and 16 base32 characters.
MINTED_IDS = {"session_id": "ses_" + "s" * 16, "team_id": "team_" + "t" * 16,
              "agent_id": "agt_" + "g" * 16, "operator_id": "op_" + "o" * 16}


def _largest_command(arguments: int) -> list[str]:
    """``arguments`` ASCII arguments whose grant encoding is exactly MAX_COMMAND_SIZE bytes."""
    command = ["x"] * arguments
    command[-1] += "x" * (MAX_COMMAND_SIZE - command_size(command))
    assert command_size(command) == MAX_COMMAND_SIZE
    return command


def test_the_largest_command_fits_a_grant_with_every_other_claim_at_its_longest() -> None:
    # Ids as the rendezvous mints them, the longest email, rule id and an approval: the grant
    # still fits the 8 KiB a JWT may have (protocol.tokens), which MAX_COMMAND_SIZE is sized for.
    approval = {
        "statement": {
            "format": "tucdesk-approval-v1", "request_id": "apr_" + "a" * 16,
            "team_id": "team_" + "t" * 16, "agent_id": "agt_" + "g" * 16, "action": "exec",
            "command_sha256": "0" * 64, "policy_version": 2**53 - 1,
            "requester_thumbprint": "r" * 43, "approver_thumbprint": "p" * 43,
            "issued_at": 2**53 - 1, "expires_at": 2**53 - 1,
        },
        "signature": "s" * 86,
    }  # fmt: skip
    for arguments in (1, MAX_COMMAND_ARGUMENTS):
        token = _issue(
            **MINTED_IDS, issuer=LONG_ISSUER, operator_email="e" * 320, policy_rule_id="r" * 128,
            policy_result="approval_required", policy_version=2**53 - 1, approval=approval,
            command=_largest_command(arguments),
        )  # fmt: skip
        assert len(token) <= MAX_TOKEN_SIZE
        verified = _verify(
            token, issuer=LONG_ISSUER, session_id=MINTED_IDS["session_id"],
            team_id=MINTED_IDS["team_id"], agent_id=MINTED_IDS["agent_id"],
        )  # fmt: skip
        assert verified.command == tuple(_largest_command(arguments))


def test_a_command_over_the_size_limit_cannot_be_issued() -> None:
    command = _largest_command(2)
    command[-1] += "x"
    with pytest.raises(SessionGrantError, match=f"at most {MAX_COMMAND_SIZE} bytes"):
        _issue(command=command)


def test_exec_command_check_names_the_limit_it_breaks() -> None:
    check_exec_command(_largest_command(MAX_COMMAND_ARGUMENTS))
    with pytest.raises(CommandTooLargeError, match=f"has {MAX_COMMAND_ARGUMENTS + 1} arguments"):
        check_exec_command(["x"] * (MAX_COMMAND_ARGUMENTS + 1))
    with pytest.raises(CommandTooLargeError, match=f"is {MAX_COMMAND_SIZE + 1} bytes"):
        check_exec_command(["x" * (MAX_COMMAND_SIZE - 4 + 1)])
    # A character outside ASCII travels escaped (\\uXXXX): it counts 6, not its UTF-8 length.
    assert command_size(["\u00e9"]) == len('["\\u00e9"]') == 10


def test_shell_grant_with_a_command_cannot_be_issued() -> None:
    with pytest.raises(SessionGrantError, match="shell"):
        _issue(mode="shell", command=["ls"])


def test_unknown_mode_cannot_be_issued() -> None:
    with pytest.raises(SessionGrantError, match="mode"):
        _issue(mode="tunnel")


def test_refusals_are_token_errors() -> None:
    assert issubclass(SessionGrantError, TokenError)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_is_refused_with_a_grant_error(text: str) -> None:
    with pytest.raises(SessionGrantError):
        _verify(text)


@settings(max_examples=100, deadline=None)
@given(
    command=st.lists(st.text(min_size=0, max_size=40), min_size=1, max_size=8),
    now=st.integers(min_value=0, max_value=2**40),
)
def test_any_valid_exec_grant_round_trips(command: list[str], now: int) -> None:
    grant = _verify(_issue(command=command, now=now), now=now)
    assert grant.command == tuple(command)
