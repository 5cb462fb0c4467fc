"""Where the rendezvous is and how to reach it safely: URL checks, TLS context, WebSocket URL.

HTTPS is required, except plain HTTP to a loopback address (the local demo and tests), so the
registration key and the control channel never cross a network in clear text.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from agent.errors import ConfigError

CONTROL_CHANNEL_PATH = "/v1/agents/connect"
MAX_SERVER_URL_LENGTH = 2048


def check_server_url(url: str) -> str:
    """The server URL without a trailing slash; ConfigError unless https, or http on loopback."""
    if not isinstance(url, str) or not url or len(url) > MAX_SERVER_URL_LENGTH:
        raise ConfigError("the server URL is missing or too long")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"server URL {url!r} must look like https://HOST[:PORT]")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"server URL {url!r} must not carry credentials, a query or a fragment")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(
            f"server URL {url!r} is plain HTTP to a non-loopback host; use https:// "
            "(plain HTTP is only for a rendezvous on this machine)"
        )
    return url.rstrip("/")


def control_channel_url(server_url: str) -> str:
    """The WebSocket URL of the control channel: wss:// for https servers, ws:// for http."""
    parts = urlsplit(check_server_url(server_url))
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + CONTROL_CHANNEL_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def tls_context(ca_file: Path | str | None) -> ssl.SSLContext:
    """A verifying client TLS context trusting ``ca_file`` (or the system store when None)."""
    try:
        if ca_file is None:
            return ssl.create_default_context()
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"{ca_file}: cannot load the CA file ({error})") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
