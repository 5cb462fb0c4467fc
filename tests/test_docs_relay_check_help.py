"""The relay health check as `tucdesk-rendezvous --help` and the example config describe it
matches rendezvous/relay_health.py: a probe hello answered `ok`, not a bare TCP connect."""

from __future__ import annotations

from pathlib import Path

from rendezvous.config import SETTING_HELP
from rendezvous.relay_health import RELAY_CHECK_TIMEOUT_SECONDS

EXAMPLE_CONFIG = Path(__file__).parent.parent / "deploy" / "rendezvous" / "rendezvous.example.toml"


def test_relay_check_help_names_the_probe_hello_not_a_tcp_connect() -> None:
    text = SETTING_HELP["relay_check_seconds"]
    assert "probe hello" in text
    assert f"within {RELAY_CHECK_TIMEOUT_SECONDS:g} s" in text
    assert "TCP connection" not in text


def test_example_config_describes_the_probe_the_relay_counts() -> None:
    text = " ".join(EXAMPLE_CONFIG.read_text().split())
    assert "probe hello" in text
    assert "tucdesk_relay_probes_total" in text
    assert "closed before its hello" not in text
