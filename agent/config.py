"""The agent configuration: one typed object from flags, TUCDESK_AGENT_* environment and TOML.

Precedence, highest first: command-line flags, ``TUCDESK_AGENT_<SETTING>`` environment
variables, the TOML file given by ``--config`` (or ``TUCDESK_AGENT_CONFIG``; settings at the top
level or all under ``[agent]``), then the defaults below. As root, with neither given,
/etc/tucdesk/agent.toml is read when it exists (as sshd reads /etc/ssh/sshd_config), so the
systemd unit works with or without it; a file named explicitly must exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import pwd
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import login_records
from agent.errors import ConfigError
from protocol.config_file import read_config_table

ENVIRONMENT_PREFIX = "TUCDESK_AGENT_"
CONFIG_ENVIRONMENT = ENVIRONMENT_PREFIX + "CONFIG"
# Read when present, as root, if no file is named by --config or TUCDESK_AGENT_CONFIG.
SYSTEM_CONFIG_FILE = Path("/etc/tucdesk/agent.toml")
CONFIG_TABLE = "agent"
# A top-level table this close to [agent] (difflib ratio) is taken for a typo and refused:
# one letter added or changed at the end ([agentt], [agents], [agentd]: 0.91), not another tool's
# name that contains it ([reagent], [magenta]: 0.83). In a file without [agent], whose settings
# would all be ignored, letters swapped too ([agnet]: 0.8).
MISSPELT_TABLE_RATIO = 0.9
MISSPELT_TABLE_RATIO_WITHOUT_AGENT = 0.8
MAX_CONFIG_FILE_SIZE = 64 * 1024
SYSTEM_STATE_DIR = Path("/var/lib/tucdesk-agent")
STATE_FILE_NAME = "agent.state"
STATUS_FILE_NAME = "status.json"
CONNECTION_FILE_NAME = "connection"
DEFAULT_MAX_SESSIONS = 64
MAX_MAX_SESSIONS = 4096
DEFAULT_HANDSHAKE_TIMEOUT_SECONDS = 15.0
DEFAULT_RECONNECT_CAP_SECONDS = 30.0
RECORDINGS_DIR_NAME = "recordings"
DEFAULT_MAX_RECORDING_BYTES = 64 * 1024 * 1024
MIN_MAX_RECORDING_BYTES = 4 * 1024
# sshd's and login.defs' default; the daemon's own files keep the unit's UMask=0077.
DEFAULT_SESSION_UMASK = "022"
# A umask is permission bits only: three octal digits, optionally after a leading 0.
_SESSION_UMASK = re.compile(r"0?[0-7]{3}")


logger = logging.getLogger("tucdesk.agent.config")


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """/var/lib/tucdesk-agent for root, else $XDG_STATE_HOME (or ~/.local/state)/tucdesk-agent."""
    environ = os.environ if environ is None else environ
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tucdesk-agent"


# What each AgentConfig setting is, for --help (which adds its variable and default). A None
# default is described here instead.
SETTING_HELP: dict[str, str] = {
    "state_dir": f"where the sealed state lives (default {SYSTEM_STATE_DIR} as root, else "
    "$XDG_STATE_HOME/tucdesk-agent)",
    "user": "local account sessions run as (default: the agent's own)",
    "shell": "absolute path of the shell for shell sessions (default: that account's login "
    "shell)",
    "ca_file": "CA bundle for the rendezvous's TLS certificate (default: the copy enroll "
    "saved as STATE_DIR/rendezvous-ca.pem; read again at every connection attempt, so a CA "
    "appended to it is trusted from the next reconnect)",
    "machine_root": "read machine identifiers under this directory (only tests change it)",
    "max_sessions": f"most sessions at once (1..{MAX_MAX_SESSIONS})",
    "handshake_timeout_seconds": "how long a session's handshake with the operator may take "
    "(at most 300)",
    "reconnect_cap_seconds": "longest wait between reconnects to the rendezvous (1..3600)",
    "record_sessions": "record what each session outputs (asciicast v2; never what is typed)",
    "recordings_dir": f"where recordings go (default: STATE_DIR/{RECORDINGS_DIR_NAME})",
    "max_recording_bytes": "a recording stops, with a marker, at this size (at least "
    f"{MIN_MAX_RECORDING_BYTES})",
    "recordings_max_age_days": "delete finished recordings older than this (default: keep)",
    "recordings_max_total_bytes": "keep at most this many bytes of finished recordings, oldest "
    "deleted first (default: no cap)",
    "session_umask": "umask of every session's processes, 3 or 4 octal digits as a string "
    "(sshd's 022 by default; the daemon's own files keep 0077)",
    "utmp_file": "utmp file PTY sessions are listed in while they run, for who (default "
    f"{login_records.UTMP_FILE})",
    "wtmp_file": "wtmp file PTY sessions' logins and logouts are appended to, for last "
    f"(default {login_records.WTMP_FILE})",
    "audit_login_uid": "as root, give each session's processes the session user's audit login "
    "uid, as sshd does, so auditd attributes their actions to that user (false saves about "
    "4-5 ms of the agent's CPU per exec session where no auditd reads login uids)",
    "kill_leftover_processes": "when a session's shell or command exits, kill every process "
    "it left behind (nohup and background jobs too) and stop reading its output; off: they "
    "run on and an exec session's output is read to its end, as with ssh",
}


@dataclass(frozen=True)
class AgentConfig:
    """Every setting of the agent daemon, typed and validated."""

    state_dir: Path = field(default_factory=default_state_dir)
    # The account sessions run as (None: the agent's own) and the shell for shell sessions
    # (None: that account's login shell).
    user: str | None = None
    shell: str | None = None
    # A CA bundle for the rendezvous's TLS certificate; overrides the one saved at enrollment.
    ca_file: Path | None = None
    # Where machine identifiers are read from; only tests point this anywhere but "/".
    machine_root: Path = Path("/")
    max_sessions: int = DEFAULT_MAX_SESSIONS
    handshake_timeout_seconds: float = DEFAULT_HANDSHAKE_TIMEOUT_SECONDS
    reconnect_cap_seconds: float = DEFAULT_RECONNECT_CAP_SECONDS
    # Session recordings (agent/recording.py): off by default; the directory defaults to
    # <state_dir>/recordings; each recording stops (with a marker) at max_recording_bytes.
    record_sessions: bool = False
    recordings_dir: Path | None = None
    max_recording_bytes: int = DEFAULT_MAX_RECORDING_BYTES
    # Retention (agent/recording_retention.py): finished recordings older than this many days,
    # or beyond this many bytes in total (oldest first), are deleted. None: no limit.
    recordings_max_age_days: float | None = None
    recordings_max_total_bytes: int | None = None
    # What a session leaves behind when its main process exits on its own: left running, as
    # after ssh (False), or torn down with the session (True). A forced end always tears down.
    kill_leftover_processes: bool = False
    # What a session looks like on the host (docs/self-hosting.md): its umask, and where its
    # login records go (agent/login_records.py).
    session_umask: str = DEFAULT_SESSION_UMASK
    # Looked up when the config is made, so that a test suite can point every config it makes
    # elsewhere (login_records.UTMP_FILE, WTMP_FILE) instead of the host's own files.
    utmp_file: Path = field(default_factory=lambda: login_records.UTMP_FILE)
    wtmp_file: Path = field(default_factory=lambda: login_records.WTMP_FILE)
    # As root: each session's audit login uid is the session user's (sshd's pam_loginuid).
    audit_login_uid: bool = True

    @property
    def session_umask_bits(self) -> int:
        """session_umask as a number (validated: 3-4 octal digits)."""
        return int(self.session_umask, 8)

    @property
    def state_file(self) -> Path:
        """The machine-bound state file inside the state dir."""
        return self.state_dir / STATE_FILE_NAME

    @property
    def status_file(self) -> Path:
        """The small status file ``run`` keeps and ``status`` reads."""
        return self.state_dir / STATUS_FILE_NAME

    @property
    def connection_file(self) -> Path:
        """Where ``run`` keeps the id of the control connection it was last welcomed on."""
        return self.state_dir / CONNECTION_FILE_NAME

    @property
    def recordings_path(self) -> Path:
        """Where session recordings go: recordings_dir, or <state_dir>/recordings."""
        if self.recordings_dir is not None:
            return self.recordings_dir
        return self.state_dir / RECORDINGS_DIR_NAME

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that is out of range."""
        if not 0 < self.max_sessions <= MAX_MAX_SESSIONS:
            raise ConfigError(f"max_sessions must be 1..{MAX_MAX_SESSIONS}")
        if not 0 < self.handshake_timeout_seconds <= 300:
            raise ConfigError("handshake_timeout_seconds must be more than 0 and at most 300")
        if not 1 <= self.reconnect_cap_seconds <= 3600:
            raise ConfigError("reconnect_cap_seconds must be 1..3600")
        if self.max_recording_bytes < MIN_MAX_RECORDING_BYTES:
            raise ConfigError(f"max_recording_bytes must be at least {MIN_MAX_RECORDING_BYTES}")
        age = self.recordings_max_age_days
        if age is not None and not (math.isfinite(age) and age > 0):
            raise ConfigError(
                f"recordings_max_age_days must be a number of days more than 0, not {age!r} "
                "(leave it unset to keep recordings)"
            )
        total = self.recordings_max_total_bytes
        if total is not None and total < self.max_recording_bytes:
            raise ConfigError(
                f"recordings_max_total_bytes must be at least max_recording_bytes "
                f"({self.max_recording_bytes}) so that one full recording fits, not {total} "
                "(leave it unset for no cap)"
            )
        if not _SESSION_UMASK.fullmatch(self.session_umask):
            raise ConfigError(
                f"session_umask must be 3 or 4 octal digits such as 022 or 0027 (in agent.toml "
                f'a quoted string: session_umask = "022"), not {self.session_umask!r}'
            )
        if self.shell is not None and not os.path.isabs(self.shell):
            raise ConfigError(f"shell must be an absolute path, not {self.shell!r}")


