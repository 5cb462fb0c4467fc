"""The rendezvous speaks HTTP/1.1 only; Hypercorn's HTTP/2 is switched off at every entrance.

Hypercorn 0.18's HTTP/2 protocol raises KeyError when body data arrives for a stream it has
already answered (an early 413 from the body limit, or any route that answers without reading
a body; upstream PRs #312, #334, #365 are unmerged), and under the trio worker that error ends
the whole server: one unauthenticated request dropped every agent's control channel. Nothing
TucDesk runs needs HTTP/2: the CLI and the relay's JWKS fetch use HTTP/1.1 and agents' control
channels are WebSockets over HTTP/1.1.

HTTP/2 can reach Hypercorn three ways, and each is closed here:
- ALPN ``h2`` in the TLS handshake: the service offers ``http/1.1`` only (``HTTP_1_ONLY_ALPN``);
- the prior-knowledge preface (``PRI * HTTP/2.0``), over TLS or plain HTTP: answered as an
  HTTP/1.1 request (405, then the rest of the preface is not HTTP/1.1 and the connection closes);
- an ``Upgrade: h2c`` header: ignored, so the request is answered in HTTP/1.1 (RFC 9110 lets a
  server ignore Upgrade).
Hypercorn has no setting for the last two, so its connection wrapper is replaced with one that
always speaks HTTP/1.1 (``speak_http_1_only``), checked at start-up against the Hypercorn
internals it relies on.
"""

from __future__ import annotations

from typing import Any

import h11
import hypercorn.trio.tcp_server
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol

HTTP_1_ONLY_ALPN = ["http/1.1"]
# ProtocolWrapper(app, config, context, task_group, state, ssl, client, server, send, alpn)
_WRAPPER_ARGUMENTS_BEFORE_ALPN = 9


class _Http11OnlyProtocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol without its switches to HTTP/2."""

    async def _check_protocol(self, event: h11.Request) -> None:
        return None


class _Http11OnlyWrapper(ProtocolWrapper):
    """Hypercorn's per-connection wrapper, always with the HTTP/1.1-only protocol."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The last argument, the ALPN protocol chosen, is dropped: never "h2".
        arguments = list(args[:_WRAPPER_ARGUMENTS_BEFORE_ALPN])
        kwargs.pop("alpn_protocol", None)
        super().__init__(*arguments, **kwargs)
        self.protocol = _Http11OnlyProtocol(
            self.app, self.config, self.context, self.task_group, self.state, self.ssl,
            self.client, self.server, self.send,
        )


def speak_http_1_only() -> None:
    """Make Hypercorn's trio worker serve every connection in HTTP/1.1 (idempotent).

    Raises RuntimeError when the installed Hypercorn no longer has the internals this replaces,
    so an upgrade cannot silently bring its HTTP/2 back.
    """
    if not callable(getattr(H11Protocol, "_check_protocol", None)) or not hasattr(
        hypercorn.trio.tcp_server, "ProtocolWrapper"
    ):
        raise RuntimeError(
            "this Hypercorn version cannot be limited to HTTP/1.1 (rendezvous/http_versions.py)"
        )
    hypercorn.trio.tcp_server.ProtocolWrapper = _Http11OnlyWrapper
