"""The agent's exception hierarchy: every failure a user can act on says what to do next."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every agent failure that the CLI reports as one line."""


class ConfigError(AgentError):
    """A setting (flag, TUCDESK_AGENT_* variable or TOML entry) is missing or invalid."""


class EnrollmentError(AgentError):
    """Enrollment failed: the server refused, could not be reached, or state exists already."""


class ControlChannelError(AgentError):
    """The control channel to the rendezvous failed or the server broke its protocol."""


class OfferError(AgentError):
    """A session offer from the rendezvous is malformed and cannot be acted on."""


class PolicyCacheError(AgentError):
    """The agent's pinned policy trust or cached policy bundle cannot be read or stored."""
