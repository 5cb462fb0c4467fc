"""The session handshake (SIGMA-I): two sans-I/O state machines, bytes in and bytes out.

    operator                                               agent
    1 OperatorHello {v, sid, e_op, random}       ->
                                                 <-   2 AgentHello {e_ag, AEAD_a(id_ag, sig_ag)}
    3 OperatorAuth {AEAD_o(id_op, grant, sig_op)} ->
                                                 <-   4 AgentResult {AEAD_a(accepted | refused)}

Transcript: a running SHA-256, ``h = SHA-256(h || len u32 || field)`` per field, starting from
SHA-256("tucdesk-handshake-v1"). It absorbs message 1 as sent (so the session id, version and
random are bound), e_ag, id_ag, sig_ag, id_op, the grant and sig_op, in that order.

* shared = X25519(e_op, e_ag); an all-zero result (a low-order point) is refused.
* Handshake keys: HKDF-SHA256(shared, salt = h after e_ag, info = "tucdesk-handshake-keys-v1")
  -> AEAD_a (agent -> operator) and AEAD_o (operator -> agent), AES-256-GCM. Encrypting the
  proofs keeps identities and the grant (which names the command) away from the relay.
* The agent signs h after id_ag (Purpose.HANDSHAKE_AGENT); the operator signs h after the
  grant (Purpose.HANDSHAKE_OPERATOR). Each side then checks the other: the operator through its
  pinned-key callback, the agent through its grant callback.
* Key confirmation: each AEAD box authenticates the transcript so far as associated data under
  keys only the holder of the shared secret has, so any difference between the two sides'
  transcripts or keys fails at the next message, not at the first frame. Message 4 also carries
  HMAC(confirmation key, "tucdesk-agent-accepted") from the final session keys.
* Session keys: ``session_keys.derive_session_keys(shared, final h, session id)``.

A refusal (bad operator proof, refused grant) still produces message 4, so the operator is told
why (``HandshakeRefused.code`` / ``.reason``) instead of seeing the connection drop.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from enum import Enum, StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol import handshake_messages as wire
from protocol.domains import Purpose
from protocol.errors import HandshakeError, ProtocolError
from protocol.frames import ReceiveMode, RekeyLimits, SecureChannel
from protocol.identity import PublicIdentity, SigningIdentity
from protocol.session_keys import (
    EphemeralKey,
    Role,
    SessionKeys,
    derive_session_keys,
    hkdf_sha256,
    session_id_bytes,
)

TRANSCRIPT_LABEL = b"tucdesk-handshake-v1"
HANDSHAKE_KEYS_INFO = b"tucdesk-handshake-keys-v1"
ACCEPTED_CONFIRMATION_LABEL = b"tucdesk-agent-accepted"
_HANDSHAKE_KEY_SIZE = 32
_AGENT_PROOF_NONCE = bytes(11) + b"\x01"
_AGENT_RESULT_NONCE = bytes(11) + b"\x02"
_OPERATOR_PROOF_NONCE = bytes(11) + b"\x03"

GrantCheck = Callable[[str | bytes, PublicIdentity], str | None]
"""Agent side: given the grant and the operator's key, return None to accept or a refusal reason.

It may also raise a ProtocolError (e.g. TokenError "token has expired"): its message becomes
the reason the operator sees.
"""

AgentKeyCheck = Callable[[PublicIdentity], str | None]
"""Operator side: given the agent's identity key, None if it is the expected key, else why not."""


class RefusalCode(StrEnum):
    """Why the agent refused, as sent in message 4."""

    GRANT_REFUSED = "grant-refused"
    OPERATOR_AUTHENTICATION_FAILED = "operator-authentication-failed"
    HANDSHAKE_FAILED = "handshake-failed"


class HandshakeRefused(HandshakeError):
    """The agent refused the session. On the agent, ``reply`` is message 4: send it, then close."""

    def __init__(self, code: str, reason: str, reply: bytes | None = None) -> None:
        super().__init__(f"the agent refused the session ({code}): {reason}")
        self.code = code
        self.reason = reason
        self.reply = reply


class _State(Enum):
    START = "start"
    WAIT_AGENT_HELLO = "waiting for the agent hello"
    WAIT_OPERATOR_HELLO = "waiting for the operator hello"
    WAIT_OPERATOR_AUTH = "waiting for the operator's authentication"
    WAIT_RESULT = "waiting for the agent's result"
    COMPLETE = "complete"
    FAILED = "failed"


