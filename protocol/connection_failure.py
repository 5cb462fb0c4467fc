"""Why a network connection failed, in words a user can act on: the one place that says it.

The agent (control channel, enrollment), the relay (its JWKS fetch) and the CLI all report a
failed connection with these words. The chain an error carries (protocol/exception_chain.py) is
walked to the most specific known cause: a certificate that does not verify first, wherever it
is, then the first refused, reset, timed-out, unresolvable or TLS failure, then any OS error
with a message, then the first wrapper that says anything. Callers add only what they alone
know (which flag names the CA, the URL). Only exception types and library messages are used,
never request contents, so nothing secret (a registration key travels in a request body) can
end up in the text. No I/O.
"""

from __future__ import annotations

import enum
import http.client
import socket
import ssl
from dataclasses import dataclass

from protocol.exception_chain import root_causes

MAX_DESCRIPTION_LENGTH = 300
# trio's wrapper of several failures says only this; its members say more.
NURSERY_GROUP_MESSAGE = "Exceptions from Trio nursery"


class FailureKind(enum.Enum):
    """What went wrong, for callers that add advice of their own to some kinds."""

    UNTRUSTED_CERTIFICATE = "untrusted certificate"
    TLS = "tls"
    UNKNOWN_HOST = "unknown host"
    REFUSED = "refused"
    CLOSED_WITHOUT_ANSWER = "closed without answering"
    RESET = "reset"
    TIMED_OUT = "timed out"
    OS_ERROR = "os error"
    OTHER = "other"


@dataclass(frozen=True)
class ConnectionFailure:
    """A classified failure: its kind, the library's own detail, and the words to show."""

    kind: FailureKind
    detail: str
    words: str


def classify_connection_failure(
    error: BaseException,
    *,
    timeout_types: tuple[type[BaseException], ...] = (),
    timeout_seconds: float | None = None,
) -> ConnectionFailure:
    """The most specific known reason in ``error``'s chain, named.

    ``timeout_types`` are a library's own timeout exceptions (httpx's, trio's) that do not
    derive from ``TimeoutError``; ``timeout_seconds``, when known, is said with a timeout.
    """
    chain = root_causes(error)
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError):
            # getattr: only errors OpenSSL raised carry these; one built by hand may not.
            detail = (
                getattr(item, "verify_message", None)
                or getattr(item, "reason", None)
                or "certificate verify failed"
            )
            words = f"TLS: certificate verify failed: {detail}"
            return _failure(FailureKind.UNTRUSTED_CERTIFICATE, detail, words)
    for item in chain:
        known = _known_failure(item, timeout_types, timeout_seconds)
        if known is not None:
            return known
    for item in chain:
        if isinstance(item, OSError) and item.strerror:
            return _failure(FailureKind.OS_ERROR, item.strerror, _lower_first(item.strerror))
    for item in chain:
        text = str(item).strip()
        if text and not text.startswith(NURSERY_GROUP_MESSAGE):
            return _failure(FailureKind.OTHER, text, f"{type(item).__name__}: {text}")
    name = type(chain[0]).__name__ if chain else "unknown error"
    return _failure(FailureKind.OTHER, "", name)


def _known_failure(
    item: BaseException,
    timeout_types: tuple[type[BaseException], ...],
    timeout_seconds: float | None,
) -> ConnectionFailure | None:
    if isinstance(item, ssl.SSLError):
        detail = getattr(item, "reason", None) or item.strerror or type(item).__name__
        return _failure(FailureKind.TLS, detail, f"TLS error ({detail})")
    if isinstance(item, socket.gaierror):
        detail = item.strerror or str(item)
        words = f"cannot resolve the host name ({detail})"
        return _failure(FailureKind.UNKNOWN_HOST, detail, words)
    if isinstance(item, ConnectionRefusedError):
        return _failure(
            FailureKind.REFUSED, item.strerror or "",
            "connection refused (nothing listening at that host and port?)",
        )
    # Before ConnectionResetError, which it derives from.
    if isinstance(item, http.client.RemoteDisconnected):
        return _failure(
            FailureKind.CLOSED_WITHOUT_ANSWER, str(item),
            "the server closed the connection without answering",
        )
    if isinstance(item, ConnectionResetError):
        return _failure(FailureKind.RESET, item.strerror or "", "the connection was reset")
    if isinstance(item, (TimeoutError, *timeout_types)):
        after = f" after {timeout_seconds:g} s" if timeout_seconds is not None else ""
        return _failure(FailureKind.TIMED_OUT, "", f"timed out{after}")
    return None


def _failure(kind: FailureKind, detail: str, words: str) -> ConnectionFailure:
    return ConnectionFailure(kind, _short(detail), _short(words))


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _short(text: str) -> str:
    return text if len(text) <= MAX_DESCRIPTION_LENGTH else text[: MAX_DESCRIPTION_LENGTH - 1] + "…"
