"""Session benchmarks, TucDesk side by side with OpenSSH on the same machine in the same run.

    .venv/bin/python bench/bench_sessions.py [--quick] [--output bench/RESULTS-sessions.md]

Starts a private sshd on a loopback port (bench/ssh_harness.py) and the whole TucDesk stack on
loopback (operator_cli.local_stack: rendezvous on SQLite with TLS, relay, enrolled agent), then
measures each pair with the same driver:

1. Latency of one command: ``tucdesk exec AGENT -- true`` against ``ssh host true`` (wall time
   of the whole client process, connection set-up included).
2. Bulk output without a PTY: ``exec cat FILE`` against ``ssh -T host cat FILE`` on a 200 MB
   file; throughput from the first output byte to the end (set-up reported separately).
3. Bulk output through a PTY: ``cat FILE`` typed into ``tucdesk connect`` against ``ssh -tt``,
   both clients in a local PTY; throughput from the typed command to the end marker.
4. Keystroke echo round trip: one key at a time into ``cat`` on a remote PTY in non-canonical
   mode, waiting for each echo; p50 and p99 over 2,000 keys.
5. The agent daemon's idle resident memory (VmRSS from /proc).

TucDesk runs from this checkout with its bytecode compiled first (``compileall``), as an
installed package has it: pip compiles at install, and a checkout writes ``__pycache__`` on first
use unless ``PYTHONDONTWRITEBYTECODE`` is set. This machine sets it, so without the step every
``tucdesk exec`` would recompile its modules, ~35 ms of its ~0.25 s here.

Every figure is printed and written, with the command line and machine, to the results file.
"""

from __future__ import annotations

import argparse
import base64
import compileall
import os
import platform
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pexpect  # type: ignore[import-untyped]

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from bench.ssh_harness import SshServer, ssh_server  # noqa: E402
from operator_cli.local_stack import LocalStack  # noqa: E402

BULK_FILE_BYTES = 200 * 1000 * 1000
LATENCY_RUNS = 30
KEYSTROKES = 2000
BULK_ROUNDS = 3
KEYSTROKE_LINE = 60  # keys per line before a newline keeps the tty line short
IDLE_SETTLE_SECONDS = 5.0
COMMAND_TIMEOUT_SECONDS = 300.0
PROMPT_TIMEOUT_SECONDS = 30.0
END_MARKER = b"__BENCH_END__"
READY_MARKER = b"__BENCH_READY__"
_CHUNK = 1 << 20
PACKAGES = ("agent", "audit", "operator_cli", "protocol", "relay", "rendezvous")
# The targets: TucDesk against OpenSSH in the same run, or absolute figures.
RATIO_TARGETS = {
    "exec true, median wall": 1.0,
    "bulk exec throughput": 1.0,
    "bulk PTY throughput": 1.0,
}
ABSOLUTE_TARGETS = {"keystroke echo p99": 1.0, "agent daemon idle RSS": 60.0}


@dataclass
class Client:
    """How to reach one remote machine: exec argv, interactive-PTY argv, and environment."""

    name: str
    exec_argv: Callable[[Sequence[str]], list[str]]
    shell_argv: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    # Long-running server-side processes whose CPU a bulk transfer is charged to.
    server_pids: dict[str, int] = field(default_factory=dict)


@dataclass
class Result:
    """One measured figure for both tools."""

    what: str
    unit: str
    ssh: float
    tucdesk: float | None
    better: str  # "lower" or "higher"

    def ratio(self) -> float | None:
        """tucdesk / ssh."""
        if self.tucdesk is None or self.ssh == 0:
            return None
        return self.tucdesk / self.ssh

    def target(self) -> tuple[str, bool | None]:
        """The issue's target for this figure, and whether it was met (None: no target)."""
        ratio = self.ratio()
        if self.what in RATIO_TARGETS:
            limit = RATIO_TARGETS[self.what]
            sign = "≤" if self.better == "lower" else "≥"
            met = (
                None
                if ratio is None
                else (ratio <= limit if self.better == "lower" else ratio >= limit)
            )
            return f"{sign} {limit:.1f}× OpenSSH", met
        if self.what in ABSOLUTE_TARGETS:
            limit = ABSOLUTE_TARGETS[self.what]
            return f"≤ {limit:g} {self.unit}", None if self.tucdesk is None else (
                self.tucdesk <= limit
            )
        return "", None


