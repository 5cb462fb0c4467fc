"""The team roster: who may open sessions, who may approve, and its JSON form."""

from __future__ import annotations

import pytest

from protocol.identity import b64url
from protocol.policy.roster import Role, Roster, RosterEntry, RosterError

from .builders import ADMIN, APPROVER, AUDITOR, BASE_ROSTER, NEWCOMER, OPERATOR


def test_operators_and_admins_may_open_sessions_and_nobody_else() -> None:
    may = {key: BASE_ROSTER.may_open_sessions(key.public.key_id)
           for key in (ADMIN, OPERATOR, APPROVER, AUDITOR, NEWCOMER)}
    assert may == {ADMIN: True, OPERATOR: True, APPROVER: False, AUDITOR: False, NEWCOMER: False}


def test_approvers_and_admins_may_approve_and_nobody_else() -> None:
    may = {key: BASE_ROSTER.may_approve(key.public.key_id)
           for key in (ADMIN, OPERATOR, APPROVER, AUDITOR, NEWCOMER)}
    assert may == {ADMIN: True, OPERATOR: False, APPROVER: True, AUDITOR: False, NEWCOMER: False}


def test_the_admin_keys_are_the_admin_entries() -> None:
    assert BASE_ROSTER.admin_keys() == {ADMIN.public.key_id: ADMIN.public}


def test_the_requesting_operator_comes_from_the_roster() -> None:
    operator = BASE_ROSTER.requesting_operator(OPERATOR.public.key_id)
    assert (operator.email, operator.role) == ("oscar@example.com", "operator")
    with pytest.raises(KeyError):
        BASE_ROSTER.requesting_operator(NEWCOMER.public.key_id)


def test_the_roster_round_trips_through_json_in_a_canonical_order() -> None:
    reversed_roster = Roster.of(reversed(BASE_ROSTER.entries))
    assert reversed_roster.to_json() == BASE_ROSTER.to_json()
    assert reversed_roster == BASE_ROSTER
    assert Roster.from_json(BASE_ROSTER.to_json()) == BASE_ROSTER


def test_a_key_listed_twice_is_refused() -> None:
    with pytest.raises(RosterError, match="twice"):
        Roster.of([*BASE_ROSTER.entries, RosterEntry(ADMIN.public, "x@example.com", Role.AUDITOR)])


@pytest.mark.parametrize(
    "entry",
    [
        {"public_key": b64url(ADMIN.public.raw), "email": "a@example.com", "role": "root"},
        {"public_key": b64url(ADMIN.public.raw), "email": "nobody", "role": "admin"},
        {"public_key": "not-a-key", "email": "a@example.com", "role": "admin"},
        {"public_key": b64url(b"short"), "email": "a@example.com", "role": "admin"},
        {"public_key": b64url(ADMIN.public.raw), "email": "a@example.com"},
        {"public_key": b64url(ADMIN.public.raw), "email": 5, "role": "admin"},
    ],
)
def test_a_malformed_entry_is_refused(entry: object) -> None:
    with pytest.raises(RosterError):
        Roster.from_json([entry])
