"""The rendezvous configuration: one typed object from flags, TUCDESK_* environment and TOML.

Precedence, highest first: command-line flags, ``TUCDESK_<SETTING>`` environment variables, the
TOML file given by ``--config`` (or ``TUCDESK_CONFIG``), then the defaults below.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.config_file import read_config_table
from rendezvous.errors import ConfigError
from rendezvous.store import backend_for

ENVIRONMENT_PREFIX = "TUCDESK_"
MAX_ACCESS_TOKEN_SECONDS = 15 * 60
MAX_CONFIG_FILE_SIZE = 256 * 1024
DATABASE_FILE_NAME = "rendezvous.db"
MAX_RELAYS = 64
MAX_RELAY_ID_LENGTH = 128
RELAY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
RELAY_SYNTAX = "ID=HOST:PORT[/UDPPORT]"
MAX_WORKERS = 64
MIN_DATABASE_POOL_SIZE = 2
MAX_DATABASE_POOL_SIZE = 1000


@dataclass(frozen=True)
class RelayEndpoint:
    """One relay the rendezvous may send sessions through: its id and where clients reach it."""

    id: str
    host: str
    port: int
    udp_port: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The relay as clients see it in a session answer or offer."""
        return {"id": self.id, "host": self.host, "port": self.port, "udp_port": self.udp_port}


def parse_relay(text: str) -> RelayEndpoint:
    """Parse ``ID=HOST:PORT[/UDPPORT]`` (``[v6]:PORT`` for IPv6), raising ConfigError."""
    relay_id, separator, address = str(text).strip().partition("=")
    if not separator or not relay_id or not address:
        raise ConfigError(f"relay {text!r} is not {RELAY_SYNTAX}")
    if len(relay_id) > MAX_RELAY_ID_LENGTH or not RELAY_ID_PATTERN.match(relay_id):
        raise ConfigError(
            f"relay id {relay_id!r} must be 1..{MAX_RELAY_ID_LENGTH} letters, digits, . _ -"
        )
    address, slash, udp_text = address.partition("/")
    udp_port: int | None = None
    if slash:
        if not udp_text.isdigit() or not 0 < int(udp_text) <= 65535:
            raise ConfigError(f"relay {text!r}: UDP port must be 1..65535")
        udp_port = int(udp_text)
    try:
        host, port = split_listen(address)
    except ConfigError:
        raise ConfigError(f"relay {text!r} is not {RELAY_SYNTAX}") from None
    if port == 0:
        raise ConfigError(f"relay {text!r}: port must be 1..65535")
    return RelayEndpoint(relay_id, host, port, udp_port)


def parse_relays(value: object) -> tuple[RelayEndpoint, ...]:
    """Relays from a list (flags, TOML) or a comma-separated string (environment)."""
    if isinstance(value, RelayEndpoint):
        return (value,)
    items: Iterable[object]
    if isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ConfigError(f"relays must be a list of {RELAY_SYNTAX}")
    relays = tuple(item if isinstance(item, RelayEndpoint) else parse_relay(str(item))
                   for item in items)
    if len(relays) > MAX_RELAYS:
        raise ConfigError(f"at most {MAX_RELAYS} relays may be configured")
    ids = [relay.id for relay in relays]
    if len(set(ids)) != len(ids):
        raise ConfigError("relay ids must be unique")
    return relays


