"""The relay list: ID=HOST:PORT[/UDPPORT], from flags, TUCDESK_RELAYS and TOML."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rendezvous.config import RelayEndpoint, ServiceConfig, load_config, parse_relay
from rendezvous.errors import ConfigError
from rendezvous.main import build_parser


def test_relay_with_and_without_udp_port_parses() -> None:
    assert parse_relay("relay-1=127.0.0.1:7000/7001") == RelayEndpoint(
        "relay-1", "127.0.0.1", 7000, 7001
    )
    assert parse_relay("r2=relay.example.net:443") == RelayEndpoint(
        "r2", "relay.example.net", 443, None
    )
    assert parse_relay("v6=[::1]:7000") == RelayEndpoint("v6", "::1", 7000, None)


@pytest.mark.parametrize(
    "text",
    ["", "relay", "=127.0.0.1:7000", "r=", "r=127.0.0.1", "r=127.0.0.1:0", "r=127.0.0.1:70000",
     "r=127.0.0.1:7000/", "r=127.0.0.1:7000/0", "r=127.0.0.1:7000/x", "bad id=h:1",
     "r=:7000"],
)
def test_malformed_relay_is_refused_with_the_expected_syntax(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_relay(text)


def test_duplicate_relay_ids_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        ServiceConfig(relays=("a=h:1", "a=h:2"))  # type: ignore[arg-type]


def test_relays_come_from_flags_over_environment_over_toml(tmp_path: Path) -> None:
    config_file = tmp_path / "rendezvous.toml"
    config_file.write_text('relays = ["file=10.0.0.1:7000/7001"]\n')
    assert load_config({}, {}, config_file).relays == (
        RelayEndpoint("file", "10.0.0.1", 7000, 7001),
    )
    environ = {"TUCDESK_RELAYS": "env-1=h1:1, env-2=h2:2"}
    assert [relay.id for relay in load_config({}, environ, config_file).relays] == [
        "env-1", "env-2",
    ]
    flags = {"relays": ["flag=127.0.0.1:9"]}
    assert [relay.id for relay in load_config(flags, environ, config_file).relays] == ["flag"]


def test_serve_takes_repeatable_relay_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--relay", "a=127.0.0.1:1", "--relay", "b=127.0.0.1:2/3"]
    )
    assert args.relays == ["a=127.0.0.1:1", "b=127.0.0.1:2/3"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_relay_text_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        relay = parse_relay(text)
    except ConfigError:
        return
    assert 0 < relay.port <= 65535
    assert relay.udp_port is None or 0 < relay.udp_port <= 65535
