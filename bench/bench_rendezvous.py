"""Rendezvous benchmarks: registrations/s, authenticated agent lists/s, 1,000 control channels.

The service runs as its own process (`tucdesk-rendezvous serve`, plain HTTP on loopback). The
HTTP load comes from raw-socket HTTP/1.1 keep-alive clients (prepared request bytes, a selector
over many connections, responses framed by Content-Length) so that the load generator, which
shares the machine's cores with the server, costs a small fraction of what it measures: its own
CPU per request is reported next to the server's. Registrations are driven from this process;
the list benchmark from LIST_WORKERS worker processes; control channels use trio-websocket.
Run on SQLite and on a throwaway PostgreSQL cluster:

    .venv/bin/python bench/bench_rendezvous.py [--backend sqlite|postgres|both] [--agents 1000]

On PostgreSQL the service is measured once per ``--postgres-workers`` value (default: 1, then
2 processes on one address; SQLite always runs one). Server CPU and RSS are summed over the
service's whole process tree.

Targets (issue 4): >= 200 registrations/s, >= 1,000 list requests/s, <= 300 MiB RSS with 1,000
connected agents. Results go to stdout as Markdown rows for bench/RESULTS-rendezvous.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
LIST_WORKERS = 1
LIST_CONNECTIONS_PER_WORKER = 8
MAX_RESPONSE_HEAD = 16 * 1024
START_TIMEOUT = 30
SMALL_TEAM_AGENTS = 10
# The list is paged (500 agents by default); ask for the largest page, so the 1,000-agent team
# still comes back whole in one answer, as before paging.
LIST_PATH = "/v1/agents?limit=1000"


def start_server(data_dir: Path, database: str,
                 workers: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    """Init the data dir and start `serve [--workers N]` on an ephemeral loopback port."""
    store = ["--data-dir", str(data_dir), "--database", database]
    subprocess.run([str(BIN / "tucdesk-rendezvous"), "init", *store], check=True,
                   capture_output=True)
    log = data_dir / "serve.log"
    handle = log.open("w")
    # Every simulated agent registers from this one address: lift the per-address limit on
    # unauthenticated requests, which would otherwise (rightly) throttle it.
    environment = {**os.environ, "TUCDESK_ACCESS_TOKEN_SECONDS": "900",
                   "TUCDESK_HEARTBEAT_TIMEOUT_SECONDS": "600",
                   "TUCDESK_AUTH_RATE_LIMIT": "1000000", "TUCDESK_AUTH_RATE_BURST": "1000000"}
    process = subprocess.Popen(
        [str(BIN / "tucdesk-rendezvous"), "serve", *store, "--listen", "127.0.0.1:0",
         "--insecure-http", "--workers", str(workers)],
        stdout=handle, stderr=subprocess.STDOUT, env=environment,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        urls = re.findall(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if len(urls) >= workers:  # every worker logs its own line
            return process, urls[0]
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{log.read_text()}")
        time.sleep(0.05)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the workers of `serve --workers N`)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids.extend(process_tree(int(child)))
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its descendants have used so far."""
    total = 0
    for member in process_tree(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident set size of a process and its descendants, summed, in MiB."""
    total = 0
    for member in process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


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


class RawHttpLoad:
    """HTTP/1.1 keep-alive requests over raw sockets, many connections, one selector.

    ``next_request(slot)`` gives the bytes of a connection's next request (None: that connection
    is done); ``on_response(slot, status, body)`` sees each answer. Responses must carry
    Content-Length (the service's all do). A connection the server closes (Hypercorn recycles one
    after ``keep_alive_max_requests``) is reopened and its unanswered request sent again.
    """

    def __init__(self, url: str, connections: int) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.connections = connections
        self.reconnects = 0

    def run(
        self,
        next_request: Callable[[int], bytes | None],
        on_response: Callable[[int, int, bytes], None],
        deadline: float | None = None,
    ) -> None:
        """Drive every connection until it runs out of requests (or ``deadline`` passes)."""
        selector = selectors.DefaultSelector()
        pending: dict[socket.socket, tuple[int, bytes]] = {}
        buffers: dict[socket.socket, bytes] = {}

        def open_with(slot: int, request: bytes) -> None:
            sock = socket.create_connection(self.address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)
            sock.setblocking(False)
            pending[sock] = (slot, request)
            buffers[sock] = b""
            selector.register(sock, selectors.EVENT_READ)

        def close(sock: socket.socket) -> None:
            selector.unregister(sock)
            sock.close()
            del pending[sock], buffers[sock]

        for slot in range(self.connections):
            first = next_request(slot)
            if first is not None:
                open_with(slot, first)
        while pending and (deadline is None or time.perf_counter() < deadline):
            for key, _ in selector.select(timeout=1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                slot, request = pending[sock]
                data = sock.recv(1 << 20)
                if not data:
                    close(sock)
                    self.reconnects += 1
                    open_with(slot, request)
                    continue
                buffer = buffers[sock] + data
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_RESPONSE_HEAD:
                        raise RuntimeError("response head too large")
                    buffers[sock] = buffer
                    continue
                status, length, closing = _parse_head(buffer[:end])
                if len(buffer) < end + 4 + length:
                    buffers[sock] = buffer
                    continue
                if len(buffer) > end + 4 + length:
                    raise RuntimeError("the server answered more than was asked")
                on_response(slot, status, buffer[end + 4 : end + 4 + length])
                following = next_request(slot)
                if following is None:
                    close(sock)
                elif closing:
                    close(sock)
                    self.reconnects += 1
                    open_with(slot, following)
                else:
                    buffers[sock] = b""
                    pending[sock] = (slot, following)
                    sock.sendall(following)
        for sock in list(pending):
            close(sock)
        selector.close()


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    closing = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            closing = True
    return status, length, closing


def http_request(url: str, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """The bytes of one HTTP/1.1 request to ``url``'s host."""
    host = urlsplit(url).netloc
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method != "GET":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def bench_registrations(url: str, secrets: list[str]) -> tuple[float, list[tuple]]:
    """Register one agent per key, REGISTRATION_CONCURRENCY at a time; (per second, agents)."""
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
    requests = [
        http_request(url, "POST", "/v1/agents/register",
                     {"Content-Type": "application/json"}, json.dumps(payload).encode())
        for payload in payloads
    ]
    queue = list(range(len(requests)))[::-1]
    in_flight: dict[int, int] = {}
    registered: list[tuple] = []

    def next_request(slot: int) -> bytes | None:
        if not queue:
            return None
        index = queue.pop()
        in_flight[slot] = index
        return requests[index]

    def on_response(slot: int, status: int, body: bytes) -> None:
        if status != 200:
            raise RuntimeError(f"registration failed ({status}): {body[:300]!r}")
        index = in_flight.pop(slot)
        registered.append((agents[index], json.loads(body)["agent_id"], index))

    load = RawHttpLoad(url, min(REGISTRATION_CONCURRENCY, len(requests)))
    started = time.perf_counter()
    load.run(next_request, on_response)
    elapsed = time.perf_counter() - started
    return len(payloads) / elapsed, registered


