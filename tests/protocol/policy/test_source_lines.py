"""The TOML line map behind policy error messages: every construct lands on its own line."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.policy.source_lines import SourceLines, format_path

TRICKY = '''\
title = """
[[rules]]
not = "a header"
"""
literal = \'\'\'
[[rules]] inside a literal string \'\'\'
"quoted key" = 1
dotted.key = "x" # [[rules]] in a comment
nested = [
  ["[[rules]]", "a"],
  [1, 2],
]

[[rules]]
id = "first"
inline = { a = 1, "b c" = [1, 2] }

[rules.when]
hours = "09:00-17:00"

[[rules]]
id = "second"
[rules.when]
days = [
  "mon",
  "tue",
]
[[rules.when.extra]]
x = 1
'''


def test_keys_headers_and_elements_map_to_their_lines() -> None:
    lines = SourceLines.scan(TRICKY)
    expected = {
        ("title",): 1,
        ("literal",): 5,
        ("quoted key",): 7,
        ("dotted", "key"): 8,
        ("nested",): 9,
        ("nested", 0): 10,
        ("nested", 1): 11,
        ("nested", 0, 1): 10,
        ("rules", 0): 14,
        ("rules", 0, "id"): 15,
        ("rules", 0, "inline", "b c", 1): 16,
        ("rules", 0, "when"): 18,
        ("rules", 0, "when", "hours"): 19,
        ("rules", 1): 21,
        ("rules", 1, "id"): 22,
        ("rules", 1, "when", "days"): 24,
        ("rules", 1, "when", "days", 1): 26,
        ("rules", 1, "when", "extra", 0, "x"): 29,
    }
    assert {path: lines.line_of(path) for path in expected} == expected


def test_an_unrecorded_path_falls_back_to_its_nearest_ancestor() -> None:
    lines = SourceLines.scan(TRICKY)
    assert lines.line_of(("rules", 1, "outcome")) == 21
    assert lines.line_of(("nowhere",)) is None


def test_text_the_scanner_cannot_follow_yields_no_lines_rather_than_an_error() -> None:
    assert SourceLines.scan('a = "unterminated').line_of(("a",)) is None


def test_paths_are_written_as_a_reader_writes_them() -> None:
    assert format_path(("rules", 2, "when", "days", 0)) == "rules[2].when.days[0]"
    assert format_path(()) == ""


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b-c", "d_e", '"q k"', "x.y"]),
            st.sampled_from(['"s"', "1", "[1,\n2]", "{ k = 1 }", "'''\nm\n'''", "true"]),
            st.integers(min_value=0, max_value=2),
        ),
        max_size=8,
        unique_by=lambda item: item[0],
    )
)
def test_each_top_level_key_is_found_on_the_line_it_starts(
    entries: list[tuple[str, str, int]],
) -> None:
    text = ""
    expected: dict[tuple[str, ...], int] = {}
    for key, value, blanks in entries:
        text += "\n" * blanks
        path = ("q k",) if key == '"q k"' else tuple(key.split("."))
        expected[path] = text.count("\n") + 1
        text += f"{key} = {value}  # note\n"
    lines = SourceLines.scan(text)
    assert {path: lines.line_of(path) for path in expected} == expected
