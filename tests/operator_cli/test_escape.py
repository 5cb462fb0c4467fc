"""The ssh-style escape scanner, against a small reference model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operator_cli.escape import (
    EscapeAction,
    EscapeCharacterError,
    EscapeResult,
    EscapeScanner,
    escape_help,
    parse_escape_character,
)

# Bytes that matter to the scanner, plus a little noise, so interesting sequences are common.
interesting_bytes = st.sampled_from(list(b"~.?\x1a\r\nab"))
keystrokes = st.lists(interesting_bytes, max_size=60).map(bytes)


def reference(data: bytes) -> tuple[bytes, list[EscapeAction]]:
    """The escape rules written as plainly as possible: look at the text one position at a time."""
    forwarded = bytearray()
    actions: list[EscapeAction] = []
    line_start = True
    position = 0
    while position < len(data):
        char = data[position : position + 1]
        if line_start and char == b"~":
            if position + 1 == len(data):
                break  # a lone '~' at the end waits for the next key
            following = data[position + 1 : position + 2]
            position += 2
            if following == b".":
                actions.append(EscapeAction.DISCONNECT)
                return bytes(forwarded), actions
            if following == b"?":
                actions.append(EscapeAction.SHOW_HELP)
                continue
            if following == b"\x1a":
                actions.append(EscapeAction.SUSPEND)
                continue
            if following == b"~":
                forwarded += b"~"
                line_start = False
                continue
            forwarded += b"~" + following
            line_start = following in (b"\r", b"\n")
            continue
        forwarded += char
        line_start = char in (b"\r", b"\n")
        position += 1
    return bytes(forwarded), actions


def feed_in_chunks(data: bytes, cuts: list[int]) -> tuple[bytes, list[EscapeAction]]:
    scanner = EscapeScanner()
    forwarded = bytearray()
    actions: list[EscapeAction] = []
    boundaries = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    for start, end in zip(boundaries, boundaries[1:], strict=False):
        result = scanner.feed(data[start:end])
        forwarded += result.forward
        actions.extend(result.actions)
    return bytes(forwarded), actions


@settings(max_examples=500)
@given(keystrokes)
def test_scanner_matches_the_reference_model(data: bytes) -> None:
    result = EscapeScanner().feed(data)
    assert (result.forward, list(result.actions)) == reference(data)


@settings(max_examples=500)
@given(keystrokes, st.lists(st.integers(min_value=0, max_value=60), max_size=10))
def test_chunking_of_the_input_does_not_matter(data: bytes, cuts: list[int]) -> None:
    assert feed_in_chunks(data, cuts) == reference(data)


@settings(max_examples=200)
@given(st.binary(max_size=200).filter(lambda data: b"~" not in data))
def test_input_without_the_escape_character_passes_unchanged(data: bytes) -> None:
    assert EscapeScanner().feed(data) == EscapeResult(data)


@settings(max_examples=200)
@given(keystrokes)
def test_disabled_escapes_forward_everything(data: bytes) -> None:
    assert EscapeScanner(escape_character=None).feed(data) == EscapeResult(data)


def test_tilde_dot_at_session_start_disconnects() -> None:
    assert EscapeScanner().feed(b"~.") == EscapeResult(b"", (EscapeAction.DISCONNECT,))


def test_tilde_dot_after_a_newline_disconnects_and_drops_the_rest() -> None:
    scanner = EscapeScanner()
    assert scanner.feed(b"ls\r~.rm -rf\r") == EscapeResult(b"ls\r", (EscapeAction.DISCONNECT,))
    assert scanner.disconnected
    assert scanner.feed(b"more") == EscapeResult(b"")


def test_tilde_dot_in_the_middle_of_a_line_is_ordinary_text() -> None:
    assert EscapeScanner().feed(b"cd ~.") == EscapeResult(b"cd ~.")


def test_double_tilde_sends_one_tilde() -> None:
    assert EscapeScanner().feed(b"~~/x") == EscapeResult(b"~/x")


def test_tilde_question_mark_asks_for_help_and_allows_another_escape() -> None:
    assert EscapeScanner().feed(b"~?~.") == EscapeResult(
        b"", (EscapeAction.SHOW_HELP, EscapeAction.DISCONNECT)
    )


def test_tilde_followed_by_another_key_sends_both() -> None:
    assert EscapeScanner().feed(b"~x") == EscapeResult(b"~x")


def test_escape_split_across_reads_is_still_recognised() -> None:
    scanner = EscapeScanner()
    assert scanner.feed(b"\n~") == EscapeResult(b"\n")
    assert scanner.feed(b".") == EscapeResult(b"", (EscapeAction.DISCONNECT,))


def test_help_text_lists_every_escape_with_raw_mode_line_ends() -> None:
    text = escape_help()
    for sequence in ("~.", "~^Z", "~?", "~~"):
        assert sequence in text
    assert "\r\n" in text and "\n" not in text.replace("\r\n", "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("~", ord("~")), ("%", ord("%")), ("^]", 0x1D), ("^a", 0x01), ("^?", 0x7F), ("none", None)],
)
def test_escape_character_forms_like_ssh_minus_e(text: str, expected: int | None) -> None:
    assert parse_escape_character(text) == expected


@pytest.mark.parametrize("text", ["", "~~", "^1", "é", "nope"])
def test_other_escape_character_values_are_refused(text: str) -> None:
    with pytest.raises(EscapeCharacterError):
        parse_escape_character(text)


def test_a_control_escape_character_works_and_is_shown_in_caret_form() -> None:
    scanner = EscapeScanner(0x1D)
    assert scanner.feed(b"ls\r\x1d?\x1d\x1a").actions == (
        EscapeAction.SHOW_HELP, EscapeAction.SUSPEND,
    )
    assert scanner.feed(b"\x1d.").actions == (EscapeAction.DISCONNECT,)
    assert " ^].   - disconnect" in escape_help(0x1D)
    assert " ^]^Z  - suspend" in escape_help(0x1D)
