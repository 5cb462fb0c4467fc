"""What decide() is asked about: who (operator), where (agent), what (action and command).

Every field here must come from a trusted source, never from what the subject claims about
itself: the operator's email and role from the signed roster or signed access token, the agent's
tags from what admins assigned (the rendezvous registry, or the signed policy bundle on the
agent) — never tags an agent reports for itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    """What the operator wants to do on the agent."""

    SHELL = "shell"
    EXEC = "exec"


@dataclass(frozen=True)
class RequestingOperator:
    """The operator asking: email, role and the thumbprint of the key they signed with."""

    email: str
    role: str
    key_thumbprint: str


@dataclass(frozen=True)
class TargetAgent:
    """The agent asked for: its id, its name, and the tags admins assigned to it."""

    agent_id: str
    name: str
    tags: frozenset[str]


@dataclass(frozen=True)
class AccessRequest:
    """One session request. ``command`` is the exec argv; it is None for a shell."""

    operator: RequestingOperator
    agent: TargetAgent
    action: Action
    command: tuple[str, ...] | None = None