def config_file_to_read(
    config_file: Path | None,
    environ: Mapping[str, str],
    system_config_file: Path | None = SYSTEM_CONFIG_FILE,
) -> Path | None:
    """The TOML file to read: --config, else TUCDESK_AGENT_CONFIG, else (as root) the system
    file if it exists, else none."""
    if config_file is not None:
        return config_file
    if environ.get(CONFIG_ENVIRONMENT):
        return Path(environ[CONFIG_ENVIRONMENT])
    if system_config_file is not None and os.geteuid() == 0 and system_config_file.exists():
        return system_config_file
    return None


def load_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: Path | None = None,
    system_config_file: Path | None = SYSTEM_CONFIG_FILE,
) -> AgentConfig:
    """Merge flags > environment > TOML file > defaults into a validated AgentConfig.

    ``flags`` holds the parsed flags; None values (flags not given) are ignored. Unknown
    TUCDESK_AGENT_* variables are warned about (they are likely typos), not refused.
    """
    fields = {item.name: item for item in dataclasses.fields(AgentConfig)}
    values: dict[str, Any] = {}
    config_file = config_file_to_read(config_file, environ, system_config_file)
    if config_file is not None:
        for name, raw in _read_toml(config_file).items():
            key = name.replace("-", "_")
            if key not in fields:
                raise ConfigError(f"{config_file}: unknown setting {name!r}")
            values[key] = _convert(key, raw, fields[key].type, f"{config_file}: {name}")
    for name in unknown_environment_variables(environ):
        logger.warning("ignoring unknown environment variable %s%s", name, _did_you_mean(name))
    for key in fields:
        env_name = ENVIRONMENT_PREFIX + key.upper()
        if environ.get(env_name):
            values[key] = _convert(key, environ[env_name], fields[key].type, env_name)
    for key, raw in flags.items():
        if raw is not None and key in fields:
            values[key] = _convert(key, raw, fields[key].type, f"--{key.replace('_', '-')}")
    if "state_dir" not in values:
        values["state_dir"] = default_state_dir(environ)
    config = AgentConfig(**values)
    config.validate()
    return config


