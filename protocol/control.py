"""In-session control messages (start, resize, signal, exit status, close) and their msgpack codec.

They travel inside encrypted frames, so only an authenticated peer can send them, but a
compromised or buggy peer still must not be able to crash or overstretch the other side: every
message is a msgpack map with a ``type`` tag and exactly the fields of its schema, each bounded.
Decoding raises CodecError, and nothing else, for any input that is not such a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn, TypeAlias

import msgpack

from protocol.errors import CodecError

MAX_CONTROL_MESSAGE_SIZE = 64 * 1024
MIN_TERMINAL_DIMENSION = 1
MAX_TERMINAL_DIMENSION = 10_000
MAX_TERMINAL_TYPE_LENGTH = 64
MAX_COMMAND_ARGUMENTS = 256
MAX_ARGUMENT_LENGTH = 8 * 1024
MAX_COMMAND_SIZE = 32 * 1024
MAX_ENV_ENTRIES = 32
MAX_ENV_NAME_LENGTH = 64
MAX_ENV_VALUE_LENGTH = 1024
MAX_CLOSE_MESSAGE_LENGTH = 1024
MAX_EXIT_CODE = 255
MAX_SIGNAL_NUMBER = 64
_MAX_MAP_ENTRIES = max(MAX_ENV_ENTRIES, 8)

SESSION_MODES: Final = ("shell", "exec")
SIGNAL_NAMES: Final = (
    "INT", "TERM", "HUP", "QUIT", "KILL", "WINCH", "TSTP", "CONT", "USR1", "USR2",
)
CLOSE_REASONS: Final = (
    "normal",  # the session ended as asked (exit, logout, operator hung up)
    "timeout",  # a session, idle or handshake time limit ran out
    "policy-denied",  # local policy refused the session or a later action
    "revoked",  # the grant, key or operator was revoked mid-session
    "protocol-error",  # the peer sent something this side cannot accept
    "rekey-failed",  # the session could not rekey before its limits
    "shutdown",  # the agent or operator process is shutting down
    "internal-error",  # this side failed; the message says what to look at
)
# Environment passed from the operator is an SSH AcceptEnv-style subset: locale, time zone and
# colour hints only, never anything that changes what code runs (PATH, LD_*, shell startup).
_ENV_NAME = re.compile(r"LANG|LANGUAGE|LC_[A-Z]{1,32}|TZ|COLORTERM")
_TERMINAL_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

TYPE_FIELD = "type"
SESSION_START_TAG = "start"
RESIZE_TAG = "resize"
SIGNAL_TAG = "signal"
EXIT_STATUS_TAG = "exit"
CLOSE_TAG = "close"
KEEPALIVE_TAG = "keepalive"
PTY_FIELD = "pty"


@dataclass(frozen=True)
class SessionStart:
    """Operator → agent: what to run. ``command`` is the argv for exec and empty for a shell.

    A shell always runs on a terminal; an exec runs on pipes unless ``pty`` (``exec -t``, like
    ``ssh -t host cmd``): then on a terminal of ``terminal_type``, ``rows`` and ``cols``. The
    field is sent only when true, so an agent that predates it reads every other start as
    before (and refuses ``exec -t`` as a field it does not know).
    """

    mode: Literal["shell", "exec"]
    command: tuple[str, ...]
    terminal_type: str
    rows: int
    cols: int
    env: tuple[tuple[str, str], ...] = ()
    pty: bool = False

    def __post_init__(self) -> None:
        if self.mode not in SESSION_MODES:
            _refuse(f"session mode must be one of {list(SESSION_MODES)}")
        _check_command(self.mode, self.command)
        if type(self.pty) is not bool:
            _refuse("pty must be true or false")
        if self.pty and self.mode != "exec":
            _refuse("pty is for an exec session (a shell always has a terminal)")
        _check_text(self.terminal_type, "terminal type", MAX_TERMINAL_TYPE_LENGTH)
        if not _TERMINAL_TYPE.fullmatch(self.terminal_type):
            _refuse("terminal type must be letters, digits and . _ + - (like xterm-256color)")
        _check_dimension(self.rows, "rows")
        _check_dimension(self.cols, "cols")
        _check_env(self.env)


@dataclass(frozen=True)
class Resize:
    """Operator → agent: the terminal window changed size."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        _check_dimension(self.rows, "rows")
        _check_dimension(self.cols, "cols")


