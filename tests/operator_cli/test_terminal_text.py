"""Untrusted text on a terminal: nothing a terminal acts on gets through raw, and a command is
shown as shell text that runs exactly that argv (the CVE-2019-6109 lesson)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operator_cli.terminal_text import cut, shown_argument, shown_command, visible, wrapped

# Text as an argv can carry it: any character but NUL and lone surrogates.
ARGUMENT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[16D\x1b[K", "\\e[16D\\e[K"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x00\x07\x7f", "\\x00\\a\\x7f"),
        ("\x9b2J", "\\x9b2J"),  # C1 CSI: one character is enough on some terminals
        ("abc\u202edef", "abc\\u202edef"),  # RIGHT-TO-LEFT OVERRIDE
        ("\u2066x\u2069", "\\u2066x\\u2069"),  # LEFT-TO-RIGHT ISOLATE ... POP
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("caf\u00e9 \u2014 ok", "caf\u00e9 \u2014 ok"),  # printable text stays as it is
    ],
)
def test_characters_a_terminal_acts_on_are_shown_as_escapes(raw: str, shown: str) -> None:
    assert visible(raw) == shown


@given(ARGUMENT)
def test_visible_text_is_always_printable(text: str) -> None:
    assert visible(text).isprintable()


@given(st.lists(ARGUMENT, min_size=1, max_size=4))
def test_a_shown_command_is_always_printable(command: list[str]) -> None:
    assert shown_command(command).isprintable()


@given(st.lists(ARGUMENT.filter(str.isprintable)))
def test_a_printable_command_is_shown_as_shlex_join_shows_it(command: list[str]) -> None:
    assert shown_command(command) == shlex.join(command)


def test_an_argument_with_control_characters_is_quoted_in_the_dollar_quote_form() -> None:
    assert shown_argument("touch /tmp/PW;: \x1b[16D\x1b[Kuptime") == (
        "$'touch /tmp/PW;: \\e[16D\\e[Kuptime'"
    )
    assert shown_argument("it's\\\n") == "$'it\\'s\\\\\\n'"
    assert shown_argument("\x9b") == "$'\\u009b'"  # \x9b in $'…' would be a byte, not U+009B


BASH = shutil.which("bash")


@pytest.mark.skipif(BASH is None, reason="needs bash to run the shown command")
@settings(max_examples=60, deadline=None)
@given(st.lists(ARGUMENT, min_size=1, max_size=3))
def test_bash_runs_a_shown_command_as_exactly_its_argv(command: list[str]) -> None:
    assert BASH is not None
    script = "printf '%s\\0' " + shown_command(command)
    env = {**os.environ, "LC_ALL": "C.UTF-8"}  # $'\u…' needs a UTF-8 locale to encode
    output = subprocess.run([BASH, "-c", script], capture_output=True, check=True, env=env)
    assert output.stdout.split(b"\0")[:-1] == [argument.encode() for argument in command]


def test_a_cut_is_marked_and_wrapping_loses_no_character() -> None:
    assert cut("abcdef", 6) == ("abcdef", False)
    assert cut("abcdefg", 6) == ("abcde…", True)
    text = "uptime" + " " * 50 + "; touch /tmp/PW2"
    assert "".join(wrapped(text, 20)) == text
    assert all(len(line) <= 20 for line in wrapped(text, 20))