def unknown_environment_variables(environ: Mapping[str, str]) -> list[str]:
    """TUCDESK_AGENT_* variables that name no setting (sorted)."""
    known = {ENVIRONMENT_PREFIX + item.name.upper() for item in dataclasses.fields(AgentConfig)}
    known.add(CONFIG_ENVIRONMENT)
    return sorted(
        name for name in environ if name.startswith(ENVIRONMENT_PREFIX) and name not in known
    )


def _did_you_mean(name: str) -> str:
    known = [ENVIRONMENT_PREFIX + item.name.upper() for item in dataclasses.fields(AgentConfig)]
    close = difflib.get_close_matches(name, [*known, CONFIG_ENVIRONMENT], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_session_user(config: AgentConfig) -> pwd.struct_passwd:
    """The account sessions run as (``user``, or the agent's own); ConfigError if it is unknown."""
    try:
        if config.user is None:
            return pwd.getpwuid(os.geteuid())
        return pwd.getpwnam(config.user)
    except KeyError:
        who = repr(config.user) if config.user is not None else f"uid {os.geteuid()}"
        raise ConfigError(
            f"user {who} does not exist on this host; set user (--user) to an existing account"
        ) from None


def _read_toml(path: Path) -> dict[str, Any]:
    # As the relay and rendezvous read theirs: [agent] (or the top level without one); other
    # tables in a shared file are theirs, keys above [agent] are refused.
    settings = read_config_table(path, CONFIG_TABLE, MAX_CONFIG_FILE_SIZE, ConfigError)
    _refuse_misspelt_tables(path)
    return settings


def _refuse_misspelt_tables(path: Path) -> None:
    """ConfigError for a table named almost like [agent] ([agentt], [agents], [Agent]; without
    an [agent] table also [agnet]): its settings would be silently ignored. Tables of other
    tools in a shared file stay allowed, even with "agent" in their name ([reagent],
    [magenta], [tucdesk-agent])."""
    try:  # read_config_table has checked that it parses and its size
        with path.open("rb") as handle:
            parsed = tomllib.loads(handle.read(MAX_CONFIG_FILE_SIZE + 1).decode("utf-8"))
    except (OSError, ValueError):
        return  # replaced since: its settings were read, nothing more to say
    threshold = (
        MISSPELT_TABLE_RATIO if CONFIG_TABLE in parsed else MISSPELT_TABLE_RATIO_WITHOUT_AGENT
    )
    for name, value in parsed.items():
        if name == CONFIG_TABLE or not isinstance(value, dict):
            continue
        ratio = difflib.SequenceMatcher(None, name.lower(), CONFIG_TABLE).ratio()
        if name.lower() == CONFIG_TABLE or ratio >= threshold:
            raise ConfigError(
                f"{path}: unknown table [{name}]; did you mean [{CONFIG_TABLE}]?"
            )


def _convert(name: str, raw: Any, declared: Any, origin: str) -> Any:
    text = str(declared)
    try:
        if text == "bool":
            return _boolean(raw)
        if "int" in text:
            # A float (5.7, inf, 1e400) is refused rather than truncated.
            if isinstance(raw, bool) or not isinstance(raw, int | str):
                raise ValueError(raw)
            return int(raw)
        if "float" in text:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        if "Path" in text:
            return Path(str(raw)).expanduser()
        if not isinstance(raw, str | int):
            raise ValueError(raw)
        return str(raw)
    except (TypeError, ValueError, OverflowError):
        kind = " (it takes a whole number)" if "int" in text else ""
        raise ConfigError(f"{origin}: {raw!r} is not a valid value for {name}{kind}") from None


_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(raw)
