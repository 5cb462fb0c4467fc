"""Why a connection to the rendezvous failed, in words an admin can act on.

httpx, trio and trio-websocket wrap the real reason (a refused TCP connect, a TLS verification
failure) in exception groups, ``__cause__`` and ``__context__`` chains, and some of the wrappers
have empty messages. This walks the chain to the most specific cause and names it. Only
exception types and library messages are shown, never request contents, so nothing secret
(a registration key travels in the request body) can end up in the text.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from protocol.exception_chain import root_causes

MAX_DESCRIPTION_LENGTH = 300
CA_FILE_ADVICE = "is --ca-file the CA that signed the rendezvous certificate?"
SYSTEM_CA_ADVICE = (
    "the system CAs do not trust the rendezvous certificate; pass --ca-file with the CA that "
    "signed it"
)


def describe_connection_failure(error: BaseException, ca_file: Path | str | None = None) -> str:
    """One line naming the most specific known reason in ``error``'s chain."""
    chain = root_causes(error)
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError):
            detail = item.verify_message or item.reason or "certificate verify failed"
            advice = CA_FILE_ADVICE if ca_file is not None else SYSTEM_CA_ADVICE
            return _short(f"TLS: certificate verify failed: {detail} — {advice}")
    for item in chain:
        if isinstance(item, ssl.SSLError):
            return _short(f"TLS: {item.reason or item.strerror or type(item).__name__}")
        if isinstance(item, socket.gaierror):
            return _short(f"cannot resolve the host name ({item.strerror})")
        if isinstance(item, ConnectionRefusedError):
            return "connection refused (is the rendezvous running, on that host and port?)"
        if isinstance(item, TimeoutError):
            return "timed out"
        if isinstance(item, OSError) and item.strerror:
            return _short(item.strerror)
    for item in chain:
        text = str(item).strip()
        if text and not text.startswith("Exceptions from Trio nursery"):
            return _short(f"{type(item).__name__}: {text}")
    return type(chain[0]).__name__ if chain else "unknown error"


def _short(text: str) -> str:
    return text if len(text) <= MAX_DESCRIPTION_LENGTH else text[: MAX_DESCRIPTION_LENGTH - 1] + "…"
