"""`tucdesk policy show|set|test` and `tucdesk roster show|sign` (docs/sessions.md §6).

The policy an agent enforces is a bundle signed on the admin's own machine with their operator
key: the policy text, the team roster (operator keys, emails, roles) and the agent tags. The
rendezvous only countersigns and distributes it, so these commands build and sign the bundle
here, after validating the document locally and showing what changes.

``policy set`` keeps the roster and tags of the current bundle (changes to those are signed
with ``roster sign``, which shows them first); the very first bundle signs the team as it is.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from operator_cli.client import ApiError, Session
from operator_cli.confirm import answered_yes
from operator_cli.home import CliHome, HomeError
from operator_cli.http import HttpError
from protocol.errors import ProtocolError
from protocol.identity import PublicIdentity, b64url_decode
from protocol.policy import (
    PolicyBundleContent,
    Roster,
    RosterEntry,
    SignedPolicyBundle,
    parse_policy,
    sign_policy_bundle,
)
from protocol.policy.document import MAX_POLICY_SIZE, Policy
from protocol.policy.errors import PolicyDocumentError

EXIT_OK = 0
EXIT_DECLINED = 1
APPROVALS_PATH = "/v1/approvals"
# A top-level `version = N` line (bare or quoted key), keeping whatever follows the number.
_VERSION_LINE = re.compile(r'^(\s*(?:version|"version"|\'version\')\s*=\s*)(\d+)(.*)$')
_TABLE_HEADER = re.compile(r"^\s*\[")


class PolicyCommandError(HomeError):
    """A policy or roster command cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class TeamPolicy:
    """GET /v1/policy: the current signed bundle (if any) and the team as it is now."""

    bundle: SignedPolicyBundle | None
    version: int
    current_roster: Roster
    current_tags: dict[str, frozenset[str]]

    @classmethod
    def from_response(cls, body: object) -> TeamPolicy:
        """Parse the service's answer; PolicyCommandError if it is not the contract's shape."""
        if not isinstance(body, Mapping):
            raise PolicyCommandError("the server's policy answer is not a JSON object")
        try:
            raw_bundle = body.get("bundle")
            bundle = None if raw_bundle is None else SignedPolicyBundle.from_json(raw_bundle)
            version = body.get("version") or 0
            pending = body.get("pending") or {}
            roster = Roster.of(_roster_entry(item) for item in pending.get("roster") or [])
            tags = {
                str(agent): frozenset(str(tag) for tag in values)
                for agent, values in (pending.get("agent_tags") or {}).items()
            }
        except (ProtocolError, ValueError, TypeError, AttributeError) as error:
            raise PolicyCommandError(
                f"the server's policy answer is malformed ({error}); is it the same version?"
            ) from None
        if type(version) is not int:
            raise PolicyCommandError("the server's policy version is not a whole number")
        return cls(bundle, version, roster, tags)

    @property
    def signed_roster(self) -> Roster | None:
        """The roster admins signed last, or None before the first bundle."""
        return None if self.bundle is None else self.bundle.content.roster

    @property
    def signed_tags(self) -> dict[str, frozenset[str]]:
        """The agent tags admins signed last (empty before the first bundle)."""
        return {} if self.bundle is None else dict(self.bundle.content.agent_tags)


def _roster_entry(item: object) -> RosterEntry:
    if not isinstance(item, Mapping):
        raise ValueError("a roster entry is an object")
    key = PublicIdentity(b64url_decode(str(item["public_key"]), 64))
    return RosterEntry(key, str(item["email"]), item["role"])


@dataclass(frozen=True)
class RosterChange:
    """One difference between the signed roster and the team now, keyed by operator key."""

    kind: str  # "added", "removed" or "changed"
    thumbprint: str
    email: str
    detail: str

    def line(self) -> str:
        """The change as one line for the terminal."""
        return f"  {self.kind:<8} {self.email:<32} {self.detail}"


