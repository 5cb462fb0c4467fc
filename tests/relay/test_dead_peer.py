"""A side whose host dies or whose network is cut is given up after dead_peer_timeout.

Such a side sends no FIN, so without TCP keepalive on the relay's sockets its partner waited for
the idle timeout (ten minutes by default) to learn the session was over. A live side that only
stops reading must not be given up (TCP_USER_TIMEOUT would: Linux applies it to a zero window).
The cut side runs in a network namespace joined to this one by a veth pair; taking its end of
the link down is a cut network (packets vanish, nothing is answered).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp
from relay.config import HostPort
from relay.tcp import DEAD_PEER_PROBES, detect_dead_peers, open_tcp_listener

from .harness import make_token, running_relay, trio_test

REPOSITORY = Path(__file__).resolve().parents[2]
DEAD_PEER_TIMEOUT = 3.0
# Far above DEAD_PEER_TIMEOUT and far below the idle timeout the test relay is given.
GIVEN_UP_WITHIN_SECONDS = 12.0
IDLE_TIMEOUT = 120.0
STALL_TIMEOUT = 2.0
KEYSTROKE_SECONDS = 0.5
NEEDS = "root and iproute2 (ip netns) to cut a network"
# The cut side: pair as the agent, say so, then wait to be cut off.
CUT_SIDE = """
import sys, trio
from relay.client import connect_tcp
async def main():
    stream = await connect_tcp(sys.argv[1], int(sys.argv[2]), sys.argv[3], pair_timeout=10)
    print("paired", flush=True)
    await trio.sleep(3600)
trio.run(main)
"""


def _can_cut_networks() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@contextmanager
def namespace_link() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined by a veth pair: (namespace, its interface, this side's IP)."""
    tag = f"tdp{os.getpid() % 100000}"
    namespace, here, there = tag, f"{tag}h", f"{tag}n"
    subnet = 100 + os.getpid() % 100
    here_ip, there_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"

    def ip(*arguments: str) -> None:
        subprocess.run(["ip", *arguments], check=True, capture_output=True)

    ip("netns", "add", namespace)
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", namespace)
        ip("addr", "add", f"{here_ip}/30", "dev", here)
        ip("link", "set", here, "up")
        ip("-n", namespace, "addr", "add", f"{there_ip}/30", "dev", there)
        ip("-n", namespace, "link", "set", there, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        yield namespace, there, here_ip
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", here], capture_output=True)


def test_accepted_connections_inherit_keepalive_and_the_user_timeout() -> None:
    listener = open_tcp_listener("127.0.0.1", 0)
    detect_dead_peers(listener, 60.0)
    listener.setblocking(True)
    with listener, socket.create_connection(listener.getsockname()[:2]):
        accepted, _address = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == DEAD_PEER_PROBES
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0


def test_a_live_peer_that_stops_reading_is_not_given_up() -> None:
    listener = open_tcp_listener("127.0.0.1", 0)
    detect_dead_peers(listener, STALL_TIMEOUT)
    listener.setblocking(True)
    with listener, socket.socket() as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(listener.getsockname()[:2])
        accepted, _address = listener.accept()
        with accepted:
            accepted.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:  # fill the reader's window: it is alive but reads nothing
                    accepted.send(b"x" * 65536)
            accepted.settimeout(3 * STALL_TIMEOUT)
            with pytest.raises(TimeoutError) as waited:  # still waiting: not reset
                accepted.send(b"y" * 65536)
            assert waited.value.errno is None  # the socket timeout, not ETIMEDOUT from the kernel


@pytest.mark.skipif(
    not _can_cut_networks() and os.environ.get("CI") != "true", reason=f"needs {NEEDS}"
)
@pytest.mark.parametrize("partner_sends", [False, True], ids=["quiet", "sending"])
@trio_test
async def test_a_side_cut_off_by_the_network_is_given_up_and_its_partner_told(
    partner_sends: bool,
) -> None:
    # Quiet: keepalive probes find the dead side. Sending (the agent's heartbeats to an operator
    # whose host died): data stays in flight, no probe is sent, and the relay's check of how
    # long the side left it unacknowledged does.
    assert _can_cut_networks(), f"CI must run this test: it needs {NEEDS}"
    signer = SigningIdentity.generate()
    async with running_relay(
        signer, listen=HostPort("0.0.0.0", 0), dead_peer_timeout=DEAD_PEER_TIMEOUT,
        idle_timeout=IDLE_TIMEOUT,
    ) as relay:  # fmt: skip
        port = relay.tcp_address[1]
        with namespace_link() as (namespace, there, here_ip):
            cut_side = await trio.lowlevel.open_process(
                ["ip", "netns", "exec", namespace, sys.executable, "-c", CUT_SIDE, here_ip,
                 str(port), make_token(signer, "s-cut", Side.AGENT)],
                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
            )  # fmt: skip
            try:
                operator = await connect_tcp(
                    "127.0.0.1", port, make_token(signer, "s-cut", Side.OPERATOR)
                )
                assert cut_side.stdout is not None
                with trio.fail_after(10):
                    assert (await cut_side.stdout.receive_some(64)).strip() == b"paired"
                await trio.run_process(["ip", "-n", namespace, "link", "set", there, "down"])
                cut_at = time.monotonic()
                for _ in range(int(GIVEN_UP_WITHIN_SECONDS / KEYSTROKE_SECONDS)):
                    if partner_sends:
                        with contextlib.suppress(trio.BrokenResourceError):
                            await operator.send_all(b"beat")
                    if not await _still_open(operator):
                        break
                    await trio.sleep(KEYSTROKE_SECONDS)
                given_up_after = time.monotonic() - cut_at
                assert given_up_after < GIVEN_UP_WITHIN_SECONDS, "the cut side was not given up"
                await operator.aclose()
            finally:
                cut_side.kill()
                await cut_side.wait()


async def _still_open(operator: trio.SocketStream) -> bool:
    """False once the relay has closed the session (EOF or reset)."""
    try:
        with trio.move_on_after(0.1):
            if await operator.receive_some(1024) == b"":
                return False
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True