class Transcript:
    """Running SHA-256 over length-prefixed fields; both sides must absorb identical fields."""

    __slots__ = ("digest",)

    def __init__(self) -> None:
        self.digest = hashlib.sha256(TRANSCRIPT_LABEL).digest()

    def absorb(self, *fields: bytes) -> bytes:
        """Mix ``fields`` into the transcript and return the new hash."""
        hasher = hashlib.sha256(self.digest)
        for field in fields:
            hasher.update(len(field).to_bytes(4, "big"))
            hasher.update(field)
        self.digest = hasher.digest()
        return self.digest


def pin_agent_key(expected: PublicIdentity) -> AgentKeyCheck:
    """An AgentKeyCheck that accepts exactly ``expected`` (compared in constant time)."""

    def check(presented: PublicIdentity) -> str | None:
        if hmac.compare_digest(presented.raw, expected.raw):
            return None
        return (
            f"the agent presented key {presented.fingerprint}, but {expected.fingerprint} is "
            "pinned for it; if the agent was re-enrolled, update the pinned key"
        )

    return check


class _Handshake:
    """What both roles share: state, deadline, transcript, keys once derived."""

    def __init__(self, session_id: bytes | str, deadline: float) -> None:
        self.session_id = session_id_bytes(session_id)
        self.deadline = deadline
        self._state = _State.START
        self._transcript = Transcript()
        ephemeral = EphemeralKey()
        self._ephemeral: EphemeralKey | None = ephemeral
        self._ephemeral_public = ephemeral.public
        self._shared: bytes | None = None
        self._agent_box: AESGCM | None = None
        self._operator_box: AESGCM | None = None
        self._keys: SessionKeys | None = None
        self.peer_identity: PublicIdentity | None = None

    @property
    def is_complete(self) -> bool:
        """True once the handshake succeeded and session keys are available."""
        return self._state is _State.COMPLETE

    @property
    def session_keys(self) -> SessionKeys:
        """The session's keys; raises HandshakeError unless the handshake completed."""
        if self._state is not _State.COMPLETE or self._keys is None:
            raise HandshakeError("the handshake has not completed")
        return self._keys

    def _begin(self, expected: _State, now: float) -> None:
        if self._state is _State.FAILED:
            raise HandshakeError("the handshake already failed")
        if self._state is _State.COMPLETE:
            # A stray message after completion is refused without disturbing the session.
            raise HandshakeError("the handshake is already complete")
        if now > self.deadline:
            self._state = _State.FAILED
            raise HandshakeError("the handshake did not finish before its deadline")
        if self._state is not expected:
            state = self._state
            self._state = _State.FAILED
            raise HandshakeError(f"unexpected handshake message while {state.value}")

    def _agree(self, peer_ephemeral: bytes) -> None:
        if self._ephemeral is None:
            raise HandshakeError("this handshake already used its ephemeral key")
        ephemeral, self._ephemeral = self._ephemeral, None  # forward secrecy: used exactly once
        self._shared = ephemeral.shared_secret(peer_ephemeral)
        material = hkdf_sha256(
            self._shared, self._transcript.digest, HANDSHAKE_KEYS_INFO, 2 * _HANDSHAKE_KEY_SIZE
        )
        self._agent_box = AESGCM(material[:_HANDSHAKE_KEY_SIZE])
        self._operator_box = AESGCM(material[_HANDSHAKE_KEY_SIZE:])

    def _finish_keys(self) -> SessionKeys:
        assert self._shared is not None
        keys = derive_session_keys(self._shared, self._transcript.digest, self.session_id)
        self._shared = None
        return keys


