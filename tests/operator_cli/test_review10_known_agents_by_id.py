"""An agent reached by its id, pinned and presenting its pinned key, while its name is pinned to
another agent: nothing changes, so nothing is written and a read-only home still verifies it."""

from __future__ import annotations

from pathlib import Path

from operator_cli.known_agents import KNOWN_AGENTS_FILE_NAME, KnownAgents, PinOutcome
from protocol.identity import SigningIdentity, b64url

from .test_known_agents_ci import run_on_read_only

NAME_HOLDER_KEY = SigningIdentity.generate().public
BY_ID_KEY = SigningIdentity.generate().public
SERVER = "https://rendezvous.example:8443"


def pinned_home(tmp_path: Path) -> Path:
    home = tmp_path / "ci"
    known = KnownAgents.in_home(home, SERVER)
    assert known.verify_or_pin("agt_a", NAME_HOLDER_KEY, name="web") is PinOutcome.FIRST_USE
    assert known.verify_or_pin(
        "agt_b", BY_ID_KEY, name="web", addressed_by_id=True
    ) is PinOutcome.FIRST_USE
    return home


def test_a_pinned_agent_reached_by_id_is_verified_without_a_write(tmp_path: Path) -> None:
    home = pinned_home(tmp_path)
    pins = home / KNOWN_AGENTS_FILE_NAME
    before = (pins.read_bytes(), pins.stat().st_mtime_ns, pins.stat().st_ino)
    known = KnownAgents.in_home(home, SERVER)
    assert known.verify_or_pin(
        "agt_b", BY_ID_KEY, name="web", addressed_by_id=True
    ) is PinOutcome.MATCHED
    assert (pins.read_bytes(), pins.stat().st_mtime_ns, pins.stat().st_ino) == before
    # The name still answers only for the agent that holds it.
    assert set(known.pins_for_name("web")) == {"agt_a"}


def test_a_pinned_agent_reached_by_id_is_verified_on_a_read_only_home(tmp_path: Path) -> None:
    home = pinned_home(tmp_path)
    done = run_on_read_only(home, f"""
        import sys
        from pathlib import Path
        from operator_cli.known_agents import KnownAgents, KnownAgentsError
        from protocol.identity import PublicIdentity, b64url_decode
        known = KnownAgents.in_home(Path(sys.argv[1]), {SERVER!r})
        key = PublicIdentity(b64url_decode({b64url(BY_ID_KEY.raw)!r}, 64))
        try:
            print(known.verify_or_pin("agt_b", key, name="web", addressed_by_id=True).value)
        except KnownAgentsError as error:
            print("refused:", error)
    """)
    assert done.stdout.strip() == PinOutcome.MATCHED.value, (done.stdout, done.stderr)