def _list_worker(url: str, token: str, seconds: float, connections: int, queue: Any) -> None:
    request = http_request(url, "GET", LIST_PATH, {"Authorization": f"Bearer {token}"}, b"")
    answered = 0
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds

    def next_request(slot: int) -> bytes | None:
        return request if time.perf_counter() < deadline else None

    def on_response(slot: int, status: int, body: bytes) -> None:
        nonlocal answered
        if status != 200:
            raise RuntimeError(f"list failed ({status}): {body[:300]!r}")
        answered += 1

    RawHttpLoad(url, connections).run(next_request, on_response, deadline + 30)
    queue.put((answered, time.process_time() - cpu))


def bench_list(url: str, token: str, workers: int = LIST_WORKERS,
               connections: int = LIST_CONNECTIONS_PER_WORKER) -> tuple[float, float]:
    """Authenticated GET /v1/agents per second from ``workers`` load processes.

    Returns (requests per second, load-generator CPU ms per request).
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_list_worker, args=(url, token, LIST_SECONDS, connections, queue))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=LIST_SECONDS + 90) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    total = sum(answered for answered, _ in results)
    load_cpu = sum(cpu for _, cpu in results)
    return total / LIST_SECONDS, (load_cpu / total * 1000 if total else float("nan"))


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


def run_backend(name: str, database: str, agents_wanted: int, workers: int = 1) -> dict[str, Any]:
    """All three benchmarks against one service (``workers`` processes) on one backend."""
    with tempfile.TemporaryDirectory(prefix=f"bench-rendezvous-{name}-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        invite, secrets = trio.run(seed, database, max(REGISTRATIONS, agents_wanted))
        small_invite, small_secrets = trio.run(seed, database, SMALL_TEAM_AGENTS)
        process, url = start_server(data_dir, database, workers)
        try:
            idle_rss = rss_mib(process.pid)
            bench_registrations(url, small_secrets)  # warm-up, and the small team's agents
            cpu = cpu_seconds(process.pid)
            rate, registered = bench_registrations(url, secrets)
            registration_cpu = (cpu_seconds(process.pid) - cpu) / len(registered)
            token = operator_token(url, invite)
            cpu = cpu_seconds(process.pid)
            list_rate, list_load_cpu = bench_list(url, token)
            list_cpu = (cpu_seconds(process.pid) - cpu) / (list_rate * LIST_SECONDS)
            small_token = operator_token(url, small_invite)
            cpu = cpu_seconds(process.pid)
            small_list_rate, small_load_cpu = bench_list(url, small_token)
            small_list_cpu = (cpu_seconds(process.pid) - cpu) / (small_list_rate * LIST_SECONDS)
            connected, before, during = trio.run(
                hold_channels, url, registered[:agents_wanted], process.pid
            )
        finally:
            process.terminate()
            process.wait(timeout=30)
    return {
        "backend": name,
        "workers": workers,
        "registrations_per_second": rate,
        "server_cpu_ms_per_registration": registration_cpu * 1000,
        "list_requests_per_second": list_rate,
        "server_cpu_ms_per_list": list_cpu * 1000,
        "small_team_agents": SMALL_TEAM_AGENTS,
        "small_list_requests_per_second": small_list_rate,
        "server_cpu_ms_per_small_list": small_list_cpu * 1000,
        "load_generator_cpu_ms_per_small_list": small_load_cpu,
        "load_generator_cpu_ms_per_list": list_load_cpu,
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
    parser.add_argument(
        "--postgres-workers", type=int, nargs="+", default=[1, 2], metavar="N",
        help="serve --workers values to measure on PostgreSQL, one full run each (default 1 2)",
    )
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
                for workers in args.postgres_workers:
                    results.append(run_backend("postgres",
                                               cluster.create_database(f"bench_w{workers}"),
                                               args.agents, workers))
            finally:
                cluster.stop()
    print("| backend | workers | registrations/s (server CPU ms each) | GET /v1/agents/s, "
          "10 agents (CPU ms) | GET /v1/agents/s, 1,000 agents (CPU ms) | channels held | RSS idle "
          "| RSS with channels |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['workers']} | {r['registrations_per_second']:.0f} "
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