def roster_changes(signed: Roster | None, current: Roster) -> list[RosterChange]:
    """What signing ``current`` would change relative to ``signed`` (everything if none)."""
    before = {entry.thumbprint: entry for entry in (signed.entries if signed else ())}
    after = {entry.thumbprint: entry for entry in current.entries}
    changes: list[RosterChange] = []
    for thumbprint, entry in after.items():
        old = before.get(thumbprint)
        if old is None:
            changes.append(RosterChange("added", thumbprint, entry.email,
                                        f"{entry.role.value} key {entry.public_key.fingerprint}"))
        elif (old.email, old.role) != (entry.email, entry.role):
            detail = f"{old.role.value} -> {entry.role.value}"
            if old.email != entry.email:
                detail = f"{old.email} -> {entry.email}, {detail}"
            changes.append(RosterChange("changed", thumbprint, entry.email, detail))
    for thumbprint, entry in before.items():
        if thumbprint not in after:
            changes.append(RosterChange("removed", thumbprint, entry.email,
                                        f"{entry.role.value} key {entry.public_key.fingerprint}"))
    return sorted(changes, key=lambda change: (change.kind, change.email, change.thumbprint))


def tag_changes(
    signed: Mapping[str, frozenset[str]], current: Mapping[str, frozenset[str]]
) -> list[str]:
    """Agents whose admin-assigned tags differ between the signed bundle and now, one line each."""
    lines = []
    for agent in sorted(set(signed) | set(current)):
        old, new = signed.get(agent, frozenset()), current.get(agent, frozenset())
        if old != new:
            lines.append(f"  tags     {agent:<32} {_tags(old)} -> {_tags(new)}")
    return lines


def _tags(tags: frozenset[str]) -> str:
    return ",".join(sorted(tags)) or "(none)"


def with_version(policy_text: str, version: int) -> str:
    """``policy_text`` with its top-level ``version = N`` line set to ``version``.

    Only the number changes; comments and layout stay. Raises PolicyCommandError when the
    document has no such line before its first table.
    """
    lines = policy_text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if _TABLE_HEADER.match(line):
            break
        match = _VERSION_LINE.match(line)
        if match:
            lines[index] = f"{match.group(1)}{version}{match.group(3)}"
            if line.endswith("\n") and not lines[index].endswith("\n"):
                lines[index] += "\n"
            updated = "".join(lines)
            if parse_policy(updated).version != version:
                break
            return updated
    raise PolicyCommandError(
        "cannot find the policy's 'version = N' line to raise it; edit the document and use "
        "'tucdesk policy set FILE'"
    )


# policy_show prints this many '#' lines above the policy text.
POLICY_SHOW_HEADER_LINES = 3


def policy_in_force_failure(content: PolicyBundleContent) -> PolicyDocumentError | None:
    """Why the policy in force (signed under older checks, read leniently) fails today's
    checks, or None: a selector that can never match, which agents skip (a deny rule that
    never applies)."""
    try:
        parse_policy(content.policy_text)
    except PolicyDocumentError as error:
        return error
    return None


def _fix_steps(content: PolicyBundleContent, error: PolicyDocumentError) -> str:
    where = (
        "" if error.line is None
        else f" (line {error.line + POLICY_SHOW_HEADER_LINES} of that file)"
    )  # fmt: skip
    return (
        f"'tucdesk policy show > policy.toml', correct it{where} and set version = "
        f"{content.version + 1}, 'tucdesk policy set policy.toml' (it keeps the signed roster)"
    )


def check_policy_in_force(content: PolicyBundleContent) -> None:
    """Refuse, saying the way out, when the policy in force (signed under older checks) fails
    today's: no new version can carry it, so ``roster sign`` must not offer to sign."""
    error = policy_in_force_failure(content)
    if error is not None:
        version = content.version
        raise PolicyCommandError(
            f"the policy in force (version {version}) fails this release's checks, so it "
            f"cannot be signed again with the roster: {error.detail}. Agents keep the roster "
            f"signed in version {version} (a key disabled since still works on them) until "
            f"you fix the policy: {_fix_steps(content, error)}, then 'tucdesk roster sign' "
            "again"
        )


