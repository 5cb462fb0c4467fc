"""Where each key of a TOML document sits in its source text, so errors can name a line.

tomllib parses values but forgets positions. This scanner walks the same text again (only text
tomllib has already accepted) and records the line on which every table header, key and array
element starts, keyed by its path: ``("rules", 2, "outcome")`` for the third ``[[rules]]`` table's
``outcome`` key. A path that was not recorded falls back to its nearest recorded ancestor.
"""

from __future__ import annotations

import bisect
import tomllib
from collections.abc import Sequence

PathPart = str | int
Path = tuple[PathPart, ...]

_BARE_KEY_CHARACTERS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
)
_INLINE_WHITESPACE = " \t"


class _ScanError(Exception):
    """The scanner met text it does not understand; lines are then simply unknown."""


class SourceLines:
    """Line numbers (1-based) of the keys in one TOML document."""

    def __init__(self, lines: dict[Path, int]) -> None:
        self._lines = lines

    @classmethod
    def scan(cls, text: str) -> SourceLines:
        """Map every key path of ``text`` (valid TOML) to its line; empty if the scan fails."""
        try:
            return cls(_Scanner(text).run())
        except (_ScanError, IndexError, tomllib.TOMLDecodeError, RecursionError):
            return cls({})

    def line_of(self, path: Sequence[PathPart]) -> int | None:
        """The line of ``path``, else of its nearest recorded ancestor, else None."""
        key = tuple(path)
        while key:
            line = self._lines.get(key)
            if line is not None:
                return line
            key = key[:-1]
        return None


def format_path(path: Sequence[PathPart]) -> str:
    """A path as a reader writes it: ``rules[2].when.hours``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += part if not text else f".{part}"
    return text


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0
        self.newlines = [index for index, character in enumerate(text) if character == "\n"]
        self.lines: dict[Path, int] = {}
        self.table: Path = ()
        self.array_table_counts: dict[Path, int] = {}

    def run(self) -> dict[Path, int]:
        while True:
            self._skip_blank_and_comments()
            if self.position >= len(self.text):
                return self.lines
            if self.text[self.position] == "[":
                self._table_header()
            else:
                path = self.table + self._key()
                self._record(path)
                self._skip_inline_whitespace()
                self._expect("=")
                self._skip_inline_whitespace()
                self._value(path)

    def _line(self) -> int:
        return bisect.bisect_left(self.newlines, self.position) + 1

    def _record(self, path: Path) -> None:
        self.lines.setdefault(path, self._line())

    def _expect(self, character: str) -> None:
        if not self.text.startswith(character, self.position):
            raise _ScanError(f"expected {character!r}")
        self.position += len(character)

    def _skip_inline_whitespace(self) -> None:
        while self.position < len(self.text) and self.text[self.position] in _INLINE_WHITESPACE:
            self.position += 1

    def _skip_blank_and_comments(self) -> None:
        while self.position < len(self.text):
            character = self.text[self.position]
            if character in " \t\r\n":
                self.position += 1
            elif character == "#":
                end = self.text.find("\n", self.position)
                self.position = len(self.text) if end < 0 else end
            else:
                return

    def _table_header(self) -> None:
        start_line = self._line()
        array = self.text.startswith("[[", self.position)
        self.position += 2 if array else 1
        self._skip_inline_whitespace()
        keys = self._key()
        self._skip_inline_whitespace()
        self._expect("]]" if array else "]")
        path = self._resolve(keys)
        if array:
            index = self.array_table_counts.get(path, 0)
            self.array_table_counts[path] = index + 1
            self.lines.setdefault(path, start_line)
            path = (*path, index)
        self.lines[path] = start_line
        self.table = path

    def _resolve(self, keys: Path) -> Path:
        # Inside [a.b], a segment naming an array of tables means its most recent element.
        path: Path = ()
        for position, key in enumerate(keys):
            path = (*path, key)
            count = self.array_table_counts.get(path)
            if count is not None and position < len(keys) - 1:
                path = (*path, count - 1)
        return path

    def _key(self) -> Path:
        parts: list[PathPart] = [self._simple_key()]
        while True:
            self._skip_inline_whitespace()
            if not self.text.startswith(".", self.position):
                return tuple(parts)
            self.position += 1
            self._skip_inline_whitespace()
            parts.append(self._simple_key())

    def _simple_key(self) -> str:
        start = self.position
        if self.position < len(self.text) and self.text[self.position] in "\"'":
            self._string()
            quoted = self.text[start : self.position]
            value = tomllib.loads(f"k = {quoted}")["k"]
            if not isinstance(value, str):
                raise _ScanError("quoted key is not a string")
            return value
        while self.position < len(self.text) and self.text[self.position] in _BARE_KEY_CHARACTERS:
            self.position += 1
        if self.position == start:
            raise _ScanError("expected a key")
        return self.text[start : self.position]

    def _string(self) -> None:
        quote = self.text[self.position]
        if self.text.startswith(quote * 3, self.position):
            self.position += 3
            while True:
                if quote == '"' and self.text[self.position] == "\\":
                    self.position += 2
                    continue
                if self.text.startswith(quote * 3, self.position):
                    self.position += 3
                    # A multi-line string may end with up to two extra quote characters.
                    while self.text.startswith(quote, self.position):
                        self.position += 1
                    return
                self.position += 1
        self.position += 1
        while True:
            character = self.text[self.position]
            if quote == '"' and character == "\\":
                self.position += 2
            elif character == quote:
                self.position += 1
                return
            elif character == "\n":
                raise _ScanError("newline inside a single-line string")
            else:
                self.position += 1

    def _value(self, path: Path) -> None:
        character = self.text[self.position]
        if character in "\"'":
            self._string()
        elif character == "[":
            self._array(path)
        elif character == "{":
            self._inline_table(path)
        else:
            # Numbers, booleans and dates: everything up to a separator.
            while self.position < len(self.text) and self.text[self.position] not in ",]}#\r\n":
                self.position += 1

    def _array(self, path: Path) -> None:
        self.position += 1
        index = 0
        while True:
            self._skip_blank_and_comments()
            if self.text[self.position] == "]":
                self.position += 1
                return
            element = (*path, index)
            self._record(element)
            start = self.position
            self._value(element)
            index += 1
            self._skip_blank_and_comments()
            if self.text[self.position] == ",":
                self.position += 1
            elif self.text[self.position] != "]" or self.position == start:
                raise _ScanError("malformed array")

    def _inline_table(self, path: Path) -> None:
        self.position += 1
        while True:
            self._skip_inline_whitespace()
            if self.text[self.position] == "}":
                self.position += 1
                return
            key_path = path + self._key()
            self._record(key_path)
            self._skip_inline_whitespace()
            self._expect("=")
            self._skip_inline_whitespace()
            self._value(key_path)
            self._skip_inline_whitespace()
            if self.text[self.position] == ",":
                self.position += 1
            elif self.text[self.position] != "}":
                raise _ScanError("malformed inline table")
