"""The signed policy bundle: what an agent accepts, and every way a bundle is refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.domains import Purpose
from protocol.identity import SigningIdentity
from protocol.policy.decide import decide
from protocol.policy.document import Mode, Outcome
from protocol.policy.errors import (
    CountersignatureError,
    MalformedBundleError,
    PolicyBundleError,
    RequestError,
    RollbackError,
    TeamMismatchError,
    UntrustedSignerError,
)
from protocol.policy.request import Action
from protocol.policy.roster import Role, Roster, RosterEntry
from protocol.policy.signed_policy import (
    MAX_BUNDLE_SIZE,
    PinnedPolicyTrust,
    SignedPolicyBundle,
    _countersigned_bytes,
    accept_policy_bundle,
    countersign_policy_bundle,
    sign_policy_bundle,
)

from .builders import (
    ADMIN,
    APPROVER,
    AUDITOR,
    BASE_ROSTER,
    NEWCOMER,
    OPERATOR,
    RENDEZVOUS,
    SECOND_ADMIN,
    STRANGER,
    TEAM,
    content,
    enrollment_trust,
    published,
    with_roster,
)

SAM_AS_ADMIN = RosterEntry(SECOND_ADMIN.public, "sam@example.com", Role.ADMIN)
NON_ADMINS = [entry for entry in BASE_ROSTER.entries if entry.role is not Role.ADMIN]


def _accepted_v1() -> tuple[SignedPolicyBundle, PinnedPolicyTrust]:
    bundle = published(content(1))
    return bundle, accept_policy_bundle(bundle, enrollment_trust()).trust


# --- accepted ----------------------------------------------------------------------------------


def test_an_agent_accepts_a_bundle_signed_by_its_pinned_admin_and_countersigned() -> None:
    bundle = published(content(1))
    accepted = accept_policy_bundle(bundle, enrollment_trust())
    assert accepted.policy.version == 1 and accepted.policy.mode is Mode.ALLOWLIST
    assert accepted.roster.may_open_sessions(OPERATOR.public.key_id)
    assert accepted.bundle.content.tags_for("agt_1") == {"prod", "db"}
    assert accepted.bundle.content.tags_for("agt_unknown") == frozenset()
    assert accepted.trust.version == 1
    assert accepted.trust.bundle_sha256 == bundle.content.sha256()
    assert accepted.trust.admin_keys == {ADMIN.public.key_id: ADMIN.public}
    assert not accepted.admins_changed and not accepted.unchanged


def test_a_bundle_survives_its_json_bytes_and_text_forms() -> None:
    bundle = published(content(1))
    for form in (bundle.to_bytes(), bundle.to_bytes().decode(), json.loads(bundle.to_bytes())):
        assert accept_policy_bundle(form, enrollment_trust()).bundle == bundle


def test_the_same_bundle_again_is_accepted_as_unchanged() -> None:
    bundle, trust = _accepted_v1()
    again = accept_policy_bundle(bundle.to_bytes(), trust)
    assert again.unchanged and again.trust == trust


def test_a_newer_version_that_follows_the_cached_one_is_accepted() -> None:
    first, trust = _accepted_v1()
    second = published(content(2, previous=first.content.sha256()))
    assert accept_policy_bundle(second, trust).trust.version == 2


def test_an_agent_that_missed_versions_accepts_the_latest() -> None:
    _, trust = _accepted_v1()
    fifth = published(content(5, previous="0" * 64))
    assert accept_policy_bundle(fifth, trust).trust.version == 5


def test_an_admin_set_change_signed_by_a_pinned_admin_is_accepted() -> None:
    first, trust = _accepted_v1()
    roster = with_roster(BASE_ROSTER, SAM_AS_ADMIN)
    accepted = accept_policy_bundle(
        published(content(2, roster, first.content.sha256())), trust
    )
    assert accepted.admins_changed
    assert set(accepted.trust.admin_keys) == {ADMIN.public.key_id, SECOND_ADMIN.public.key_id}
    # The newly pinned admin may now sign the next version on their own.
    third = published(content(3, roster, accepted.trust.bundle_sha256), SECOND_ADMIN,
                      accepted.trust)
    assert accept_policy_bundle(third, accepted.trust).trust.version == 3


def test_an_operator_added_by_an_admin_takes_effect() -> None:
    first, trust = _accepted_v1()
    roster = with_roster(
        BASE_ROSTER, RosterEntry(NEWCOMER.public, "nina@example.com", Role.OPERATOR)
    )
    accepted = accept_policy_bundle(published(content(2, roster, first.content.sha256())), trust)
    assert accepted.roster.may_open_sessions(NEWCOMER.public.key_id)
    assert not accepted.admins_changed


def test_the_rendezvous_countersigns_only_what_a_trusted_admin_signed() -> None:
    with pytest.raises(UntrustedSignerError):
        countersign_policy_bundle(sign_policy_bundle(content(1), STRANGER), RENDEZVOUS,
                                  enrollment_trust())


# --- refused -----------------------------------------------------------------------------------


def test_a_forged_admin_signature_is_refused() -> None:
    bundle = published(content(1))
    forged = bytes([bundle.admin_signature[0] ^ 1]) + bundle.admin_signature[1:]
    forged_bundle = replace(bundle, admin_signature=forged)
    recountersigned = countersign_unchecked(forged_bundle)
    with pytest.raises(UntrustedSignerError, match="does not verify"):
        accept_policy_bundle(recountersigned, enrollment_trust())


def test_a_bundle_signed_by_an_admin_who_is_not_pinned_is_refused() -> None:
    roster = with_roster(BASE_ROSTER, SAM_AS_ADMIN)
    bundle = countersign_unchecked(sign_policy_bundle(content(1, roster), SECOND_ADMIN))
    with pytest.raises(UntrustedSignerError, match="not signed by a pinned admin"):
        accept_policy_bundle(bundle, enrollment_trust())


def test_an_admin_set_change_signed_only_by_the_new_admin_is_refused() -> None:
    first, trust = _accepted_v1()
    roster = Roster.of([RosterEntry(STRANGER.public, "mallory@example.com", Role.ADMIN),
                        *NON_ADMINS])
    takeover = countersign_unchecked(
        sign_policy_bundle(content(2, roster, first.content.sha256()), STRANGER)
    )
    with pytest.raises(UntrustedSignerError):
        accept_policy_bundle(takeover, trust)


def test_an_operator_key_added_by_the_rendezvous_alone_is_refused() -> None:
    first, trust = _accepted_v1()
    honest = published(content(2, previous=first.content.sha256()))
    roster = with_roster(BASE_ROSTER, RosterEntry(STRANGER.public, "mallory@example.com",
                                                  Role.OPERATOR))
    # Keeps the admin's signature but swaps in a roster with one more operator.
    slipped_in = countersign_unchecked(replace(
        honest, content=content(2, roster, first.content.sha256())
    ))
    with pytest.raises(UntrustedSignerError, match="does not verify"):
        accept_policy_bundle(slipped_in, trust)
    # Or signs the whole thing with its own key, as if it were an admin.
    self_signed = countersign_unchecked(
        sign_policy_bundle(content(2, roster, first.content.sha256()), RENDEZVOUS)
    )
    with pytest.raises(UntrustedSignerError, match="not signed by a pinned admin"):
        accept_policy_bundle(self_signed, trust)


def test_a_policy_loosened_by_the_rendezvous_alone_is_refused() -> None:
    honest = published(content(1))
    loosened = countersign_unchecked(replace(honest, content=content(1, mode="blocklist")))
    with pytest.raises(UntrustedSignerError):
        accept_policy_bundle(loosened, enrollment_trust())


def test_a_bundle_without_a_countersignature_is_refused() -> None:
    admin_only = sign_policy_bundle(content(1), ADMIN)
    with pytest.raises(CountersignatureError, match="lacks"):
        accept_policy_bundle(admin_only, enrollment_trust())
    with pytest.raises(CountersignatureError, match="lacks"):
        accept_policy_bundle(admin_only.to_bytes(), enrollment_trust())


def test_a_countersignature_by_another_key_is_refused() -> None:
    bundle = sign_policy_bundle(content(1), ADMIN)
    countersigned = countersign_unchecked(bundle, signer=STRANGER)
    with pytest.raises(CountersignatureError, match="unpinned"):
        accept_policy_bundle(countersigned, enrollment_trust())
    lying = replace(countersigned, countersigner_key_id=RENDEZVOUS.public.key_id)
    with pytest.raises(CountersignatureError, match="does not verify"):
        accept_policy_bundle(lying, enrollment_trust())


def test_a_countersignature_moved_from_another_bundle_is_refused() -> None:
    one = published(content(1))
    other = published(content(1, mode="blocklist"))
    moved = replace(other, countersignature=one.countersignature)
    with pytest.raises(CountersignatureError):
        accept_policy_bundle(moved, enrollment_trust())


def test_an_older_version_is_refused_as_a_rollback() -> None:
    first, trust = _accepted_v1()
    second = accept_policy_bundle(published(content(2, previous=first.content.sha256())), trust)
    with pytest.raises(RollbackError, match="older"):
        accept_policy_bundle(first, second.trust)


def test_a_different_bundle_with_the_cached_version_is_refused() -> None:
    _, trust = _accepted_v1()
    with pytest.raises(RollbackError, match="differs"):
        accept_policy_bundle(published(content(1, mode="blocklist")), trust)


def test_the_next_version_must_name_the_cached_bundle_as_its_predecessor() -> None:
    _, trust = _accepted_v1()
    for previous in (None, "a" * 64):
        with pytest.raises(RollbackError, match="does not follow"):
            accept_policy_bundle(published(content(2, previous=previous)), trust)


def test_a_bundle_for_another_team_is_refused() -> None:
    other_team = countersign_unchecked(sign_policy_bundle(content(1, team="team_other"), ADMIN))
    with pytest.raises(TeamMismatchError):
        accept_policy_bundle(other_team, enrollment_trust())


def test_an_admin_removed_from_the_roster_can_no_longer_sign() -> None:
    first, trust = _accepted_v1()
    handover = Roster.of([RosterEntry(SECOND_ADMIN.public, "sam@example.com", Role.ADMIN),
                          *NON_ADMINS])
    second = accept_policy_bundle(published(content(2, handover, first.content.sha256())), trust)
    assert set(second.trust.admin_keys) == {SECOND_ADMIN.public.key_id}
    third = countersign_unchecked(sign_policy_bundle(
        content(3, BASE_ROSTER, second.trust.bundle_sha256), ADMIN
    ))
    with pytest.raises(UntrustedSignerError):
        accept_policy_bundle(third, second.trust)


def test_the_cached_handover_bundle_still_loads_after_its_signer_left_the_pins() -> None:
    first, trust = _accepted_v1()
    handover = Roster.of([SAM_AS_ADMIN, *NON_ADMINS])
    bundle = published(content(2, handover, first.content.sha256()))
    accepted = accept_policy_bundle(bundle, trust)
    assert ADMIN.public.key_id not in accepted.trust.admin_keys
    again = accept_policy_bundle(bundle.to_bytes(), accepted.trust)
    assert again.unchanged and again.trust == accepted.trust


# --- malformed ---------------------------------------------------------------------------------


def _json(bundle: SignedPolicyBundle) -> dict[str, object]:
    data: dict[str, object] = json.loads(bundle.to_bytes())
    return data


def _mutated(**changes: object) -> dict[str, object]:
    data = _json(published(content(1)))
    inner = dict(data["content"])  # type: ignore[call-overload]
    inner.update(changes)
    data["content"] = inner
    return data


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not json", "must be JSON"),
        (b"[]", "exactly the keys"),
        (b" " * (MAX_BUNDLE_SIZE + 1), "at most"),
        (b'{"content": 1, "content": 2}', "duplicate key"),
        (b'{"content": 1.5, "admin_signature": null, "countersignature": null}', "floating"),
        ({**_json(published(content(1))), "extra": 1}, "exactly the keys"),
        (_mutated(format="tucdesk-policy-bundle-v0"), "format"),
        (_mutated(policy_sha256="0" * 64), "policy_sha256 does not match"),
        (_mutated(policy_toml="version = 1\nmode = 'open'\n"), "policy is invalid"),
        (_mutated(version=2), "differs from the policy's version"),
        (_mutated(version=True), "whole number"),
        (_mutated(roster=[]), "at least one admin"),
        (_mutated(roster=[e for e in BASE_ROSTER.to_json() if e["role"] != "admin"]),
         "at least one admin"),
        (_mutated(roster="everyone"), "a roster is a list"),
        (_mutated(agent_tags={"agt_1": "prod"}), "agent_tags"),
        (_mutated(agent_tags={"agt_1": ["prod", "prod"]}), "twice"),
        (_mutated(agent_tags={"agt_1": [7]}), "tag"),
        (_mutated(previous_sha256="abc"), "previous_sha256"),
        (_mutated(team_id=""), "team_id"),
    ],
)
def test_a_malformed_bundle_is_refused_with_a_reason(data: object, fragment: str) -> None:
    with pytest.raises(MalformedBundleError, match=fragment):
        accept_policy_bundle(data, enrollment_trust())


def test_a_malformed_signature_is_refused() -> None:
    data = _json(published(content(1)))
    data["admin_signature"] = {"key_id": ADMIN.public.key_id, "signature": "AAAA"}
    with pytest.raises(MalformedBundleError, match="64 bytes"):
        accept_policy_bundle(data, enrollment_trust())


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_any_changed_byte_of_a_bundle_is_refused(data: st.DataObject) -> None:
    original = published(content(1)).to_bytes()
    index = data.draw(st.integers(min_value=0, max_value=len(original) - 1))
    replacement = data.draw(st.integers(min_value=0, max_value=255).filter(
        lambda value: value != original[index]
    ))
    mutated = original[:index] + bytes([replacement]) + original[index + 1:]
    with pytest.raises(PolicyBundleError):
        accept_policy_bundle(mutated, enrollment_trust())


def test_the_pins_round_trip_through_json() -> None:
    _, trust = _accepted_v1()
    assert PinnedPolicyTrust.from_json(json.loads(json.dumps(trust.to_json()))) == trust


def test_pins_without_an_admin_are_refused() -> None:
    with pytest.raises(ValueError, match="admin keys"):
        PinnedPolicyTrust.at_enrollment(TEAM, [], RENDEZVOUS.public)


def countersign_unchecked(
    bundle: SignedPolicyBundle, signer: SigningIdentity = RENDEZVOUS
) -> SignedPolicyBundle:
    """A countersignature by a rendezvous that skips the admin checks (a compromised one)."""
    signature = signer.sign(Purpose.POLICY_COUNTERSIGN, _countersigned_bytes(bundle))
    return replace(bundle, countersigner_key_id=signer.public.key_id, countersignature=signature)


def test_the_agent_builds_the_request_from_the_signed_roster_and_tags_only() -> None:
    accepted = accept_policy_bundle(published(content(1)), enrollment_trust())
    request = accepted.access_request(OPERATOR.public.key_id, "agt_1", "db-1", Action.SHELL)
    assert request.operator.email == "oscar@example.com" and request.operator.role == "operator"
    assert request.agent.tags == {"prod", "db"}
    assert decide(accepted.policy, request, 1_800_000_000).result is Outcome.ALLOW
    untagged = accepted.access_request(OPERATOR.public.key_id, "agt_2", "web-1", Action.SHELL)
    assert untagged.agent.tags == frozenset()


@pytest.mark.parametrize("key", [APPROVER, AUDITOR, NEWCOMER], ids=["approver", "auditor",
                                                                     "unknown"])
def test_a_key_that_may_not_open_sessions_gets_no_request(key: SigningIdentity) -> None:
    accepted = accept_policy_bundle(published(content(1)), enrollment_trust())
    with pytest.raises(RequestError, match="may open sessions"):
        accepted.access_request(key.public.key_id, "agt_1", "db-1", Action.SHELL)