def read_policy_file(path: Path) -> tuple[str, Policy]:
    """The file's text and parsed policy; PolicyDocumentError names the line at fault."""
    try:
        if path.stat().st_size > MAX_POLICY_SIZE:
            raise PolicyCommandError(f"{path} is larger than {MAX_POLICY_SIZE} bytes")
        data = path.read_bytes()
    except OSError as error:
        raise PolicyCommandError(f"cannot read {path}: {error.strerror or error}") from None
    policy = parse_policy(data, source_name=path.name)
    return data.decode("utf-8"), policy


def fetch_team_policy(api: Session) -> TeamPolicy:
    """GET /v1/policy, parsed."""
    return TeamPolicy.from_response(api.request("GET", "/v1/policy"))


def _team_id(api: Session, state: TeamPolicy) -> str:
    if state.bundle is not None:
        return state.bundle.content.team_id
    api.token()
    team_id = (api.home.load_token() or {}).get("team_id")
    if not isinstance(team_id, str) or not team_id:
        raise PolicyCommandError("cannot tell your team; log in again with 'tucdesk login'")
    return team_id


def _publish(
    api: Session, content: PolicyBundleContent, *, freeze_roster: bool = False
) -> dict[str, Any]:
    """Sign ``content`` and PUT it; ``freeze_roster`` accepts a roster with no active admin
    (the rendezvous refuses it otherwise: 409 roster_would_freeze)."""
    signed = sign_policy_bundle(content, api.identity)
    query = "?freeze_roster=true" if freeze_roster else ""
    answer = api.request("PUT", f"/v1/policy{query}", {"bundle": signed.to_json()})
    return answer if isinstance(answer, dict) else {}


def _signer(bundle: SignedPolicyBundle) -> str:
    entry = bundle.content.roster.entry_for(bundle.admin_key_id)
    return entry.email if entry is not None else f"key {bundle.admin_key_id}"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def policy_show(home: CliHome, *, as_json: bool = False) -> int:
    """`tucdesk policy show`: the signed policy, who signed it, and what is pending."""
    api = Session.from_home(home)
    try:
        state = fetch_team_policy(api)
    finally:
        api.close()
    if as_json:
        print(json.dumps(None if state.bundle is None else state.bundle.to_json(), indent=2))
        return EXIT_OK
    if state.bundle is None:
        print("no signed policy yet: agents let only the team's admins open sessions.")
        print("write one (docs/policy.md) and sign it with: tucdesk policy set FILE")
        return EXIT_OK
    content = state.bundle.content
    pending = len(roster_changes(content.roster, state.current_roster)) + len(
        tag_changes(content.agent_tags, state.current_tags)
    )
    print(f"# policy version {content.version}, sha256 {content.sha256()[:16]}…, "
          f"issued {_when(content.issued_at)}")
    print(f"# signed by {_signer(state.bundle)}; countersigned by the rendezvous: "
          f"{'yes' if state.bundle.countersignature else 'no'}")
    print(f"# mode {content.policy.mode.value}, {len(content.policy.rules)} rules; roster of "
          f"{len(content.roster.entries)} keys"
          + (f" ({pending} changes pending: tucdesk roster show)" if pending else ""))
    sys.stdout.write(content.policy_text if content.policy_text.endswith("\n")
                     else content.policy_text + "\n")
    failure = policy_in_force_failure(content)
    if failure is not None:
        # On stderr: 'policy show > policy.toml' must still write the policy alone.
        print(
            f"warning: this policy (signed before this release's checks) fails them: "
            f"{failure.detail}. Agents skip what can never match, so a rule holding it may "
            f"not do what it says; fix it: {_fix_steps(content, failure)}",
            file=sys.stderr,
        )
    return EXIT_OK


