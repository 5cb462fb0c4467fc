"""How `exec --tag` writes each agent's output: prefixed whole lines, a line too long to hold
written in bounded pieces, and the options and status its per-agent children get."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operator_cli.home import CliHome
from operator_cli.main import build_parser
from operator_cli.tagged_exec import (
    EXIT_CONNECTION_FAILED,
    MAX_LINE_BYTES,
    READ_SIZE,
    LineCutter,
    StatusReport,
    TaggedAgent,
    _PrefixedOutput,
    _run_one,
    global_options_of,
    outcome_note,
    parse_status_report,
)

PREFIX = b"web-1: "
CONTINUED = b"web-1+ "


def _joined(output: bytes) -> bytes:
    """What the agent printed, from the prefixed output: pieces marked + continue a line."""
    text = bytearray()
    for line in output.splitlines(keepends=True):
        if line.startswith(CONTINUED):
            del text[-1:]  # the newline that ended the piece before
            text += line[len(CONTINUED):]
        else:
            assert line.startswith(PREFIX)
            text += line[len(PREFIX):]
    return bytes(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda chunk: chunk.replace(b"\r", b"")),
                max_size=12))
def test_the_prefixed_pieces_give_back_exactly_what_the_agent_printed(
    chunks: list[bytes],
) -> None:
    cutter = LineCutter(PREFIX, CONTINUED, max_line=8)
    output = b"".join(cutter.feed(chunk) for chunk in chunks if chunk) + cutter.finish()
    printed = b"".join(chunks)
    assert _joined(output) == (printed if not printed or printed.endswith(b"\n")
                               else printed + b"\n")
    # Held back at most max_line bytes plus one read: every piece stays short.
    assert all(len(line) <= len(PREFIX) + 8 + 40 + 1 for line in output.splitlines())


def test_a_long_line_without_a_newline_is_written_in_bounded_pieces(
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    size = 20 * MAX_LINE_BYTES
    agent = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.write(1, b'a' * {size} + b'\\nnext\\n')"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert agent.stdout is not None and agent.stderr is not None
    _PrefixedOutput(len("web-1")).relay("web-1", agent.stdout, agent.stderr)
    assert agent.wait() == 0
    output = capfdbinary.readouterr().out
    lines = output.splitlines()
    assert len(lines) > 10  # not one 1.3 MB line held in memory until its newline
    assert all(len(line) <= len(PREFIX) + MAX_LINE_BYTES + READ_SIZE for line in lines)
    assert lines[0].startswith(PREFIX) and lines[1].startswith(CONTINUED)
    assert lines[-1] == PREFIX + b"next"
    assert _joined(output) == b"a" * size + b"\nnext\n"


def test_every_global_option_goes_to_the_per_agent_sessions() -> None:
    args = build_parser().parse_args(
        ["--debug", "--server", "https://rv.example:8443", "--ca-file", "/etc/ca.pem",
         "exec", "--tag", "web", "--", "true"]
    )  # fmt: skip
    assert global_options_of(args) == [
        "--debug", "--server", "https://rv.example:8443", "--ca-file", "/etc/ca.pem"
    ]
    assert global_options_of(build_parser().parse_args(["exec", "--tag", "w", "x"])) == []


def test_an_agent_whose_session_cannot_be_set_up_is_summarized_so(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    # A real `tucdesk exec` child with a home that is not logged in: it never opens a session.
    agent = TaggedAgent("agt_missing", "web-1", True)
    outcome = _run_one(CliHome(tmp_path / "home"), agent, ["true"], (), _PrefixedOutput(5))
    assert (outcome.status, outcome.note) == (EXIT_CONNECTION_FAILED,
                                              "the session could not be set up")
    assert capfdbinary.readouterr().err.startswith(b"web-1: tucdesk: ")


def test_the_status_pipe_tells_an_opened_session_from_one_never_set_up() -> None:
    assert parse_status_report(b"") == StatusReport(opened=False, exit_status=None)
    assert parse_status_report(b"opened\n") == StatusReport(opened=True, exit_status=None)
    assert parse_status_report(b"opened\nexit 255\n") == StatusReport(True, 255)
    for garbled in (b"exit\n", b"exit -1\n", b"opened\nopened\n", b"exit 1\nopened\n",
                    b"exit 0\nexit 1\n", b"open\n"):
        assert parse_status_report(garbled) == StatusReport(), garbled


@pytest.mark.parametrize(("status", "report", "note"), [
    (255, StatusReport(True, 255), ""),  # the command's own 255
    (0, StatusReport(True, 0), ""),
    (255, StatusReport(), "the session could not be set up"),
    # Opened, then the connection was lost before the exit status came.
    (255, StatusReport(opened=True), "ended without an exit status"),
    # Ctrl-C while waiting for an approver (never opened), or a second Ctrl-C that gave up an
    # open session: neither is a set-up failure.
    (130, StatusReport(), "interrupted"),
    (130, StatusReport(opened=True), "interrupted"),
    (130, StatusReport(True, 130), ""),  # the command's own 130
])
def test_a_child_without_an_exit_status_is_summarized_by_how_far_it_got(
    status: int, report: StatusReport, note: str
) -> None:
    assert outcome_note(status, report) == note
