"""database_password_file's first line, read as the service reads it: lines end at \n alone (one
\r before it dropped, as from a Windows editor); a byte order mark or a control character is
refused with an error that never shows the file's content."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rendezvous.store import StoreUnavailable
from rendezvous.store.postgres import password_from_file

SECRET = "s3cret-Pa55"


def _read(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "db-password"
    path.write_bytes(content)
    path.chmod(0o600)
    return password_from_file(path)()


@pytest.mark.parametrize(
    "content",
    [
        SECRET.encode(),
        SECRET.encode() + b"\n",
        SECRET.encode() + b"\r\n",
        SECRET.encode() + b"\nthe rest is ignored\n",
        SECRET.encode() + b"\r\nthe rest is ignored\r\n",
    ],
)
def test_the_first_line_is_the_password_whatever_the_line_ending(
    tmp_path: Path, content: bytes
) -> None:
    assert _read(tmp_path, content) == SECRET


@pytest.mark.parametrize("separator", ["\u2028", "\u2029"])
def test_unicode_line_separators_are_part_of_the_password(tmp_path: Path, separator: str) -> None:
    # Printable in the sense of head -n1 and PostgreSQL: only \n ends the line.
    password = f"pass{separator}word"
    assert _read(tmp_path, (password + "\n").encode()) == password


@pytest.mark.parametrize(
    "separator", ["\x1c", "\x1d", "\x1e", "\x85", "\x0b", "\x0c", "\r", "\x00", "\x7f", "\t"]
)
def test_a_control_character_in_the_password_is_refused_not_cut_at(
    tmp_path: Path, separator: str
) -> None:
    # str.splitlines ended the line at \x1c-\x1e, \x85, \v, \f and a lone \r: the password
    # 'abc\x1cdef' was read as 'abc'.
    with pytest.raises(StoreUnavailable) as refused:
        _read(tmp_path, f"Xq7{separator}Zp9\n".encode())
    message = str(refused.value)
    assert "control character" in message and "database_password_file" in message
    assert "Xq7" not in message and "Zp9" not in message


def test_a_byte_order_mark_is_refused_without_showing_the_password(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable) as refused:
        _read(tmp_path, b"\xef\xbb\xbf" + SECRET.encode() + b"\n")
    assert "byte order mark" in str(refused.value)
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n", b"\nsecond line\n"])
def test_an_empty_first_line_is_refused(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(StoreUnavailable, match="is empty"):
        _read(tmp_path, content)


def test_a_password_that_is_not_utf8_is_refused_without_showing_it(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="not UTF-8") as refused:
        _read(tmp_path, b"caf\xe9-" + SECRET.encode())
    assert SECRET not in str(refused.value)


PRINTABLE = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\ufeff"), min_size=1
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(password=PRINTABLE, ending=st.sampled_from(["", "\n", "\r\n"]), rest=st.text())
def test_any_printable_password_is_read_back_exactly(
    tmp_path: Path, password: str, ending: str, rest: str
) -> None:
    content = password + ending + (rest if ending else "")
    assert _read(tmp_path, content.encode()) == password
