"""Relay metrics: every refusal reason is exported, and the HTTP responder serves only /metrics."""

from __future__ import annotations

import pytest

from relay.metrics import RelayMetrics
from relay.metrics_http import metrics_response
from relay.wire import REFUSAL_REASONS


def test_every_refusal_reason_is_exported_from_the_start():
    text = RelayMetrics().exposition().decode()
    for reason in REFUSAL_REASONS:
        for transport in ("tcp", "udp"):
            assert f'reason="{reason.value}",transport="{transport}"' in text


def test_two_relays_in_one_process_keep_separate_counts():
    first, second = RelayMetrics(), RelayMetrics()
    first.refusals.labels("tcp", "same_side").inc()
    assert first.refusal_count("tcp", "same_side") == 1
    assert second.refusal_count("tcp", "same_side") == 0


def test_get_metrics_returns_the_exposition():
    response = metrics_response(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", lambda: b"m 1\n")
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\nm 1\n")


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", b"404"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
        (b"\x00\x01garbage", b"400"),
        (b"GET /metrics\r\n\r\n", b"400"),
    ],
)
def test_anything_else_gets_an_error_status(request_head, status):
    assert metrics_response(request_head, lambda: b"").split(b" ")[1] == status
