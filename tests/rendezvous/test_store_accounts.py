"""Store behaviour for teams, invites, operators, login challenges, revocation, nonces and API keys.

Every test runs on SQLite and on PostgreSQL (the ``store`` fixture is parametrized).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from rendezvous.store import (
    AlreadyExists,
    ChallengeUnusable,
    InvalidArgument,
    InviteUnusable,
    NotFound,
    Store,
    Team,
    UnusableReason,
    open_store,
)

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0
HOUR = 3600.0


def secret_hash(secret: str) -> bytes:
    """How the service hashes a secret before the store sees it."""
    return hashlib.sha256(secret.encode()).digest()


def operator_key() -> tuple[bytes, str]:
    """A (public key, thumbprint) pair; the store treats both as opaque."""
    raw = os.urandom(32)
    return raw, "jkt-" + raw.hex()[:20]


async def make_invite(store: Store, team: Team, code: str, email: str = "ada@example.com",
                      role: str = "operator", expires_at: float = NOW + HOUR) -> None:
    await store.create_invite(team.id, email, role, secret_hash(code), expires_at, "admin", NOW)


# ---- teams ---------------------------------------------------------------------------------


async def test_created_team_can_be_found_by_id_and_name(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    assert team.id.startswith("tm_")
    assert await store.get_team(team.id) == team
    assert await store.get_team_by_name("ops") == team
    assert await store.get_team("tm_missing") is None
    assert await store.get_team_by_name("nobody") is None


async def test_team_names_are_unique(store: Store) -> None:
    await store.create_team("ops", NOW)
    with pytest.raises(AlreadyExists):
        await store.create_team("ops", NOW + 1)


async def test_teams_are_listed_by_name(store: Store) -> None:
    for name in ("zeta", "alpha", "mid"):
        await store.create_team(name, NOW)
    assert [team.name for team in await store.list_teams()] == ["alpha", "mid", "zeta"]


async def test_empty_or_oversized_team_name_is_refused(store: Store) -> None:
    with pytest.raises(InvalidArgument):
        await store.create_team("", NOW)
    with pytest.raises(InvalidArgument):
        await store.create_team("x" * 1000, NOW)


# ---- invites and enrollment ----------------------------------------------------------------


async def test_invite_for_unknown_team_is_refused(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.create_invite("tm_nope", "a@b", "admin", secret_hash("c"), NOW + 1, "x", NOW)


async def test_invite_is_stored_without_its_code(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    await make_invite(store, team, "the-code", role="admin")
    [invite] = await store.list_invites(team.id)
    assert (invite.email, invite.role, invite.used_at) == ("ada@example.com", "admin", None)
    assert "the-code" not in repr(invite)


async def test_enrolling_with_an_invite_creates_the_operator_it_names(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    await make_invite(store, team, "code-1", email="ada@example.com", role="approver")
    public_key, thumbprint = operator_key()
    operator, invite = await store.enroll_operator(secret_hash("code-1"), NOW + 5, public_key,
                                                   thumbprint)
    assert operator.id.startswith("op_")
    assert (operator.team_id, operator.email, operator.role) == (team.id, "ada@example.com",
                                                                 "approver")
    assert operator.public_key == public_key and operator.is_active()
    assert operator.tokens_valid_after == NOW + 5
    assert invite.used_at == NOW + 5 and invite.used_by == operator.id
    assert await store.get_operator_by_thumbprint(thumbprint) == operator
    assert await store.get_operator(team.id, operator.id) == operator
    [listed] = await store.list_invites(team.id)
    assert listed.used_by == operator.id


async def test_reused_invite_is_refused(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    await make_invite(store, team, "code-1")
    await store.enroll_operator(secret_hash("code-1"), NOW, *operator_key())
    with pytest.raises(InviteUnusable) as refused:
        await store.enroll_operator(secret_hash("code-1"), NOW + 1, *operator_key())
    assert refused.value.reason is UnusableReason.USED
    assert len(await store.list_operators(team.id)) == 1


async def test_a_revoked_invite_cannot_be_used_and_only_a_pending_one_of_the_team_revokes(
    store: Store,
) -> None:
    team = await store.create_team("ops", NOW)
    other = await store.create_team("other", NOW)
    await make_invite(store, team, "code-1")
    [pending] = await store.list_invites(team.id)
    with pytest.raises(NotFound):  # another team's id, and an unknown one, look alike
        await store.revoke_invite(other.id, pending.id, NOW + 1)
    with pytest.raises(NotFound):
        await store.revoke_invite(team.id, "inv_missing", NOW + 1)
    revoked = await store.revoke_invite(team.id, pending.id, NOW + 1)
    assert (revoked.id, revoked.expires_at, revoked.used_at) == (pending.id, 0.0, None)
    with pytest.raises(InviteUnusable) as refused:
        await store.enroll_operator(secret_hash("code-1"), NOW + 2, *operator_key())
    assert refused.value.reason is UnusableReason.REVOKED
    with pytest.raises(InviteUnusable) as again:
        await store.revoke_invite(team.id, pending.id, NOW + 2)
    assert again.value.reason is UnusableReason.REVOKED
    assert await store.list_operators(team.id) == []
    await make_invite(store, team, "code-2", email="bob@example.com")
    await store.enroll_operator(secret_hash("code-2"), NOW + 3, *operator_key())
    used = next(i for i in await store.list_invites(team.id) if i.email == "bob@example.com")
    with pytest.raises(InviteUnusable) as spent:
        await store.revoke_invite(team.id, used.id, NOW + 4)
    assert spent.value.reason is UnusableReason.USED


async def test_expired_invite_is_refused(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    await make_invite(store, team, "code-1", expires_at=NOW + 60)
    with pytest.raises(InviteUnusable) as refused:
        await store.enroll_operator(secret_hash("code-1"), NOW + 60, *operator_key())
    assert refused.value.reason is UnusableReason.EXPIRED
    assert await store.list_operators(team.id) == []


async def test_unknown_invite_is_refused(store: Store) -> None:
    with pytest.raises(InviteUnusable) as refused:
        await store.consume_invite(secret_hash("never issued"), NOW)
    assert refused.value.reason is UnusableReason.UNKNOWN


async def test_consuming_an_invite_marks_it_used_once(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    await make_invite(store, team, "code-1")
    invite = await store.consume_invite(secret_hash("code-1"), NOW)
    assert invite.used_at == NOW
    with pytest.raises(InviteUnusable):
        await store.consume_invite(secret_hash("code-1"), NOW)


async def test_enrolling_an_already_enrolled_key_leaves_the_invite_unused(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    await make_invite(store, team, "code-1")
    await make_invite(store, team, "code-2", email="bob@example.com")
    key = operator_key()
    await store.enroll_operator(secret_hash("code-1"), NOW, *key)
    with pytest.raises(AlreadyExists):
        await store.enroll_operator(secret_hash("code-2"), NOW, *key)
    invite = await store.consume_invite(secret_hash("code-2"), NOW)
    assert invite.email == "bob@example.com"


async def test_concurrent_enrollments_with_one_invite_create_exactly_one_operator(
    database_url: str,
) -> None:
    outcomes: list[str] = []
    async with open_store(database_url) as first, open_store(database_url) as second:
        team = await first.create_team("ops", NOW)
        await make_invite(first, team, "code-1")

        async def enroll(instance: Store) -> None:
            try:
                await instance.enroll_operator(secret_hash("code-1"), NOW, *operator_key())
                outcomes.append("enrolled")
            except InviteUnusable as refused:
                outcomes.append(refused.reason.value)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for index in range(8):
                    nursery.start_soon(enroll, (first, second)[index % 2])
        assert sorted(outcomes) == ["enrolled"] + ["used"] * 7
        assert len(await second.list_operators(team.id)) == 1


# ---- operators -----------------------------------------------------------------------------


async def test_disabling_an_operator_kills_its_tokens(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    await make_invite(store, team, "code-1")
    operator, _ = await store.enroll_operator(secret_hash("code-1"), NOW, *operator_key())
    disabled = await store.disable_operator(team.id, operator.id, NOW + 100)
    assert not disabled.is_active()
    assert disabled.disabled_at == NOW + 100 and disabled.tokens_valid_after == NOW + 100
    again = await store.disable_operator(team.id, operator.id, NOW + 200)
    assert again.disabled_at == NOW + 100


async def test_revoking_operator_tokens_moves_the_cutoff_forward_only(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    await make_invite(store, team, "code-1")
    operator, _ = await store.enroll_operator(secret_hash("code-1"), NOW, *operator_key())
    assert (await store.revoke_operator_tokens(team.id, operator.id, NOW + 50)).tokens_valid_after \
        == NOW + 50
    later = await store.revoke_operator_tokens(team.id, operator.id, NOW + 10)
    assert later.tokens_valid_after == NOW + 50 and later.is_active()


async def test_operators_are_invisible_to_other_teams(store: Store) -> None:
    team_a = await store.create_team("a", NOW)
    team_b = await store.create_team("b", NOW)
    await make_invite(store, team_a, "code-a")
    operator, _ = await store.enroll_operator(secret_hash("code-a"), NOW, *operator_key())
    assert await store.get_operator(team_b.id, operator.id) is None
    assert await store.list_operators(team_b.id) == []
    assert await store.list_invites(team_b.id) == []
    with pytest.raises(NotFound):
        await store.disable_operator(team_b.id, operator.id, NOW)
    with pytest.raises(NotFound):
        await store.revoke_operator_tokens(team_b.id, operator.id, NOW)
    assert (await store.get_operator(team_a.id, operator.id)) == operator


# ---- login challenges ----------------------------------------------------------------------


async def test_login_challenge_is_answered_once(store: Store) -> None:
    created = await store.create_login_challenge("ch-1", "nonce-text", NOW + 60, NOW,
                                                 subject="jkt-1")
    consumed = await store.consume_login_challenge("ch-1", NOW + 1)
    assert consumed == created and consumed.subject == "jkt-1"
    with pytest.raises(ChallengeUnusable) as refused:
        await store.consume_login_challenge("ch-1", NOW + 2)
    assert refused.value.reason is UnusableReason.UNKNOWN


async def test_expired_login_challenge_is_refused_and_burnt(store: Store) -> None:
    await store.create_login_challenge("ch-1", "nonce", NOW + 60, NOW)
    with pytest.raises(ChallengeUnusable) as refused:
        await store.consume_login_challenge("ch-1", NOW + 60)
    assert refused.value.reason is UnusableReason.EXPIRED
    with pytest.raises(ChallengeUnusable):
        await store.consume_login_challenge("ch-1", NOW)


async def test_repeated_login_challenge_id_is_refused(store: Store) -> None:
    await store.create_login_challenge("ch-1", "one", NOW + 60, NOW)
    with pytest.raises(AlreadyExists):
        await store.create_login_challenge("ch-1", "two", NOW + 60, NOW)


async def test_concurrent_answers_to_one_challenge_succeed_once(database_url: str) -> None:
    outcomes: list[bool] = []
    async with open_store(database_url) as first, open_store(database_url) as second:
        await first.create_login_challenge("ch-1", "nonce", NOW + 60, NOW)

        async def answer(instance: Store) -> None:
            try:
                await instance.consume_login_challenge("ch-1", NOW)
                outcomes.append(True)
            except ChallengeUnusable:
                outcomes.append(False)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for index in range(6):
                    nursery.start_soon(answer, (first, second)[index % 2])
    assert sorted(outcomes) == [False] * 5 + [True]


# ---- token revocation, nonces, pruning -----------------------------------------------------


async def test_revoked_token_is_reported_revoked(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    assert not await store.is_token_revoked("jti-1")
    await store.revoke_token(team.id, "jti-1", NOW + 900, NOW)
    await store.revoke_token(team.id, "jti-1", NOW + 900, NOW + 1)  # idempotent
    assert await store.is_token_revoked("jti-1")
    assert not await store.is_token_revoked("jti-2")


async def test_token_revoked_by_another_team_stays_valid_for_its_own_team(store: Store) -> None:
    team_a = await store.create_team("a", NOW)
    team_b = await store.create_team("b", NOW)
    await store.revoke_token(team_b.id, "jti-of-a", NOW + 900, NOW)
    assert not await store.is_token_revoked("jti-of-a", team_id=team_a.id)
    assert await store.is_token_revoked("jti-of-a", team_id=team_b.id)
    await store.revoke_token(team_a.id, "jti-of-a", NOW + 900, NOW)
    assert await store.is_token_revoked("jti-of-a", team_id=team_a.id)


async def test_remembered_nonce_is_refused_until_it_expires(store: Store) -> None:
    assert await store.remember_nonce("proof", "n-1", NOW + 60, NOW)
    assert not await store.remember_nonce("proof", "n-1", NOW + 70, NOW + 10)
    assert await store.remember_nonce("register", "n-1", NOW + 60, NOW)  # scopes are separate
    assert await store.remember_nonce("proof", "n-1", NOW + 120, NOW + 60)  # expired: reusable
    assert not await store.remember_nonce("proof", "n-1", NOW + 130, NOW + 61)


async def test_concurrent_uses_of_one_nonce_are_accepted_once(database_url: str) -> None:
    outcomes: list[bool] = []
    async with open_store(database_url) as first, open_store(database_url) as second:

        async def use(instance: Store) -> None:
            outcomes.append(await instance.remember_nonce("proof", "n-1", NOW + 60, NOW))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for index in range(8):
                    nursery.start_soon(use, (first, second)[index % 2])
    assert sorted(outcomes) == [False] * 7 + [True]


async def test_pruning_removes_only_expired_entries(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    await store.remember_nonce("proof", "old", NOW + 10, NOW)
    await store.remember_nonce("proof", "new", NOW + 100, NOW)
    await store.create_login_challenge("old", "c", NOW + 10, NOW)
    await store.create_login_challenge("new", "c", NOW + 100, NOW)
    await store.revoke_token(team.id, "old", NOW + 10, NOW)
    await store.revoke_token(team.id, "new", NOW + 100, NOW)
    assert await store.prune_expired(NOW + 50) == 3
    assert not await store.is_token_revoked("old")
    assert await store.is_token_revoked("new")
    assert not await store.remember_nonce("proof", "new", NOW + 200, NOW + 60)
    assert (await store.consume_login_challenge("new", NOW + 60)).id == "new"
    assert await store.prune_expired(NOW + 50) == 0


# ---- API keys ------------------------------------------------------------------------------


async def test_api_key_is_found_by_its_hash_and_revoked_instantly(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    created = await store.create_api_key(team.id, "ci", ["agents:read", "audit:export"],
                                         secret_hash("sk_live_x"), "op_admin", NOW)
    assert created.id.startswith("ak_") and created.scopes == ("agents:read", "audit:export")
    assert await store.get_api_key_by_hash(secret_hash("sk_live_x")) == created
    assert await store.get_api_key_by_hash(secret_hash("sk_live_y")) is None
    revoked = await store.revoke_api_key(team.id, created.id, NOW + 5)
    assert not revoked.is_active()
    found = await store.get_api_key_by_hash(secret_hash("sk_live_x"))
    assert found is not None and found.revoked_at == NOW + 5
    again = await store.revoke_api_key(team.id, created.id, NOW + 9)
    assert again.revoked_at == NOW + 5


async def test_api_keys_are_invisible_to_other_teams(store: Store) -> None:
    team_a = await store.create_team("a", NOW)
    team_b = await store.create_team("b", NOW)
    key = await store.create_api_key(team_a.id, "ci", [], secret_hash("k"), "op", NOW)
    assert await store.list_api_keys(team_b.id) == []
    with pytest.raises(NotFound):
        await store.revoke_api_key(team_b.id, key.id, NOW)
    assert (await store.list_api_keys(team_a.id)) == [key]


async def test_api_key_hashes_are_unique(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    await store.create_api_key(team.id, "one", [], secret_hash("k"), "op", NOW)
    with pytest.raises(AlreadyExists):
        await store.create_api_key(team.id, "two", [], secret_hash("k"), "op", NOW)


async def test_api_key_for_unknown_team_is_refused(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.create_api_key("tm_nope", "ci", [], secret_hash("k"), "op", NOW)


async def test_api_keys_are_listed_newest_first(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    for index in range(3):
        await store.create_api_key(team.id, f"k{index}", [], secret_hash(f"k{index}"), "op",
                                   NOW + index)
    assert [key.name for key in await store.list_api_keys(team.id)] == ["k2", "k1", "k0"]
