"""The relay's configuration: one typed object from flags, TUCDESK_RELAY_* variables and TOML.

Precedence: command-line flag, then environment variable, then the ``--config`` TOML file, then
the default. Every option is described once, in OPTIONS, which also generates ``--help``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.config_file import read_config_table
from protocol.rate_limits import DEFAULT_IPV4_SOURCE_PREFIX, DEFAULT_IPV6_SOURCE_PREFIX
from protocol.relay_token import DEFAULT_RELAY_TOKEN_ISSUER, MAX_RELAY_ID_SIZE
from relay.errors import ConfigError

ENVIRONMENT_PREFIX = "TUCDESK_RELAY_"
MAX_CONFIG_FILE_SIZE = 256 * 1024
FORWARDING_MODES = ("copy", "splice")
# With the kernel's doubling, at least Linux's usual autotuning ceilings (6 MiB receive, 4 MiB
# send), and measured faster than autotuning on loopback (bench/RESULTS-relay.md).
DEFAULT_SOCKET_BUFFER = 4 * 1024 * 1024
# Open files the relay needs besides its clients' sockets: listeners, the event loop, logs, the
# spare descriptors kept for accepting under descriptor exhaustion, and a margin.
FILE_DESCRIPTOR_MARGIN = 64
# A token with a key id the relay does not know waits for a JWKS refetch, and refetches for such
# tokens are spaced by half of hello_timeout but at least 1 s (keyset.unknown_key_refetch_for):
# below 2 s a genuine token arriving just after a made-up key id's refetch would find no
# refetch starting before its hello_timeout ran out, and be refused after a key rotation.
MIN_HELLO_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class HostPort:
    """A HOST:PORT to listen on."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6); port 0 picks a free port."""
        host, separator, port_text = text.rpartition(":")
        if not separator or not host or not port_text.isdigit():
            raise ConfigError(f"{text!r} is not HOST:PORT")
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{text!r}: port must be 0..65535")
        return cls(host.strip("[]"), port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Option:
    """One configuration option: its field name, kind, default and help text."""

    name: str
    kind: str  # "str", "int", "float", "bool", "address", "paths"
    default: Any
    help: str
    required: bool = False
    minimum: float | None = None

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return "--" + self.name.replace("_", "-")

    @property
    def environment_variable(self) -> str:
        """The environment variable."""
        return ENVIRONMENT_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("listen", "address", None, "TCP HOST:PORT to accept clients on", required=True),
    Option("udp", "address", None, "UDP HOST:PORT to accept datagram sessions on (off if unset)"),
    Option("relay_id", "str", None, "this relay's id; tokens for any other relay are refused",
           required=True),
    Option("token_key", "paths", (), "PEM public key file of the rendezvous relay-token signer "
           "(tucdesk-rendezvous keys show --pem relay-token; a private key is refused); repeat "
           "for key rotation (env/TOML: comma-separated list / array); SIGHUP re-reads them"),
    Option("jwks", "str", None, "https URL of the rendezvous JWKS "
           "(https://HOST/.well-known/jwks.json); only its relay-token key is trusted"),
    Option("jwks_ca", "str", None, "CA bundle (PEM) to verify the JWKS server (default: system)"),
    Option("jwks_refresh", "float", 300.0, "seconds between JWKS refreshes", minimum=1),
    Option("issuer", "str", DEFAULT_RELAY_TOKEN_ISSUER, "issuer name relay tokens must carry"),
    Option("metrics", "address", None, "HOST:PORT to serve Prometheus metrics on (off if unset)"),
    Option("hello_timeout", "float", 5.0, "seconds a client has to send its whole hello (and a "
           "token with a newly rotated key to wait for the JWKS refetch; at least 2)",
           minimum=MIN_HELLO_TIMEOUT_SECONDS),
    Option("pair_timeout", "float", 30.0, "seconds the first side waits for the other",
           minimum=0.01),
    Option("idle_timeout", "float", 600.0, "seconds without traffic before a session is closed",
           minimum=0.01),
    Option("dead_peer_timeout", "float", 60.0,
           "seconds after which a side that stopped answering at the TCP level (host down, "
           "network cut) is given up and its session closed: TCP keepalive when nothing is in "
           "flight, and data left unacknowledged that long when something is "
           "(0: leave it to idle_timeout)", minimum=0),
    Option("grace", "float", 30.0, "seconds sessions may drain after a shutdown signal", minimum=0),
    Option("max_sessions", "int", 10_000, "most sessions (waiting or paired) at once", minimum=1),
    Option("max_waiting", "int", 1_000, "most sides waiting for their peer at once", minimum=1),
    Option("max_pending", "int", 1_024, "most TCP connections still sending their hello; when "
           "full, the oldest of them is dropped to make room for a newcomer", minimum=1),
    Option("max_pending_per_source", "int", 10,
           "TCP connections from one source (an IPv4 address or IPv6 network, see "
           "source_ipv6_prefix) that get the whole hello_timeout; any more must send their "
           "hello within 1 s or are refused with too_many_connections", minimum=1),
    Option("source_ipv4_prefix", "int", DEFAULT_IPV4_SOURCE_PREFIX,
           "IPv4 prefix length whose addresses share one source's rate limit and hello cap "
           "(32: each address)", minimum=8),
    Option("source_ipv6_prefix", "int", DEFAULT_IPV6_SOURCE_PREFIX,
           "IPv6 prefix length whose addresses share one source's rate limit and hello cap "
           "(64: a host's usual network)", minimum=16),
    Option("session_bandwidth", "float", 0.0,
           "per-session cap in bytes/s, both directions together (0: no cap)", minimum=0),
    Option("total_bandwidth", "float", 0.0, "relay-wide cap in bytes/s (0: no cap)", minimum=0),
    Option("rate_limit", "float", 10.0, "new TCP connections per second per source; UDP "
           "hellos have a budget of their own at the same rate (a spoofed UDP source cannot "
           "spend a TCP client's)", minimum=0.001),
    Option("rate_burst", "int", 40, "connections (or UDP hellos) a source may open at once "
           "before the rate limit applies", minimum=1),
    Option("forwarding", "str", "copy",
           "TCP data path: copy (one shared buffer; measured fastest on loopback) or splice "
           "(Linux zero-copy through a pipe per direction)"),
    Option("socket_buffer", "int", DEFAULT_SOCKET_BUFFER,
           "SO_RCVBUF and SO_SNDBUF in bytes for client connections (0: kernel autotuning); "
           "used only if net.core.rmem_max and wmem_max allow the whole size, since a clamped "
           "fixed buffer would slow long-distance sessions; fixed buffers also let bulk "
           "transfers batch the relay's wake-ups", minimum=0),
    Option("blur_logs", "bool", False, "round byte counts and durations in logs and cut "
           "peer addresses to their network (IPv4 /24, IPv6 /48, no port)"),
    Option("log_level", "str", "info", "debug, info, warning or error"),
)


