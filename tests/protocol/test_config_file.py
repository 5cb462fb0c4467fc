"""The shared TOML config reader: bounded reads, one table, the caller's error type."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.config_file import read_config_table


class ExampleConfigError(Exception):
    pass


def read(path: Path, max_size: int = 1024) -> dict:
    return read_config_table(path, "relay", max_size, ExampleConfigError)


def test_the_named_table_is_read_with_dashes_as_underscores(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('[relay]\nmax-sessions = 5\nrelay_id = "r1"\n')
    assert read(path) == {"max_sessions": 5, "relay_id": "r1"}


def test_a_file_without_the_table_is_read_at_top_level(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text('relay_id = "r1"\n')
    assert read(path) == {"relay_id": "r1"}


def test_keys_above_the_table_are_refused_not_ignored(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('max_sessions = 0\nrelay_id = "r0"\n[relay]\nrelay_id = "r1"\n')
    with pytest.raises(ExampleConfigError, match=r"max_sessions, relay_id must go inside"):
        read(path)


def test_other_tables_beside_the_table_are_left_to_their_readers(tmp_path):
    path = tmp_path / "all.toml"
    path.write_text('[agent]\nuser = "ops"\n[relay]\nrelay_id = "r1"\n')
    assert read(path) == {"relay_id": "r1"}


def test_an_endless_file_is_refused_after_a_bounded_read():
    # /dev/zero reports size 0 and never ends: a stat check alone would read forever.
    with pytest.raises(ExampleConfigError, match="larger than 1024 bytes"):
        read(Path("/dev/zero"))


def test_an_oversized_file_is_refused(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * 2000 + "\n")
    with pytest.raises(ExampleConfigError, match="larger than 1024 bytes"):
        read(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"relay = [", "not valid TOML"),
        (b"\xff\xfe", "not valid TOML"),
        (b"relay = 5\n", r"\[relay\] must be a table"),
    ],
)
def test_garbage_is_refused_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ExampleConfigError, match=message):
        read(path)


def test_missing_and_unreadable_paths_are_the_callers_error(tmp_path):
    with pytest.raises(ExampleConfigError, match="no such config file"):
        read(tmp_path / "missing.toml")
    with pytest.raises(ExampleConfigError, match="cannot read the config file"):
        read(tmp_path)  # a directory