@dataclass(frozen=True)
class Signal:
    """Operator → agent: deliver a signal (by name, from SIGNAL_NAMES) to the session's process."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in SIGNAL_NAMES:
            _refuse(f"signal must be one of {list(SIGNAL_NAMES)}")


@dataclass(frozen=True)
class ExitStatus:
    """Agent → operator: the process ended with an exit ``code`` or was killed by ``signal``."""

    code: int | None = None
    signal: int | None = None

    def __post_init__(self) -> None:
        if (self.code is None) == (self.signal is None):
            _refuse("exit status must carry exactly one of an exit code or a signal number")
        if self.code is not None:
            _check_integer(self.code, "exit code", 0, MAX_EXIT_CODE)
        if self.signal is not None:
            _check_integer(self.signal, "signal number", 1, MAX_SIGNAL_NUMBER)


@dataclass(frozen=True)
class Close:
    """Either side: the session is ending, with a reason from CLOSE_REASONS and a short message."""

    reason: str
    message: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or self.reason not in CLOSE_REASONS:
            _refuse(f"close reason must be one of {list(CLOSE_REASONS)}")
        _check_text(self.message, "close message", MAX_CLOSE_MESSAGE_LENGTH, allow_empty=True)


@dataclass(frozen=True)
class Keepalive:
    """Either side: "are you there?" (``reply`` false), or the answer to one (``reply`` true).

    The operator asks when it has heard nothing for a while, as ssh's ServerAliveInterval does,
    and gives the session up when no answer comes: a dead agent host or a cut network sends
    nothing, not even a close.
    """

    reply: bool = False

    def __post_init__(self) -> None:
        if type(self.reply) is not bool:
            _refuse("keepalive reply must be true or false")


ControlMessage: TypeAlias = SessionStart | Resize | Signal | ExitStatus | Close | Keepalive


def encode_control(message: ControlMessage) -> bytes:
    """The msgpack encoding of ``message`` (already validated when it was constructed)."""
    body: dict[str, Any]
    if isinstance(message, SessionStart):
        body = {
            TYPE_FIELD: SESSION_START_TAG,
            "mode": message.mode,
            "command": list(message.command),
            "term": message.terminal_type,
            "rows": message.rows,
            "cols": message.cols,
            "env": dict(message.env),
        }
        if message.pty:
            body[PTY_FIELD] = True
    elif isinstance(message, Resize):
        body = {TYPE_FIELD: RESIZE_TAG, "rows": message.rows, "cols": message.cols}
    elif isinstance(message, Signal):
        body = {TYPE_FIELD: SIGNAL_TAG, "name": message.name}
    elif isinstance(message, ExitStatus):
        body = {TYPE_FIELD: EXIT_STATUS_TAG, "code": message.code, "signal": message.signal}
    elif isinstance(message, Close):
        body = {TYPE_FIELD: CLOSE_TAG, "reason": message.reason, "message": message.message}
    elif isinstance(message, Keepalive):
        body = {TYPE_FIELD: KEEPALIVE_TAG, "reply": message.reply}
    else:
        raise CodecError(f"not a control message: {type(message).__name__}")
    encoded: bytes = msgpack.packb(body, use_bin_type=True)
    if len(encoded) > MAX_CONTROL_MESSAGE_SIZE:
        raise CodecError(f"control message is larger than {MAX_CONTROL_MESSAGE_SIZE} bytes")
    return encoded


def decode_control(data: bytes) -> ControlMessage:
    """Parse one control message, raising CodecError for anything that does not fit a schema."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("control message must be bytes")
    if len(data) > MAX_CONTROL_MESSAGE_SIZE:
        raise CodecError(f"control message is larger than {MAX_CONTROL_MESSAGE_SIZE} bytes")
    try:
        body = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_extension,
            object_pairs_hook=_map_without_duplicates,
            max_str_len=MAX_CONTROL_MESSAGE_SIZE,
            max_bin_len=0,
            max_array_len=MAX_COMMAND_ARGUMENTS,
            max_map_len=_MAX_MAP_ENTRIES,
            max_ext_len=0,
        )
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException):
        raise CodecError("control message is not valid msgpack") from None
    if not isinstance(body, dict):
        raise CodecError("control message must be a msgpack map")
    tag = body.get(TYPE_FIELD)
    if tag == SESSION_START_TAG:
        _expect_keys(
            body, {"mode", "command", "term", "rows", "cols", "env"}, optional={PTY_FIELD}
        )
        command = body["command"]
        if not isinstance(command, list):
            _refuse("command must be a list of arguments")
        env = body["env"]
        if not isinstance(env, dict):
            _refuse("env must be a map of names to values")
        return SessionStart(
            mode=body["mode"],
            command=tuple(command),
            terminal_type=body["term"],
            rows=body["rows"],
            cols=body["cols"],
            env=tuple(env.items()),
            pty=body.get(PTY_FIELD, False),
        )
    if tag == RESIZE_TAG:
        _expect_keys(body, {"rows", "cols"})
        return Resize(rows=body["rows"], cols=body["cols"])
    if tag == SIGNAL_TAG:
        _expect_keys(body, {"name"})
        return Signal(name=body["name"])
    if tag == EXIT_STATUS_TAG:
        _expect_keys(body, {"code", "signal"})
        return ExitStatus(code=body["code"], signal=body["signal"])
    if tag == CLOSE_TAG:
        _expect_keys(body, {"reason", "message"})
        return Close(reason=body["reason"], message=body["message"])
    if tag == KEEPALIVE_TAG:
        _expect_keys(body, {"reply"})
        return Keepalive(reply=body["reply"])
    raise CodecError("control message has an unknown or missing type tag")


