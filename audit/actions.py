"""The fixed vocabulary of audited actions, actor kinds and policy outcomes.

Records may only name an action listed here; the log refuses anything else at append. Adding an
action is a code change that ships a new verifier; a verifier meeting an action it does not know
(a newer release's, of the same ``word.word`` form) still checks the record's chain and signature
and answers NEWER (exit 5), not INVALID, since it cannot check what the record means
(audit/README.md, "Records of a newer release"). So keep new actions to that form, and never
give an existing action a new meaning an older verifier would check wrongly.
"""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """What happened. The value is the exact string stored in a record."""

    OPERATOR_INVITE_CREATED = "operator.invite_created"
    """An admin created a one-time operator invite (context: invite id, role)."""
    OPERATOR_INVITE_USED = "operator.invite_used"
    """A new operator enrolled with an invite (context: key thumbprint)."""
    OPERATOR_INVITE_REVOKED = "operator.invite_revoked"
    """An unused invite was made unusable (target = ``invite:`` and its id): by an admin with
    ``tucdesk-rendezvous invite revoke`` (context: invite id, email, role), or, in older logs,
    by an operator's disable (context: reason ``operator_disabled``, that operator's id and
    email); a disable now names the invites it expires in ``operator.revoked``."""
    OPERATOR_LOGIN_SUCCEEDED = "operator.login_succeeded"
    """An operator signed the login challenge and received an access token (context: jti)."""
    OPERATOR_LOGIN_FAILED = "operator.login_failed"
    """A login attempt failed (context: reason, client address)."""
    OPERATOR_TOKEN_REVOKED = "operator.token_revoked"  # noqa: S105 - an action name
    """An access token was revoked by its jti."""
    OPERATOR_REVOKED = "operator.revoked"
    """An operator was disabled; their key no longer authenticates. Written before the disable
    takes effect, it is the disable's one statement of what it takes away: context ``email``,
    ``role`` and the holdings read just before, ``api_keys``, ``registration_keys`` and
    ``invites`` (ids), each revoked unless used in the meantime. Keys the operator creates
    during the disable are not named; they are refused at use because their creator is
    disabled. A repeated disable writes no second record."""
    OPERATOR_REVOKE_FAILED = "operator.revoke_failed"
    """An ``operator.revoked`` just recorded (the same actor's latest for the operator) did not
    take effect (target = the same operator; context: reason): with ``last_active_admin``
    (another admin was disabled first) the operator is still active; with ``already_disabled``
    another disable of the operator committed first, and its ``operator.revoked`` states what
    was taken away (two admins or instances disabling at once). Without such an earlier
    record, a disable was refused before anything was done (target = ``operator:`` and the id
    as sent; context: reason ``not_found``, ``not_permitted`` or ``last_active_admin``)."""
    API_KEY_CREATED = "api_key.created"
    """An integration API key was created (never the key itself; its id)."""
    API_KEY_REVOKED = "api_key.revoked"
    """An integration API key was revoked by a revoke request (a disable names the keys
    it revokes in ``operator.revoked`` instead)."""
    REGISTRATION_KEY_CREATED = "registration_key.created"
    """An admin created a single-use agent registration key (context: key id, tags, ttl)."""
    REGISTRATION_KEY_USED = "registration_key.used"
    """A registration key was consumed by an enrolling agent."""
    REGISTRATION_KEY_REVOKED = "registration_key.revoked"
    """A registration key was revoked before use (a disable names the keys it revokes in
    ``operator.revoked`` instead)."""
    AGENT_REGISTERED = "agent.registered"
    """An agent enrolled. Signed by the audit key, it introduces the agent's public key (target =
    agent id, context carries ``agent_public_key`` and ``agent_key_id``): see audit/trust.py."""
    AGENT_REGISTRATION_REFUSED = "agent.registration_refused"
    """An enrollment was refused (context: reason)."""
    AGENT_CLONE_ANOMALY = "agent.clone_anomaly"
    """One agent identity appeared with two machine fingerprints or two live connections."""
    AGENT_CONNECTED = "agent.connected"
    """An agent opened its control channel."""
    AGENT_DISCONNECTED = "agent.disconnected"
    """An agent's control channel closed."""
    AGENT_REMOVED = "agent.removed"
    """An admin removed an agent from the team (target = agent id; context: name, key
    fingerprint): its key never authenticates again, and its name is free for a new agent."""
    AGENT_REMOVE_FAILED = "agent.remove_failed"
    """A removal of an agent was refused and nothing was removed (target = the agent id as
    sent; context: reason ``not_found`` or ``not_permitted``)."""
    AGENT_TAGS_CHANGED = "agent.tags_changed"
    """An admin changed an agent's tags (target = agent id; context: name, old and new tags).
    Agents enforce the new tags once an admin signs them into the roster."""
    AGENT_TAGS_CHANGE_FAILED = "agent.tags_change_failed"
    """An ``agent.tags_changed`` just recorded did not take effect: the agent's tags changed
    meanwhile (context: name, the tags it was to replace and to set, the current tags), so
    that earlier record names an attempt. Without such an earlier record, a change was refused
    before anything was done (target = the agent id as sent; context: reason ``not_found`` or
    ``not_permitted``)."""
    SESSION_REQUESTED = "session.requested"
    """An operator asked for a session to a target."""
    SESSION_DECISION = "session.decision"
    """Policy decided on a session request (policy_result says how and why)."""
    SESSION_STARTED = "session.started"
    """A session's handshake completed and the shell or command started."""
    SESSION_COMMAND = "session.command"
    """A command ran inside a session (context: command, exit code)."""
    SESSION_ENDED = "session.ended"
    """A session ended (context: exit status, byte counts), as its agent signed it; or as the
    rendezvous or an admin ended it (context: reason, e.g. ``agent_removed``,
    ``ended_by_admin``, ``agent_lost``)."""
    SESSION_REFUSED = "session.refused"
    """A session was refused after the decision (e.g. by the agent's local policy)."""
    SESSION_END_FAILED = "session.end_failed"
    """A request to end a session (``tucdesk sessions end``) was refused and nothing was ended
    (target = ``session:`` and the id as sent; context: reason ``not_found`` (also another
    team's session) or ``not_permitted``). An admin's end that went ahead is ``session.ended``
    by that admin, reason ``ended_by_admin``."""
    POLICY_SET = "policy.set"
    """A team's signed policy document was replaced (context: version, hash)."""
    ROSTER_SIGNED = "roster.signed"
    """A team's operator roster was signed (context: version, hash)."""
    POLICY_SET_FAILED = "policy.set_failed"
    """A bundle just audited as ``policy.set`` or ``roster.signed`` was not stored after all:
    another admin stored that version first, or the store failed (context: audited_as, version,
    sha256, reason). That earlier record, with the same sha256, names an attempt, not the policy
    in force."""
    POLICY_RESET = "policy.reset"
    """The server admin retired a team's signed policy chain (``tucdesk-rendezvous team
    reset-policy``) because no active admin of its signed roster was left to sign the next
    version (context: ``retired_version``, ``retired_sha256``, and ``signers``: the active
    admins who may sign the new first one). Agents keep their pins: only a re-enrolled agent
    takes the new chain."""
    POLICY_REFUSED = "policy.refused"
    """An agent refused a policy bundle it was sent (context: version, reason)."""
    APPROVAL_REQUESTED = "approval.requested"
    """A request was parked waiting for an approver."""
    APPROVAL_APPROVED = "approval.approved"
    """An approver signed the exact request."""
    APPROVAL_DENIED = "approval.denied"
    """An approver refused the request."""
    APPROVAL_WITHDRAWN = "approval.withdrawn"
    """The requester withdrew a pending request before anyone decided it."""
    APPROVAL_EXPIRED = "approval.expired"
    """A parked request expired without a decision."""
    APPROVAL_EXECUTED = "approval.executed"
    """An approved request was carried out."""
    APPROVAL_DECISION_REFUSED = "approval.decision_refused"
    """An approval, denial or withdrawal was refused and changed nothing (target =
    ``approval_request:`` and the id as sent; context: approval_request (that id), decision
    (``approve``, ``deny`` or ``withdraw``), reason: e.g. ``not_found``, ``own_request``,
    ``role_may_not_decide``, ``not_requester``, ``already_<state>``)."""
    APPROVAL_SUPERSEDED = "approval.superseded"
    """An ``approval.approved``, ``approval.denied``, ``approval.withdrawn`` or
    ``approval.expired`` just recorded did not take effect: the request was decided, withdrawn
    or expired first (context:
    approval_request, audited_as, state: the request's state that won)."""
    AUDIT_EXPORTED = "audit.exported"
    """Someone exported the team's audit log."""
    HISTORY_PRUNED = "history.pruned"
    """The server admin deleted the team's old session and approval-request rows from the
    database (``tucdesk-rendezvous db prune``), recorded before they were deleted (context:
    before: the cutoff, UTC; sessions and approval_requests: how many). Audit records are never
    pruned: the log keeps its account of those sessions."""
    SERVICE_KEY_ROTATED = "service_key.rotated"
    """An admin rotated a rendezvous service key (target = ``service-key:<purpose>``; context:
    purpose, old and new fingerprints, the new key). Recorded in every log; for the audit
    signer it is signed by the old key and introduces the new one: see audit/trust.py."""


class ActorKind(StrEnum):
    """Who acted."""

    OPERATOR = "operator"
    """A human operator; ``id`` is the operator id, ``display`` their email."""
    AGENT = "agent"
    """An agent on a managed host; ``id`` is the agent id."""
    API_KEY = "api_key"
    """An integration authenticated by API key; ``id`` is the key id."""
    SERVICE = "service"
    """The rendezvous itself (expiries, anomaly detection)."""
    UNAUTHENTICATED = "unauthenticated"
    """A caller who did not prove an identity (failed logins, refused enrollments)."""


class PolicyOutcome(StrEnum):
    """The result a policy decision or an approval step produced."""

    ALLOW = "allow"
    DENY = "deny"
    APPROVAL_REQUIRED = "approval_required"
    APPROVED = "approved"
    DENIED = "denied"
