"""Wire schema of the four handshake messages and of the encrypted parts inside them.

Every message is a msgpack map with exactly the keys of its schema, each type- and size-checked.
Decoders raise HandshakeError, and nothing else, for any input that is not such a message.

    1 OperatorHello  op -> agent  {t: 1, v: 1, sid: bin, e: bin32, r: bin32}          (plaintext)
    2 AgentHello     agent -> op  {t: 2, e: bin32, box: AEAD(AgentProof)}
    3 OperatorAuth   op -> agent  {t: 3, box: AEAD(OperatorProof)}
    4 AgentResult    agent -> op  {t: 4, box: AEAD(Accepted | Refused)}

    AgentProof     {id: bin32, sig: bin64}
    OperatorProof  {id: bin32, grant: str | bin, sig: bin64}
    Accepted       {ok: true, confirm: bin32}
    Refused        {ok: false, code: str, message: str}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.errors import HandshakeError
from protocol.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE
from protocol.session_keys import MAX_SESSION_ID_SIZE, X25519_KEY_SIZE

PROTOCOL_VERSION = 1
MAX_HANDSHAKE_MESSAGE_SIZE = 16 * 1024
MAX_GRANT_SIZE = 8 * 1024
MAX_REFUSAL_CODE_LENGTH = 64
MAX_REFUSAL_MESSAGE_LENGTH = 512
HELLO_RANDOM_SIZE = 32
CONFIRMATION_TAG_SIZE = 32
AEAD_TAG_SIZE = 16
MAX_BOX_SIZE = MAX_HANDSHAKE_MESSAGE_SIZE - 64
_MAX_MAP_ENTRIES = 8

OPERATOR_HELLO = 1
AGENT_HELLO = 2
OPERATOR_AUTH = 3
AGENT_RESULT = 4


@dataclass(frozen=True)
class OperatorHello:
    """Message 1: protocol version, session id, the operator's ephemeral key and a fresh random."""

    version: int
    session_id: bytes
    ephemeral: bytes
    random: bytes


@dataclass(frozen=True)
class AgentHello:
    """Message 2: the agent's ephemeral key and its encrypted AgentProof."""

    ephemeral: bytes
    box: bytes


@dataclass(frozen=True)
class OperatorAuth:
    """Message 3: the operator's encrypted OperatorProof."""

    box: bytes


@dataclass(frozen=True)
class AgentResult:
    """Message 4: the agent's encrypted Accepted or Refused."""

    box: bytes


@dataclass(frozen=True)
class AgentProof:
    """Inside message 2: the agent's identity key and its signature over the transcript."""

    identity: bytes
    signature: bytes


@dataclass(frozen=True)
class OperatorProof:
    """Inside message 3: the operator's key, the session grant, and its transcript signature."""

    identity: bytes
    grant: str | bytes
    signature: bytes


@dataclass(frozen=True)
class Accepted:
    """Inside message 4: the session is on; ``confirm`` proves the agent derived the same keys."""

    confirm: bytes


@dataclass(frozen=True)
class Refused:
    """Inside message 4: the agent refused, with a reason code and a message for the operator."""

    code: str
    message: str


Validator = Callable[[Any], bool]


def _bin(size: int) -> Validator:
    return lambda value: type(value) is bytes and len(value) == size


def _bin_up_to(limit: int) -> Validator:
    return lambda value: type(value) is bytes and 0 < len(value) <= limit


def _text_up_to(limit: int) -> Validator:
    return lambda value: type(value) is str and len(value) <= limit


def _int(value: Any) -> bool:
    return type(value) is int


def is_valid_grant(value: Any) -> bool:
    """Whether ``value`` can travel as a session grant: 1 to MAX_GRANT_SIZE bytes, text or bin."""
    if type(value) is str:
        try:
            return 0 < len(value.encode("utf-8")) <= MAX_GRANT_SIZE
        except UnicodeEncodeError:
            return False
    return type(value) is bytes and 0 < len(value) <= MAX_GRANT_SIZE


_OPERATOR_HELLO_SCHEMA = {
    "t": _int,
    "v": _int,
    "sid": _bin_up_to(MAX_SESSION_ID_SIZE),
    "e": _bin(X25519_KEY_SIZE),
    "r": _bin(HELLO_RANDOM_SIZE),
}
_AGENT_HELLO_SCHEMA = {"t": _int, "e": _bin(X25519_KEY_SIZE), "box": _bin_up_to(MAX_BOX_SIZE)}
_BOX_ONLY_SCHEMA = {"t": _int, "box": _bin_up_to(MAX_BOX_SIZE)}
_AGENT_PROOF_SCHEMA = {"id": _bin(PUBLIC_KEY_SIZE), "sig": _bin(SIGNATURE_SIZE)}
_OPERATOR_PROOF_SCHEMA = {
    "id": _bin(PUBLIC_KEY_SIZE),
    "grant": is_valid_grant,
    "sig": _bin(SIGNATURE_SIZE),
}
_ACCEPTED_SCHEMA = {"ok": lambda value: value is True, "confirm": _bin(CONFIRMATION_TAG_SIZE)}
_REFUSED_SCHEMA = {
    "ok": lambda value: value is False,
    "code": _text_up_to(MAX_REFUSAL_CODE_LENGTH),
    "message": _text_up_to(MAX_REFUSAL_MESSAGE_LENGTH),
}