# Said before a --freeze-roster publish (and before roster sign's question).
FREEZE_ROSTER_NOTE = (
    "--freeze-roster: if this roster names no active admin as admin, it is published anyway: "
    "nobody can then sign a policy or roster that agents accept (and no operator invited since "
    "can open a session) until the server admin runs `tucdesk-rendezvous team reset-policy` "
    "and each agent is re-enrolled"
)


def policy_set(home: CliHome, path: Path, *, freeze_roster: bool = False) -> int:
    """`tucdesk policy set FILE`: validate, show the version step, sign and publish
    (``freeze_roster``: even if the roster leaves no active admin able to sign the next)."""
    text, policy = read_policy_file(path)
    api = Session.from_home(home)
    try:
        state = fetch_team_policy(api)
        next_version = state.version + 1
        if policy.version != next_version:
            raise PolicyCommandError(
                f"{path.name} says version = {policy.version}, but the team's policy is at "
                f"version {state.version}: set version = {next_version} in {path}"
            )
        roster = state.signed_roster or state.current_roster
        tags = state.signed_tags if state.bundle is not None else state.current_tags
        print(f"policy version {state.version} -> {next_version}: mode {policy.mode.value}, "
              f"{len(policy.rules)} rules", file=sys.stderr)
        if state.bundle is None:
            print("first signed policy: it also signs the team roster as it is now:",
                  file=sys.stderr)
            for change in roster_changes(None, roster):
                print(change.line(), file=sys.stderr)
            for line in tag_changes({}, tags):
                print(line, file=sys.stderr)
        else:
            pending = roster_changes(roster, state.current_roster)
            if pending:
                print(f"roster unchanged ({len(pending)} changes pending: tucdesk roster sign)",
                      file=sys.stderr)
        content = PolicyBundleContent(
            team_id=_team_id(api, state), version=next_version, issued_at=int(time.time()),
            policy_text=text, roster=roster, agent_tags=tags,
            previous_sha256=None if state.bundle is None else state.bundle.content.sha256(),
        )
        if freeze_roster:
            print(FREEZE_ROSTER_NOTE, file=sys.stderr)
        answer = _publish(api, content, freeze_roster=freeze_roster)
    finally:
        api.close()
    pushed = answer.get("pushed_to")
    print(f"policy version {next_version} is set (sha256 {content.sha256()[:16]}…)"
          + (f"; sent to {pushed} online agents" if isinstance(pushed, int) else ""))
    return EXIT_OK


def policy_test(
    home: CliHome,
    *,
    operator: str,
    agent: str,
    action: str,
    command: str | None,
    at: str | None,
) -> int:
    """`tucdesk policy test`: the decision the stored policy makes on a request, and why."""
    if action == "exec" and not command:
        raise PolicyCommandError("--action exec needs --command \"CMD ARGS\"")
    if action == "shell" and command:
        raise PolicyCommandError("a shell has no command: leave out --command")
    argv = None
    if command:
        try:
            argv = shlex.split(command)
        except ValueError as error:
            raise PolicyCommandError(f"--command is not a valid command line: {error}") from None
    when = None if at is None else parse_instant(at).isoformat()
    body = {"operator": operator, "agent": agent, "action": action, "command": argv, "at": when}
    api = Session.from_home(home)
    try:
        answer = api.request("POST", "/v1/policy/test", body)
    finally:
        api.close()
    if not isinstance(answer, Mapping):
        raise PolicyCommandError("the server's decision is not a JSON object")
    rule = answer.get("rule_id") or "(mode default)"
    print(f"{answer.get('result')}: {answer.get('reason')}")
    print(f"  rule {rule}, policy version {answer.get('version')}")
    return EXIT_OK


def parse_instant(text: str) -> datetime:
    """An RFC 3339 time with its offset (``2026-03-29T02:30:00+02:00``, or ``…Z``)."""
    try:
        instant = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise PolicyCommandError(
            f"--at {text!r} is not a time like 2026-03-29T02:30:00+02:00"
        ) from None
    if instant.tzinfo is None:
        raise PolicyCommandError("--at needs a UTC offset or Z, e.g. 2026-03-29T02:30:00Z")
    return instant