class OperatorHandshake(_Handshake):
    """The operator's side: ``start`` gives message 1; ``receive`` message 2 gives message 3, then
    message 4 completes (or raises HandshakeRefused with the agent's reason)."""

    def __init__(
        self,
        identity: SigningIdentity,
        session_id: bytes | str,
        grant: str | bytes,
        check_agent_key: AgentKeyCheck,
        deadline: float,
    ) -> None:
        super().__init__(session_id, deadline)
        if not wire.is_valid_grant(grant):
            raise HandshakeError(
                f"a session grant is 1 to {wire.MAX_GRANT_SIZE} bytes of text or binary"
            )
        self._identity = identity
        self._grant = grant
        self._check_agent_key = check_agent_key
        self._after_proofs = b""

    def start(self, now: float) -> bytes:
        """Message 1."""
        self._begin(_State.START, now)
        message = wire.encode_operator_hello(
            wire.OperatorHello(
                wire.PROTOCOL_VERSION, self.session_id, self._ephemeral_public,
                os.urandom(wire.HELLO_RANDOM_SIZE),
            )
        )
        self._transcript.absorb(message)
        self._state = _State.WAIT_AGENT_HELLO
        return message

    def receive(self, message: bytes, now: float) -> bytes | None:
        """Handle message 2 (returns message 3) or message 4 (returns None once complete)."""
        if self._state is _State.WAIT_RESULT:
            self._begin(_State.WAIT_RESULT, now)
            return self._failing(self._receive_result, message)
        self._begin(_State.WAIT_AGENT_HELLO, now)
        return self._failing(self._receive_agent_hello, message)

    def channel(
        self, now: float, mode: ReceiveMode = ReceiveMode.STREAM, limits: RekeyLimits | None = None
    ) -> SecureChannel:
        """The operator's frame channel for the completed session."""
        return SecureChannel(self.session_keys, Role.OPERATOR, now, mode, limits)

    def _failing(self, step: Callable[[bytes], bytes | None], message: bytes) -> bytes | None:
        try:
            return step(message)
        except BaseException:
            self._state = _State.FAILED
            raise

    def _receive_agent_hello(self, message: bytes) -> bytes:
        hello = wire.decode_agent_hello(message)
        transcript = self._transcript
        transcript.absorb(hello.ephemeral)
        box_context = transcript.digest
        self._agree(hello.ephemeral)
        assert self._agent_box is not None and self._operator_box is not None
        try:
            proof_bytes = self._agent_box.decrypt(_AGENT_PROOF_NONCE, hello.box, box_context)
        except InvalidTag:
            raise HandshakeError(
                "key confirmation failed: the agent derived different keys "
                "(the handshake was tampered with or replayed)"
            ) from None
        proof = wire.decode_agent_proof(proof_bytes)
        agent = PublicIdentity(proof.identity)
        signed = transcript.absorb(proof.identity)
        try:
            agent.verify(Purpose.HANDSHAKE_AGENT, signed, proof.signature)
        except ProtocolError:
            raise HandshakeError("the agent's handshake signature does not verify") from None
        try:
            refusal = self._check_agent_key(agent)
        except ProtocolError as error:
            refusal = str(error) or type(error).__name__
        if refusal is not None:
            raise HandshakeError(f"wrong agent key: {refusal}")
        self.peer_identity = agent
        self._after_proofs = transcript.absorb(proof.signature)
        grant = self._grant
        signed = transcript.absorb(self._identity.public.raw, _grant_bytes(grant))
        signature = self._identity.sign(Purpose.HANDSHAKE_OPERATOR, signed)
        plaintext = wire.encode_operator_proof(
            wire.OperatorProof(self._identity.public.raw, grant, signature)
        )
        transcript.absorb(signature)
        box = self._operator_box.encrypt(_OPERATOR_PROOF_NONCE, plaintext, self._after_proofs)
        self._keys = self._finish_keys()
        self._state = _State.WAIT_RESULT
        return wire.encode_operator_auth(wire.OperatorAuth(box))

    def _receive_result(self, message: bytes) -> None:
        result_message = wire.decode_agent_result(message)
        assert self._agent_box is not None and self._keys is not None
        try:
            plaintext = self._agent_box.decrypt(
                _AGENT_RESULT_NONCE, result_message.box, self._after_proofs
            )
        except InvalidTag:
            raise HandshakeError("the agent's result does not authenticate") from None
        result = wire.decode_result(plaintext)
        if isinstance(result, wire.Refused):
            raise HandshakeRefused(result.code, result.message)
        expected = self._keys.confirmation_tag(ACCEPTED_CONFIRMATION_LABEL)
        if not hmac.compare_digest(result.confirm, expected):
            raise HandshakeError(
                "key confirmation failed: the agent derived different session keys"
            )
        self._state = _State.COMPLETE
        return None


