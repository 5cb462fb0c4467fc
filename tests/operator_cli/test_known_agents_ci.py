"""Known agents in CI jobs: a read-only CLI home still checks pinned keys, a pin that cannot be
written says which file and why, and strict mode refuses what is not pinned."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from operator_cli.known_agents import (
    KNOWN_AGENTS_FILE_NAME,
    AgentKeyChangedError,
    AgentKeyNotPinnedError,
    KnownAgents,
    KnownAgentsError,
    PinOutcome,
    strict_agent_keys,
)
from protocol.identity import SigningIdentity, b64url

FIRST_KEY = SigningIdentity.generate().public
SECOND_KEY = SigningIdentity.generate().public
SERVER = "https://rendezvous.example:8443"
REPOSITORY = Path(__file__).resolve().parents[2]


def run_on_read_only(home: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (python) with ``home`` read-only: a read-only bind mount in a private mount
    namespace as root (who ignores permissions), no write permission otherwise."""
    command = [sys.executable, "-c", textwrap.dedent(code), str(home)]
    if os.geteuid() != 0:
        for path in [home, *home.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    elif shutil.which("unshare") is None or subprocess.run(
        ["unshare", "-m", "true"], capture_output=True, check=False
    ).returncode != 0:
        pytest.skip("no unshare -m here to mount a directory read-only")
    else:
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", script, "sh", str(home), *command]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, check=False,
                          timeout=60)


CHECK = f"""
    import sys
    from pathlib import Path
    from operator_cli.known_agents import KnownAgents, KnownAgentsError
    from protocol.identity import PublicIdentity, b64url_decode
    known = KnownAgents.in_home(Path(sys.argv[1]), {SERVER!r})
    key = PublicIdentity(b64url_decode({b64url(FIRST_KEY.raw)!r}, 64))
    try:
        print(known.verify_or_pin("agt_1", key, name="web1").value)
    except KnownAgentsError as error:
        print("refused:", error)
"""


def test_a_pinned_key_is_checked_on_a_read_only_home(tmp_path: Path) -> None:
    home = tmp_path / "ci"
    KnownAgents.in_home(home, SERVER).verify_or_pin("agt_1", FIRST_KEY, name="web1")
    done = run_on_read_only(home, CHECK)
    assert done.stdout.strip() == PinOutcome.MATCHED.value, done.stderr


def test_a_first_pin_on_a_read_only_home_names_the_file_and_why(tmp_path: Path) -> None:
    home = tmp_path / "ci"
    home.mkdir()
    done = run_on_read_only(home, CHECK)
    message = done.stdout.strip()
    assert message.startswith("refused: cannot pin the key of agent web1"), (message, done.stderr)
    assert str(home / KNOWN_AGENTS_FILE_NAME) in message
    assert "Read-only file system" in message or "Permission denied" in message
    assert "tucdesk agents trust AGENT --fingerprint" in message


def test_strict_mode_refuses_an_agent_not_pinned_and_writes_nothing(tmp_path: Path) -> None:
    known = KnownAgents(tmp_path / KNOWN_AGENTS_FILE_NAME, SERVER, strict=True)
    with pytest.raises(AgentKeyNotPinnedError) as caught:
        known.verify_or_pin("agt_1", FIRST_KEY, name="web1")
    message = str(caught.value)
    assert "no key is pinned for agent web1 (agt_1)" in message
    assert "tucdesk agents trust web1 --fingerprint SHA256:" in message
    assert FIRST_KEY.fingerprint not in message  # never offer the presented key to paste
    assert not (tmp_path / KNOWN_AGENTS_FILE_NAME).exists()
    with pytest.raises(AgentKeyNotPinnedError):  # by id, too
        known.verify_or_pin("agt_1", FIRST_KEY, name="web1", addressed_by_id=True)


def test_strict_mode_accepts_a_pinned_key_and_still_refuses_a_changed_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / KNOWN_AGENTS_FILE_NAME
    KnownAgents(path, SERVER).trust("agt_1", FIRST_KEY, name="web1")
    strict = KnownAgents(path, SERVER, strict=True)
    assert strict.verify_or_pin("agt_1", FIRST_KEY, name="web1") is PinOutcome.MATCHED
    with pytest.raises(AgentKeyChangedError):
        strict.verify_or_pin("agt_1", SECOND_KEY, name="web1")
    # The name's pinned key under a new id (the same machine re-registered) is pinned already.
    assert (strict.verify_or_pin("agt_2", FIRST_KEY, name="web1")
            is PinOutcome.NEW_ID_SAME_KEY)
    with pytest.raises(AgentKeyChangedError):  # another key under the name: as without strict
        strict.verify_or_pin("agt_3", SECOND_KEY, name="web1")


@pytest.mark.parametrize(("value", "strict"), [
    (None, False), ("", False), ("0", False), ("no", False), ("1", True), ("true", True),
    ("YES", True), (" on ", True),
])
def test_strict_mode_from_the_environment(
    tmp_path: Path, value: str | None, strict: bool
) -> None:
    environ = {} if value is None else {"TUCDESK_STRICT_AGENT_KEYS": value}
    assert strict_agent_keys(environ) is strict
    assert KnownAgents.in_home(tmp_path, SERVER, environ).strict is strict


def test_a_strict_mode_value_that_is_neither_on_nor_off_is_an_error() -> None:
    with pytest.raises(KnownAgentsError, match="TUCDESK_STRICT_AGENT_KEYS='ture'"):
        strict_agent_keys({"TUCDESK_STRICT_AGENT_KEYS": "ture"})