def _expect_keys(
    body: dict[str, Any], fields: set[str], optional: frozenset[str] | set[str] = frozenset()
) -> None:
    expected = fields | {TYPE_FIELD}
    present = set(body) - set(optional)
    if present != expected:
        missing = sorted(expected - present)
        extra = sorted(str(key) for key in present - expected)
        _refuse(f"{body[TYPE_FIELD]} message fields are wrong (missing {missing}, extra {extra})")


def _map_without_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise CodecError("control message map has a duplicate key")
    return result


def _refuse_extension(code: int, data: bytes) -> NoReturn:
    raise CodecError("control messages carry no msgpack extension types")


def _refuse(reason: str) -> NoReturn:
    raise CodecError(reason)


def _check_integer(value: object, what: str, lowest: int, highest: int) -> None:
    # type() rather than isinstance(): bool is an int subclass and must not pass as a number.
    if type(value) is not int or not lowest <= value <= highest:
        _refuse(f"{what} must be an integer in {lowest}..{highest}")


def _check_dimension(value: object, what: str) -> None:
    _check_integer(value, what, MIN_TERMINAL_DIMENSION, MAX_TERMINAL_DIMENSION)


def _check_text(value: object, what: str, max_length: int, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str) or len(value) > max_length or (not value and not allow_empty):
        size = "0" if allow_empty else "1"
        _refuse(f"{what} must be text of {size}..{max_length} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _refuse(f"{what} must be valid Unicode")


def _check_command(mode: str, command: object) -> None:
    if not isinstance(command, tuple):
        _refuse("command must be a tuple of arguments")
    if mode == "shell":
        if command:
            _refuse("a shell session takes no command")
        return
    if not 0 < len(command) <= MAX_COMMAND_ARGUMENTS:
        _refuse(f"an exec session needs a command of 1..{MAX_COMMAND_ARGUMENTS} arguments")
    total = 0
    for index, argument in enumerate(command):
        if not isinstance(argument, str):
            _refuse("command arguments must be text")
        _check_text(argument, "command argument", MAX_ARGUMENT_LENGTH, allow_empty=index > 0)
        if "\x00" in argument:
            _refuse("command arguments cannot contain NUL characters")
        total += len(argument)
    if total > MAX_COMMAND_SIZE:
        _refuse(f"command is longer than {MAX_COMMAND_SIZE} characters in all")


def _check_env(env: object) -> None:
    if not isinstance(env, tuple) or len(env) > MAX_ENV_ENTRIES:
        _refuse(f"env must be a tuple of at most {MAX_ENV_ENTRIES} (name, value) pairs")
    names: set[str] = set()
    for entry in env:
        if not isinstance(entry, tuple) or len(entry) != 2:
            _refuse("env entries must be (name, value) pairs")
        name, value = entry
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            _refuse("env may only carry LANG, LANGUAGE, LC_*, TZ and COLORTERM")
        if not isinstance(value, str):
            _refuse(f"env {name} must be text")
        if name in names:
            _refuse(f"env names {name} twice")
        names.add(name)
        _check_text(value, f"env {name}", MAX_ENV_VALUE_LENGTH, allow_empty=True)
        if "\x00" in value:
            _refuse("env values cannot contain NUL characters")
