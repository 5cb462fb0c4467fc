"""Rendezvous store throughput on SQLite and PostgreSQL: the floor under the HTTP benchmarks.

Measures, per backend, the store calls the hot HTTP paths make: agent registration (concurrent,
one key each), listing a team's agents (and, in one query, with its policy version), the
per-request operator-and-revocation lookup and proof-nonce checks,
control-channel connect and heartbeat, and audit appends. PostgreSQL runs on a throwaway
cluster started with the machine's initdb/pg_ctl (tests/pg_cluster.py) unless --postgres-url
names one.

    .venv/bin/python -m bench.bench_store [--agents 1000] [--output bench/RESULTS-store.md]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from audit.store import StoredRecord
from rendezvous.store import Store, open_store

NOW = 1_800_000_000.0
CONCURRENCY = 16


async def _timed(count: int, operation: Callable[[int], Awaitable[object]]) -> float:
    """Run ``operation(i)`` for i in range(count) with CONCURRENCY tasks; return ops/second."""
    indices = iter(range(count))

    async def worker() -> None:
        for index in indices:
            await operation(index)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(worker)
    return count / (time.perf_counter() - started)


def _fake_record(seq: int) -> StoredRecord:
    canonical = b'{"seq":%d,"action":"bench"}' % seq
    return StoredRecord(
        seq=seq,
        time=f"2026-11-26T10:00:00.{seq % 1_000_000:06d}Z",
        record_hash=hashlib.sha256(canonical).digest(),
        leaf_hash=hashlib.sha256(b"\x00" + canonical).digest(),
        canonical=canonical,
    )


async def bench_backend(database: str, agents: int) -> dict[str, float]:
    """All measurements on one freshly created database."""
    results: dict[str, float] = {}
    async with open_store(database) as store:
        team = await store.create_team("bench", NOW)
        small = await store.create_team("bench-small", NOW)
        hashes = [hashlib.sha256(os.urandom(32)).digest() for _ in range(agents + 50)]
        for index, key_hash in enumerate(hashes):
            await store.create_registration_key(
                small.id if index >= agents else team.id, key_hash, ["bench"], NOW + 3600, "op",
                NOW,
            )  # fmt: skip

        async def register(index: int) -> None:
            await store.register_agent(hashes[index], NOW, os.urandom(32), "SHA256:bench",
                                       "machine", f"host-{index}", f"host-{index}")

        results["register_agent (concurrent)"] = await _timed(agents, register)
        for index in range(agents, agents + 50):
            await register(index)
        results["list_agents, 50-agent team"] = await _timed(
            2000, lambda _: store.list_agents(small.id)
        )
        results[f"list_agents, {agents}-agent team"] = await _timed(
            200, lambda _: store.list_agents(team.id)
        )
        results["agent_listing (agents + policy version), 50-agent team"] = await _timed(
            2000, lambda _: store.agent_listing(small.id)
        )
        results["is_token_revoked"] = await _timed(
            5000, lambda i: store.is_token_revoked(f"jti-{i}", team.id)
        )
        results["token_holder (operator + revocation, per request)"] = await _timed(
            5000, lambda i: store.token_holder(team.id, "op_bench", f"jti-{i}")
        )
        results["remember_nonce"] = await _timed(
            2000, lambda i: store.remember_nonce("proof", f"n-{i}", NOW + 60, NOW)
        )
        listed = await store.list_agents(team.id)
        results["mark_agent_connected"] = await _timed(
            len(listed),
            lambda i: store.mark_agent_connected(team.id, listed[i].id, "bench", f"c-{i}",
                                                 "machine", NOW),
        )  # fmt: skip
        results["touch_agent (heartbeat)"] = await _timed(
            len(listed), lambda i: store.touch_agent(team.id, listed[i].id, NOW + 1, f"c-{i}")
        )
        results["audit append (sequential)"] = await _sequential_appends(store, 1000)
    return results


async def _sequential_appends(store: Store, count: int) -> float:
    started = time.perf_counter()
    for seq in range(count):
        await store.audit.append("tm_bench_audit", _fake_record(seq))
    return count / (time.perf_counter() - started)


def _table(results: dict[str, dict[str, float]]) -> str:
    backends = list(results)
    lines = [
        "| operation | " + " | ".join(f"{b} (ops/s)" for b in backends) + " |",
        "|---|" + "---:|" * len(backends),
    ]
    for operation in next(iter(results.values())):
        row = " | ".join(f"{results[b].get(operation, float('nan')):,.0f}" for b in backends)
        lines.append(f"| {operation} | {row} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the store benchmark on both backends and print (or write) a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000, help="agents to register")
    parser.add_argument("--postgres-url", help="use this database instead of a throwaway one")
    parser.add_argument("--output", type=Path, help="write the Markdown report here")
    args = parser.parse_args(argv)

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tucdesk-bench-") as directory:
        results["sqlite"] = trio.run(bench_backend, f"{directory}/rendezvous.db", args.agents)

    if args.postgres_url:
        results["postgres"] = trio.run(bench_backend, args.postgres_url, args.agents)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.pg_cluster import PostgresCluster, find_postgres_bin_dir

        bin_dir = find_postgres_bin_dir()
        if bin_dir is None:
            print("PostgreSQL not installed: measured SQLite only", file=sys.stderr)
        else:
            cluster = PostgresCluster(bin_dir)
            try:
                cluster.start()
                url = cluster.create_database("bench")
                results["postgres"] = trio.run(bench_backend, url, args.agents)
            finally:
                cluster.stop()

    report = "\n".join([
        "# Rendezvous store throughput",
        "",
        f"`python -m bench.bench_store --agents {args.agents}`, in-process, {CONCURRENCY} "
        f"concurrent trio tasks; {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs. SQLite: WAL, synchronous=FULL. PostgreSQL: throwaway local "
        "cluster with fsync=off (durability costs are not in its figures).",
        "",
        _table(results),
        "",
    ])  # fmt: skip
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
