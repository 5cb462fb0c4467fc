"""The relay's fixed socket buffers: applied only where the kernel grants all of them."""

from __future__ import annotations

import socket

import pytest

from relay.config import DEFAULT_SOCKET_BUFFER, load_config
from relay.errors import ConfigError
from relay.tcp import kernel_socket_buffer_maxima, open_tcp_listener, usable_socket_buffer

REQUIRED = {"listen": "127.0.0.1:7000", "relay_id": "r1", "token_key": ["k.pem"]}
MIB = 1 << 20


@pytest.mark.parametrize(
    ("requested", "maxima", "usable"),
    [
        (4 * MIB, (4 * MIB, 4 * MIB), 4 * MIB),
        (4 * MIB, (32 * MIB, 8 * MIB), 4 * MIB),
        # A stock kernel would clamp them and end autotuning: keep autotuning.
        (4 * MIB, (212_992, 212_992), 0),
        (4 * MIB, (4 * MIB, 212_992), 0),  # either direction short is enough to keep autotuning
        (4 * MIB, (None, 4 * MIB), 0),  # unreadable: do not guess
        (0, (8 * MIB, 8 * MIB), 0),  # asked for autotuning
    ],
)
def test_fixed_buffers_are_used_only_when_the_kernel_grants_all_of_them(
    requested, maxima, usable
):
    assert usable_socket_buffer(requested, maxima) == usable


def test_kernel_maxima_are_read_from_proc_and_garbage_means_unknown(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("4194304\n")
    bad.write_text("lots\n")
    assert kernel_socket_buffer_maxima((str(good), str(bad))) == (4194304, None)
    assert kernel_socket_buffer_maxima((str(tmp_path / "missing"), str(good))) == (None, 4194304)


def _accepted_buffers(socket_buffer: int) -> tuple[int, int]:
    listener = open_tcp_listener("127.0.0.1", 0, socket_buffer)
    with listener, socket.create_connection(listener.getsockname()[:2]) as client:
        listener.setblocking(True)
        accepted, _ = listener.accept()
        with accepted, client:
            return (
                accepted.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            )


def test_accepted_connections_inherit_the_listeners_buffers():
    size = 96 * 1024  # below any kernel's maxima, and not an autotuning default
    assert _accepted_buffers(size) == (2 * size, 2 * size)  # Linux doubles it for bookkeeping
    assert _accepted_buffers(0) != (2 * size, 2 * size)


def test_socket_buffer_option_defaults_to_four_mib_and_zero_means_autotuning():
    assert load_config(REQUIRED, {}).socket_buffer == DEFAULT_SOCKET_BUFFER == 4 * MIB
    assert load_config(REQUIRED, {"TUCDESK_RELAY_SOCKET_BUFFER": "0"}).socket_buffer == 0
    with pytest.raises(ConfigError, match="socket_buffer must be at least 0"):
        load_config({**REQUIRED, "socket_buffer": -1}, {})
