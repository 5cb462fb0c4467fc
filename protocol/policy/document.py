"""The policy document: TOML text parsed and validated into a Policy, with errors naming the line.

The language is described in docs/policy.md. Validation is strict: unknown keys, empty lists,
unknown roles, days, time zones or actions are errors, because in a security policy a typo that
is silently ignored changes who gets in. So is a selector that can never match: an agent id or
tag outside the forms the rendezvous issues (protocol/identifiers.py: ids are ``agt_`` and 16
lower-case base32 characters, tags lower-case ``a-z 0-9 - _ . : =``), or an allow rule for a
role that can never open a session, a name glob that no host name could match (agent names
are host names: only A-Z a-z 0-9 . _ - and the glob characters * ? [ ] ! are allowed, no
spaces, no look-alike letters from other scripts) or an email that is not in Unicode NFKC form
(the roster compares emails ignoring case but never normalises them, so a decomposed ``é`` or
a full-width ``ｆ`` would never match). Ids and tags compare exactly, so ``Web`` is refused
rather than lower-cased: the signed text must say what is enforced.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from protocol.identifiers import (
    AGENT_ID_PREFIX,
    HOSTNAME_CHARACTERS,
    TAG_FORM,
    id_form,
    is_agent_tag,
    is_issued_id,
)
from protocol.policy.errors import PolicyDocumentError
from protocol.policy.matching import AgentSelector, CommandPattern, OperatorSelector
from protocol.policy.request import Action
from protocol.policy.roster import SESSION_ROLES, Role, check_email
from protocol.policy.source_lines import Path, SourceLines, format_path
from protocol.policy.time_window import (
    ALL_DAYS,
    DEFAULT_TIMEZONE,
    MINUTES_PER_DAY,
    TimeWindow,
    parse_days,
    parse_hours,
    parse_timezone,
)

MAX_POLICY_SIZE = 256 * 1024
MAX_RULES = 1000
MAX_PATTERNS = 256
MAX_SELECTOR_ITEMS = 1000
MAX_RULE_ID_LENGTH = 64
MAX_NAME_LENGTH = 128
MAX_DESCRIPTION_LENGTH = 1024
MAX_VERSION = 2**53 - 1
DEFAULT_SOURCE_NAME = "policy.toml"
HIGH_RISK_RULE_ID = "high_risk"
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TOML_POSITION = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.DOTALL)

_TOP_KEYS = frozenset({"version", "mode", "description", "high_risk", "rules"})
_RULE_KEYS = frozenset(
    {"id", "outcome", "description", "actions", "operators", "agents", "commands", "when"}
)
_OPERATOR_KEYS = frozenset({"emails", "roles"})
_AGENT_KEYS = frozenset({"ids", "names", "tags"})
_WHEN_KEYS = frozenset({"days", "hours", "timezone"})

_T = TypeVar("_T")
_E = TypeVar("_E", bound=StrEnum)


class Mode(StrEnum):
    """What happens when no rule matches."""

    ALLOWLIST = "allowlist"
    """Deny unless a rule allows."""
    BLOCKLIST = "blocklist"
    """Allow unless a rule denies."""


class Outcome(StrEnum):
    """What a rule, and a decision, says."""

    ALLOW = "allow"
    DENY = "deny"
    APPROVAL_REQUIRED = "approval_required"


@dataclass(frozen=True)
class Rule:
    """One rule: the selectors it matches on (None = any) and its outcome."""

    rule_id: str
    outcome: Outcome
    actions: frozenset[Action]
    operators: OperatorSelector | None = None
    agents: AgentSelector | None = None
    commands: tuple[CommandPattern, ...] | None = None
    when: TimeWindow | None = None
    description: str = ""


@dataclass(frozen=True)
class Policy:
    """A validated policy document."""

    version: int
    mode: Mode
    rules: tuple[Rule, ...]
    high_risk: tuple[CommandPattern, ...] = ()
    description: str = ""


def parse_policy(
    source: str | bytes, source_name: str = DEFAULT_SOURCE_NAME, *, already_signed: bool = False
) -> Policy:
    """Parse and validate a policy document; raise PolicyDocumentError naming the line at fault.

    ``already_signed`` is for a document inside a bundle an admin signed earlier (the one in
    force, an agent's cache): selectors that can never match are let through and still never
    match, so a team's policy stays readable after an upgrade that added those checks. Every
    new document (``tucdesk policy set``, signing, countersigning) is checked fully.
    """
    text = _decode(source, source_name)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise _syntax_error(error, source_name) from None
    except RecursionError:
        raise PolicyDocumentError(
            "nests too deeply", source_name=source_name, line=None, field=None
        ) from None
    return _Validator(source_name, SourceLines.scan(text), strict=not already_signed).policy(data)


def _decode(source: str | bytes, source_name: str) -> str:
    def fail(message: str) -> PolicyDocumentError:
        return PolicyDocumentError(message, source_name=source_name, line=None, field=None)

    if isinstance(source, bytes | bytearray):
        if len(source) > MAX_POLICY_SIZE:
            raise fail(f"is larger than {MAX_POLICY_SIZE} bytes")
        try:
            return bytes(source).decode("utf-8")
        except UnicodeDecodeError:
            raise fail("is not UTF-8 text") from None
    if not isinstance(source, str):
        raise fail("must be text")
    if len(source) > MAX_POLICY_SIZE:
        raise fail(f"is larger than {MAX_POLICY_SIZE} bytes")
    try:
        encoded = source.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates have no UTF-8 form, so such a document could never be hashed or signed.
        raise fail("is not valid Unicode text") from None
    if len(encoded) > MAX_POLICY_SIZE:
        raise fail(f"is larger than {MAX_POLICY_SIZE} bytes")
    return source


def _parse_day(name: str) -> frozenset[int]:
    return parse_days([name])


def _syntax_error(error: tomllib.TOMLDecodeError, source_name: str) -> PolicyDocumentError:
    message = str(error)
    match = _TOML_POSITION.match(message)
    if match is None:
        return PolicyDocumentError(
            f"is not valid TOML: {message}", source_name=source_name, line=None, field=None
        )
    detail, line, column = match.groups()
    return PolicyDocumentError(
        f"is not valid TOML: {detail} (column {column})",
        source_name=source_name,
        line=int(line),
        field=None,
    )


class _Validator:
    def __init__(self, source_name: str, lines: SourceLines, *, strict: bool = True) -> None:
        self.source_name = source_name
        self.lines = lines
        self.strict = strict

    def fail(self, path: Path, message: str, separator: str = " ") -> PolicyDocumentError:
        field = format_path(path)
        return PolicyDocumentError(
            f"{field}{separator}{message}" if field else message,
            source_name=self.source_name,
            line=self.lines.line_of(path),
            field=field or None,
        )

    def policy(self, data: dict[str, Any]) -> Policy:
        self.known_keys(data, (), _TOP_KEYS)
        if "version" not in data:
            raise self.fail(("version",), "is required (a whole number, raised on every change)")
        version = data["version"]
        if type(version) is not int or not 1 <= version <= MAX_VERSION:
            raise self.fail(("version",), f"must be a whole number from 1 to {MAX_VERSION}")
        if "mode" not in data:
            raise self.fail(("mode",), "is required: \"allowlist\" or \"blocklist\"")
        mode = self.choice(data["mode"], ("mode",), Mode)
        description = self.description(data, ())
        high_risk: tuple[CommandPattern, ...] = ()
        if "high_risk" in data:
            high_risk = self.patterns(data["high_risk"], ("high_risk",))
        raw_rules = data.get("rules", [])
        if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
            raise self.fail(("rules",), "must be a list of [[rules]] tables")
        if len(raw_rules) > MAX_RULES:
            raise self.fail(("rules",), f"has more than {MAX_RULES} rules")
        rules: list[Rule] = []
        seen: set[str] = set()
        for index, raw in enumerate(raw_rules):
            rule = self.rule(raw, ("rules", index))
            if rule.rule_id in seen:
                raise self.fail(("rules", index, "id"), f"{rule.rule_id!r} is used by another rule")
            seen.add(rule.rule_id)
            rules.append(rule)
        return Policy(version, mode, tuple(rules), high_risk, description)

    def rule(self, data: dict[str, Any], path: Path) -> Rule:
        self.known_keys(data, path, _RULE_KEYS)
        for required in ("id", "outcome"):
            if required not in data:
                raise self.fail(path, f"lacks the required key {required!r}")
        rule_id = data["id"]
        if (
            not isinstance(rule_id, str)
            or len(rule_id) > MAX_RULE_ID_LENGTH
            or not _RULE_ID.fullmatch(rule_id)
        ):
            raise self.fail(
                (*path, "id"),
                f"must be 1..{MAX_RULE_ID_LENGTH} letters, digits, '.', '_' or '-'",
            )
        if rule_id == HIGH_RISK_RULE_ID:
            raise self.fail((*path, "id"), f"{HIGH_RISK_RULE_ID!r} is reserved for high_risk")
        outcome = self.choice(data["outcome"], (*path, "outcome"), Outcome)
        actions = frozenset(Action)
        if "actions" in data:
            actions = frozenset(
                self.string_list(data["actions"], (*path, "actions"), self.enum_item(Action))
            )
        commands = None
        if "commands" in data:
            if "actions" in data and actions != {Action.EXEC}:
                raise self.fail(
                    (*path, "commands"), "apply to exec only; set actions = [\"exec\"]"
                )
            actions = frozenset({Action.EXEC})
            commands = self.patterns(data["commands"], (*path, "commands"))
        return Rule(
            rule_id=rule_id,
            outcome=outcome,
            actions=actions,
            operators=self.operators(data, path, outcome),
            agents=self.agents(data, path),
            commands=commands,
            when=self.when(data, path),
            description=self.description(data, path),
        )

    def operators(
        self, rule: dict[str, Any], rule_path: Path, outcome: Outcome
    ) -> OperatorSelector | None:
        if "operators" not in rule:
            return None
        path = (*rule_path, "operators")
        data = self.table(rule["operators"], path, _OPERATOR_KEYS)
        emails = roles = frozenset[str]()
        if "emails" in data:
            emails = frozenset(
                self.string_list(
                    data["emails"],
                    (*path, "emails"),
                    self.normal_email_item if self.strict else self.email_item,
                )
            )
        if "roles" in data:
            listed = self.string_list(data["roles"], (*path, "roles"), self.enum_item(Role))
            if self.strict and outcome is not Outcome.DENY:
                self.check_session_roles(listed, (*path, "roles"), outcome)
            roles = frozenset[str](listed)
        return OperatorSelector(emails, roles)

    def check_session_roles(self, roles: list[Role], path: Path, outcome: Outcome) -> None:
        # Only admin and operator keys may open sessions (the roster says so, and agents check
        # it): allowing another role would read as access it never gets.
        able = ", ".join(sorted(role.value for role in SESSION_ROLES))
        for index, role in enumerate(roles):
            if role not in SESSION_ROLES:
                raise self.fail(
                    (*path, index),
                    f"role {role.value!r} can never open a session (only {able} can), so this "
                    f"{outcome.value} rule never applies to it; remove it",
                    separator=": ",
                )

    def agents(self, rule: dict[str, Any], rule_path: Path) -> AgentSelector | None:
        if "agents" not in rule:
            return None
        path = (*rule_path, "agents")
        data = self.table(rule["agents"], path, _AGENT_KEYS)
        ids = tags = frozenset[str]()
        names: tuple[str, ...] = ()
        if "ids" in data:
            check_id = self.agent_id_item if self.strict else self.name_item
            ids = frozenset(self.string_list(data["ids"], (*path, "ids"), check_id))
        if "names" in data:
            check_name = self.name_glob_item if self.strict else self.name_item
            names = tuple(
                name.lower()
                for name in self.string_list(data["names"], (*path, "names"), check_name)
            )
        if "tags" in data:
            check_tag = self.tag_item if self.strict else self.name_item
            tags = frozenset(self.string_list(data["tags"], (*path, "tags"), check_tag))
        return AgentSelector(ids, names, tags)

    def when(self, rule: dict[str, Any], rule_path: Path) -> TimeWindow | None:
        if "when" not in rule:
            return None
        path = (*rule_path, "when")
        data = self.table(rule["when"], path, _WHEN_KEYS)
        days = ALL_DAYS
        if "days" in data:
            each_day = self.string_list(data["days"], (*path, "days"), _parse_day)
            days = frozenset().union(*each_day)
        start, end = 0, MINUTES_PER_DAY
        if "hours" in data:
            hours = self.string(data["hours"], (*path, "hours"))
            start, end = self.convert(parse_hours, hours, (*path, "hours"))
        zone_name = DEFAULT_TIMEZONE
        if "timezone" in data:
            zone_name = self.string(data["timezone"], (*path, "timezone"))
        zone = self.convert(parse_timezone, zone_name, (*path, "timezone"))
        return TimeWindow(days, start, end, zone)

    def patterns(self, value: object, path: Path) -> tuple[CommandPattern, ...]:
        texts = self.string_list(value, path, str, limit=MAX_PATTERNS)
        return tuple(
            self.convert(CommandPattern.compile, text, (*path, index))
            for index, text in enumerate(texts)
        )

    def description(self, data: dict[str, Any], path: Path) -> str:
        if "description" not in data:
            return ""
        text = self.string(data["description"], (*path, "description"))
        if len(text) > MAX_DESCRIPTION_LENGTH:
            raise self.fail(
                (*path, "description"), f"is longer than {MAX_DESCRIPTION_LENGTH} characters"
            )
        return text

    def known_keys(self, data: dict[str, Any], path: Path, allowed: frozenset[str]) -> None:
        for key in data:
            if key not in allowed:
                raise self.fail(
                    (*path, key), f"is not a known key here (expected {', '.join(sorted(allowed))})"
                )

    def table(self, value: object, path: Path, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "must be a table")
        self.known_keys(value, path, allowed)
        if not value:
            raise self.fail(path, f"must set at least one of {', '.join(sorted(allowed))}")
        return value

    def string(self, value: object, path: Path) -> str:
        if not isinstance(value, str):
            raise self.fail(path, "must be a string")
        return value

    def string_list(
        self,
        value: object,
        path: Path,
        convert: Callable[[str], _T],
        limit: int = MAX_SELECTOR_ITEMS,
    ) -> list[_T]:
        if not isinstance(value, list):
            raise self.fail(path, "must be a list of strings")
        if not value:
            raise self.fail(path, "must not be empty (leave the key out to match anything)")
        if len(value) > limit:
            raise self.fail(path, f"has more than {limit} entries")
        items = []
        for index, item in enumerate(value):
            items.append(self.convert(convert, self.string(item, (*path, index)), (*path, index)))
        return items

    def convert(self, convert: Callable[[Any], _T], value: Any, path: Path) -> _T:
        try:
            return convert(value)
        except ValueError as error:
            raise self.fail(path, str(error), separator=": ") from None

    def choice(self, value: object, path: Path, choices: type[StrEnum]) -> Any:
        options = ", ".join(choice.value for choice in choices)
        if not isinstance(value, str) or value not in {choice.value for choice in choices}:
            raise self.fail(path, f"must be one of {options}")
        return choices(value)

    @staticmethod
    def enum_item(choices: type[_E]) -> Callable[[str], _E]:
        def convert(text: str) -> _E:
            if text not in {choice.value for choice in choices}:
                options = ", ".join(choice.value for choice in choices)
                raise ValueError(f"{text!r} must be one of {options}")
            return choices(text)

        return convert

    @staticmethod
    def email_item(text: str) -> str:
        if not check_email(text):
            raise ValueError(f"{text!r} is not an email address")
        return text.lower()

    @classmethod
    def normal_email_item(cls, text: str) -> str:
        # The roster keeps an email as the invite gave it (lower-cased, never normalised):
        # only the NFKC form, the one people type, can be compared with it reliably.
        email = cls.email_item(text)
        normal = unicodedata.normalize("NFKC", text)
        if normal != text:
            raise ValueError(
                f"{text!r} ({ascii(text)}) is not in Unicode NFKC form: emails compare as "
                f"invited, ignoring case only, so it matches no one; write {normal!r} "
                f"({ascii(normal)})"
            )
        return email

    @staticmethod
    def name_glob_item(text: str) -> str:
        # Agent names are host names: a glob with any other character never matches one.
        text = _Validator.name_item(text)
        problem = _name_glob_problem(text)
        if problem is not None:
            raise ValueError(
                f"name {text!r} can never match an agent: {problem} (agent names are host "
                "names: A-Z a-z 0-9 . _ -, matched ignoring case; globs may add * ? [ ] [! ])"
            )
        return text

    @staticmethod
    def agent_id_item(text: str) -> str:
        # Compared exactly: an id the store could never issue would never match an agent.
        if not is_issued_id(text, AGENT_ID_PREFIX):
            hint = " (ids are lower-case)" if is_issued_id(text.lower(), AGENT_ID_PREFIX) else ""
            raise ValueError(
                f"{text[:MAX_NAME_LENGTH]!r} is not an agent id{hint}: an agent id is "
                f"{id_form(AGENT_ID_PREFIX)}, as 'tucdesk agents' lists it"
            )
        return text

    @staticmethod
    def tag_item(text: str) -> str:
        # Compared exactly, and tags are stored lower-case: 'Web' would never match 'web'.
        if not is_agent_tag(text):
            lower = text.strip().lower()
            hint = f"; write {lower!r}" if is_agent_tag(lower) else ""
            raise ValueError(
                f"tag {text[:MAX_NAME_LENGTH]!r} can never match an agent: tags are {TAG_FORM}"
                f"{hint}"
            )
        return text

    @staticmethod
    def name_item(text: str) -> str:
        if not text or len(text) > MAX_NAME_LENGTH or not text.isprintable():
            raise ValueError(f"must be 1..{MAX_NAME_LENGTH} printable characters")
        return text


def _name_glob_problem(glob: str) -> str | None:
    """Why the name glob ``glob`` can match no host name, or None if it may match one."""
    index, first = 0, True
    while index < len(glob):
        char = glob[index]
        if char in "*?":
            index += 1
        elif char == "[":
            end = glob.find("]", index + 1)
            if end == -1:
                return "'[' opens a set that no ']' closes"
            members = glob[index + 1 : end]
            negated = members.startswith("!")
            members = members.removeprefix("!")
            if not members:
                return "'[]' is an empty set"
            # A set of other characters never matches a host name's; '[!é]' is harmless.
            strange = [member for member in members if member not in HOSTNAME_CHARACTERS]
            if strange and not negated:
                return f"the set {glob[index : end + 1]!r} holds {_character(strange[0])}"
            index = end + 1
        elif char not in HOSTNAME_CHARACTERS:
            what = "a space" if char.isspace() else _character(char)
            return f"it holds {what}, which no host name does"
        elif first and not char.isalnum():
            return f"a host name never starts with {char!r}"
        else:
            index += 1
        first = False
    return None


def _character(char: str) -> str:
    """A character named for an error message: ``'Ь' (CYRILLIC CAPITAL LETTER SOFT SIGN)``."""
    name = unicodedata.name(char, "")
    return f"{char!r} ({name})" if name else repr(char)
