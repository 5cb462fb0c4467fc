"""Domain-separation prefixes: a signature names its purpose so it cannot pass as another kind.

A signature is always made over ``PREFIX || 0x00 || message``; see identity.sign_for.
"""

from enum import StrEnum


class Purpose(StrEnum):
    """What a signature is for. The value is the exact prefix signed in front of the message."""

    REGISTER = "tucdesk-register-v1"
    AGENT_AUTH = "tucdesk-agent-auth-v1"
    OPERATOR_LOGIN = "tucdesk-operator-login-v1"
    OPERATOR_ENROLL = "tucdesk-operator-enroll-v1"
    REQUEST_PROOF = "tucdesk-request-proof-v1"
    HANDSHAKE_AGENT = "tucdesk-handshake-agent-v1"
    HANDSHAKE_OPERATOR = "tucdesk-handshake-operator-v1"
    AUDIT_RECORD = "tucdesk-audit-record-v1"
    AUDIT_CHECKPOINT = "tucdesk-audit-checkpoint-v1"
    POLICY = "tucdesk-policy-v1"
    POLICY_COUNTERSIGN = "tucdesk-policy-countersign-v1"
    APPROVAL = "tucdesk-approval-v1"
    STATE_FILE = "tucdesk-state-file-v1"
    SELF_TEST = "tucdesk-self-test-v1"
    RELAY_UDP_CREDENTIAL = "tucdesk-relay-udp-credential-v1"
    SERVICE_KEY_ROTATION = "tucdesk-service-key-rotation-v1"


def framed_message(purpose: Purpose, message: bytes) -> bytes:
    """The exact bytes a signature for ``purpose`` covers."""
    return purpose.value.encode("ascii") + b"\x00" + message
