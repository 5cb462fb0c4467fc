"""A/B of the keystroke path: CPU, system calls and wake-ups per key in the CLI, relay and agent.

    .venv/bin/python bench/bench_keystroke_ab.py before=/tmp/before after=. [--rounds 6]
        [--keys 800] [--pty-mb 60]

Each NAME=TREE starts its own local stack (operator_cli.local_stack: rendezvous, relay, agent)
with PYTHONPATH=TREE, and the trees take turns round by round, so a load that comes and goes
falls on all of them alike. A round types KEYS keys one at a time into ``cat`` on a remote PTY
(as bench_sessions.py does) with ``perf stat -p`` on the CLI, the relay and the agent for
exactly those keys; with --pty-mb, a PTY ``cat`` of that many MB follows, counted the same way.
Latency percentiles on a shared machine swing with its load; CPU per key (task-clock), system
calls, epoll_wait and epoll_ctl per key are the figures to compare, and the relay (the same
code in every tree, unless a tree changes it) shows how fast the machine ran in each round.

Make a "before" tree with ``git archive REV | tar -x -C /tmp/before``. The script runs from a
temporary directory: ``python -m operator_cli.main`` puts the current directory first on
sys.path, so started from the checkout every CLI would be the checkout's, whatever PYTHONPATH
says. Needs ``perf`` (linux-perf) and permission to attach it to the three processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from bench.bench_sessions import (  # noqa: E402
    COMMAND_TIMEOUT_SECONDS,
    END_MARKER,
    Client,
    PtyClient,
    echoing_session,
    make_bulk_file,
    percentile,
    type_keys,
)
from operator_cli.local_stack import LocalStack  # noqa: E402

EVENTS = {
    "task-clock": "cpu",
    "raw_syscalls:sys_enter": "syscalls",
    "syscalls:sys_enter_epoll_wait": "epoll_wait",
    "syscalls:sys_enter_epoll_ctl": "epoll_ctl",
    "context-switches": "switches",
}
PROCESSES = ("cli", "relay", "agent")
PERF_SETTLE_SECONDS = 0.5  # perf attaches asynchronously: wait before the measured work
Counts = dict[str, dict[str, float]]  # process -> figure -> total over the measured work


class TreeStack:
    """One tree's local stack, and the Client that drives ``tucdesk`` against it."""

    def __init__(self, name: str, tree: Path, work: Path, stacks: ExitStack) -> None:
        self.name = name
        self.stack = stacks.enter_context(
            LocalStack(work / name, extra_env={"PYTHONPATH": str(tree)})
        )
        self.stack.start()
        agent = self.stack.agent_name
        self.stack.run_tucdesk("exec", agent, "--", "true")  # pin the agent's key once
        self.client = Client(
            name,
            exec_argv=lambda command: self.stack.tucdesk_command("exec", agent, "--", *command),
            shell_argv=self.stack.tucdesk_command("connect", agent),
            env=dict(self.stack.cli_env(), TERM="xterm"),
            server_pids={},
        )
        self.pids = {
            "relay": self.stack.processes["relay"].pid,
            "agent": self.stack.processes["agent"].pid,
        }


def start_perf(pids: dict[str, int]) -> dict[str, subprocess.Popen[str]]:
    """Start ``perf stat`` on each process; stop them with ``stop_perf``."""
    events = ",".join(EVENTS)
    started = {
        process: subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", events, "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for process, pid in pids.items()
    }  # fmt: skip
    time.sleep(PERF_SETTLE_SECONDS)
    return started


def stop_perf(started: dict[str, subprocess.Popen[str]]) -> Counts:
    """Each process's figures since ``start_perf`` (task-clock in ms)."""
    counts: Counts = {}
    for process, perf in started.items():
        perf.send_signal(signal.SIGINT)
        _, report = perf.communicate(timeout=10)
        figures: dict[str, float] = {}
        for line in report.splitlines():
            fields = line.split(",")
            if len(fields) > 3 and fields[2] in EVENTS:
                try:
                    figures[EVENTS[fields[2]]] = float(fields[0])
                except ValueError:
                    continue  # "<not counted>"
        counts[process] = figures
    return counts


def keys_round(tree: TreeStack, keys: int) -> tuple[list[float], Counts]:
    """Echo latencies of ``keys`` keys, and the three processes' counts over exactly them."""
    session = echoing_session(tree.client)
    try:
        started = start_perf({"cli": session.child.pid, **tree.pids})
        samples = type_keys(session, keys)
        return samples, stop_perf(started)
    finally:
        session.close()