def roster_show(home: CliHome) -> int:
    """`tucdesk roster show`: the signed roster, with pending additions, removals, changes."""
    api = Session.from_home(home)
    try:
        state = fetch_team_policy(api)
    finally:
        api.close()
    signed = state.signed_roster
    if signed is None:
        print("no signed roster yet: agents let only the team's admins open sessions.")
    else:
        print(f"signed roster (policy version {state.version}):")
        for entry in signed.entries:
            print(f"  {entry.email:<32} {entry.role.value:<9} {entry.public_key.fingerprint}")
    changes = roster_changes(signed, state.current_roster)
    tags = tag_changes(state.signed_tags, state.current_tags)
    if not changes and not tags:
        print("nothing pending: the signed roster matches the team")
        return EXIT_OK
    print("pending (not yet enforced by agents; an admin runs 'tucdesk roster sign'):")
    for change in changes:
        print(change.line())
    for line in tags:
        print(line)
    return EXIT_OK


def approvals_voided_line(api: Session) -> str:
    """How many approvals in flight a new policy version voids: every pending request and
    every approved one not used yet was made for the version in force, and the rendezvous and
    agents accept an approval only for the version it names (their requesters ask again)."""
    counts = []
    for state in ("pending", "approved"):
        try:
            listed = api.request("GET", f"{APPROVALS_PATH}?state={state}")
        except (ApiError, HttpError) as error:
            return f"  approvals it voids: unknown (the approval list could not be read: {error})"
        approvals = listed.get("approvals") if isinstance(listed, dict) else None
        counts.append(len(approvals) if isinstance(approvals, list) else 0)
    pending, approved = counts
    return (
        f"  approvals it voids: {pending} pending request(s) and {approved} approved but unused "
        "approval(s); their requesters must ask again"
    )


def roster_sign(
    home: CliHome, *, assume_yes: bool, ask: Callable[[str], str] = input,
    freeze_roster: bool = False,
) -> int:
    """`tucdesk roster sign`: sign the current roster and tags into the next policy version
    (``freeze_roster``: even if it leaves no active admin able to sign the next)."""
    api = Session.from_home(home)
    try:
        state = fetch_team_policy(api)
        if state.bundle is None:
            raise PolicyCommandError(
                "the team has no signed policy yet: sign one with 'tucdesk policy set FILE' "
                "(it signs the roster too)"
            )
        content = state.bundle.content
        changes = roster_changes(content.roster, state.current_roster)
        tags = tag_changes(content.agent_tags, state.current_tags)
        if not changes and not tags:
            print("nothing to sign: the signed roster matches the team")
            return EXIT_OK
        check_policy_in_force(content)  # before anything is asked: it could not be signed
        next_version = state.version + 1
        print(f"signing roster changes into policy version {next_version} "
              "(same policy rules):")
        for change in changes:
            print(change.line())
        for line in tags:
            print(line)
        print(approvals_voided_line(api))
        if freeze_roster:
            print(FREEZE_ROSTER_NOTE)
        if not assume_yes:
            if not sys.stdin.isatty():
                print("tucdesk: not confirmed: run it in a terminal, or pass --yes",
                      file=sys.stderr)
                return EXIT_DECLINED
            if not answered_yes(ask, "Sign these changes with your key? [y/N] "):
                print("not signed")
                return EXIT_DECLINED
        bumped = PolicyBundleContent(
            team_id=content.team_id, version=next_version, issued_at=int(time.time()),
            policy_text=with_version(content.policy_text, next_version),
            roster=state.current_roster, agent_tags=state.current_tags,
            previous_sha256=content.sha256(),
        )
        _publish(api, bumped, freeze_roster=freeze_roster)
    finally:
        api.close()
    print(f"roster signed as policy version {next_version}")
    return EXIT_OK
