"""`tucdesk-rendezvous --help` documents every setting the service reads, and the store flags
work before the command as after it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rendezvous.config import ServiceConfig
from rendezvous.main import build_parser, main


def subparser(parser: object, name: str) -> object:
    return next(
        action.choices[name]
        for action in parser._actions  # type: ignore[attr-defined]  # noqa: SLF001
        if isinstance(action.choices, dict) and name in action.choices
    )


@pytest.mark.parametrize("command", [[], ["serve"]])
def test_help_lists_every_setting_with_its_variable_and_default(command: list[str]) -> None:
    parser = build_parser()
    for name in command:
        parser = subparser(parser, name)  # type: ignore[assignment]
    text = parser.format_help()
    for field in dataclasses.fields(ServiceConfig):
        assert f"  {field.name}, TUCDESK_{field.name.upper()}" in text, field.name
    assert "TUCDESK_AUTH_RATE_LIMIT" in text and "TUCDESK_AUTH_RATE_BURST" in text
    words = " ".join(text.split())
    assert "default 604800 (7d)" in words  # invite_seconds
    assert "TUCDESK_CONFIG" in words
    assert "default /var/lib/tucdesk-rendezvous" in words


def test_invite_ttl_help_names_the_setting_that_changes_its_default() -> None:
    invite_create = subparser(subparser(build_parser(), "invite"), "create")
    text = " ".join(invite_create.format_help().split())  # type: ignore[attr-defined]
    assert "(default: invite_seconds, 7d)" in text


def test_data_dir_works_before_the_command_as_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data-dir", str(tmp_path), "init"]) == 0
    capsys.readouterr()
    assert main(["--data-dir", str(tmp_path), "keys", "show"]) == 0
    before = capsys.readouterr().out
    assert main(["keys", "show", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == before
    assert "jwt-issuer: SHA256:" in before
