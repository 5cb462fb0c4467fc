"""`tucdesk roster sign` for a team whose policy in force was signed before a release added a
check it fails (the reviewer's p2_roster.py: an allow rule listing role approver), against a
real rendezvous: it is refused before anything is asked, saying so plainly (not naming a file
the admin never gave) and giving the way out, and that way out works: `policy show >
policy.toml`, fix it, `policy set policy.toml`, then `roster sign`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio

from operator_cli.client import Session
from operator_cli.home import CliHome
from operator_cli.main import main
from operator_cli.policy_commands import fetch_team_policy
from protocol.domains import Purpose
from protocol.policy.signed_policy import (
    PolicyBundleContent,
    SignedPolicyBundle,
    _countersigned_bytes,
)
from rendezvous.credentials import hash_secret, new_invite_code
from rendezvous.service_keys import load_service_keys
from rendezvous.store import open_store
from rendezvous.store.base import StoredPolicyBundle
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio

ADMIN = "alice@alpha.test"
CAROL = "carol@alpha.test"
OLD_LINE = 'operators = { roles = ["operator", "approver"] }'  # line 6: fails since 8324058
OLD_POLICY = (
    f'version = 1\nmode = "allowlist"\n[[rules]]\nid = "ops"\noutcome = "allow"\n{OLD_LINE}\n'
)


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@dataclass
class Team:
    alice: Path
    data_dir: Path
    database_url: str


async def _run(home: Path, *arguments: str) -> int:
    exit_code: int = await trio.to_thread.run_sync(main, ["--home", str(home), *arguments])
    return exit_code


def _version(home: Path) -> tuple[int, list[str]]:
    api = Session.from_home(CliHome(home))
    try:
        state = fetch_team_policy(api)
    finally:
        api.close()
    assert state.bundle is not None
    return state.version, [entry.email for entry in state.bundle.content.roster.entries]


@pytest.fixture
async def team(tmp_path: Path) -> AsyncIterator[Team]:
    database_url = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    codes = []
    async with open_store(database_url) as store:
        alpha = await store.create_team("alpha", time.time())
        for email, role in [(ADMIN, "admin"), (CAROL, "operator")]:
            code, now = new_invite_code(), time.time()
            await store.create_invite(alpha.id, email, role, hash_secret(code), now + 600,
                                      "test", now)  # fmt: skip
            codes.append((email.split("@")[0], code))
    data_dir = tmp_path / "data"
    async with live_service(data_dir, database_url) as (url, _):
        for name, code in codes:
            login = ["--home", str(tmp_path / name), "login", "--server", url, "--invite", code]
            assert await trio.to_thread.run_sync(main, login) == 0
        team = Team(tmp_path / "alice", data_dir, database_url)
        await _sign_as_an_older_release(team, alpha.id)
        yield team


async def _sign_as_an_older_release(team: Team, team_id: str) -> None:
    """Version 1, signed by alice and countersigned by the rendezvous with no document checks
    (as releases before 8324058 did), stored as the team's policy in force."""
    api = Session.from_home(CliHome(team.alice))
    try:
        state = await trio.to_thread.run_sync(fetch_team_policy, api)
        content = PolicyBundleContent(
            team_id=team_id, version=1, issued_at=int(time.time()), policy_text=OLD_POLICY,
            roster=state.current_roster, agent_tags={}, previous_sha256=None,
        )  # fmt: skip
        signed = SignedPolicyBundle(
            content, api.identity.public.key_id,
            api.identity.sign(Purpose.POLICY, content.canonical_bytes()),
        )  # fmt: skip
    finally:
        api.close()
    service = load_service_keys(team.data_dir).policy_signer
    countersigned = replace(
        signed,
        countersigner_key_id=service.public.key_id,
        countersignature=service.sign(Purpose.POLICY_COUNTERSIGN, _countersigned_bytes(signed)),
    )
    async with open_store(team.database_url) as store:
        await store.store_policy_bundle(
            StoredPolicyBundle(
                team_id=team_id, version=1, content_sha256=content.sha256(),
                policy_sha256=content.policy_sha256,
                bundle=countersigned.to_bytes().decode("utf-8"),
                admin_key_id=signed.admin_key_id, created_by="older-release",
                created_at=time.time(),
            )
        )  # fmt: skip


async def test_roster_sign_says_the_policy_in_force_fails_and_the_way_out_works(
    team: Team, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _run(team.alice, "operators", "disable", "--yes", CAROL) == 0
    capsys.readouterr()

    # Refused before it shows or asks anything (with and without --yes), nothing signed.
    for options in ((), ("--yes",)):
        assert await _run(team.alice, "roster", "sign", *options) != 0
        out, err = capsys.readouterr()
        assert "signing roster changes" not in out and "Sign these" not in out + err
        message = " ".join(err.split())
        assert "the policy in force (version 1) fails this release's checks" in message
        assert "role 'approver' can never open a session" in message
        assert "policy.toml line" not in message  # not a file the admin gave
        assert "Agents keep the roster signed in version 1" in message
        assert "'tucdesk policy show > policy.toml'" in message
        assert "set version = 2, 'tucdesk policy set policy.toml'" in message
        assert "then 'tucdesk roster sign' again" in message
    version, roster = await trio.to_thread.run_sync(_version, team.alice)
    assert version == 1 and CAROL in roster  # agents still trust carol's key

    # The way out, exactly as the message says it.
    assert await _run(team.alice, "policy", "show") == 0
    shown, warned = capsys.readouterr()
    warning = " ".join(warned.split())
    # policy show warns on stderr, with the same steps, and keeps stdout the policy alone.
    assert warning.startswith("warning: this policy (signed before this release's checks)")
    assert "role 'approver' can never open a session" in warning
    assert f"(line {message.split('(line ')[1].split(' ')[0]} of that file)" in warning
    assert "warning" not in shown
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(shown)
    lines = policy_file.read_text().splitlines()
    line = int(message.split("(line ")[1].split(" ")[0])
    assert lines[line - 1] == OLD_LINE  # the line the message names, in that file
    lines[line - 1] = 'operators = { roles = ["operator"] }'
    policy_file.write_text("\n".join(lines).replace("version = 1", "version = 2") + "\n")
    assert await _run(team.alice, "policy", "set", str(policy_file)) == 0
    version, roster = await trio.to_thread.run_sync(_version, team.alice)
    assert version == 2 and CAROL in roster  # policy set keeps the signed roster
    assert await _run(team.alice, "roster", "sign", "--yes") == 0
    version, roster = await trio.to_thread.run_sync(_version, team.alice)
    assert version == 3 and CAROL not in roster
    capsys.readouterr()
    assert await _run(team.alice, "policy", "show") == 0
    assert capsys.readouterr().err == ""  # a policy passing today's checks: no warning
