"""The policy package's errors: documents that fail validation, bundles and approvals refused."""

from __future__ import annotations

from protocol.errors import ProtocolError


class PolicyError(ProtocolError):
    """Base class for every error raised by protocol.policy."""


class PolicyDocumentError(PolicyError):
    """A policy document is not valid; the message names the file, line and field."""

    def __init__(self, message: str, *, source_name: str, line: int | None, field: str | None):
        location = source_name if line is None else f"{source_name} line {line}"
        super().__init__(f"{location}: {message}")
        self.source_name = source_name
        self.line = line
        self.field = field
        self.detail = message


class RequestError(PolicyError):
    """A request handed to decide() is malformed (and is therefore denied)."""


class PolicyBundleError(PolicyError):
    """A signed policy bundle was refused; the subclass says why."""


class MalformedBundleError(PolicyBundleError):
    """The bundle is not well-formed: bad JSON, wrong shape, over a limit, or an invalid policy."""


class TeamMismatchError(PolicyBundleError):
    """The bundle is for another team than the one this agent belongs to."""


class UntrustedSignerError(PolicyBundleError):
    """The bundle is not signed by a pinned admin key, or the signature does not verify."""


class CountersignatureError(PolicyBundleError):
    """The rendezvous countersignature is missing or does not verify against the pinned key."""


class RollbackError(PolicyBundleError):
    """The bundle is older than the cached one, contradicts it, or does not follow it."""


class ApprovalError(PolicyError):
    """An approval was refused: malformed, forged, for another request, expired or self-approved."""


class SelfApprovalError(ApprovalError):
    """The approver is the operator who made the request."""


class ApprovalMismatchError(ApprovalError):
    """The approval is for another request, agent, action, command or policy version."""


class ApprovalExpiredError(ApprovalError):
    """The approval's validity window does not contain the verifier's clock."""


class ApproverNotAuthorizedError(ApprovalError):
    """The approving key is not in the signed roster, or its role may not approve."""
