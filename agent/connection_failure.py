"""Why a connection to the rendezvous failed, in words an admin can act on.

The words are protocol/connection_failure.py's (shared with the relay and the CLI); the agent
adds which CA it trusted when the rendezvous's certificate does not verify, or, when it failed
on its validity dates, this host's clock: a host clock set wrong makes a good certificate look
expired or not yet valid, and no other CA would help then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from protocol.connection_failure import FailureKind, classify_connection_failure

CA_FILE_ADVICE = "is --ca-file the CA that signed the rendezvous certificate?"
SYSTEM_CA_ADVICE = (
    "the system CAs do not trust the rendezvous certificate; pass --ca-file with the CA that "
    "signed it"
)
# OpenSSL's verify messages for a certificate outside its validity dates.
VALIDITY_DATE_FAILURES = ("not yet valid", "has expired")
CLOCK_ADVICE = (
    "this host's clock reads {now}; if that is wrong, the clock is the cause: check NTP "
    "(timedatectl / chronyc tracking)"
)


def describe_connection_failure(
    error: BaseException,
    ca_file: Path | str | None = None,
    clock: Callable[[], float] = time.time,
) -> str:
    """One line naming the most specific known reason in ``error``'s chain."""
    failure = classify_connection_failure(error)
    if failure.kind is FailureKind.UNTRUSTED_CERTIFICATE:
        if any(words in failure.detail for words in VALIDITY_DATE_FAILURES):
            now = datetime.fromtimestamp(clock(), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            return f"{failure.words} — {CLOCK_ADVICE.format(now=now)}"
        advice = CA_FILE_ADVICE if ca_file is not None else SYSTEM_CA_ADVICE
        return f"{failure.words} — {advice}"
    return failure.words