@dataclass(frozen=True)
class RelayConfig:
    """Everything the relay needs to run; see OPTIONS for the meaning of each field."""

    listen: HostPort
    relay_id: str
    udp: HostPort | None = None
    token_key: tuple[Path, ...] = ()
    jwks: str | None = None
    jwks_ca: str | None = None
    jwks_refresh: float = 300.0
    issuer: str = DEFAULT_RELAY_TOKEN_ISSUER
    metrics: HostPort | None = None
    hello_timeout: float = 5.0
    pair_timeout: float = 30.0
    idle_timeout: float = 600.0
    dead_peer_timeout: float = 60.0
    grace: float = 30.0
    max_sessions: int = 10_000
    max_waiting: int = 1_000
    max_pending: int = 1_024
    max_pending_per_source: int = 10
    source_ipv4_prefix: int = DEFAULT_IPV4_SOURCE_PREFIX
    source_ipv6_prefix: int = DEFAULT_IPV6_SOURCE_PREFIX
    session_bandwidth: float = 0.0
    total_bandwidth: float = 0.0
    rate_limit: float = 10.0
    rate_burst: int = 40
    forwarding: str = "copy"
    socket_buffer: int = DEFAULT_SOCKET_BUFFER
    blur_logs: bool = False
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.relay_id or len(self.relay_id.encode("utf-8")) > MAX_RELAY_ID_SIZE:
            raise ConfigError(f"relay id must be 1..{MAX_RELAY_ID_SIZE} bytes")
        if not self.token_key and not self.jwks:
            raise ConfigError("give the relay-token keys with --token-key FILE or --jwks URL")
        if self.jwks and not self.jwks.startswith("https://"):
            raise ConfigError("--jwks must be an https:// URL: the keys are fetched over TLS")
        if self.forwarding not in FORWARDING_MODES:
            raise ConfigError(f"forwarding must be one of {', '.join(FORWARDING_MODES)}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log level must be debug, info, warning or error")
        if math.isfinite(self.hello_timeout) and self.hello_timeout < MIN_HELLO_TIMEOUT_SECONDS:
            raise ConfigError(
                f"hello_timeout must be at least {MIN_HELLO_TIMEOUT_SECONDS:g} s: a token signed "
                "with a newly rotated key needs that long to wait for the JWKS refetch"
            )
        for option in OPTIONS:
            value = getattr(self, option.name)
            # NaN passes every minimum (NaN < x is False) and inf is no duration or rate.
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{option.name} must be a finite number, not {value}")
            if option.minimum is not None and value < option.minimum:
                raise ConfigError(f"{option.name} must be at least {option.minimum}")
        if self.source_ipv4_prefix > 32 or self.source_ipv6_prefix > 128:
            raise ConfigError("source_ipv4_prefix must be 8..32 and source_ipv6_prefix 16..128")

    @property
    def file_descriptors_needed(self) -> int:
        """Open files the configured maxima need: two sockets per session, pending hellos and a
        margin. Splice pipes come on top when available; without them a session copies instead."""
        return 2 * self.max_sessions + self.max_pending + FILE_DESCRIPTOR_MARGIN

    def sessions_allowed_by(self, open_files: int) -> int:
        """How many paired sessions an open-file limit of ``open_files`` leaves room for once
        the pending hellos and the margin are counted (at most max_sessions)."""
        room = (open_files - self.max_pending - FILE_DESCRIPTOR_MARGIN) // 2
        return max(0, min(self.max_sessions, room))

    def limits_summary(self) -> str:
        """The admission limits in force, as ``key=value`` fields for the start-up log line."""
        return (
            f"max_sessions={self.max_sessions} max_waiting={self.max_waiting} "
            f"max_pending={self.max_pending} max_pending_per_source={self.max_pending_per_source} "
            f"rate_limit={self.rate_limit:g}/s rate_burst={self.rate_burst} "
            f"source_prefix=/{self.source_ipv4_prefix},/{self.source_ipv6_prefix} "
            f"hello_timeout_s={self.hello_timeout:g} "
            f"session_bandwidth={self.session_bandwidth:g} "
            f"total_bandwidth={self.total_bandwidth:g}"
        )

    def with_changes(self, **changes: Any) -> RelayConfig:
        """A copy with some fields replaced (tests and benchmarks use this)."""
        return dataclasses.replace(self, **changes)


