"""The protocol package's exception hierarchy: every failure raised here is a ProtocolError."""


class ProtocolError(Exception):
    """Base class for every error raised by protocol/."""


class KeyFileError(ProtocolError):
    """A key file is missing, malformed, or has permissions that expose it."""


class SignatureError(ProtocolError):
    """A signature did not verify for the claimed key and purpose."""


class PayloadError(ProtocolError):
    """A signed timestamped payload is malformed, skewed, or replayed."""


class ReplayError(PayloadError):
    """A nonce or counter was seen before inside its window."""


class TokenError(ProtocolError):
    """A JWT is malformed, forged, expired, or has the wrong claims."""


class CodecError(ProtocolError):
    """A wire message does not match its schema."""


class HandshakeError(ProtocolError):
    """The session handshake failed; the session must not proceed."""


class FrameError(ProtocolError):
    """A frame is malformed, forged, replayed, out of order, or over a limit."""
