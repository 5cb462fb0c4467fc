"""The waiting message says what Ctrl-C does: with --approval-timeout it withdraws the request,
without one the request stays pending."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from operator_cli.approval_requests import PendingApproval
from operator_cli.approval_wait import bound_approval_waits, waiting_message

PENDING = PendingApproval("apr_123", None, ("approver@example.com",), "restart", None)


@pytest.fixture(autouse=True)
def unbounded_afterwards() -> Iterator[None]:
    yield
    bound_approval_waits(None)


def test_with_an_approval_timeout_ctrl_c_is_said_to_withdraw_the_request() -> None:
    bound_approval_waits(600.0)
    said = waiting_message(PENDING)
    assert "Ctrl-C stops waiting and withdraws the request" in said
    assert "stays pending" not in said


def test_without_an_approval_timeout_ctrl_c_is_said_to_keep_the_request_pending() -> None:
    bound_approval_waits(None)
    said = waiting_message(PENDING)
    assert "Ctrl-C stops waiting (the request stays pending; tucdesk approvals withdraw apr_123" \
        in said
    assert "withdraws the request" not in said
