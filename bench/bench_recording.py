"""What session recording costs the agent: CPU seconds per MiB of PTY output, off against on.

    .venv/bin/python bench/bench_recording.py [--mib 20] [--rounds 3] [--baseline-tree DIR]

Starts the whole TucDesk stack on loopback (operator_cli.local_stack), then, in alternation,
restarts the agent daemon with recording off and on (TUCDESK_AGENT_RECORD_SESSIONS) and types
``cat FILE`` into ``tucdesk connect`` in a local PTY, as bench/bench_sessions.py does. The figure
is the agent process's own CPU (utime + stime of all its threads, from /proc, not its children
``cat`` and the shell), so it holds up on a loaded machine where wall-clock throughput does not.
Also times the recorder alone (agent/recording.py) on PTY-sized chunks, in this process. With
``--baseline-tree`` (e.g. ``git archive HEAD | tar -x -C DIR``), an agent run from that tree
takes its turn too, to show that recording off costs nothing against code without recordings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.recording import SessionRecorder  # noqa: E402
from bench.bench_sessions import Client, bulk_pty, make_bulk_file  # noqa: E402
from operator_cli.local_stack import LocalStack  # noqa: E402

MIB = 1024 * 1024
PTY_READ_BYTES = 4095


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` itself (every thread, no children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settled_cpu_seconds(pid: int, quiet: float = 0.1, limit: float = 10.0) -> float:
    """``pid``'s CPU seconds once it has spent none for ``quiet`` seconds: the session has ended
    and its recording is closed (the writer thread's last chunk counts); at most ``limit`` s."""
    deadline = time.monotonic() + limit
    spent = own_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = own_cpu_seconds(pid)
        if now == spent:
            return now
        spent = now
    raise RuntimeError(f"agent {pid} still busy {limit} s after the session")


def recorder_alone(directory: Path, mib: int) -> float:
    """CPU seconds per MiB for SessionRecorder.output on 16 KiB chunks of terminal text."""
    line = "drwxr-xr-x 2 root root 4096 Nov 26 18:00 caf\u00e9 \x1b[01;34mdir\x1b[0m\r\n"
    chunk = (line * 400).encode()[: 4 * PTY_READ_BYTES]
    count = mib * MIB // len(chunk)

    async def run() -> None:
        recorder = await SessionRecorder.create(directory, "ses_bench", max_bytes=1 << 40)
        for _ in range(count):
            await recorder.output(1, chunk)
        await recorder.close()

    start = time.process_time()
    trio.run(run)
    seconds = time.process_time() - start
    (directory / "ses_bench.cast").unlink()
    return seconds / (count * len(chunk) / MIB)


def main(argv: list[str] | None = None) -> int:
    """Measure and print agent CPU per MiB of PTY output with recording off and on."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=20, help="size of the file cat prints")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs")
    parser.add_argument(
        "--baseline-tree", type=Path, help="also run the agent from this source tree (off)"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tucdesk-bench-recording-"))
    try:
        alone = recorder_alone(work, 64)
        print(f"recorder alone: {alone * 1000:.2f} ms CPU per MiB", flush=True)
        bulk = make_bulk_file(work, args.mib * MIB)
        modes = (["baseline"] if args.baseline_tree else []) + ["off", "on"]
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        rates: dict[str, list[float]] = {mode: [] for mode in modes}
        with LocalStack(work / "stack") as stack:
            stack.start()
            env = dict(stack.cli_env(), TERM="xterm")
            agent = stack.agent_name
            stack.run_tucdesk("exec", agent, "--", "true")
            client = Client(
                "tucdesk",
                exec_argv=lambda command: stack.tucdesk_command("exec", agent, "--", *command),
                shell_argv=stack.tucdesk_command("connect", agent),
                env=env,
            )
            recordings = stack.agent_state_dir / "recordings"
            for round_number in range(args.rounds):
                for mode in modes:
                    stack.stop_agent()
                    stack.extra_env["TUCDESK_AGENT_RECORD_SESSIONS"] = (
                        "true" if mode == "on" else "false"
                    )
                    stack.extra_env.pop("PYTHONPATH", None)
                    if mode == "baseline":
                        stack.extra_env["PYTHONPATH"] = str(args.baseline_tree.resolve())
                    stack.start_agent()
                    stack.wait_agent_online()
                    pid = stack.processes["agent"].pid
                    before = own_cpu_seconds(pid)
                    seconds, received = bulk_pty(client, bulk)
                    spent = settled_cpu_seconds(pid) - before
                    samples[mode].append(spent / (received / MIB))
                    rates[mode].append(received / seconds / 1e6)
                    recorded = sum(p.stat().st_size for p in recordings.glob("*.cast"))
                    print(
                        f"  round {round_number + 1} recording {mode}: agent "
                        f"{spent / (received / MIB) * 1000:.2f} ms CPU/MiB, "
                        f"{received / seconds / 1e6:.1f} MB/s wall, {recorded} bytes recorded",
                        flush=True,
                    )
                    shutil.rmtree(recordings, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for mode in modes:
        print(
            f"recording {mode}: median agent CPU {statistics.median(samples[mode]) * 1000:.2f} "
            f"ms/MiB (runs: {', '.join(f'{v * 1000:.2f}' for v in samples[mode])}); "
            f"median wall {statistics.median(rates[mode]):.1f} MB/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
