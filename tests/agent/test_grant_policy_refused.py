"""A grant decided under a policy version the agent refused is not "try again shortly".

After a policy-signer rotation the agent refuses the next bundle ("countersigned by an unpinned
key") and keeps the older version; every exec then failed with "policy out of date …; try again
shortly", which never came true. The refusal now names the version the agent refused, why, and
what fixes it (re-enrolling, docs/self-hosting.md "Rotating service keys"); an agent that merely
has not received the newer version yet still says to try again shortly.
"""

from __future__ import annotations

from pathlib import Path

from agent.grant_policy import GrantPolicy
from agent.policy_cache import PolicyCache
from protocol.identity import SigningIdentity
from tests.agent.policy_support import make_bundle
from tests.agent.test_policy_enforcement import (
    ADMIN,
    AGENT_ID,
    AGENT_NAME,
    ALICE,
    MEMBERS,
    POLICY_BODY,
    POLICY_SIGNER,
    TEAM_ID,
    bundle,
    grant,
    pins,
    refusal,
)

ROTATED_POLICY_SIGNER = SigningIdentity.generate()
FIRST = bundle()
NOT_YET = ("refused by the agent: policy out of date (the grant was decided under version 2, "
           "the agent holds version 1); try again shortly")  # fmt: skip


def _agent(tmp_path: Path) -> tuple[PolicyCache, GrantPolicy]:
    cache = PolicyCache(pins(), None, tmp_path / "policy.json", lambda trust: None)
    cache.apply(FIRST.to_json())
    return cache, GrantPolicy(cache, AGENT_ID, TEAM_ID, AGENT_NAME)


def _push(cache: PolicyCache, policy_signer: SigningIdentity, version: int = 2) -> str:
    newer = make_bundle(
        team_id=TEAM_ID, version=version, body=POLICY_BODY, members=MEMBERS, signer=ADMIN,
        policy_signer=policy_signer, agent_tags={AGENT_ID: ("prod",)},
        previous=None if version == 1 else FIRST,
    )  # fmt: skip
    reply = cache.answer_bundle_message({"type": "policy_bundle", "bundle": newer.to_json()})
    return str(reply["type"])


def test_a_newer_policy_not_received_yet_still_says_try_again_shortly(tmp_path: Path) -> None:
    _, policy = _agent(tmp_path)
    assert refusal(policy, grant(ALICE, policy_version=2), ALICE) == NOT_YET


def test_a_newer_policy_the_agent_refused_says_which_why_and_to_re_enroll(
    tmp_path: Path,
) -> None:
    cache, policy = _agent(tmp_path)
    assert _push(cache, ROTATED_POLICY_SIGNER) == "policy_refused"
    reason = refusal(policy, grant(ALICE, policy_version=2), ALICE)
    assert reason == (
        "refused by the agent: policy out of date (the grant was decided under version 2, the "
        "agent holds version 1): the agent refused policy version 2 (the policy bundle is "
        "countersigned by an unpinned key), and refuses every newer one until re-enrolled: "
        "re-enroll it ('tucdesk-agent enroll --force' with a new registration key), as after "
        "a policy-signer rotation (docs/self-hosting.md, \"Rotating service keys\")"
    )
    assert "try again shortly" not in reason


def test_accepting_a_newer_policy_forgets_the_refusal(tmp_path: Path) -> None:
    cache, policy = _agent(tmp_path)
    assert _push(cache, ROTATED_POLICY_SIGNER) == "policy_refused"
    assert _push(cache, POLICY_SIGNER, version=2) == "policy_applied"
    assert cache.refusal is None
    message = refusal(policy, grant(ALICE, policy_version=3), ALICE)
    assert message == NOT_YET.replace("version 2", "version 3").replace("version 1", "version 2")


def test_a_refused_older_version_does_not_explain_a_newer_grant(tmp_path: Path) -> None:
    cache, policy = _agent(tmp_path)
    # A replay of the version the agent holds, countersigned by another key: not newer.
    assert _push(cache, ROTATED_POLICY_SIGNER, version=1) == "policy_refused"
    assert cache.refusal is None
    assert refusal(policy, grant(ALICE, policy_version=2), ALICE) == NOT_YET


def test_a_refusal_that_re_enrolling_does_not_fix_says_to_read_the_log(tmp_path: Path) -> None:
    cache, policy = _agent(tmp_path)
    # The agent cannot store the newer version (a directory where its cached file goes).
    (tmp_path / "policy.json").unlink()
    (tmp_path / "policy.json").mkdir()
    assert _push(cache, POLICY_SIGNER) == "policy_refused"
    reason = refusal(policy, grant(ALICE, policy_version=2), ALICE)
    assert reason.startswith(
        "refused by the agent: policy out of date (the grant was decided under version 2, the "
        "agent holds version 1): the agent refused policy version 2 (cannot store policy "
        "version 2: "
    )
    assert reason.endswith(") and will not retry by itself: fix what its log names ('refusing "
                           "policy version …'), then restart it")  # fmt: skip
    assert "re-enroll" not in reason and "try again shortly" not in reason
