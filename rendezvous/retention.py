"""Bounding the database: ``tucdesk-rendezvous db prune`` deletes old session history.

Sessions that are over and approval requests that are settled are history only: no reader of
the service needs them once they are old (the sweeps and the agent's ``live_sessions`` report
read open sessions; redemption reads pending and approved requests). They go in small batches,
each its own short transaction, so instances serving the same database wait for at most one
batch. The audit log is never pruned: it is append-only and hash-chained, and it keeps its own
account of every session (docs/self-hosting.md, "Retention").
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from rendezvous.audit_trail import Action, AuditTrail, service_actor
from rendezvous.errors import ConfigError
from rendezvous.store.base import PrunedHistory, Store

# Rows per table per batch: one batch holds SQLite's write lock (or PostgreSQL's row locks)
# for milliseconds, not for the whole prune.
PRUNE_BATCH_ROWS = 500
PAUSE_BETWEEN_BATCHES_SECONDS = 0.02
# An agent that was offline delivers its spooled session events later; the rendezvous refuses
# an event whose session row is gone, so history younger than this is never pruned.
MIN_PRUNE_AGE_SECONDS = 7 * 86400


def prune_cutoff(older_than_seconds: int, now: float) -> float:
    """The time before which history goes; ConfigError below the minimum age."""
    if older_than_seconds < MIN_PRUNE_AGE_SECONDS:
        raise ConfigError(
            f"--older-than must be at least {MIN_PRUNE_AGE_SECONDS // 86400}d: agents deliver "
            "session events they spooled while offline, and need the session still there"
        )
    return now - older_than_seconds


async def prune_team_history(
    store: Store,
    trail: AuditTrail | None,
    team_id: str,
    before: float,
    *,
    batch_rows: int = PRUNE_BATCH_ROWS,
    progress: Callable[[PrunedHistory], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> PrunedHistory:
    """Delete the team's history from before ``before`` in batches; with ``trail``, record
    ``history.pruned`` first (no audit, no action); without one, only count (a dry run).

    Two records: the plan (``stage: planned``, the counts found) before the first batch, and
    the outcome (``stage: completed``, or ``interrupted`` when ``stop_requested`` said so
    between batches or a batch failed) with the rows really deleted. One outcome record, not
    one per batch: a large prune would otherwise add hundreds of records to the log.
    """
    prunable = await store.prunable_history(team_id, before)
    if trail is None or not prunable:
        return prunable
    await _record(trail, team_id, before, "planned", prunable)
    pruned = PrunedHistory()
    stage = "interrupted"
    try:
        while not (stop_requested is not None and stop_requested()):
            batch = await store.prune_history(team_id, before, batch_rows)
            if not batch:
                stage = "completed"
                break
            pruned += batch
            if progress is not None:
                progress(pruned)
            # Other processes' writers wait on the lock this batch held (SQLite's busy handler
            # polls): a pause lets them in before the next batch takes it again.
            await trio.sleep(PAUSE_BETWEEN_BATCHES_SECONDS)
    except BaseException:
        # A batch failed or the prune was cancelled: what was deleted is still on record.
        with trio.CancelScope(shield=True):
            try:
                await _record(trail, team_id, before, "interrupted", pruned)
            except Exception:  # noqa: BLE001, S110 - the caller needs the first failure
                pass
        raise
    await _record(trail, team_id, before, stage, pruned)
    return pruned


async def _record(
    trail: AuditTrail, team_id: str, before: float, stage: str, counts: PrunedHistory
) -> None:
    await trail.record(
        team_id,
        actor=service_actor("admin command"),
        action=Action.HISTORY_PRUNED,
        target=f"team:{team_id}",
        details={
            "stage": stage,
            "before": _utc(before),
            "sessions": counts.sessions,
            "approval_requests": counts.approval_requests,
        },
    )


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
