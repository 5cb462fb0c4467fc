"""The agent's pins and cached bundle: what it accepts, how it keeps it, what a restart keeps."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.enrollment import parse_policy_trust
from agent.errors import EnrollmentError, PolicyCacheError
from agent.grant_policy import GrantPolicy, GrantPolicyRefused
from agent.machine_identity import MachineIdentifiers, read_machine_identifiers
from agent.main import load_policy_cache
from agent.main import main as agent_main
from agent.policy_cache import PolicyCache, policy_file_path
from agent.state_file import AgentState, load_state, open_state, save_state, seal_state
from protocol.identity import SigningIdentity, b64url
from protocol.policy import PinnedPolicyTrust, Role, SignedPolicyBundle
from tests.agent.policy_support import make_bundle
from tests.agent.test_policy_enforcement import grant

TEAM_ID = "tm_cache"
AGENT_ID = "agt_cache"
POLICY_SIGNER = SigningIdentity.generate()
ADMIN = SigningIdentity.generate()
SECOND_ADMIN = SigningIdentity.generate()
ALICE = SigningIdentity.generate()
MACHINE = MachineIdentifiers(machine_id="0123456789abcdef0123456789abcdef")
ALLOW_ALL = '\n[[rules]]\nid = "everyone"\noutcome = "allow"\n'


def pins(*admins: SigningIdentity) -> PinnedPolicyTrust:
    return PinnedPolicyTrust.at_enrollment(
        TEAM_ID, [admin.public for admin in admins or (ADMIN,)], POLICY_SIGNER.public
    )


def bundle(
    version: int = 1,
    *,
    signer: SigningIdentity = ADMIN,
    admins: tuple[SigningIdentity, ...] = (ADMIN,),
    previous: SignedPolicyBundle | None = None,
    **options: Any,
) -> SignedPolicyBundle:
    members = {admin: (f"admin{index}@example.test", Role.ADMIN)
               for index, admin in enumerate(admins)}
    members[ALICE] = ("alice@example.test", Role.OPERATOR)
    return make_bundle(
        team_id=TEAM_ID, version=version, body=ALLOW_ALL, members=members, signer=signer,
        policy_signer=POLICY_SIGNER, previous=previous, **options,
    )


class SavedPins:
    """Stands in for the encrypted state: records the pins the cache asks to keep."""

    def __init__(self) -> None:
        self.saved: list[PinnedPolicyTrust] = []

    def __call__(self, trust: PinnedPolicyTrust) -> None:
        self.saved.append(trust)


def fresh_cache(tmp_path: Path) -> tuple[PolicyCache, SavedPins]:
    saved = SavedPins()
    return PolicyCache(pins(), None, policy_file_path(tmp_path), saved), saved


def message(signed: SignedPolicyBundle) -> dict[str, Any]:
    return {"type": "policy_bundle", "bundle": signed.to_json()}


def test_accepted_bundle_is_cached_0600_and_its_version_pinned(tmp_path: Path) -> None:
    cache, saved = fresh_cache(tmp_path)
    reply = cache.answer_bundle_message(message(bundle()))
    assert reply == {"type": "policy_applied", "version": 1}
    path = policy_file_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_bytes())["content"]["version"] == 1
    assert [trust.version for trust in saved.saved] == [1] and cache.version == 1


def test_bundle_not_signed_by_a_pinned_admin_is_refused_with_the_reason(tmp_path: Path) -> None:
    cache, saved = fresh_cache(tmp_path)
    intruder = SigningIdentity.generate()
    forged = bundle(signer=intruder, admins=(intruder,))  # the rendezvous countersigned it
    reply = cache.answer_bundle_message(message(forged))
    assert reply["type"] == "policy_refused" and reply["version"] == 1
    assert "not signed by a pinned admin" in reply["reason"]
    assert cache.accepted is None and not saved.saved
    assert not policy_file_path(tmp_path).exists()


def test_bundle_without_the_pinned_rendezvous_countersignature_is_refused(tmp_path: Path) -> None:
    cache, _ = fresh_cache(tmp_path)
    document = bundle().to_json()
    document["countersignature"] = None
    reply = cache.answer_bundle_message({"type": "policy_bundle", "bundle": document})
    assert reply["type"] == "policy_refused" and "countersignature" in reply["reason"]


def test_malformed_bundle_message_is_refused_not_raised(tmp_path: Path) -> None:
    cache, _ = fresh_cache(tmp_path)
    reply = cache.answer_bundle_message({"type": "policy_bundle", "bundle": "not json"})
    assert reply["type"] == "policy_refused" and reply["version"] is None


def test_admin_set_changes_only_through_a_bundle_signed_by_a_pinned_admin(tmp_path: Path) -> None:
    cache, _ = fresh_cache(tmp_path)
    handover = bundle(1, admins=(SECOND_ADMIN,))  # signed by ADMIN, names SECOND_ADMIN
    assert cache.apply(handover.to_json()).admins_changed
    assert cache.trust is not None and set(cache.trust.admin_keys) == {SECOND_ADMIN.public.key_id}
    # The old admin is no longer pinned: their next bundle is refused.
    by_old_admin = bundle(2, signer=ADMIN, admins=(ADMIN,), previous=handover,
                          countersign_as=(ADMIN,))
    assert cache.answer_bundle_message(message(by_old_admin))["type"] == "policy_refused"
    by_new_admin = bundle(2, signer=SECOND_ADMIN, admins=(SECOND_ADMIN,), previous=handover)
    assert cache.answer_bundle_message(message(by_new_admin)) == {
        "type": "policy_applied", "version": 2,
    }


def test_older_policy_version_is_refused_as_a_rollback(tmp_path: Path) -> None:
    cache, _ = fresh_cache(tmp_path)
    first = bundle(1)
    cache.apply(first.to_json())
    cache.apply(bundle(2, previous=first).to_json())
    reply = cache.answer_bundle_message(message(first))
    assert reply["type"] == "policy_refused"
    assert "older than the cached version 2" in reply["reason"]
    assert cache.version == 2


def test_redelivery_of_the_same_bundle_is_applied_without_rewriting_the_pins(
    tmp_path: Path,
) -> None:
    cache, saved = fresh_cache(tmp_path)
    signed = bundle()
    cache.apply(signed.to_json())
    assert cache.answer_bundle_message(message(signed)) == {"type": "policy_applied", "version": 1}
    assert len(saved.saved) == 1


def test_cached_policy_is_reloaded_at_start_up(tmp_path: Path) -> None:
    cache, saved = fresh_cache(tmp_path)
    cache.apply(bundle().to_json())
    reloaded = PolicyCache.load(policy_file_path(tmp_path), saved.saved[-1].to_json(), saved)
    assert reloaded.accepted is not None and reloaded.problem is None
    assert reloaded.accepted.bundle.content.version == 1


def test_swapping_in_an_older_cached_file_is_refused_at_start_up(tmp_path: Path) -> None:
    cache, saved = fresh_cache(tmp_path)
    first = bundle(1)
    cache.apply(first.to_json())
    older_file = policy_file_path(tmp_path).read_bytes()
    cache.apply(bundle(2, previous=first).to_json())
    policy_file_path(tmp_path).write_bytes(older_file)
    reloaded = PolicyCache.load(policy_file_path(tmp_path), saved.saved[-1].to_json(), saved)
    assert reloaded.accepted is None
    assert reloaded.problem is not None and "version 2" in reloaded.problem
    policy = GrantPolicy(reloaded, AGENT_ID, TEAM_ID, "web-1")
    assert reloaded.problem in _refusal_reason(policy)


def test_missing_or_open_cached_file_refuses_sessions_until_the_bundle_comes_again(
    tmp_path: Path,
) -> None:
    cache, saved = fresh_cache(tmp_path)
    signed = bundle()
    cache.apply(signed.to_json())
    path = policy_file_path(tmp_path)
    path.chmod(0o644)
    reloaded = PolicyCache.load(path, saved.saved[-1].to_json(), saved)
    assert reloaded.accepted is None and reloaded.problem is not None
    path.unlink()
    reloaded = PolicyCache.load(path, saved.saved[-1].to_json(), saved)
    assert reloaded.accepted is None
    # The rendezvous sends the same version again after welcome: the agent recovers.
    assert reloaded.answer_bundle_message(message(signed))["type"] == "policy_applied"
    assert reloaded.accepted is not None and reloaded.problem is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_malformed_pins_in_the_state_stop_the_agent_with_a_re_enroll_message(
    tmp_path: Path,
) -> None:
    with pytest.raises(PolicyCacheError, match="re-enroll"):
        PolicyCache.load(policy_file_path(tmp_path), {"team_id": TEAM_ID}, SavedPins())


def test_state_file_keeps_the_pins_and_old_state_without_them_still_loads(tmp_path: Path) -> None:
    state = AgentState(
        agent_id=AGENT_ID, team_id=TEAM_ID, server_url="http://127.0.0.1:1",
        identity_seed=bytes(32), policy_trust=pins().to_json(),
    )
    assert open_state(seal_state(state, MACHINE), MACHINE).policy_trust == pins().to_json()
    legacy = state.to_json_dict()
    del legacy["policy_trust"]
    assert AgentState.from_json_dict(legacy).policy_trust is None


def test_daemon_policy_cache_writes_accepted_pins_into_the_sealed_state(tmp_path: Path) -> None:
    config = AgentConfig(state_dir=tmp_path)
    state = AgentState(
        agent_id=AGENT_ID, team_id=TEAM_ID, server_url="http://127.0.0.1:1",
        identity_seed=bytes(32), policy_trust=pins().to_json(),
    )
    save_state(config.state_file, state, MACHINE)
    cache = load_policy_cache(config, state, MACHINE)
    cache.apply(bundle().to_json())
    stored = load_state(config.state_file, MACHINE)
    assert stored.policy_trust is not None and stored.policy_trust["version"] == 1
    # A restart (a new cache from the sealed state and the file) enforces the same policy.
    restarted = load_policy_cache(config, stored, MACHINE)
    assert restarted.accepted is not None and restarted.version == 1


def _refusal_reason(policy: GrantPolicy) -> str:
    with pytest.raises(GrantPolicyRefused) as refused:
        policy.check(grant(ALICE), ALICE.public.key_id, 0.0)
    return refused.value.reason


def test_status_shows_the_applied_policy_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "machine"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    identifiers = read_machine_identifiers(root)
    config = AgentConfig(state_dir=tmp_path / "state")
    state = AgentState(
        agent_id=AGENT_ID, team_id=TEAM_ID, server_url="http://127.0.0.1:1",
        identity_seed=bytes(32), policy_trust=pins().to_json(),
    )
    save_state(config.state_file, state, identifiers)
    arguments = ["status", "--state-dir", str(config.state_dir), "--machine-root", str(root)]
    agent_main(arguments, environ={})
    assert "Policy:       none signed yet, only admins may open sessions" in capsys.readouterr().out
    load_policy_cache(config, state, identifiers).apply(bundle().to_json())
    agent_main(arguments, environ={})
    assert "Policy:       version 1 applied; 1 admin key(s) pinned" in capsys.readouterr().out


def test_enrollment_pins_admins_only_with_the_published_policy_signer_key() -> None:
    service_keys = {"policy-signer": {POLICY_SIGNER.public.key_id: POLICY_SIGNER.public}}
    body = {"policy_trust": {"admin_keys": [b64url(ADMIN.public.raw)],
                             "policy_key": b64url(POLICY_SIGNER.public.raw)}}
    trust = parse_policy_trust(body, TEAM_ID, service_keys)
    assert set(trust.admin_keys) == {ADMIN.public.key_id} and trust.version == 0
    impostor = {"policy_trust": {**body["policy_trust"], "policy_key": b64url(ADMIN.public.raw)}}
    with pytest.raises(EnrollmentError, match="not its published policy-signer"):
        parse_policy_trust(impostor, TEAM_ID, service_keys)
    with pytest.raises(EnrollmentError, match="no policy trust"):
        parse_policy_trust({}, TEAM_ID, service_keys)
    no_admins = {"policy_trust": {**body["policy_trust"], "admin_keys": []}}
    with pytest.raises(EnrollmentError, match="admin keys"):
        parse_policy_trust(no_admins, TEAM_ID, service_keys)
