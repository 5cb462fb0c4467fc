"""Refusal records are budgeted per caller: a burst of refused requests by one caller leaves at
most the budget's records, the rest are counted and the caller's next recorded refusal carries
the count (``suppressed``); other callers are unaffected, the answers never change, and the
export verifies.

Against a real rendezvous (teams alpha and beta on one instance, an online agent in each), on
SQLite and PostgreSQL. The budget's clock is a settable one, so the window passes at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from audit.errors import StoreError as AuditStoreError
from rendezvous.audit_trail import (
    REFUSAL_RECORDS_BURST,
    REFUSAL_RECORDS_PER_MINUTE,
    SUPPRESSED_KEY,
    RefusalBudget,
)
from rendezvous.store import Store
from tests.rendezvous.service_harness import Clock, OperatorSession, ServiceHarness
from tests.rendezvous.test_refusals_audited import (
    NO_SUCH_AGENT,
    _answer,
    _export_verifies,
    _refusals,
    two_teams,
)

pytestmark = pytest.mark.anyio

BURST = 100
FORBIDDEN_REMOVAL = (
    403,
    {"error": "forbidden", "message": "the operator role may not do this (agents:write)"},
)
SECONDS_PER_RECORD = 60.0 / REFUSAL_RECORDS_PER_MINUTE
AUDIT_LOGGER = "tucdesk.rendezvous.audit"


def _budgeted(service: ServiceHarness, **settings: Any) -> Clock:
    """Give the service a fresh refusal budget on a settable clock; return the clock."""
    clock = Clock()
    service.ctx.audit.refusal_budget = RefusalBudget(clock=clock, **settings)
    return clock


def _by(refusals: list[dict[str, Any]], who: OperatorSession) -> list[dict[str, Any]]:
    return [event for event in refusals if event["actor"]["id"] == who.operator_id]


async def test_a_burst_of_refusals_leaves_the_budgets_records_and_the_next_one_counts_the_rest(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with two_teams(store, tmp_path) as teams:
        service, operator = teams.service, teams.operator
        clock = _budgeted(service)
        path = f"/v1/agents/{teams.alpha_agent}"
        with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
            answers = [await _answer(service, operator, "DELETE", path) for _ in range(BURST)]
        assert answers == [FORBIDDEN_REMOVAL] * BURST
        recorded = _by(await _refusals(service, teams.alpha), operator)
        assert len(recorded) == REFUSAL_RECORDS_BURST
        assert all(SUPPRESSED_KEY not in event["context"] for event in recorded)
        # Named once (rate-limited), by id; nothing the caller sent beyond the route's id.
        warnings = [r.getMessage() for r in caplog.records if "over the budget" in r.getMessage()]
        assert len(warnings) == 1 and operator.operator_id in warnings[0], warnings

        # Another caller, in the same team and in another, is unaffected.
        assert await _answer(service, teams.approver, "DELETE", path) == (
            403,
            {"error": "forbidden", "message": "the approver role may not do this (agents:write)"},
        )
        assert await _answer(service, teams.bob, "DELETE", path) == (404, NO_SUCH_AGENT)
        [approver_record] = _by(await _refusals(service, teams.alpha), teams.approver)
        assert approver_record["context"] == {"reason": "not_permitted"}
        [bob_record] = await _refusals(service, teams.beta)
        assert bob_record["context"] == {"reason": "not_found"}

        # One record's worth of time later, the next refusal is recorded with the count.
        clock.now += SECONDS_PER_RECORD
        assert await _answer(service, operator, "DELETE", path) == FORBIDDEN_REMOVAL
        assert await _answer(service, operator, "DELETE", path) == FORBIDDEN_REMOVAL
        recorded = _by(await _refusals(service, teams.alpha), operator)
        assert len(recorded) == REFUSAL_RECORDS_BURST + 1
        assert recorded[-1]["context"] == {
            "reason": "not_permitted",
            SUPPRESSED_KEY: BURST - REFUSAL_RECORDS_BURST,
        }
        # The one refused after it is counted toward the caller's next record.
        clock.now += SECONDS_PER_RECORD
        assert await _answer(service, operator, "DELETE", path) == FORBIDDEN_REMOVAL
        recorded = _by(await _refusals(service, teams.alpha), operator)
        assert recorded[-1]["context"] == {"reason": "not_permitted", SUPPRESSED_KEY: 1}
        counted = service.ctx.audit.refusal_budget.suppressed_total
        assert counted == BURST - REFUSAL_RECORDS_BURST + 1
        await _export_verifies(service, teams.alpha, tmp_path)


async def test_one_budget_covers_all_of_a_callers_refusals(store: Store, tmp_path: Path) -> None:
    async with two_teams(store, tmp_path) as teams:
        service, bob = teams.service, teams.bob
        clock = _budgeted(service, burst=2)
        assert await _answer(service, bob, "DELETE", "/v1/agents/gone") == (404, NO_SUCH_AGENT)
        assert (await _answer(service, bob, "POST", "/v1/approvals/gone/withdraw"))[0] == 404
        for _ in range(3):
            assert (await _answer(service, bob, "POST", "/v1/approvals/gone/withdraw"))[0] == 404
            assert await _answer(service, bob, "DELETE", "/v1/agents/gone") == (404, NO_SUCH_AGENT)
        assert len(await _refusals(service, teams.beta)) == 2
        clock.now += SECONDS_PER_RECORD
        assert await _answer(service, bob, "DELETE", "/v1/agents/gone") == (404, NO_SUCH_AGENT)
        refusals = await _refusals(service, teams.beta)
        assert [event["context"].get(SUPPRESSED_KEY) for event in refusals] == [None, None, 6]
        await _export_verifies(service, teams.beta, tmp_path)


async def test_a_count_whose_record_could_not_be_appended_is_carried_by_the_next(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_teams(store, tmp_path) as teams:
        service, bob = teams.service, teams.bob
        clock = _budgeted(service, burst=1)

        async def failing_append(*args: Any, **kwargs: Any) -> None:
            raise AuditStoreError("disk I/O error")

        for _ in range(3):  # one recorded, two counted
            assert await _answer(service, bob, "DELETE", "/v1/agents/gone") == (404, NO_SUCH_AGENT)
        clock.now += SECONDS_PER_RECORD
        monkeypatch.setattr(service.store.audit, "append", failing_append)
        assert await _answer(service, bob, "DELETE", "/v1/agents/gone") == (404, NO_SUCH_AGENT)
        monkeypatch.undo()
        clock.now += SECONDS_PER_RECORD
        assert await _answer(service, bob, "DELETE", "/v1/agents/gone") == (404, NO_SUCH_AGENT)
        refusals = await _refusals(service, teams.beta)
        assert [event["context"].get(SUPPRESSED_KEY) for event in refusals] == [None, 2]


def test_a_forgotten_callers_pending_count_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = RefusalBudget(burst=1, max_callers=2, clock=clock)
    first, second, third = (
        ("t", "operator", "op_1"),
        ("t", "operator", "op_2"),
        ("t", "api_key", "k"),
    )
    assert budget.take(first) == 0
    assert budget.take(first) is None
    assert budget.take(second) == 0
    with caplog.at_level(logging.WARNING, logger=AUDIT_LOGGER):
        assert budget.take(third) == 0  # the table is full: the least recently refused goes
    forgotten = [r.getMessage() for r in caplog.records if "no longer counted" in r.getMessage()]
    assert forgotten == [
        "1 refusals of operator op_1 (team t) were not recorded (over the refusal budget) and "
        "are no longer counted: too many callers refused at once"
    ]
    # Forgotten, it starts with a full budget again (the count is in the service log).
    assert budget.take(first) == 0


def test_the_budget_refills_at_its_rate_and_never_beyond_its_burst() -> None:
    clock = Clock()
    counted: list[None] = []
    budget = RefusalBudget(
        per_minute=60, burst=3, clock=clock, on_suppressed=lambda: counted.append(None)
    )
    caller = ("t", "operator", "op_1")
    assert [budget.take(caller) for _ in range(4)] == [0, 0, 0, None]
    clock.now += 1.0
    assert [budget.take(caller) for _ in range(2)] == [1, None]
    clock.now += 3600.0
    assert [budget.take(caller) for _ in range(4)] == [1, 0, 0, None]
    assert len(counted) == budget.suppressed_total == 3


async def test_refusals_over_the_budget_are_counted_in_the_metrics(
    store: Store, tmp_path: Path
) -> None:
    """The service's own budget (as build_context makes it) counts each refusal it does not
    record in tucdesk_audit_refusals_suppressed_total."""
    async with two_teams(store, tmp_path) as teams:
        service, operator = teams.service, teams.operator
        path = f"/v1/agents/{teams.alpha_agent}"
        for _ in range(REFUSAL_RECORDS_BURST + 3):
            assert await _answer(service, operator, "DELETE", path) == FORBIDDEN_REMOVAL
        exposition = service.ctx.metrics.exposition().decode()
        assert "tucdesk_audit_refusals_suppressed_total 3.0" in exposition, exposition[-2000:]