def load_config(
    flags: Mapping[str, Any],
    environment: Mapping[str, str],
    config_file: Path | None = None,
) -> RelayConfig:
    """Merge flags (None = not given), TUCDESK_RELAY_* variables and a TOML file into a config."""
    file_values = _read_toml(config_file) if config_file is not None else {}
    known = {option.name for option in OPTIONS}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigError(f"{config_file}: unknown option(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw: Any = flags.get(option.name)
        source = option.flag
        if raw is None or raw == [] or raw == ():
            raw, source = environment.get(option.environment_variable), option.environment_variable
        if raw is None:
            raw, source = file_values.get(option.name), f"{config_file}: {option.name}"
        if raw is None:
            if option.required:
                raise ConfigError(
                    f"{option.flag} is required (or {option.environment_variable}, or "
                    f"{option.name} in the --config file)"
                )
            continue
        values[option.name] = _convert(option, raw, source)
    return RelayConfig(**values)


def _read_toml(path: Path) -> dict[str, Any]:
    return read_config_table(path, "relay", MAX_CONFIG_FILE_SIZE, ConfigError)


def _convert(option: Option, raw: Any, source: str) -> Any:
    try:
        if option.kind == "str":
            if not isinstance(raw, str):
                raise ValueError
            return raw
        if option.kind == "address":
            return raw if isinstance(raw, HostPort) else HostPort.parse(str(raw))
        if option.kind == "int":
            if isinstance(raw, bool) or isinstance(raw, float):
                raise ValueError
            return int(raw)
        if option.kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if option.kind == "bool":
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if option.kind == "paths":
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(Path(str(item).strip()) for item in items if str(item).strip())
    except (ValueError, TypeError):
        raise ConfigError(f"{source}: {raw!r} is not a valid {option.kind}") from None
    raise ConfigError(f"{source}: option kind {option.kind} is unknown")
