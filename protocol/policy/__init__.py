"""Team policy (issue 7): the policy document, decide(), the signed policy bundle and approvals.

Sans-I/O like the rest of protocol/: no sockets, no files, no clock. Callers pass ``now`` in.

- document: parse_policy(text) -> Policy, with errors that name the line at fault
- decide: decide(policy, request, now) -> Decision(result, rule_id, reason)
- roster: the team's operator keys and roles
- signed_policy: the admin-signed, rendezvous-countersigned bundle and the agent's pins
- approval: approvals signed by an approver over one exact request
"""

from protocol.policy.approval import (
    ApprovalContext,
    ApprovalStatement,
    SignedApproval,
    approve_request,
    command_sha256,
    verify_approval,
)
from protocol.policy.decide import Decision, decide
from protocol.policy.document import HIGH_RISK_RULE_ID, Mode, Outcome, Policy, Rule, parse_policy
from protocol.policy.errors import (
    ApprovalError,
    ApprovalExpiredError,
    ApprovalMismatchError,
    ApproverNotAuthorizedError,
    CountersignatureError,
    MalformedBundleError,
    PolicyBundleError,
    PolicyDocumentError,
    PolicyError,
    RollbackError,
    SelfApprovalError,
    TeamMismatchError,
    UntrustedSignerError,
)
from protocol.policy.request import AccessRequest, Action, RequestingOperator, TargetAgent
from protocol.policy.roster import Role, Roster, RosterEntry
from protocol.policy.signed_policy import (
    AcceptedPolicy,
    PinnedPolicyTrust,
    PolicyBundleContent,
    SignedPolicyBundle,
    accept_policy_bundle,
    countersign_policy_bundle,
    sign_policy_bundle,
)

__all__ = [
    "HIGH_RISK_RULE_ID",
    "AcceptedPolicy",
    "AccessRequest",
    "Action",
    "ApprovalContext",
    "ApprovalError",
    "ApprovalExpiredError",
    "ApprovalMismatchError",
    "ApprovalStatement",
    "ApproverNotAuthorizedError",
    "CountersignatureError",
    "Decision",
    "MalformedBundleError",
    "Mode",
    "Outcome",
    "PinnedPolicyTrust",
    "Policy",
    "PolicyBundleContent",
    "PolicyBundleError",
    "PolicyDocumentError",
    "PolicyError",
    "RequestingOperator",
    "Role",
    "RollbackError",
    "Roster",
    "RosterEntry",
    "Rule",
    "SelfApprovalError",
    "SignedApproval",
    "SignedPolicyBundle",
    "TargetAgent",
    "TeamMismatchError",
    "UntrustedSignerError",
    "accept_policy_bundle",
    "approve_request",
    "command_sha256",
    "countersign_policy_bundle",
    "decide",
    "parse_policy",
    "sign_policy_bundle",
    "verify_approval",
]