class AgentHandshake(_Handshake):
    """The agent's side: ``receive`` message 1 gives message 2; message 3 gives message 4 and
    completes, or raises HandshakeRefused whose ``reply`` (message 4) tells the operator why."""

    def __init__(
        self,
        identity: SigningIdentity,
        session_id: bytes | str,
        check_grant: GrantCheck,
        deadline: float,
    ) -> None:
        super().__init__(session_id, deadline)
        self._identity = identity
        self._check_grant = check_grant
        self._after_proofs = b""
        self._state = _State.WAIT_OPERATOR_HELLO
        self.grant: str | bytes | None = None

    def receive(self, message: bytes, now: float) -> bytes:
        """Handle message 1 (returns message 2) or message 3 (returns message 4, completing)."""
        if self._state is _State.WAIT_OPERATOR_AUTH:
            self._begin(_State.WAIT_OPERATOR_AUTH, now)
            step = self._receive_operator_auth
        else:
            self._begin(_State.WAIT_OPERATOR_HELLO, now)
            step = self._receive_operator_hello
        try:
            return step(message)
        except BaseException:
            self._state = _State.FAILED
            raise

    def channel(
        self, now: float, mode: ReceiveMode = ReceiveMode.STREAM, limits: RekeyLimits | None = None
    ) -> SecureChannel:
        """The agent's frame channel for the completed session."""
        return SecureChannel(self.session_keys, Role.AGENT, now, mode, limits)

    def _receive_operator_hello(self, message: bytes) -> bytes:
        hello = wire.decode_operator_hello(message)
        if hello.version != wire.PROTOCOL_VERSION:
            raise HandshakeError(
                f"the operator speaks handshake version {hello.version}; this agent speaks "
                f"{wire.PROTOCOL_VERSION}"
            )
        if not hmac.compare_digest(hello.session_id, self.session_id):
            raise HandshakeError("the operator's hello is for a different session")
        transcript = self._transcript
        transcript.absorb(message)
        transcript.absorb(self._ephemeral_public)
        box_context = transcript.digest
        self._agree(hello.ephemeral)
        assert self._agent_box is not None
        signed = transcript.absorb(self._identity.public.raw)
        signature = self._identity.sign(Purpose.HANDSHAKE_AGENT, signed)
        plaintext = wire.encode_agent_proof(wire.AgentProof(self._identity.public.raw, signature))
        box = self._agent_box.encrypt(_AGENT_PROOF_NONCE, plaintext, box_context)
        self._after_proofs = transcript.absorb(signature)
        self._state = _State.WAIT_OPERATOR_AUTH
        return wire.encode_agent_hello(wire.AgentHello(self._ephemeral_public, box))

    def _receive_operator_auth(self, message: bytes) -> bytes:
        auth = wire.decode_operator_auth(message)
        assert self._operator_box is not None
        try:
            plaintext = self._operator_box.decrypt(
                _OPERATOR_PROOF_NONCE, auth.box, self._after_proofs
            )
        except InvalidTag:
            raise self._refuse(
                RefusalCode.HANDSHAKE_FAILED,
                "key confirmation failed: the operator derived different keys",
            ) from None
        try:
            proof = wire.decode_operator_proof(plaintext)
        except HandshakeError as error:
            raise self._refuse(RefusalCode.HANDSHAKE_FAILED, str(error)) from None
        operator = PublicIdentity(proof.identity)
        transcript = self._transcript
        signed = transcript.absorb(proof.identity, _grant_bytes(proof.grant))
        try:
            operator.verify(Purpose.HANDSHAKE_OPERATOR, signed, proof.signature)
        except ProtocolError:
            raise self._refuse(
                RefusalCode.OPERATOR_AUTHENTICATION_FAILED,
                "the operator's handshake signature does not verify",
            ) from None
        # Only an operator who proved its key gets to learn why its grant was refused.
        try:
            reason = self._check_grant(proof.grant, operator)
        except ProtocolError as error:
            reason = str(error) or type(error).__name__
        if reason is not None:
            raise self._refuse(RefusalCode.GRANT_REFUSED, reason)
        transcript.absorb(proof.signature)
        self._keys = self._finish_keys()
        self.peer_identity = operator
        self.grant = proof.grant
        confirm = self._keys.confirmation_tag(ACCEPTED_CONFIRMATION_LABEL)
        reply = self._seal_result(wire.Accepted(confirm))
        self._state = _State.COMPLETE
        return reply

    def _refuse(self, code: RefusalCode, reason: str) -> HandshakeRefused:
        reason = reason[: wire.MAX_REFUSAL_MESSAGE_LENGTH]
        reply = self._seal_result(wire.Refused(code.value, reason))
        return HandshakeRefused(code.value, reason, reply)

    def _seal_result(self, result: wire.Accepted | wire.Refused) -> bytes:
        assert self._agent_box is not None
        box = self._agent_box.encrypt(
            _AGENT_RESULT_NONCE, wire.encode_result(result), self._after_proofs
        )
        return wire.encode_agent_result(wire.AgentResult(box))


def _grant_bytes(grant: str | bytes) -> bytes:
    # The type is part of what is signed, so a text grant and the same bytes differ.
    if isinstance(grant, str):
        return b"s" + grant.encode("utf-8")
    return b"b" + grant
