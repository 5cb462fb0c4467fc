"""The relay's exception hierarchy: every failure raised by relay/ is a RelayError."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.wire import Reason


class RelayError(Exception):
    """Base class for every error raised by relay/."""


class ConfigError(RelayError):
    """The relay configuration is missing a value, or a value is malformed or out of range."""


class KeySetError(RelayError):
    """The relay-token public keys could not be loaded or fetched."""


class HelloError(RelayError):
    """A hello, status line or datagram is malformed; ``reason`` is the code to send back."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RelayRefusedError(RelayError):
    """The relay refused this client; ``reason`` is the code it sent."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(f"the relay refused the connection: {reason.value}")
        self.reason = reason
