"""The early-release patch refuses at start, with RuntimeError, a Hypercorn that lacks any
internal it uses (0.16 has ``_read_data`` but no ``idle_task``: the first client close killed
the service with AttributeError)."""

from __future__ import annotations

from typing import Any

import hypercorn.trio.run
import hypercorn.trio.tcp_server
import pytest

from rendezvous import server


def _init_without_idle_task(self: Any, *args: Any, **kwargs: Any) -> None:
    self.stream = None  # as Hypercorn 0.16: no idle timer attribute


def test_a_hypercorn_without_idle_task_is_refused_at_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", server.TCPServer)
    monkeypatch.setattr(server.TCPServer, "__init__", _init_without_idle_task)
    with pytest.raises(RuntimeError, match="cannot be released early"):
        server.release_closed_connections()
    assert hypercorn.trio.run.TCPServer is server.TCPServer  # not patched


def test_a_hypercorn_whose_idle_timer_cannot_stop_is_refused_at_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", server.TCPServer)
    monkeypatch.setattr(hypercorn.trio.tcp_server, "TrioSingleTask", object)
    with pytest.raises(RuntimeError, match="cannot be released early"):
        server.release_closed_connections()


def test_the_installed_hypercorn_is_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", server.TCPServer)
    server.release_closed_connections()
    assert hypercorn.trio.run.TCPServer is server.ConnectionReleasingTCPServer
