"""`tucdesk policy set --freeze-roster` and `tucdesk roster sign --freeze-roster` publish with
?freeze_roster=true: a live rendezvous refuses a roster that leaves no active admin able to
sign (409 roster_would_freeze) without it and takes it with it."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from operator_cli.client import ApiError, Session
from operator_cli.home import CliHome
from operator_cli.local_stack import LocalStack
from operator_cli.policy_commands import _publish, fetch_team_policy, with_version
from protocol.identity import SigningIdentity
from protocol.policy import PolicyBundleContent, Roster, RosterEntry
from protocol.policy.roster import Role
from tests.operator_cli.policy_stack_support import POLICY_TEMPLATE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    base = tmp_path_factory.mktemp("auto2-freeze")
    with LocalStack(base) as started:
        started.create_certificates()
        started.init_rendezvous()
        started.start_relay()
        started.start_rendezvous()
        started.create_operator()
        first = base / "policy-v1.toml"
        first.write_text(POLICY_TEMPLATE.format(version=1, extra=""))
        result = started.run_tucdesk("policy", "set", str(first))
        assert result.returncode == 0, result.stderr
        yield started


def _freezing_bundle(api: Session) -> PolicyBundleContent:
    """The next version with a roster naming only an outsider as admin (no active admin)."""
    state = fetch_team_policy(api)
    assert state.bundle is not None
    current = state.bundle.content
    outsider = SigningIdentity.generate()
    return PolicyBundleContent(
        team_id=current.team_id, version=state.version + 1, issued_at=int(time.time()),
        policy_text=with_version(current.policy_text, state.version + 1),
        roster=Roster.of([RosterEntry(outsider.public, "nobody@example.com", Role.ADMIN)]),
        agent_tags=current.agent_tags, previous_sha256=current.sha256(),
    )


def test_policy_set_with_the_flag_says_what_it_accepts_and_publishes(
    stack: LocalStack, tmp_path: Path
) -> None:
    # Runs before the freeze below (module order): this roster keeps its admin.
    second = tmp_path / "policy-v2.toml"
    second.write_text(POLICY_TEMPLATE.format(version=2, extra=""))
    result = stack.run_tucdesk("policy", "set", "--freeze-roster", str(second))
    assert result.returncode == 0, result.stderr
    assert "--freeze-roster: if this roster names no active admin" in result.stderr.decode()
    assert "policy version 2 is set" in result.stdout.decode()


def test_publish_sends_freeze_roster_only_when_told(stack: LocalStack, tmp_path: Path) -> None:
    home = tmp_path / "cli"
    shutil.copytree(stack.cli_home, home)
    api = Session.from_home(CliHome(home))
    try:
        before = fetch_team_policy(api).version
        content = _freezing_bundle(api)
        with pytest.raises(ApiError) as refused:
            _publish(api, content)
        assert refused.value.code == "roster_would_freeze"
        assert "--freeze-roster" in refused.value.message
        assert fetch_team_policy(api).version == before
        _publish(api, content, freeze_roster=True)
        assert fetch_team_policy(api).version == before + 1
    finally:
        api.close()


@pytest.mark.parametrize("words", [["policy", "set", "FILE"], ["roster", "sign"]])
def test_the_flag_is_offered_and_its_help_says_what_it_does(
    stack: LocalStack, tmp_path: Path, words: list[str]
) -> None:
    helped = stack.run_tucdesk(*words[:2], "--help", home=tmp_path)
    text = " ".join(helped.stdout.decode().split())
    assert "--freeze-roster" in text
    assert "roster_would_freeze" in text and "compromised" in text
    assert "reset-policy" in text
