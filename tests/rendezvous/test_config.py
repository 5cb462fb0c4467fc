"""Service configuration: flags over TUCDESK_* environment over the TOML file over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from rendezvous.config import ServiceConfig, is_loopback, load_config, split_listen
from rendezvous.errors import ConfigError
from rendezvous.main import parse_duration


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rendezvous.toml"
    path.write_text(text)
    return path


def test_flags_override_environment_which_overrides_the_file(tmp_path: Path) -> None:
    config_file = _toml(
        tmp_path, 'listen = "127.0.0.1:1000"\naccess_token_seconds = 300\nissuer = "from-file"\n'
    )
    environ = {"TUCDESK_LISTEN": "127.0.0.1:2000", "TUCDESK_ACCESS_TOKEN_SECONDS": "120"}
    config = load_config({"listen": "127.0.0.1:3000"}, environ, config_file)
    assert config.listen == "127.0.0.1:3000"
    assert config.access_token_seconds == 120
    assert config.issuer == "from-file"
    assert config.clock_skew_seconds == ServiceConfig().clock_skew_seconds


def test_config_file_may_use_a_rendezvous_table_and_be_named_by_environment(
    tmp_path: Path,
) -> None:
    config_file = _toml(tmp_path, '[rendezvous]\ninsecure_http = true\ndata-dir = "/srv/td"\n')
    config = load_config({}, {"TUCDESK_CONFIG": str(config_file)})
    assert config.insecure_http is True
    assert config.data_dir == Path("/srv/td")


def test_unknown_setting_in_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config({}, {}, _toml(tmp_path, "listne = 1\n"))


def test_malformed_toml_is_refused_with_the_file_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config({}, {}, _toml(tmp_path, "listen = \n"))


def test_unreadable_config_path_is_refused_with_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config({}, {}, tmp_path)  # a directory, not a file


def test_malformed_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="TUCDESK_MAX_BODY_BYTES"):
        load_config({}, {"TUCDESK_MAX_BODY_BYTES": "lots"})


def test_access_tokens_longer_than_15_minutes_are_refused() -> None:
    with pytest.raises(ConfigError, match="15 minutes"):
        load_config({}, {"TUCDESK_ACCESS_TOKEN_SECONDS": "901"})


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    config = ServiceConfig(data_dir=tmp_path)
    assert config.database_url == f"sqlite://{(tmp_path / 'rendezvous.db').resolve()}"
    assert config.database_url.startswith("sqlite:///")


@pytest.mark.parametrize("listen", ["nohost", ":80", "host:", "host:99999", "host:http"])
def test_malformed_listen_address_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError):
        split_listen(listen)


def test_ipv6_listen_address_is_split() -> None:
    assert split_listen("[::1]:8443") == ("::1", 8443)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("10.0.0.1", False), ("example.com", False)],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604800)]
)
def test_durations_parse(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "1.5h", "1w", "0"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_workers_come_from_the_environment_and_default_to_one() -> None:
    assert load_config({}, {}).workers == 1
    assert load_config({}, {"TUCDESK_WORKERS": "3"}).workers == 3


@pytest.mark.parametrize("workers", ["0", "-1", "65"])
def test_out_of_range_worker_counts_are_refused(workers: str) -> None:
    with pytest.raises(ConfigError, match="workers must be"):
        load_config({"workers": workers}, {})


def test_several_workers_need_postgresql(tmp_path: Path) -> None:
    sqlite = ServiceConfig(data_dir=tmp_path, insecure_http=True, workers=2)
    with pytest.raises(ConfigError, match="needs PostgreSQL"):
        sqlite.validate_for_serving()
    ServiceConfig(data_dir=tmp_path, insecure_http=True).validate_for_serving()
    postgres = ServiceConfig(
        data_dir=tmp_path, insecure_http=True, workers=2, database="postgresql://db.test/x"
    )
    postgres.validate_for_serving()
