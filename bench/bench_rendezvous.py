"""Rendezvous benchmarks: registrations/s, authenticated agent lists/s, 1,000 control channels.

The service runs as its own process (`tucdesk-rendezvous serve`, plain HTTP on loopback); the
load comes from this process (trio + httpx / trio-websocket), and for the list benchmark from
several worker processes. Run on SQLite and on a throwaway PostgreSQL cluster:

    .venv/bin/python bench/bench_rendezvous.py [--backend sqlite|postgres|both] [--agents 1000]

Targets (issue 4): >= 200 registrations/s, >= 1,000 list requests/s, <= 300 MiB RSS with 1,000
connected agents. Results go to stdout as Markdown rows for bench/RESULTS-rendezvous.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol.domains import Purpose  # noqa: E402
from protocol.identity import SigningIdentity, b64url  # noqa: E402
from protocol.signed_payload import create_signed_payload  # noqa: E402
from rendezvous.credentials import hash_secret, new_invite_code, new_registration_key  # noqa: E402
from rendezvous.store import open_store  # noqa: E402

BIN = Path(sys.executable).parent
REGISTRATIONS = 1000
REGISTRATION_CONCURRENCY = 32
LIST_SECONDS = 5.0
LIST_WORKERS = 2
LIST_CONCURRENCY_PER_WORKER = 16
START_TIMEOUT = 30
SMALL_TEAM_AGENTS = 10


def start_server(data_dir: Path, database: str) -> tuple[subprocess.Popen[bytes], str]:
    """Init the data dir and start `serve` on an ephemeral loopback port."""
    store = ["--data-dir", str(data_dir), "--database", database]
    subprocess.run([str(BIN / "tucdesk-rendezvous"), "init", *store], check=True,
                   capture_output=True)
    log = data_dir / "serve.log"
    handle = log.open("w")
    environment = {**os.environ, "TUCDESK_ACCESS_TOKEN_SECONDS": "900",
                   "TUCDESK_HEARTBEAT_TIMEOUT_SECONDS": "600"}
    process = subprocess.Popen(
        [str(BIN / "tucdesk-rendezvous"), "serve", *store, "--listen", "127.0.0.1:0",
         "--insecure-http"],
        stdout=handle, stderr=subprocess.STDOUT, env=environment,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        match = re.search(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if match:
            return process, match.group(1)
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{log.read_text()}")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def seed(database: str, keys: int) -> tuple[str, list[str]]:
    """A team, an admin invite and ``keys`` registration keys, straight into the store."""
    now = time.time()
    async with open_store(database) as store:
        team = await store.create_team(f"bench-{os.urandom(4).hex()}", now)
        invite = new_invite_code()
        await store.create_invite(team.id, "bench@example.test", "admin", hash_secret(invite),
                                  now + 3600, "bench", now)
        secrets = []
        for _ in range(keys):
            secret = new_registration_key()
            await store.create_registration_key(team.id, hash_secret(secret), ["bench"],
                                                now + 3600, "bench", now)
            secrets.append(secret)
    return invite, secrets


def operator_token(url: str, invite: str) -> str:
    """Enroll a fresh operator with the invite and log in; returns the access token."""
    from operator_cli.client import enroll, login

    identity = SigningIdentity.generate()
    with httpx.Client(base_url=url) as http:
        enroll(http, identity, invite)
        return str(login(http, identity)["access_token"])


async def bench_registrations(url: str, secrets: list[str]) -> tuple[float, list[tuple]]:
    """Register one agent per key with bounded concurrency; returns (per second, agents)."""
    agents = [SigningIdentity.generate() for _ in secrets]
    payloads = [
        create_signed_payload(
            agent, Purpose.REGISTER,
            {"registration_key": secret, "public_key": b64url(agent.public.raw),
             "machine_fingerprint": f"bench-machine-{index}", "hostname": f"bench-{index}"},
            time.time(),
        )
        for index, (agent, secret) in enumerate(zip(agents, secrets, strict=True))
    ]
    registered: list[tuple] = []
    limiter = trio.CapacityLimiter(REGISTRATION_CONCURRENCY)
    limits = httpx.Limits(max_connections=REGISTRATION_CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(index: int) -> None:
            async with limiter:
                response = await client.post("/v1/agents/register", json=payloads[index])
            if response.status_code != 200:
                raise RuntimeError(f"registration failed: {response.text}")
            registered.append((agents[index], response.json()["agent_id"], index))

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(len(payloads)):
                nursery.start_soon(one, index)
        elapsed = time.perf_counter() - started
    return len(payloads) / elapsed, registered


def _list_worker(url: str, token: str, seconds: float, queue: Any) -> None:
    async def run() -> int:
        count = 0
        limits = httpx.Limits(max_connections=LIST_CONCURRENCY_PER_WORKER)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            deadline = time.perf_counter() + seconds

            async def loop() -> None:
                nonlocal count
                while time.perf_counter() < deadline:
                    response = await client.get("/v1/agents", headers=headers)
                    if response.status_code != 200:
                        raise RuntimeError(response.text)
                    count += 1

            async with trio.open_nursery() as nursery:
                for _ in range(LIST_CONCURRENCY_PER_WORKER):
                    nursery.start_soon(loop)
        return count

    queue.put(trio.run(run))


def bench_list(url: str, token: str) -> float:
    """Authenticated GET /v1/agents per second from LIST_WORKERS load processes."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_list_worker, args=(url, token, LIST_SECONDS, queue))
               for _ in range(LIST_WORKERS)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    total = sum(queue.get(timeout=LIST_SECONDS + 60) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    return total / (time.perf_counter() - started - 0.0) if total else 0.0


async def hold_channels(url: str, agents: list[tuple], pid: int) -> tuple[int, float, float]:
    """Open one control channel per agent, hold them all, measure server RSS; then close."""
    ws_url = url.replace("http://", "ws://") + "/v1/agents/connect"
    connected = 0
    all_up = trio.Event()
    release = trio.Event()
    before = rss_mib(pid)

    async def agent_channel(identity: SigningIdentity, agent_id: str, index: int) -> None:
        nonlocal connected
        async with open_websocket_url(ws_url) as ws:
            challenge = json.loads(await ws.get_message())
            envelope = create_signed_payload(
                identity, Purpose.AGENT_AUTH,
                {"agent_id": agent_id, "public_key": b64url(identity.public.raw),
                 "challenge": challenge["challenge"], "audience": challenge["audience"],
                 "machine_fingerprint": f"bench-machine-{index}"},
                time.time(),
            )
            await ws.send_message(json.dumps({"type": "auth", "envelope": envelope}))
            welcome = json.loads(await ws.get_message())
            if welcome.get("type") != "welcome":
                raise RuntimeError(f"channel refused: {welcome}")
            connected += 1
            if connected == len(agents):
                all_up.set()
            await release.wait()

    limiter = trio.CapacityLimiter(64)

    async def start_one(item: tuple) -> None:
        async with limiter:
            pass
        await agent_channel(*item)

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for item in agents:
                nursery.start_soon(start_one, item)
            await all_up.wait()
            await trio.sleep(1.0)  # let the server settle before sampling
            during = rss_mib(pid)
            release.set()
    return connected, before, during


def run_backend(name: str, database: str, agents_wanted: int) -> dict[str, Any]:
    """All three benchmarks against one server process on one backend."""
    with tempfile.TemporaryDirectory(prefix=f"bench-rendezvous-{name}-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        invite, secrets = trio.run(seed, database, max(REGISTRATIONS, agents_wanted))
        small_invite, small_secrets = trio.run(seed, database, SMALL_TEAM_AGENTS)
        process, url = start_server(data_dir, database)
        try:
            idle_rss = rss_mib(process.pid)
            cpu = cpu_seconds(process.pid)
            trio.run(bench_registrations, url, small_secrets)
            rate, registered = trio.run(bench_registrations, url, secrets)
            registration_cpu = (cpu_seconds(process.pid) - cpu) / len(registered)
            token = operator_token(url, invite)
            cpu = cpu_seconds(process.pid)
            started = time.perf_counter()
            list_rate = bench_list(url, token)
            elapsed = time.perf_counter() - started
            list_cpu = (cpu_seconds(process.pid) - cpu) / (list_rate * elapsed)
            small_token = operator_token(url, small_invite)
            cpu = cpu_seconds(process.pid)
            started = time.perf_counter()
            small_list_rate = bench_list(url, small_token)
            small_list_cpu = (cpu_seconds(process.pid) - cpu) / (
                small_list_rate * (time.perf_counter() - started)
            )
            connected, before, during = trio.run(
                hold_channels, url, registered[:agents_wanted], process.pid
            )
        finally:
            process.terminate()
            process.wait(timeout=30)
    return {
        "backend": name,
        "registrations_per_second": rate,
        "server_cpu_ms_per_registration": registration_cpu * 1000,
        "list_requests_per_second": list_rate,
        "server_cpu_ms_per_list": list_cpu * 1000,
        "small_team_agents": SMALL_TEAM_AGENTS,
        "small_list_requests_per_second": small_list_rate,
        "server_cpu_ms_per_small_list": small_list_cpu * 1000,
        "agents_listed": len(registered),
        "connected_agents": connected,
        "rss_idle_mib": idle_rss,
        "rss_before_channels_mib": before,
        "rss_with_channels_mib": during,
    }


def main() -> int:
    """Parse arguments, run the chosen backends, print Markdown rows and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--agents", type=int, default=1000, help="control channels to hold")
    args = parser.parse_args()
    results = []
    if args.backend in {"sqlite", "both"}:
        with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
            results.append(run_backend("sqlite", f"sqlite:///{tmp}/rendezvous.db", args.agents))
    if args.backend in {"postgres", "both"}:
        from tests.pg_cluster import PostgresCluster, find_postgres_bin_dir

        bin_dir = find_postgres_bin_dir()
        if bin_dir is None:
            print("postgres: initdb/pg_ctl not found; skipped", file=sys.stderr)
        else:
            cluster = PostgresCluster(bin_dir)
            cluster.start()
            try:
                results.append(run_backend("postgres", cluster.create_database("bench"),
                                           args.agents))
            finally:
                cluster.stop()
    print("| backend | registrations/s (server CPU ms each) | GET /v1/agents/s, 10 agents "
          "(CPU ms) | GET /v1/agents/s, 1,000 agents (CPU ms) | channels held | RSS idle "
          "| RSS with channels |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['registrations_per_second']:.0f} "
              f"({r['server_cpu_ms_per_registration']:.1f}) | "
              f"{r['small_list_requests_per_second']:.0f} "
              f"({r['server_cpu_ms_per_small_list']:.2f}) | "
              f"{r['list_requests_per_second']:.0f} ({r['server_cpu_ms_per_list']:.1f}) | "
              f"{r['connected_agents']} | {r['rss_idle_mib']:.0f} MiB | "
              f"{r['rss_with_channels_mib']:.0f} MiB |")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