def _pack(fields: Mapping[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(dict(fields), use_bin_type=True)
    if len(packed) > MAX_HANDSHAKE_MESSAGE_SIZE:
        raise HandshakeError(f"handshake message exceeds {MAX_HANDSHAKE_MESSAGE_SIZE} bytes")
    return packed


def _unpack(
    data: bytes, what: str, schema: Mapping[str, Validator], message_type: int | None = None
) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise HandshakeError(f"{what} must be bytes")
    if len(data) > MAX_HANDSHAKE_MESSAGE_SIZE:
        raise HandshakeError(f"{what} exceeds {MAX_HANDSHAKE_MESSAGE_SIZE} bytes")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_map_len=_MAX_MAP_ENTRIES,
            max_array_len=_MAX_MAP_ENTRIES,
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException):
        # msgpack reports truncation, bad UTF-8, bad markers and trailing bytes each differently.
        raise HandshakeError(f"{what} is not valid msgpack") from None
    if not isinstance(value, dict):
        raise HandshakeError(f"{what} is not a msgpack map")
    if message_type is not None and value.get("t") != message_type:
        raise HandshakeError(
            f"expected {what} (message {message_type}), got message {value.get('t')!r:.20}"
        )
    if value.keys() != schema.keys():
        raise HandshakeError(f"{what} does not have the expected fields")
    for name, valid in schema.items():
        if not valid(value[name]):
            raise HandshakeError(f"{what} field {name!r} has the wrong type or size")
    return value



def encode_operator_hello(message: OperatorHello) -> bytes:
    """Message 1 on the wire."""
    return _pack(
        {
            "t": OPERATOR_HELLO,
            "v": message.version,
            "sid": message.session_id,
            "e": message.ephemeral,
            "r": message.random,
        }
    )


def decode_operator_hello(data: bytes) -> OperatorHello:
    """Parse message 1 (the version is returned as sent; the agent decides whether it speaks it)."""
    fields = _unpack(data, "operator hello", _OPERATOR_HELLO_SCHEMA, OPERATOR_HELLO)
    return OperatorHello(fields["v"], fields["sid"], fields["e"], fields["r"])


def encode_agent_hello(message: AgentHello) -> bytes:
    """Message 2 on the wire."""
    return _pack({"t": AGENT_HELLO, "e": message.ephemeral, "box": message.box})


def decode_agent_hello(data: bytes) -> AgentHello:
    """Parse message 2."""
    fields = _unpack(data, "agent hello", _AGENT_HELLO_SCHEMA, AGENT_HELLO)
    return AgentHello(fields["e"], fields["box"])


def encode_operator_auth(message: OperatorAuth) -> bytes:
    """Message 3 on the wire."""
    return _pack({"t": OPERATOR_AUTH, "box": message.box})


def decode_operator_auth(data: bytes) -> OperatorAuth:
    """Parse message 3."""
    fields = _unpack(data, "operator authentication", _BOX_ONLY_SCHEMA, OPERATOR_AUTH)
    return OperatorAuth(fields["box"])


def encode_agent_result(message: AgentResult) -> bytes:
    """Message 4 on the wire."""
    return _pack({"t": AGENT_RESULT, "box": message.box})


def decode_agent_result(data: bytes) -> AgentResult:
    """Parse message 4."""
    fields = _unpack(data, "agent result", _BOX_ONLY_SCHEMA, AGENT_RESULT)
    return AgentResult(fields["box"])


def encode_agent_proof(proof: AgentProof) -> bytes:
    """The plaintext sealed inside message 2."""
    return _pack({"id": proof.identity, "sig": proof.signature})


def decode_agent_proof(data: bytes) -> AgentProof:
    """Parse the plaintext inside message 2."""
    fields = _unpack(data, "agent proof", _AGENT_PROOF_SCHEMA)
    return AgentProof(fields["id"], fields["sig"])


def encode_operator_proof(proof: OperatorProof) -> bytes:
    """The plaintext sealed inside message 3."""
    if not is_valid_grant(proof.grant):
        raise HandshakeError(f"a session grant is 1 to {MAX_GRANT_SIZE} bytes of text or binary")
    return _pack({"id": proof.identity, "grant": proof.grant, "sig": proof.signature})


def decode_operator_proof(data: bytes) -> OperatorProof:
    """Parse the plaintext inside message 3."""
    fields = _unpack(data, "operator proof", _OPERATOR_PROOF_SCHEMA)
    return OperatorProof(fields["id"], fields["grant"], fields["sig"])


def encode_result(result: Accepted | Refused) -> bytes:
    """The plaintext sealed inside message 4."""
    if isinstance(result, Accepted):
        return _pack({"ok": True, "confirm": result.confirm})
    return _pack(
        {
            "ok": False,
            "code": result.code[:MAX_REFUSAL_CODE_LENGTH],
            "message": result.message[:MAX_REFUSAL_MESSAGE_LENGTH],
        }
    )


def decode_result(data: bytes) -> Accepted | Refused:
    """Parse the plaintext inside message 4."""
    try:
        fields = _unpack(data, "agent result", _ACCEPTED_SCHEMA)
        return Accepted(fields["confirm"])
    except HandshakeError:
        fields = _unpack(data, "agent result", _REFUSED_SCHEMA)
        return Refused(_printable(fields["code"]), _printable(fields["message"]))


def _printable(text: str) -> str:
    # The operator's terminal shows this text: no escape sequences or control characters.
    return "".join(char if char.isprintable() else "?" for char in text)
