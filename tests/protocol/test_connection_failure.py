"""Connection failures named once (protocol/connection_failure.py), for the agent, relay and CLI."""

from __future__ import annotations

import errno
import http.client
import socket
import ssl

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.connection_failure import CA_FILE_ADVICE, describe_connection_failure
from operator_cli.http import TransportError
from protocol.connection_failure import (
    MAX_DESCRIPTION_LENGTH,
    FailureKind,
    classify_connection_failure,
)
from relay.keyset import _reason_of


def untrusted_certificate() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify")
    error.verify_message = "self-signed certificate"
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    return error


def wrapped(cause: BaseException, *layers: BaseException) -> BaseException:
    """``cause`` under ``layers`` (innermost first), each raised from the one before."""
    current = cause
    for layer in layers:
        layer.__cause__ = current
        current = layer
    return current


def test_a_certificate_failure_anywhere_in_the_chain_wins_over_its_wrappers() -> None:
    error = ExceptionGroup(
        "x", [wrapped(untrusted_certificate(), ConnectionResetError(errno.ECONNRESET, "reset"))]
    )
    failure = classify_connection_failure(error)
    assert failure.kind is FailureKind.UNTRUSTED_CERTIFICATE
    assert failure.detail == "self-signed certificate"
    assert failure.words == "TLS: certificate verify failed: self-signed certificate"


@pytest.mark.parametrize(
    ("cause", "kind", "words"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), FailureKind.REFUSED,
         "connection refused (nothing listening at that host and port?)"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), FailureKind.UNKNOWN_HOST,
         "cannot resolve the host name (Name or service not known)"),
        (http.client.RemoteDisconnected("Remote end closed connection without response"),
         FailureKind.CLOSED_WITHOUT_ANSWER, "the server closed the connection without answering"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), FailureKind.RESET,
         "the connection was reset"),
        (TimeoutError("timed out"), FailureKind.TIMED_OUT, "timed out"),
        (ssl.SSLError(1, "[SSL] wrong version number"), FailureKind.TLS,
         "TLS error ([SSL] wrong version number)"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), FailureKind.OS_ERROR,
         "network is unreachable"),
    ],
)
def test_each_known_cause_is_named_in_the_same_words_however_it_is_wrapped(
    cause: BaseException, kind: FailureKind, words: str
) -> None:
    error = BaseExceptionGroup("outer", [wrapped(cause, ValueError(""), RuntimeError(""))])
    failure = classify_connection_failure(error)
    assert (failure.kind, failure.words) == (kind, words)


def test_a_library_timeout_is_a_timeout_and_says_how_long_when_told() -> None:
    error = httpx.ConnectTimeout("")
    assert classify_connection_failure(error).kind is FailureKind.OTHER
    failure = classify_connection_failure(
        error, timeout_types=(httpx.TimeoutException,), timeout_seconds=10.0
    )
    assert (failure.kind, failure.words) == (FailureKind.TIMED_OUT, "timed out after 10 s")


def test_without_a_known_cause_the_first_wrapper_with_a_message_is_named() -> None:
    group = ExceptionGroup("Exceptions from Trio nursery", [wrapped(KeyError("k"), ValueError(""))])
    assert classify_connection_failure(group).words == "KeyError: 'k'"
    assert classify_connection_failure(ExceptionGroup("y", [RuntimeError("")])).words == (
        "RuntimeError"
    )


@given(st.text(max_size=2000))
def test_words_are_one_bounded_line_whatever_the_library_says(message: str) -> None:
    words = classify_connection_failure(RuntimeError(message.replace("\n", " "))).words
    assert len(words) <= MAX_DESCRIPTION_LENGTH
    assert "\n" not in words


def test_agent_relay_and_cli_say_the_same_words_for_the_same_failure() -> None:
    refused = wrapped(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
                      httpx.ConnectError(""))
    words = classify_connection_failure(refused).words
    assert describe_connection_failure(refused) == words
    assert _reason_of(refused) == words
    cli = TransportError("ConnectError", url="https://rv.example", cause=refused).describe()
    assert cli == f"cannot reach https://rv.example: {words}; check --server"


def test_each_part_names_its_own_ca_setting_for_an_untrusted_certificate() -> None:
    error = wrapped(untrusted_certificate(), httpx.ConnectError(""))
    assert describe_connection_failure(error, "ca.pem") == (
        f"TLS: certificate verify failed: self-signed certificate — {CA_FILE_ADVICE}"
    )
    assert _reason_of(error, "ca.pem") == (
        "TLS certificate not trusted by --jwks-ca ca.pem (self-signed certificate)"
    )
    cli = TransportError("ConnectError", url="https://rv.example", cause=error)
    assert cli.untrusted_certificate
    assert cli.describe() == (
        "TLS certificate of https://rv.example not trusted: self-signed certificate; pass "
        "--ca-file with the CA that signed it"
    )
