"""Refusal log lines: at INFO with the peer and ids, rate-limited per reason so floods stay small.

At most LINES_PER_SECOND lines per reason code in any one-second window; the refusals left out
are summed in one ``refusals_suppressed`` line when the window ends (from the relay's sweep, or
at the next refusal of that reason). Every refusal is still counted in the metrics. A token is
never logged: only the session id, side and relay id it carries, and only from a token whose
signature verified.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from protocol.errors import ProtocolError
from protocol.identity import b64url_decode
from protocol.relay_token import RelayTokenClaims

LINES_PER_SECOND = 10
WINDOW_SECONDS = 1.0
MAX_SHOWN_TEXT = 128
MAX_TOKEN_PAYLOAD_SIZE = 8 * 1024

log = logging.getLogger("tucdesk.relay")


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class RefusalLog:
    """Decides which refusals get a log line and writes it."""

    def __init__(self, lines_per_second: int = LINES_PER_SECOND) -> None:
        self.lines_per_second = lines_per_second
        self._windows: dict[str, _Window] = {}  # by reason code: a handful of entries at most

    def refused(
        self,
        now: float,
        transport: str,
        reason: str,
        *,
        peer: Callable[[], str] | str,
        claims: RelayTokenClaims | None = None,
        token: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Log one refusal unless this reason already had its lines for this second.

        ``peer`` may be a function (e.g. a getpeername), called only if the line is written.

        ``token`` is read (for its ids) only when its signature verified: pass it only with
        the reasons that say so (wrong_relay, token_expired, token_not_yet_valid, token_reused).
        ``detail``: words the relay wrote itself (an unknown key id, shown quoted), put last.
        """
        if not self._within_budget(now, reason):
            return
        shown_peer = peer if isinstance(peer, str) else peer()
        log.info("refused transport=%s reason=%s peer=%s%s%s", transport, reason, shown_peer,
                 _ids(claims, token), f" detail={detail}" if detail else "")

    def event(self, now: float, kind: str, message: str, *args: object) -> None:
        """Log a WARNING line of ``kind`` (e.g. accept_failed) under the same per-kind budget."""
        if self._within_budget(now, kind):
            log.warning(message, *args)

    def _within_budget(self, now: float, key: str) -> bool:
        window = self._windows.get(key)
        if window is None or now - window.started >= WINDOW_SECONDS:
            if window is not None:
                self._report_suppressed(key, window)
            window = self._windows[key] = _Window(now)
        if window.logged >= self.lines_per_second:
            window.suppressed += 1
            return False
        window.logged += 1
        return True

    def flush(self, now: float) -> None:
        """Write the summary of every window that has ended (called about once a second)."""
        for reason, window in list(self._windows.items()):
            if now - window.started >= WINDOW_SECONDS:
                self._report_suppressed(reason, window)
                del self._windows[reason]

    @staticmethod
    def _report_suppressed(reason: str, window: _Window) -> None:
        if window.suppressed:
            log.info(
                "refusals_suppressed reason=%s count=%d window_s=%g",
                reason, window.suppressed, WINDOW_SECONDS,
            )


def _ids(claims: RelayTokenClaims | None, token: str | None) -> str:
    if claims is not None:
        return (f" sid={_shown(claims.session_id)} side={claims.side.value} "
                f"relay_id={_shown(claims.relay_id)}")
    if token is not None:
        payload = _token_payload(token)
        if payload:
            return "".join(
                f" {name}={_shown(payload[claim])}"
                for name, claim in (("sid", "sid"), ("side", "side"), ("relay_id", "aud"))
                if claim in payload
            )
    return ""


def _token_payload(token: str) -> dict[str, object]:
    # Only for tokens verify_relay_token already checked the signature of (see refused()).
    try:
        payload = json.loads(b64url_decode(token.split(".")[1], max_size=MAX_TOKEN_PAYLOAD_SIZE))
    except (IndexError, ValueError, ProtocolError, RecursionError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _shown(value: object) -> str:
    # repr: a value with spaces, quotes or newlines cannot forge a second field or log line.
    text = value if isinstance(value, str) else str(value)
    return repr(text[:MAX_SHOWN_TEXT])


def show_address(address: object) -> str:
    """``host:port`` (``[v6]:port``) of a socket address; anything else as text."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def peer_address(sock: socket.socket) -> object:
    """The connected peer's socket address of ``sock``, or None once it has gone."""
    try:
        return sock.getpeername()
    except OSError:
        return None


def peer_of(sock: socket.socket) -> str:
    """The connected peer of ``sock`` as ``host:port``, or ``unknown`` once it has gone."""
    try:
        return show_address(sock.getpeername())
    except OSError:
        return "unknown"
