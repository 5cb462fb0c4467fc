"""How a rule's selectors match a request: operators, agents and exec command patterns.

Commands are matched as text. The argv is joined with single spaces and every run of whitespace
is collapsed to one space, so ``["rm", "-rf", "/tmp/x"]`` is ``rm -rf /tmp/x``. A pattern is a
shell-style glob matched against the whole of that text, case-sensitively: ``*`` is any run of
characters (spaces and slashes included), ``?`` one character, ``[abc]`` / ``[!abc]`` one
character from (or not from) a set. Pattern whitespace is collapsed the same way.

This is a guard rail, not a sandbox: ``sh -c``, aliases, scripts, other spellings of the same
flags and plain shell sessions all reach the same effect without matching a pattern.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.policy.errors import RequestError
from protocol.policy.request import RequestingOperator, TargetAgent

MAX_PATTERN_LENGTH = 256
MAX_COMMAND_ARGUMENTS = 1024
MAX_COMMAND_LENGTH = 32 * 1024
_WHITESPACE = re.compile(r"\s+")


def normalise_command(argv: Sequence[str]) -> str:
    """The text command patterns are matched against: argv joined, whitespace collapsed."""
    if isinstance(argv, str) or not argv:
        raise RequestError("an exec command must be a non-empty list of arguments")
    if len(argv) > MAX_COMMAND_ARGUMENTS:
        raise RequestError(f"an exec command has at most {MAX_COMMAND_ARGUMENTS} arguments")
    if not all(isinstance(argument, str) for argument in argv):
        raise RequestError("exec command arguments must be text")
    text = _WHITESPACE.sub(" ", " ".join(argv)).strip()
    if not text:
        raise RequestError("an exec command must not be blank")
    if len(text) > MAX_COMMAND_LENGTH:
        raise RequestError(f"an exec command is at most {MAX_COMMAND_LENGTH} characters")
    return text


@dataclass(frozen=True)
class CommandPattern:
    """One glob over normalised command text."""

    text: str
    _regex: re.Pattern[str]

    @classmethod
    def compile(cls, pattern: str) -> CommandPattern:
        """Check and compile ``pattern``; ValueError if it is empty, too long or unprintable."""
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise ValueError(f"a command pattern is at most {MAX_PATTERN_LENGTH} characters")
        if not pattern.isprintable():
            raise ValueError("a command pattern must not contain control characters")
        text = _WHITESPACE.sub(" ", pattern).strip()
        if not text:
            raise ValueError("a command pattern must not be blank")
        # fnmatch.translate yields an anchored regex free of nested quantifiers; with the
        # pattern and the command both length-capped, matching time stays bounded.
        return cls(text, re.compile(fnmatch.translate(text)))

    def matches(self, command_text: str) -> bool:
        """Whether the normalised command text matches this pattern as a whole."""
        return self._regex.match(command_text) is not None


@dataclass(frozen=True)
class OperatorSelector:
    """Operators a rule is about: any listed email (case-insensitive) or any listed role."""

    emails: frozenset[str]
    roles: frozenset[str]

    def matches(self, operator: RequestingOperator) -> bool:
        """Whether ``operator`` is one of the selected operators."""
        return operator.email.lower() in self.emails or operator.role in self.roles


@dataclass(frozen=True)
class AgentSelector:
    """Agents a rule is about: a listed id, a name matching a listed glob, or all listed tags."""

    ids: frozenset[str]
    names: tuple[str, ...]
    tags: frozenset[str]

    def matches(self, agent: TargetAgent) -> bool:
        """Whether ``agent`` is one of the selected agents."""
        if agent.agent_id in self.ids:
            return True
        name = agent.name.lower()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names):
            return True
        return bool(self.tags) and self.tags <= agent.tags
