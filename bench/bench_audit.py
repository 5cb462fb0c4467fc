"""Audit log throughput: append (signing included) and offline verification, on one core.

    .venv/bin/python bench/bench_audit.py [--records 100000] [--results bench/RESULTS-audit.md]

Targets (issue 3): at least 5,000 records/s for append and for verify of a 100,000-record bundle.
Rates are computed from the process's CPU time (the process is pinned to one CPU), so other
work on a shared machine does not distort them; wall-clock seconds are reported alongside.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from audit.actions import Action, ActorKind, PolicyOutcome
from audit.log import AuditLog
from audit.record import Actor, AuditEvent, PolicyResult, sign_event
from audit.store import MemoryAuditStore
from audit.trust import agent_registration_context
from audit.verify import verify_bundle
from protocol.identity import SigningIdentity

TARGET_RECORDS_PER_SECOND = 5_000
AGENT_EVENT_SHARE = 4  # one record in four is an agent-signed session.command


class FixedStepClock:
    """Deterministic, strictly increasing log time (one millisecond per record)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


def pin_to_one_core() -> str:
    """Restrict this process to a single CPU so the numbers mean 'one core'."""
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    return "not pinned (no sched_setaffinity)"


async def append_records(log: AuditLog, count: int, agent: SigningIdentity) -> tuple[float, int]:
    operator = Actor(ActorKind.OPERATOR, "op-42", "alice@example.com")
    service = Actor(ActorKind.SERVICE, "rendezvous")
    await log.append(
        Action.AGENT_REGISTERED,
        service,
        target="agent-7",
        context=agent_registration_context(agent.public, hostname="web-7"),
    )
    decision = PolicyResult(PolicyOutcome.ALLOW, "rule-12", "command on allowlist")
    agent_actor = Actor(ActorKind.AGENT, "agent-7", "web-7")
    agent_events = 0
    start = time.process_time()
    for index in range(1, count):
        if index % AGENT_EVENT_SHARE == 0:
            # Signed on the host (outside the timed region would flatter us; keep it inside).
            event = AuditEvent(
                occurred_at=log._clock(),  # noqa: SLF001 - the bench shares the log's clock
                team_id=log.team_id,
                actor=agent_actor,
                action=Action.SESSION_COMMAND,
                signer=agent.public.key_id,
                session_id=f"s-{index // 16}",
                context={"command": f"systemctl status app-{index}", "exit_code": index % 3},
            )
            await log.append_agent_event(sign_event(agent, event), "agent-7", agent.public)
            agent_events += 1
        else:
            await log.append(
                Action.SESSION_DECISION,
                operator,
                target="agent-7",
                session_id=f"s-{index // 16}",
                policy_result=decision,
                context={
                    "command": f"tail -n 100 /var/log/app-{index}.log",
                    "client_address": "127.0.0.1",
                },
            )
    return time.process_time() - start, agent_events


async def export(log: AuditLog, path: Path) -> float:
    start = time.process_time()
    with path.open("wb") as handle:
        await log.export(handle)
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--results", type=Path, help="write a Markdown report here")
    arguments = parser.parse_args(argv)
    pinning = pin_to_one_core()
    audit_key = SigningIdentity.generate()
    agent_key = SigningIdentity.generate()
    log = AuditLog(
        MemoryAuditStore(), audit_key, "bench.example.com", "team-bench", clock=FixedStepClock()
    )

    wall = time.perf_counter()
    append_seconds, agent_events = trio.run(append_records, log, arguments.records, agent_key)
    append_wall = time.perf_counter() - wall
    appended = arguments.records - 1
    with tempfile.TemporaryDirectory() as directory:
        bundle = Path(directory) / "audit.jsonl"
        wall = time.perf_counter()
        export_seconds = trio.run(export, log, bundle)
        export_wall = time.perf_counter() - wall
        bundle_bytes = bundle.stat().st_size
        wall, start = time.perf_counter(), time.process_time()
        result = verify_bundle(bundle, [audit_key.public])
        verify_seconds = time.process_time() - start
        verify_wall = time.perf_counter() - wall
    if not result.ok:
        print(f"verification failed: {result.summary()}", file=sys.stderr)
        return 1

    append_rate = appended / append_seconds
    verify_rate = result.record_count / verify_seconds
    export_rate = result.record_count / export_seconds
    rows = [
        (
            "append (sign + chain + Merkle + store)",
            appended,
            append_seconds,
            append_wall,
            append_rate,
        ),
        (
            "export to a JSON Lines bundle",
            result.record_count,
            export_seconds,
            export_wall,
            export_rate,
        ),
        ("verify bundle offline", result.record_count, verify_seconds, verify_wall, verify_rate),
    ]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{pinning}; Python {platform.python_version()}",
        f"Bundle: {result.record_count} records, {bundle_bytes / 1e6:.1f} MB, "
        f"{agent_events} agent-signed (one in {AGENT_EVENT_SHARE}), in-memory store",
        "",
        "| operation | records | CPU s | wall s | records/s (CPU) | target |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, count, seconds, wall_seconds, rate in rows:
        target = "" if "export" in name else f"≥ {TARGET_RECORDS_PER_SECOND:,}"
        lines.append(
            f"| {name} | {count:,} | {seconds:.2f} | {wall_seconds:.2f} | {rate:,.0f} | {target} |"
        )
    report = "\n".join(lines)
    print(report)
    if arguments.results:
        arguments.results.write_text(report + "\n")
    met = append_rate >= TARGET_RECORDS_PER_SECOND and verify_rate >= TARGET_RECORDS_PER_SECOND
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
