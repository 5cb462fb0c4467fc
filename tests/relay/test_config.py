"""Relay configuration: flags over environment over TOML over defaults; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import OPTIONS, HostPort, load_config
from relay.errors import ConfigError
from relay.main import build_parser

from .harness import relay_config

REQUIRED = {"listen": "127.0.0.1:7000", "relay_id": "r1", "token_key": ["k.pem"]}


def test_flags_beat_environment_which_beats_the_file_which_beats_defaults(tmp_path):
    config_file = tmp_path / "relay.toml"
    config_file.write_text(
        '[relay]\nrelay_id = "from-file"\nmax_sessions = 5\npair_timeout = 7.5\n'
        'token_key = ["a.pem", "b.pem"]\nlisten = "0.0.0.0:1"\nidle_timeout = 9\n'
    )
    environment = {"TUCDESK_RELAY_MAX_SESSIONS": "6", "TUCDESK_RELAY_RELAY_ID": "from-env"}
    config = load_config({"relay_id": "from-flag"}, environment, config_file)
    assert config.relay_id == "from-flag"
    assert config.max_sessions == 6
    assert config.pair_timeout == 7.5
    assert config.token_key == (Path("a.pem"), Path("b.pem"))
    assert config.listen == HostPort("0.0.0.0", 1)
    assert config.hello_timeout == 5.0


def test_missing_required_option_names_every_way_to_give_it():
    with pytest.raises(ConfigError, match="--relay-id.*TUCDESK_RELAY_RELAY_ID"):
        load_config({"listen": "127.0.0.1:1", "token_key": ["k"]}, {})


def test_keys_are_required_and_jwks_must_be_https():
    with pytest.raises(ConfigError, match="--token-key"):
        load_config({"listen": "127.0.0.1:1", "relay_id": "r"}, {})
    with pytest.raises(ConfigError, match="https"):
        load_config({"listen": "127.0.0.1:1", "relay_id": "r", "jwks": "http://x/jwks"}, {})


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_sessions", "0"), ("pair_timeout", "-1"), ("listen", "nohost"), ("blur_logs", "maybe"),
     ("forwarding", "teleport"), ("max_waiting", "many")],
)
def test_bad_values_are_refused_with_the_option_named(name, value):
    with pytest.raises(ConfigError):
        load_config({**REQUIRED, name: value}, {})


def test_unknown_file_options_are_refused(tmp_path):
    config_file = tmp_path / "relay.toml"
    config_file.write_text("max_sesions = 5\n")
    with pytest.raises(ConfigError, match="max_sesions"):
        load_config(REQUIRED, {}, config_file)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for option in OPTIONS:
        assert option.flag in text
        assert option.environment_variable in text.replace("\n", "").replace(" ", "")


def test_file_descriptors_needed_covers_two_sockets_per_session():
    config = load_config({**REQUIRED, "max_sessions": "100", "max_pending": "10"}, {})
    assert config.file_descriptors_needed >= 2 * 100 + 10


def test_the_example_config_in_deploy_loads():
    example = Path(__file__).parents[2] / "deploy" / "relay" / "relay.example.toml"
    config = load_config({}, {}, example)
    assert config.relay_id and config.session_bandwidth > 0


def test_an_open_file_limit_that_cannot_be_met_is_explained():
    import resource

    from relay.fdlimit import raise_open_file_limit

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit here")
    limit, warning = raise_open_file_limit(hard * 1000)
    if limit < hard * 1000:
        assert warning is not None and "--max-sessions" in warning
    limit, warning = raise_open_file_limit(16)
    assert warning is None and limit >= 16


def test_the_example_config_leaves_udp_off_and_says_what_it_is_for():
    example = Path(__file__).parents[2] / "deploy" / "relay" / "relay.example.toml"
    assert load_config({}, {}, example).udp is None
    assert '# udp = "0.0.0.0:7443"' in example.read_text()


@pytest.mark.parametrize(
    "setting", [{"source_ipv4_prefix": "33"}, {"source_ipv6_prefix": "129"},
                {"source_ipv6_prefix": "8"}, {"max_pending_per_source": "0"}],
)
def test_source_grouping_and_the_per_source_cap_are_checked(setting):
    with pytest.raises(ConfigError):
        load_config({**REQUIRED, **setting}, {})


def test_a_low_open_file_limit_is_logged_with_the_sessions_it_still_allows(
    monkeypatch, capsys, tmp_path
):
    import signal

    import relay.main
    from protocol.identity import SigningIdentity

    key_file = tmp_path / "relay-token.pub"
    key_file.write_bytes(SigningIdentity.generate().public.to_pem())
    monkeypatch.setattr(relay.main, "raise_open_file_limit", lambda needed: (4_096, "raise it"))
    previous = signal.getsignal(signal.SIGHUP)
    try:
        # 192.0.2.1 (TEST-NET) is not on this host: the relay stops right after the check.
        code = relay.main.main(["serve", "--listen", "192.0.2.1:7443", "--relay-id", "r1",
                                "--token-key", str(key_file), "--max-pending", "1024"])
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert code == 1
    allowed = (4_096 - 1_024 - 64) // 2
    assert (f"fd_limit open_files=4096 needed=21088 sessions_allowed={allowed} of "
            "max_sessions=10000: raise it") in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["hello_timeout", "grace", "total_bandwidth", "rate_limit"])
def test_non_finite_durations_and_rates_are_refused(name, value):
    # NaN passed every minimum (NaN < x is False).
    with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
        load_config({**REQUIRED, name: value}, {}, None)


@pytest.mark.parametrize("value", [0.3, 1.99])
def test_a_hello_timeout_under_two_seconds_is_refused_with_the_reason(value):
    # Below 2 s, refetches for unknown key ids (at least 1 s apart) could leave a token signed
    # with a newly rotated key no refetch before its hello_timeout.
    with pytest.raises(ConfigError, match="hello_timeout must be at least 2 s: a token signed"):
        relay_config(hello_timeout=value)