def pty_round(tree: TreeStack, path: Path) -> tuple[float, Counts]:
    """MB/s of a PTY ``cat`` of ``path``, and the counts over it (per MB)."""
    session = PtyClient(tree.client)
    try:
        started = start_perf({"cli": session.child.pid, **tree.pids})
        start = time.perf_counter()
        session.run(f"cat {path}; echo __BENCH_E''ND__".encode())
        total = session.read_until(END_MARKER, COMMAND_TIMEOUT_SECONDS)
        seconds = time.perf_counter() - start
        counts = stop_perf(started)
    finally:
        session.close()
    megabytes = total / 1e6
    per_mb = {p: {k: v / megabytes for k, v in c.items()} for p, c in counts.items()}
    return megabytes / seconds, per_mb


def describe(counts: list[Counts], unit: float, cpu_scale: float, cpu_unit: str) -> str:
    """Median over rounds of each process's figures, divided by ``unit`` (keys or 1)."""
    parts = []
    for process in PROCESSES:

        def median(figure: str, process: str = process) -> float:
            return statistics.median(c[process].get(figure, 0.0) / unit for c in counts)

        parts.append(
            f"{process} {median('cpu') * cpu_scale:.{2 if cpu_unit == 'ms' else 0}f}{cpu_unit} "
            f"sc {median('syscalls'):.2f} ew {median('epoll_wait'):.2f} "
            f"ec {median('epoll_ctl'):.2f} cs {median('switches'):.2f}"
        )
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", metavar="NAME=TREE", help="a tree to run, named")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per tree (default 6)")
    parser.add_argument("--keys", type=int, default=800, help="keys per round (default 800)")
    parser.add_argument("--pty-mb", type=int, default=0, help="also a PTY cat of this many MB")
    args = parser.parse_args(argv)
    if shutil.which("perf") is None:
        parser.error("needs perf (apt-get install linux-perf)")
    trees = []
    for spec in args.trees:
        name, _, tree = spec.partition("=")
        if not name or not tree or not (Path(tree) / "operator_cli").is_dir():
            parser.error(f"{spec!r}: give NAME=TREE, TREE a source tree of this project")
        trees.append((name, Path(tree).resolve()))
    work = Path(tempfile.mkdtemp(prefix="tucdesk-keystroke-ab-"))
    os.chdir(work)  # not the checkout: see the module docstring
    try:
        with ExitStack() as stacks:
            stacks_ = [TreeStack(name, tree, work, stacks) for name, tree in trees]
            bulk = make_bulk_file(work, args.pty_mb * 1_000_000) if args.pty_mb else None
            latencies: dict[str, list[float]] = {s.name: [] for s in stacks_}
            key_counts: dict[str, list[Counts]] = {s.name: [] for s in stacks_}
            pty: dict[str, list[tuple[float, Counts]]] = {s.name: [] for s in stacks_}
            for round_number in range(args.rounds):
                for tree in stacks_ if round_number % 2 == 0 else stacks_[::-1]:
                    samples, counts = keys_round(tree, args.keys)
                    latencies[tree.name] += samples
                    key_counts[tree.name].append(counts)
                    print(f"round {round_number + 1} {tree.name}: p50 "
                          f"{statistics.median(samples) * 1e3:.3f} p99 "
                          f"{percentile(samples, 0.99) * 1e3:.3f} ms | "
                          f"{describe([counts], args.keys, 1e3, 'us')}", flush=True)
                    if bulk is not None:
                        pty[tree.name].append(pty_round(tree, bulk))
            print("summary, medians over rounds (CPU and counts per key):")
            for tree in stacks_:
                samples = latencies[tree.name]
                p50, p99 = statistics.median(samples), percentile(samples, 0.99)
                print(f"{tree.name}: {len(samples)} keys, p50 {p50 * 1e3:.3f}"
                      f" p99 {p99 * 1e3:.3f} ms | "
                      f"{describe(key_counts[tree.name], args.keys, 1e3, 'us')}")
                if pty[tree.name]:
                    rate = statistics.median(r for r, _ in pty[tree.name])
                    print(f"  PTY cat: {rate:.1f} MB/s | per MB: "
                          f"{describe([c for _, c in pty[tree.name]], 1, 1, 'ms')}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
