"""Hypothesis strategies for audit events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from audit.actions import Action, ActorKind, PolicyOutcome
from audit.record import MAX_SAFE_INTEGER, Actor, AuditEvent, JsonValue, PolicyResult

text = st.text(max_size=24)
identifiers = st.text(min_size=1, max_size=24)
json_scalars = st.none() | st.booleans() | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER) | text
# Nested at most three levels below the context object (the limit is MAX_CONTEXT_DEPTH).
_flat: st.SearchStrategy[JsonValue] = json_scalars | st.lists(json_scalars, max_size=3)
json_values: st.SearchStrategy[JsonValue] = _flat | st.dictionaries(
    st.text(max_size=8), _flat, max_size=3
)
contexts = st.dictionaries(st.text(max_size=12), json_values, max_size=4)
actors = st.builds(Actor, st.sampled_from(ActorKind), identifiers, text)
policy_results = st.none() | st.builds(
    PolicyResult, st.sampled_from(PolicyOutcome), st.none() | identifiers, text
)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
offsets = st.integers(min_value=0, max_value=10**9).map(
    lambda micros: timedelta(microseconds=micros)
)
# Audited actions that carry no special context rules (agent.registered is built separately).
plain_actions = st.sampled_from(
    [action for action in Action if action is not Action.AGENT_REGISTERED]
)


def events(signer: str, team: str = "team-7") -> st.SearchStrategy[AuditEvent]:
    """Arbitrary valid events for ``team`` signed by key id ``signer``."""
    return st.builds(
        AuditEvent,
        occurred_at=moments,
        team_id=st.just(team),
        actor=actors,
        action=plain_actions,
        signer=st.just(signer),
        target=st.none() | text,
        session_id=st.none() | identifiers,
        policy_result=policy_results,
        context=contexts,
    )