# ---- measurements ------------------------------------------------------------------------


def exec_latency(client: Client, runs: int, warm_up: bool = True) -> list[float]:
    """Wall seconds of ``client true``, ``runs`` times (after one warm-up run if asked)."""
    argv = client.exec_argv(["true"])
    times = []
    for attempt in range(runs + 1 if warm_up else runs):
        start = time.perf_counter()
        result = subprocess.run(
            argv, env=client.env, stdin=subprocess.DEVNULL, capture_output=True,
            timeout=COMMAND_TIMEOUT_SECONDS, check=False,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{client.name} true exited {result.returncode}: {result.stderr!r}")
        if attempt or not warm_up:
            times.append(elapsed)
    return times


def bulk_exec(client: Client, path: Path) -> tuple[float, float, int]:
    """``cat path`` without a PTY: (seconds to first byte, seconds first byte→EOF, bytes)."""
    argv = client.exec_argv(["cat", str(path)])
    start = time.perf_counter()
    process = subprocess.Popen(
        argv, env=client.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    first = None
    total = 0
    deadline = start + COMMAND_TIMEOUT_SECONDS
    fd = process.stdout.fileno()
    while True:
        data = os.read(fd, _CHUNK)
        if not data:
            break
        if first is None:
            first = time.perf_counter()
        total += len(data)
        if time.perf_counter() > deadline:
            process.kill()
            raise RuntimeError(f"{client.name} cat did not finish in time")
    end = time.perf_counter()
    returncode = process.wait(timeout=COMMAND_TIMEOUT_SECONDS)
    stderr = process.stderr.read() if process.stderr else b""
    if returncode != 0 or first is None:
        raise RuntimeError(f"{client.name} cat exited {returncode}: {stderr[-500:]!r}")
    return first - start, end - first, total


class PtyClient:
    """An interactive client (``ssh -tt`` or ``tucdesk connect``) in a local PTY, read raw."""

    def __init__(self, client: Client) -> None:
        self.child = pexpect.spawn(
            client.shell_argv[0], client.shell_argv[1:], env=client.env,
            dimensions=(50, 200), echo=False,
        )  # fmt: skip
        self.fd: int = self.child.child_fd
        self.name = client.name
        # A marker that the typed command line (echoed back) does not contain literally.
        self.run(b"stty -echo; echo __BENCH_REA''DY__")
        self.read_until(READY_MARKER, PROMPT_TIMEOUT_SECONDS)

    def run(self, command: bytes) -> None:
        """Type one command line."""
        os.write(self.fd, command + b"\r")

    def read_until(self, marker: bytes, timeout: float) -> int:
        """Read until ``marker`` appears; return the bytes read (marker included)."""
        deadline = time.perf_counter() + timeout
        tail = b""
        total = 0
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise RuntimeError(f"{self.name}: {marker!r} did not arrive; last: {tail!r}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            data = os.read(self.fd, _CHUNK)
            if not data:
                raise RuntimeError(f"{self.name}: the session ended before {marker!r}")
            total += len(data)
            tail = (tail + data)[-(len(marker) + 64) :]
            if marker in tail:
                return total

    def read_exactly(self, expected: bytes, timeout: float) -> None:
        """Read exactly ``expected`` and nothing else; RuntimeError on anything different."""
        deadline = time.perf_counter() + timeout
        received = b""
        while len(received) < len(expected):
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise RuntimeError(f"{self.name}: {expected!r} did not arrive; got {received!r}")
            received += os.read(self.fd, len(expected) - len(received))
            if not expected.startswith(received):
                raise RuntimeError(f"{self.name}: expected {expected!r}, got {received!r}")

    def close(self) -> None:
        """Leave the shell and stop the client."""
        try:
            os.write(self.fd, b"\x03\rexit\r")
            self.child.expect(pexpect.EOF, timeout=10)
        except (OSError, pexpect.ExceptionPexpect):
            pass
        self.child.close(force=True)


def bulk_pty(client: Client, path: Path) -> tuple[float, int]:
    """``cat path`` typed into an interactive PTY session: (seconds, bytes read)."""
    session = PtyClient(client)
    try:
        start = time.perf_counter()
        session.run(f"cat {path}; echo __BENCH_E''ND__".encode())
        total = session.read_until(END_MARKER, COMMAND_TIMEOUT_SECONDS)
        return time.perf_counter() - start, total
    finally:
        session.close()


def keystroke_echo(client: Client, keys: int) -> list[float]:
    """Seconds from writing one key to reading its echo, for ``keys`` keys."""
    session = echoing_session(client)
    try:
        return type_keys(session, keys)
    finally:
        session.close()


def echoing_session(client: Client) -> PtyClient:
    """A remote ``cat`` in non-canonical mode, which echoes each key itself (like an editor or
    readline would), with every byte before the first key already read."""
    session = PtyClient(client)
    try:
        session.run(b"stty -echo -icanon min 1 time 0; echo __BENCH_REA''DY__; cat")
        session.read_until(READY_MARKER, PROMPT_TIMEOUT_SECONDS)
        # Type a unique string and wait for exactly its echo: from then on the output is
        # nothing but the echo of each key, so no stale byte can pass for one.
        sync = b"sync%dx" % time.time_ns()
        os.write(session.fd, sync)
        session.read_until(sync, PROMPT_TIMEOUT_SECONDS)
    except BaseException:
        session.close()
        raise
    return session


def type_keys(session: PtyClient, keys: int) -> list[float]:
    """Type ``keys`` keys one at a time into an ``echoing_session``: each one's echo time."""
    samples = []
    for index in range(keys):
        key = b"abcdefghijklmnopqrstuvwxyz"[index % 26 : index % 26 + 1]
        if index and index % KEYSTROKE_LINE == 0:
            os.write(session.fd, b"\r")
            session.read_exactly(b"\r\n", PROMPT_TIMEOUT_SECONDS)
        start = time.perf_counter()
        os.write(session.fd, key)
        session.read_exactly(key, PROMPT_TIMEOUT_SECONDS)
        samples.append(time.perf_counter() - start)
    return samples


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and of its children it has reaped, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU of this process's reaped children (the clients we ran)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bulk_cpu(client: Client, path: Path) -> dict[str, float]:
    """CPU seconds each process spends on one bulk ``exec cat``: the client and the servers."""
    before = {name: process_cpu_seconds(pid) for name, pid in client.server_pids.items()}
    client_before = children_cpu_seconds()
    bulk_exec(client, path)
    time.sleep(0.5)  # a benchmark: let the servers reap the session's processes
    spent = {"client": children_cpu_seconds() - client_before}
    for name, pid in client.server_pids.items():
        spent[name] = process_cpu_seconds(pid) - before[name]
    return spent


def resident_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[index]


def make_bulk_file(directory: Path, size: int) -> Path:
    """A text file of ``size`` bytes: base64 lines of random data (incompressible, printable)."""
    path = directory / "bulk.txt"
    line_bytes = 57  # 57 raw bytes -> 76 base64 characters + newline
    block = base64.encodebytes(os.urandom(line_bytes * 13_000))  # ~1 MB of lines
    with path.open("wb") as handle:
        written = 0
        while written < size:
            piece = block[: size - written]
            handle.write(piece)
            written += len(piece)
    return path


# ---- the two clients ---------------------------------------------------------------------


def ssh_client(server: SshServer) -> Client:
    """OpenSSH: ``ssh -T host CMD`` for exec, ``ssh -tt host`` for the interactive shell."""
    env = dict(os.environ, TERM="xterm", HOME=str(server.directory))
    return Client(
        "ssh",
        exec_argv=lambda command: [*server.ssh_argv("-T"), *command],
        shell_argv=server.ssh_argv("-tt"),
        env=env,
        server_pids={"sshd (session processes and cat)": server.process.pid},
    )


# ---- report ------------------------------------------------------------------------------


def format_table(results: Sequence[Result]) -> str:
    """A markdown table of the results."""
    lines = [
        "| measurement | OpenSSH | TucDesk | TucDesk / OpenSSH | better | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        ratio = result.ratio()
        tucdesk = "—" if result.tucdesk is None else f"{result.tucdesk:.3f} {result.unit}"
        target, met = result.target()
        verdict = "" if met is None else ("yes" if met else "**no**")
        lines.append(
            f"| {result.what} | {result.ssh:.3f} {result.unit} | {tucdesk} | "
            f"{'—' if ratio is None else f'{ratio:.2f}×'} | {result.better} | {target} | "
            f"{verdict} |"
        )
    return "\n".join(lines)


def format_cpu(bulk: Path, spent: dict[str, dict[str, float]]) -> str:
    """A markdown table: CPU seconds per process for one bulk exec, per tool."""
    size = bulk.stat().st_size / 1e6
    lines = [
        f"CPU seconds spent on one `exec cat` of the {size:.0f} MB file, per process:",
        "",
        "| tool | process | CPU s | MB per CPU s |",
        "|---|---|---|---|",
    ]
    for tool, processes in spent.items():
        for name, seconds in processes.items():
            rate = f"{size / seconds:.0f}" if seconds > 0 else "—"
            lines.append(f"| {tool} | {name} | {seconds:.2f} | {rate} |")
    return "\n".join(lines)


def machine_description() -> str:
    """CPU count, model and Python version."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ssh_version = subprocess.run(
        ["ssh", "-V"], capture_output=True, text=True, check=False
    ).stderr.strip()
    return (
        f"{os.cpu_count()} vCPU ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {ssh_version}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--output", type=Path, default=None, help="write the results here")
    parser.add_argument("--ssh-only", action="store_true", help="measure OpenSSH alone")
    parser.add_argument("--rounds", type=int, default=BULK_ROUNDS, help="bulk/keystroke rounds")
    args = parser.parse_args(argv)
    bulk_bytes = 20_000_000 if args.quick else BULK_FILE_BYTES
    runs = 5 if args.quick else LATENCY_RUNS
    keys = 200 if args.quick else KEYSTROKES

    if not args.ssh_only:
        compile_bytecode()
    work = Path(tempfile.mkdtemp(prefix="tucdesk-bench-sessions-"))
    try:
        bulk = make_bulk_file(work, bulk_bytes)
        with ssh_server() as server, ExitStack() as stacks:
            clients = [ssh_client(server)]
            if not args.ssh_only:
                clients.append(stacks.enter_context(tucdesk_stack(work)))
            results = measure(clients, bulk, runs, keys, args.rounds)
            breakdown = format_cpu(
                bulk, {client.name: bulk_cpu(client, bulk) for client in clients}
            )
            if not args.ssh_only:
                results.append(idle_memory(clients[1], server.process.pid))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = format_table(results) + "\n\n" + breakdown
    print(table)
    if args.output is not None:
        write_results(args.output, table, bulk_bytes, runs, keys, args.rounds, argv)
    return 0


def compile_bytecode() -> None:
    """Compile this checkout's modules to bytecode, as installing the package would."""
    for package in PACKAGES:
        if not compileall.compile_dir(REPOSITORY / package, quiet=1):
            raise RuntimeError(f"compiling {package} failed")
    print(f"  bytecode compiled for {', '.join(PACKAGES)}", flush=True)


def measure(
    clients: Sequence[Client], bulk: Path, runs: int, keys: int, rounds: int
) -> list[Result]:
    """Every paired measurement for ssh (clients[0]) and tucdesk (clients[1], if present).

    The two tools take turns (run by run, round by round), so a load that comes and goes on
    the machine falls on both alike; bulk figures are the median over ``rounds``.
    """
    samples: dict[str, dict[str, list[float]]] = {}

    def add(name: str, client: Client, values: Sequence[float]) -> None:
        samples.setdefault(name, {}).setdefault(client.name, []).extend(values)

    for client in clients:
        exec_latency(client, 1)  # warm up: page cache, pinning, sshd's first fork
    for _ in range(runs):
        for client in clients:
            add("exec", client, exec_latency(client, 1, warm_up=False))
    size = bulk.stat().st_size
    for round_number in range(rounds):
        for client in clients:
            setup, seconds, received = bulk_exec(client, bulk)
            if received != size:
                raise RuntimeError(f"{client.name}: cat gave {received} bytes, not {size}")
            add("first byte", client, [setup])
            add("bulk exec", client, [size / seconds / 1e6])
            seconds, _ = bulk_pty(client, bulk)
            add("bulk pty", client, [size / seconds / 1e6])
            share = keys // rounds + (1 if round_number < keys % rounds else 0)
            echoes = keystroke_echo(client, share)
            add("keys", client, echoes)
            # Per round too: a tail from one burst of slow keys shows up in one round only.
            print(f"  round {round_number + 1}/{rounds} {client.name} done; keystroke echo p50 "
                  f"{statistics.median(echoes) * 1000:.3f} ms, p99 "
                  f"{percentile(echoes, 0.99) * 1000:.3f} ms", flush=True)

    def figure(name: str, summary: Callable[[list[float]], float]) -> list[float | None]:
        by_client = samples[name]
        return [summary(by_client[c.name]) if c.name in by_client else None for c in clients]

    table = [
        ("exec true, median wall", "s", "lower", figure("exec", statistics.median)),
        ("exec true, p90 wall", "s", "lower", figure("exec", lambda v: percentile(v, 0.9))),
        ("bulk exec, time to first byte", "s", "lower", figure("first byte", statistics.median)),
        ("bulk exec throughput", "MB/s", "higher", figure("bulk exec", statistics.median)),
        ("bulk PTY throughput", "MB/s", "higher", figure("bulk pty", statistics.median)),
        ("keystroke echo p50", "ms", "lower",
         figure("keys", lambda v: statistics.median(v) * 1000)),
        ("keystroke echo p99", "ms", "lower",
         figure("keys", lambda v: percentile(v, 0.99) * 1000)),
    ]  # fmt: skip
    results = []
    for what, unit, better, values in table:
        tucdesk = values[1] if len(values) > 1 else None
        results.append(Result(what, unit, float(values[0] or 0.0), tucdesk, better))
        print(f"  {what}: ssh {values[0]:.4f} tucdesk {tucdesk or 0:.4f} {unit}", flush=True)
    return results


def idle_memory(client: Client, sshd_pid: int) -> Result:
    """The agent daemon's resident memory after it has been idle for a while; OpenSSH's column
    is the idle sshd listener, the nearest thing it has to a resident agent."""
    pid = int(client.env["TUCDESK_BENCH_AGENT_PID"])
    time.sleep(IDLE_SETTLE_SECONDS)  # a benchmark, not a test: let the daemon settle on purpose
    rss = resident_mib(pid)
    print(f"  agent idle RSS: {rss:.1f} MiB", flush=True)
    return Result("agent daemon idle RSS", "MiB", resident_mib(sshd_pid), rss, "lower")


@contextmanager
def tucdesk_stack(work: Path) -> Iterator[Client]:
    """The local TucDesk stack (SQLite, TLS, relay, agent) and the Client that drives it."""
    with LocalStack(work / "stack", progress=lambda message: print(f"  {message}")) as stack:
        stack.start()
        env = dict(stack.cli_env(), TERM="xterm")
        env["TUCDESK_BENCH_AGENT_PID"] = str(stack.processes["agent"].pid)
        agent = stack.agent_name
        # Pin the agent's key once, so every measured run is an ordinary, pinned connection.
        stack.run_tucdesk("exec", agent, "--", "true")
        yield Client(
            "tucdesk",
            exec_argv=lambda command: stack.tucdesk_command("exec", agent, "--", *command),
            shell_argv=stack.tucdesk_command("connect", agent),
            env=env,
            server_pids={
                "relay": stack.processes["relay"].pid,
                "agent (and cat)": stack.processes["agent"].pid,
                "rendezvous": stack.processes["rendezvous"].pid,
            },
        )


def write_results(
    path: Path,
    table: str,
    bulk_bytes: int,
    runs: int,
    keys: int,
    rounds: int,
    argv: list[str] | None,
) -> None:
    """Write the results file: how it was run, on what, and the table."""
    command = " ".join(["python", "bench/bench_sessions.py", *(argv or sys.argv[1:])])
    path.write_text(
        "# Session benchmarks: TucDesk against OpenSSH\n\n"
        f"Run: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).\n\n"
        f"Machine: {machine_description()}.\n\n"
        f"Bulk file {bulk_bytes / 1e6:.0f} MB ({rounds} rounds each, median), {runs} exec runs "
        f"per tool (alternating), {keys} keystrokes per tool.\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