# What each ServiceConfig setting is, for --help (which adds its flag, variable and default).
SETTING_HELP: dict[str, str] = {
    "data_dir": "service data directory: the service keys (0600 files under keys/) and, "
    "without database, the SQLite file",
    "database": "store URL, sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: the "
    f"SQLite file {DATABASE_FILE_NAME} in data_dir)",
    "database_pool_size": f"PostgreSQL connections each service process may open "
    f"({MIN_DATABASE_POOL_SIZE}..{MAX_DATABASE_POOL_SIZE}; one of them listens for other "
    "instances' notices); instances x workers x this must stay under max_connections minus "
    "the reserved connections",
    "database_password_file": "file (0600) holding the PostgreSQL password on its first line, "
    "read for every new connection, so a rotated password needs no restart; without it, the "
    "password in the database URL (if any)",
    "listen": "HOST:PORT the HTTPS API listens on",
    "tls_cert": "PEM certificate chain for TLS (with tls_key)",
    "tls_key": "PEM private key for TLS (with tls_cert)",
    "insecure_http": "serve plain HTTP without TLS (only on a loopback address)",
    "issuer": "iss of the tokens this service signs; relays must be given the same",
    "audience": "aud of the access tokens this service signs",
    "access_token_seconds": f"operator access token lifetime (at most {MAX_ACCESS_TOKEN_SECONDS})",
    "clock_skew_seconds": "how far a signed, timestamped request's clock may be off",
    "max_body_bytes": "largest request body accepted",
    "invite_seconds": "operator invite lifetime when invite create gives no --ttl",
    "registration_key_seconds": "registration key lifetime when keys create gives no --ttl",
    "max_registration_key_seconds": "longest registration key lifetime a request may ask for",
    "login_challenge_seconds": "how long an operator login challenge stays valid",
    "auth_rate_limit": "unauthenticated requests (enroll, challenge, login, agent "
    "registration) per second from one address",
    "auth_rate_burst": "how many of those one address may send at once",
    "heartbeat_seconds": "how often agents are told to send a heartbeat on their control "
    "channel",
    "heartbeat_timeout_seconds": "a control channel silent this long is closed (the agent "
    "goes offline)",
    "relays": f"relays sessions may use, {RELAY_SYNTAX} (a list in TOML, comma-separated in "
    "the environment); without one, sessions are refused",
    "relay_check_seconds": "with several relays, how often each instance sends each a probe "
    "hello; sessions avoid one that does not answer ok within 3 s (left out at once when it "
    "answers shutting_down, too_many_sessions or no_keys, after two checks in a row when it "
    "refuses or never answers; 0: never check)",
    "workers": f"service processes sharing the listening socket (1..{MAX_WORKERS}; more than "
    "1 needs PostgreSQL)",
    "metrics_listen": "HOST:PORT serving /metrics (plain HTTP) instead of the API port "
    "(default: /metrics on the API port)",
}


