"""exec --tag --json ends with one JSON document on stdout and exits 255 when the rendezvous
cannot be reached (nothing could be run because of the CLI or the service, not a command)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from operator_cli.home import CliHome, Settings
from operator_cli.main import main
from operator_cli.tagged_exec import EXIT_CONNECTION_FAILED


def unreachable_home(tmp_path: Path) -> Path:
    home = CliHome(tmp_path)
    home.save_settings(Settings(server="https://127.0.0.1:1"))  # nothing listens on port 1
    home.create_key()
    return tmp_path


def test_json_with_the_rendezvous_unreachable_is_one_document_and_exit_255(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = unreachable_home(tmp_path)
    status = main(["--home", str(home), "exec", "--tag", "web", "--json", "--", "true"])
    captured = capsys.readouterr()
    assert status == EXIT_CONNECTION_FAILED
    document = json.loads(captured.out)  # stdout is the document alone
    [line] = captured.err.strip().splitlines()
    assert line.startswith("tucdesk: ")
    assert document == {"succeeded": 0, "total": 0, "agents": [],
                        "error": line.removeprefix("tucdesk: ")}


def test_without_json_the_rendezvous_unreachable_still_exits_255_with_stdout_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = unreachable_home(tmp_path)
    status = main(["--home", str(home), "exec", "--tag", "web", "--", "true"])
    captured = capsys.readouterr()
    assert status == EXIT_CONNECTION_FAILED
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
