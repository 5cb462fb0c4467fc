"""`tucdesk-rendezvous invite create` labels the invite id and the code, which both start with
inv_, and fills the code into the login command; the bare code stays the last line."""

from __future__ import annotations

from pathlib import Path

import pytest

from rendezvous.main import main


def test_invite_id_and_code_are_labelled_and_the_command_carries_the_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--data-dir", str(tmp_path / "data")]
    main(["init", *store])
    main(["team", "create", "ops", *store])
    capsys.readouterr()
    arguments = ["invite", "create", "--team", "ops", "--email", "a@b.test", "--role", "auditor"]
    assert main([*arguments, *store]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    code = lines[-1]
    assert code.startswith("inv_")
    [id_line] = [line for line in lines if line.startswith("invite id: inv_")]
    invite_id = id_line.split()[2]
    assert invite_id != code and "revoke" in id_line
    assert any(line.endswith(f"tucdesk login --server URL --invite {code}") for line in lines)
    assert "--invite CODE" not in "\n".join(lines)
    assert sum(code in line for line in lines) == 2  # the command and the last line, no other
