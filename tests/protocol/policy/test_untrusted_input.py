"""Bundles, approvals and pins from the network or disk: any malformed input is a typed refusal."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.policy.approval import ApprovalContext, approve_request, verify_approval
from protocol.policy.errors import ApprovalError, PolicyBundleError
from protocol.policy.request import Action
from protocol.policy.signed_policy import PinnedPolicyTrust, accept_policy_bundle

from .builders import APPROVER, BASE_ROSTER, OPERATOR, content, enrollment_trust, published

NOW = 1_800_000_000
BUNDLE = json.loads(published(content(1)).to_bytes())
TRUST = enrollment_trust()
CONTEXT = ApprovalContext("req_1", "team_ops", "agt_1", Action.EXEC, ("ls", "-la"),
                          OPERATOR.public.key_id, 1)
APPROVAL = approve_request(APPROVER, CONTEXT, now=NOW).to_json()

JSON_VALUES = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**60), max_value=2**60),
        st.floats(allow_nan=False), st.text(max_size=20),
        st.sampled_from(["\ud800", "", "admin", "A" * 43, "0" * 64, "tucdesk-approval-v1"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += _paths(item, (*prefix, index))
    return paths


def _replaced(document: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    result = copy.deepcopy(document)
    target = result
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = new
    return result


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(_paths(BUNDLE)), new=JSON_VALUES)
def test_a_bundle_with_any_part_replaced_is_accepted_unchanged_or_refused_with_a_reason(
    path: tuple[Any, ...], new: Any
) -> None:
    mutated = _replaced(BUNDLE, path, new)
    try:
        accepted = accept_policy_bundle(mutated, TRUST)
    except PolicyBundleError:
        return
    assert json.loads(accepted.bundle.to_bytes()) == BUNDLE


@settings(max_examples=100, deadline=None)
@given(JSON_VALUES)
def test_arbitrary_json_is_refused_as_a_bundle(value: Any) -> None:
    with pytest.raises(PolicyBundleError):
        accept_policy_bundle(value, TRUST)


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(_paths(APPROVAL)), new=JSON_VALUES)
def test_an_approval_with_any_part_replaced_is_refused_with_a_reason(
    path: tuple[Any, ...], new: Any
) -> None:
    mutated = _replaced(APPROVAL, path, new)
    if mutated == APPROVAL:
        return
    with pytest.raises(ApprovalError):
        verify_approval(mutated, CONTEXT, BASE_ROSTER, NOW)


@settings(max_examples=100, deadline=None)
@given(st.one_of(JSON_VALUES, st.binary(max_size=64)))
def test_arbitrary_input_is_refused_as_an_approval(value: Any) -> None:
    with pytest.raises(ApprovalError):
        verify_approval(value, CONTEXT, BASE_ROSTER, NOW)


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(_paths(TRUST.to_json())), new=JSON_VALUES)
def test_stored_pins_with_any_part_replaced_load_or_fail_with_value_error(
    path: tuple[Any, ...], new: Any
) -> None:
    try:
        PinnedPolicyTrust.from_json(_replaced(TRUST.to_json(), path, new))
    except ValueError:
        pass