@dataclass(frozen=True)
class ServiceConfig:
    """Every setting of the rendezvous service, typed and validated."""

    data_dir: Path = Path("/var/lib/tucdesk-rendezvous")
    database: str | None = None
    database_pool_size: int = 10
    database_password_file: Path | None = None
    listen: str = "127.0.0.1:8443"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_http: bool = False
    issuer: str = "tucdesk-rendezvous"
    audience: str = "tucdesk"
    access_token_seconds: int = 10 * 60
    clock_skew_seconds: int = 60
    max_body_bytes: int = 64 * 1024
    invite_seconds: int = 7 * 24 * 3600
    registration_key_seconds: int = 3600
    max_registration_key_seconds: int = 30 * 24 * 3600
    login_challenge_seconds: int = 120
    # Unauthenticated requests (enroll, challenge, login, agent registration) per second and at
    # once from one address; each may write a row, so a flood must not turn into writes.
    auth_rate_limit: float = 20.0
    auth_rate_burst: int = 200
    heartbeat_seconds: float = 20.0
    heartbeat_timeout_seconds: float = 60.0
    relays: tuple[RelayEndpoint, ...] = ()
    relay_check_seconds: float = 10.0
    # Service processes sharing the listening socket, each a full instance (PostgreSQL only).
    workers: int = 1
    # HOST:PORT serving /metrics (plain HTTP) instead of the public API port; None: the API port.
    metrics_listen: str | None = None

    def __post_init__(self) -> None:
        # Accept "ID=HOST:PORT" strings too, so every way of building a config is checked alike.
        object.__setattr__(self, "relays", parse_relays(self.relays))

    @property
    def database_url(self) -> str:
        """The store URL: the given one, or the SQLite file in the data dir."""
        if self.database:
            return self.database
        return f"sqlite://{(self.data_dir / DATABASE_FILE_NAME).resolve()}"

    def store_options(self) -> dict[str, Any]:
        """The keyword arguments of ``open_store`` these settings give (pool, password file)."""
        return {
            "pool_size": self.database_pool_size,
            "password_file": self.database_password_file,
        }

    @property
    def listen_host(self) -> str:
        """The host part of ``listen``."""
        return split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        """The port part of ``listen``."""
        return split_listen(self.listen)[1]

    def validate_for_serving(self) -> None:
        """Raise ConfigError unless the settings are safe to serve with (TLS, or loopback HTTP)."""
        split_listen(self.listen)
        if self.metrics_listen is not None:
            split_listen(self.metrics_listen)
            if self.workers > 1 and split_listen(self.metrics_listen)[1] == 0:
                raise ConfigError("metrics_listen needs a fixed port with several workers")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both --tls-cert and --tls-key, or neither")
        if self.tls_cert is None:
            if not self.insecure_http:
                raise ConfigError(
                    "no TLS certificate: pass --tls-cert and --tls-key, or --insecure-http "
                    "to serve plain HTTP on a loopback address"
                )
            if not is_loopback(self.listen_host):
                raise ConfigError(
                    f"plain HTTP is only served on loopback, not on {self.listen_host}; "
                    "use TLS or listen on 127.0.0.1"
                )
        self.validate()
        if self.workers > 1 and backend_for(self.database_url)[0] != "postgres":
            raise ConfigError(
                f"workers = {self.workers} needs PostgreSQL: on SQLite a session offer cannot "
                "reach an agent channel held by another process; use one worker"
            )

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that is out of range."""
        if not 0 < self.access_token_seconds <= MAX_ACCESS_TOKEN_SECONDS:
            raise ConfigError(
                f"access_token_seconds must be 1..{MAX_ACCESS_TOKEN_SECONDS} (15 minutes at most)"
            )
        for name in (
            "clock_skew_seconds",
            "max_body_bytes",
            "invite_seconds",
            "registration_key_seconds",
            "max_registration_key_seconds",
            "login_challenge_seconds",
            "heartbeat_seconds",
            "heartbeat_timeout_seconds",
            "auth_rate_limit",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for field_name, value in vars(self).items():
            # NaN passes every range check below (NaN < 0 is False) and inf is no duration.
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{field_name} must be a finite number, not {value}")
        if self.relay_check_seconds < 0:
            raise ConfigError("relay_check_seconds must be 0 (never check) or positive")
        if self.auth_rate_burst < 1:
            raise ConfigError("auth_rate_burst must be at least 1")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be 1..{MAX_WORKERS}")
        if not MIN_DATABASE_POOL_SIZE <= self.database_pool_size <= MAX_DATABASE_POOL_SIZE:
            raise ConfigError(
                f"database_pool_size must be {MIN_DATABASE_POOL_SIZE}..{MAX_DATABASE_POOL_SIZE}"
            )
        if (
            self.database_password_file is not None
            and backend_for(self.database_url)[0] != "postgres"
        ):
            raise ConfigError("database_password_file is for PostgreSQL; database is SQLite")


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6), raising ConfigError when malformed."""
    host, separator, port_text = listen.rpartition(":")
    if not separator or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"listen address {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port_text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback address (``localhost`` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: Path | None = None,
) -> ServiceConfig:
    """Merge flags > environment > TOML file > defaults into a validated ServiceConfig.

    ``flags`` holds only the flags the user gave (None values are ignored).
    """
    fields = {field.name: field for field in dataclasses.fields(ServiceConfig)}
    values: dict[str, Any] = {}
    if config_file is None and environ.get(ENVIRONMENT_PREFIX + "CONFIG"):
        config_file = Path(environ[ENVIRONMENT_PREFIX + "CONFIG"])
    if config_file is not None:
        for name, raw in _read_toml(config_file).items():
            key = name.replace("-", "_")
            if key not in fields:
                raise ConfigError(f"{config_file}: unknown setting {name!r}")
            values[key] = _convert(key, raw, fields[key].type, f"{config_file}: {name}")
    for key in fields:
        env_name = ENVIRONMENT_PREFIX + key.upper()
        if env_name in environ:
            values[key] = _convert(key, environ[env_name], fields[key].type, env_name)
    for key, raw in flags.items():
        if raw is not None and key in fields:
            values[key] = _convert(key, raw, fields[key].type, f"--{key.replace('_', '-')}")
    config = ServiceConfig(**values)
    config.validate()
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    return read_config_table(path, "rendezvous", MAX_CONFIG_FILE_SIZE, ConfigError)


def _convert(name: str, raw: Any, declared: Any, origin: str) -> Any:
    text = str(declared)
    if name == "relays":
        return parse_relays(raw)
    try:
        if "bool" in text:
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if "int" in text:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if "float" in text:
            return float(raw)
        if "Path" in text:
            return Path(str(raw)).expanduser()
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {raw!r} is not a valid value for {name}") from None
