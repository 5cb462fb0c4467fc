"""Control-message codec: round trips, strict schemas, and CodecError (only) for anything else."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.control import (
    CLOSE_REASONS,
    MAX_ARGUMENT_LENGTH,
    MAX_CLOSE_MESSAGE_LENGTH,
    MAX_COMMAND_ARGUMENTS,
    MAX_CONTROL_MESSAGE_SIZE,
    MAX_ENV_ENTRIES,
    MAX_TERMINAL_DIMENSION,
    SIGNAL_NAMES,
    Close,
    ControlMessage,
    ExitStatus,
    Keepalive,
    Resize,
    SessionStart,
    Signal,
    decode_control,
    encode_control,
)
from protocol.errors import CodecError

dimensions = st.integers(min_value=1, max_value=MAX_TERMINAL_DIMENSION)
text = st.text(max_size=40)
arguments = st.text(max_size=40).filter(lambda value: "\x00" not in value)
env_names = st.sampled_from(["LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "COLORTERM"])

session_starts = st.one_of(
    st.builds(
        SessionStart,
        mode=st.just("shell"),
        command=st.just(()),
        terminal_type=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,20}", fullmatch=True),
        rows=dimensions,
        cols=dimensions,
        env=st.dictionaries(env_names, arguments, max_size=4).map(lambda d: tuple(d.items())),
    ),
    st.builds(
        SessionStart,
        mode=st.just("exec"),
        command=st.tuples(arguments.filter(bool)).flatmap(
            lambda first: st.lists(arguments, max_size=6).map(lambda rest: first + tuple(rest))
        ),
        terminal_type=st.just("xterm-256color"),
        rows=dimensions,
        cols=dimensions,
        pty=st.booleans(),
    ),
)
control_messages: st.SearchStrategy[ControlMessage] = st.one_of(
    session_starts,
    st.builds(Resize, rows=dimensions, cols=dimensions),
    st.builds(Signal, name=st.sampled_from(SIGNAL_NAMES)),
    st.builds(ExitStatus, code=st.integers(0, 255)),
    st.builds(ExitStatus, signal=st.integers(1, 64)),
    st.builds(
        Close,
        reason=st.sampled_from(CLOSE_REASONS),
        message=st.text(max_size=200),
    ),
    st.builds(Keepalive, reply=st.booleans()),
)

# Random msgpack-able values: what a buggy or hostile peer could put inside a frame.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10) | st.sampled_from(["type", "rows", "cols"]), children,
                      max_size=5),
    max_leaves=20,
)


def _pack(body: object) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


@settings(max_examples=300)
@given(control_messages)
def test_every_control_message_round_trips(message: ControlMessage) -> None:
    assert decode_control(encode_control(message)) == message


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_codec_error(data: bytes) -> None:
    try:
        message = decode_control(data)
    except CodecError:
        return
    assert decode_control(encode_control(message)) == message


@settings(max_examples=500)
@given(msgpack_values)
def test_arbitrary_msgpack_values_raise_only_codec_error(value: object) -> None:
    try:
        message = decode_control(_pack(value))
    except CodecError:
        return
    assert decode_control(encode_control(message)) == message


@settings(max_examples=300)
@given(
    st.sampled_from(["start", "resize", "signal", "exit", "close"]),
    st.dictionaries(
        st.sampled_from(["mode", "command", "term", "rows", "cols", "env", "name", "code",
                         "signal", "reason", "message"]),
        msgpack_values,
        max_size=7,
    ),
)
def test_random_fields_under_a_known_tag_raise_only_codec_error(
    tag: str, fields: dict[str, object]
) -> None:
    try:
        message = decode_control(_pack({"type": tag, **fields}))
    except CodecError:
        return
    assert decode_control(encode_control(message)) == message


def test_encoding_is_a_map_with_a_type_tag() -> None:
    body = msgpack.unpackb(encode_control(Resize(rows=24, cols=80)), raw=False)
    assert body == {"type": "resize", "rows": 24, "cols": 80}


def test_session_start_encodes_env_as_a_map() -> None:
    start = SessionStart("shell", (), "xterm", 24, 80, (("LANG", "C.UTF-8"), ("TZ", "UTC")))
    body = msgpack.unpackb(encode_control(start), raw=False)
    assert body["env"] == {"LANG": "C.UTF-8", "TZ": "UTC"}
    assert body["command"] == []


@pytest.mark.parametrize("rows", [0, -1, MAX_TERMINAL_DIMENSION + 1, 2**40])
def test_out_of_range_resize_is_refused(rows: int) -> None:
    with pytest.raises(CodecError, match="rows"):
        decode_control(_pack({"type": "resize", "rows": rows, "cols": 80}))


@pytest.mark.parametrize("rows", [True, 24.0, "24", None, [24]])
def test_resize_with_a_non_integer_dimension_is_refused(rows: object) -> None:
    with pytest.raises(CodecError, match="rows"):
        decode_control(_pack({"type": "resize", "rows": rows, "cols": 80}))


def test_resize_bounds_are_inclusive() -> None:
    assert decode_control(_pack({"type": "resize", "rows": 1, "cols": 10_000})) == Resize(1, 10_000)


def test_missing_field_is_refused() -> None:
    with pytest.raises(CodecError, match="missing \\['cols'\\]"):
        decode_control(_pack({"type": "resize", "rows": 24}))


def test_extra_field_is_refused() -> None:
    with pytest.raises(CodecError, match="extra \\['colour'\\]"):
        decode_control(_pack({"type": "resize", "rows": 24, "cols": 80, "colour": 1}))


@pytest.mark.parametrize("tag", ["RESIZE", "exec", "", None, 3])
def test_unknown_type_tag_is_refused(tag: object) -> None:
    with pytest.raises(CodecError, match="type tag"):
        decode_control(_pack({"type": tag, "rows": 24, "cols": 80}))


@pytest.mark.parametrize("body", [[], "resize", 7, None, [{"type": "resize"}]])
def test_a_body_that_is_not_a_map_is_refused(body: object) -> None:
    with pytest.raises(CodecError, match="map"):
        decode_control(_pack(body))


def test_trailing_bytes_after_a_message_are_refused() -> None:
    with pytest.raises(CodecError, match="not valid msgpack"):
        decode_control(encode_control(Resize(24, 80)) + b"\x00")


def test_duplicate_map_keys_are_refused() -> None:
    # fixmap of 3 entries, "rows" given twice: a smuggling attempt a lenient parser would accept.
    data = b"\x83" + _pack("type") + _pack("resize") + _pack("rows") + _pack(1) + _pack("rows")
    data += _pack(2)
    with pytest.raises(CodecError):
        decode_control(data)


def test_binary_values_are_refused() -> None:
    with pytest.raises(CodecError):
        decode_control(_pack({"type": b"resize", "rows": 24, "cols": 80}))


def test_extension_types_are_refused() -> None:
    data = _pack({"type": "resize", "rows": msgpack.ExtType(5, b"x"), "cols": 80})
    with pytest.raises(CodecError):
        decode_control(data)


def test_msgpack_timestamps_are_refused() -> None:
    data = _pack({"type": "resize", "rows": msgpack.Timestamp(1, 0), "cols": 80})
    with pytest.raises(CodecError):
        decode_control(data)


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(CodecError, match="larger than"):
        decode_control(b"\x00" * (MAX_CONTROL_MESSAGE_SIZE + 1))


def test_deeply_nested_input_is_refused() -> None:
    with pytest.raises(CodecError):
        decode_control(b"\x91" * 100_000 + b"\x00")


def test_unknown_signal_is_refused() -> None:
    with pytest.raises(CodecError, match="signal must be one of"):
        decode_control(_pack({"type": "signal", "name": "SEGV"}))


def test_signal_names_round_trip() -> None:
    for name in SIGNAL_NAMES:
        assert decode_control(encode_control(Signal(name))) == Signal(name)


@pytest.mark.parametrize(
    ("code", "signal"), [(None, None), (0, 9), (256, None), (-1, None), (None, 0), (None, 65)]
)
def test_invalid_exit_status_is_refused(code: object, signal: object) -> None:
    with pytest.raises(CodecError):
        decode_control(_pack({"type": "exit", "code": code, "signal": signal}))


def test_exit_status_carries_code_or_signal() -> None:
    assert decode_control(encode_control(ExitStatus(code=0))) == ExitStatus(code=0)
    assert decode_control(encode_control(ExitStatus(signal=9))) == ExitStatus(signal=9)


def test_close_reason_outside_the_vocabulary_is_refused() -> None:
    with pytest.raises(CodecError, match="close reason"):
        decode_control(_pack({"type": "close", "reason": "because", "message": ""}))


def test_oversized_close_message_is_refused() -> None:
    message = "x" * (MAX_CLOSE_MESSAGE_LENGTH + 1)
    with pytest.raises(CodecError, match="close message"):
        decode_control(_pack({"type": "close", "reason": "normal", "message": message}))


def _start(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "type": "start", "mode": "exec", "command": ["uname", "-a"], "term": "xterm",
        "rows": 24, "cols": 80, "env": {},
    }
    body.update(changes)
    return body


def test_exec_on_a_terminal_carries_pty_and_any_other_start_reads_as_before() -> None:
    on_terminal = SessionStart("exec", ("top",), "xterm", 30, 100, pty=True)
    assert decode_control(encode_control(on_terminal)) == on_terminal
    assert msgpack.unpackb(encode_control(on_terminal))["pty"] is True
    # Without -t the start is byte for byte what an agent that predates the field reads.
    on_pipes = SessionStart("exec", ("uname", "-a"), "xterm", 24, 80)
    assert encode_control(on_pipes) == _pack(_start())
    assert decode_control(_pack(_start(pty=False))) == on_pipes


def test_session_start_decodes_to_its_dataclass() -> None:
    start = decode_control(_pack(_start(env={"LANG": "C.UTF-8"})))
    assert start == SessionStart("exec", ("uname", "-a"), "xterm", 24, 80, (("LANG", "C.UTF-8"),))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"mode": "sftp"}, "session mode"),
        ({"mode": "shell"}, "shell session takes no command"),
        ({"command": []}, "needs a command"),
        ({"command": [""]}, "command argument"),
        ({"command": ["ls", 3]}, "arguments must be text"),
        ({"command": ["ls", "a\x00b"]}, "NUL"),
        ({"command": ["x"] * (MAX_COMMAND_ARGUMENTS + 1)}, "msgpack"),
        ({"command": ["x" * (MAX_ARGUMENT_LENGTH + 1)]}, "command argument"),
        ({"command": ["x" * 8000] * 5}, "longer than"),
        ({"command": "ls -l"}, "list of arguments"),
        ({"term": ""}, "terminal type"),
        ({"term": "xterm; rm -rf /"}, "terminal type"),
        ({"term": "x" * 65}, "terminal type"),
        ({"cols": 0}, "cols"),
        ({"env": {"LD_PRELOAD": "/tmp/evil.so"}}, "env may only carry"),
        ({"env": {"PATH": "/tmp"}}, "env may only carry"),
        ({"env": {"LANG": 1}}, "must be text"),
        ({"env": {"LANG": "x" * 1025}}, "env LANG"),
        ({"env": {"LANG": "C\x00"}}, "NUL"),
        ({"env": [["LANG", "C"]]}, "env must be a map"),
        ({"env": {f"LC_{chr(65 + i // 26)}{chr(65 + i % 26)}": "C"
                  for i in range(MAX_ENV_ENTRIES + 1)}}, "msgpack"),
        ({"pty": 1}, "pty must be true or false"),
        ({"pty": "yes"}, "pty must be true or false"),
        ({"pty": None}, "pty must be true or false"),
        ({"mode": "shell", "command": [], "pty": True}, "pty is for an exec session"),
    ],
)
def test_invalid_session_start_is_refused(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode_control(_pack(_start(**changes)))


def test_constructing_an_invalid_message_is_refused() -> None:
    with pytest.raises(CodecError):
        Resize(rows=0, cols=80)
    with pytest.raises(CodecError):
        SessionStart("shell", (), "xterm", 24, 80, (("LANG", "C"), ("LANG", "D")))
    with pytest.raises(CodecError, match="at most"):
        SessionStart("shell", (), "xterm", 24, 80, (("LANG", "C"),) * (MAX_ENV_ENTRIES + 1))
    with pytest.raises(CodecError, match="exactly one"):
        ExitStatus()


def test_encoding_something_that_is_not_a_control_message_is_refused() -> None:
    with pytest.raises(CodecError):
        encode_control("resize")  # type: ignore[arg-type]


@pytest.mark.parametrize("data", ["text", None, 42])
def test_decoding_something_that_is_not_bytes_is_refused(data: object) -> None:
    with pytest.raises(CodecError):
        decode_control(data)  # type: ignore[arg-type]


@pytest.mark.parametrize("reply", [0, 1, "yes", None])
def test_a_keepalive_reply_must_be_a_boolean(reply: object) -> None:
    with pytest.raises(CodecError):
        decode_control(_pack({"type": "keepalive", "reply": reply}))
