"""Why a connection to the rendezvous failed, in words an admin can act on.

The words are protocol/connection_failure.py's (shared with the relay and the CLI); the agent
adds only which CA it trusted when the rendezvous's certificate does not verify.
"""

from __future__ import annotations

from pathlib import Path

from protocol.connection_failure import FailureKind, classify_connection_failure

CA_FILE_ADVICE = "is --ca-file the CA that signed the rendezvous certificate?"
SYSTEM_CA_ADVICE = (
    "the system CAs do not trust the rendezvous certificate; pass --ca-file with the CA that "
    "signed it"
)


def describe_connection_failure(error: BaseException, ca_file: Path | str | None = None) -> str:
    """One line naming the most specific known reason in ``error``'s chain."""
    failure = classify_connection_failure(error)
    if failure.kind is FailureKind.UNTRUSTED_CERTIFICATE:
        advice = CA_FILE_ADVICE if ca_file is not None else SYSTEM_CA_ADVICE
        return f"{failure.words} — {advice}"
    return failure.words
