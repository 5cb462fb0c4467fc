"""scripts/install-system-deps installs nothing when TUCDESK_NO_SYSTEM_DEPS=1, even as root with
apt-get at hand (README: how to run scripts/test without it installing system packages)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "install-system-deps"


def _fake_root_with_apt_get(bin_dir: Path, calls: Path) -> None:
    """A PATH where `id -u` says root and `apt-get` only notes that it was called: running the
    real apt-get from a test would install packages on the machine."""
    bin_dir.mkdir()
    for name, body in (("id", "echo 0"), ("apt-get", f'echo "$@" >> {calls}')):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(0o755)


def _run(tmp_path: Path, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Only the two fakes on PATH, so every package the script looks for is missing.
    environment = {"PATH": str(tmp_path / "bin"), **extra}
    return subprocess.run(
        ["/bin/bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=30
    )


def test_no_system_deps_variable_installs_nothing_and_names_what_is_missing(
    tmp_path: Path,
) -> None:
    calls = tmp_path / "apt-get-calls"
    _fake_root_with_apt_get(tmp_path / "bin", calls)
    result = _run(tmp_path, {"TUCDESK_NO_SYSTEM_DEPS": "1"})
    assert result.returncode == 0, result.stderr
    assert not calls.exists()
    assert "TUCDESK_NO_SYSTEM_DEPS=1: not installing" in result.stderr
    assert "tmux" in result.stderr


def test_as_root_without_the_variable_it_installs_and_says_how_to_skip(tmp_path: Path) -> None:
    calls = tmp_path / "apt-get-calls"
    _fake_root_with_apt_get(tmp_path / "bin", calls)
    result = _run(tmp_path, {})
    assert result.returncode == 0, result.stderr
    assert "install" in calls.read_text()
    assert "set TUCDESK_NO_SYSTEM_DEPS=1 to skip" in result.stderr
