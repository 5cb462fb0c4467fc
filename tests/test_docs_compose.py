"""deploy/docker-compose.yml keeps what the self-hosting guide says must stay private: the
rendezvous's /metrics off the published API port, the database password out of the URL, and
the key and password files readable by the image's service user only."""

from __future__ import annotations

import re
from pathlib import Path

DEPLOY = Path(__file__).parent.parent / "deploy"
COMPOSE = (DEPLOY / "docker-compose.yml").read_text()


def _service(name: str) -> str:
    """The block of one service in the compose file (its indented lines)."""
    match = re.search(rf"^  {name}:\n((?:    .*\n|\n)+)", COMPOSE, re.MULTILINE)
    assert match, f"no service {name} in docker-compose.yml"
    return match.group(1)


def test_rendezvous_metrics_have_their_own_unpublished_listener() -> None:
    rendezvous = _service("rendezvous")
    listen = re.search(r"TUCDESK_METRICS_LISTEN: \S+:(\d+)", rendezvous)
    assert listen, "without metrics_listen /metrics is served on the published API port"
    ports = re.findall(r'^      - "([^"]+)"', rendezvous, re.MULTILINE)
    assert ports == ["8443:8443"]
    assert listen.group(1) != "8443"


def test_database_password_comes_from_a_file_not_the_url() -> None:
    rendezvous = _service("rendezvous")
    url = re.search(r"TUCDESK_DATABASE: (\S+)", rendezvous)
    assert url and "@" in url.group(1) and ":" not in url.group(1).split("//")[1].split("@")[0]
    assert "TUCDESK_DATABASE_PASSWORD_FILE: /run/secrets/db-password" in rendezvous
    assert "POSTGRES_PASSWORD_FILE: /run/secrets/db-password" in _service("postgres")
    assert "${POSTGRES_PASSWORD" not in COMPOSE


def test_setup_comments_give_files_to_the_images_service_user() -> None:
    uid = re.search(r"--uid (\d+)", (DEPLOY / "Dockerfile").read_text())
    assert uid
    assert f"chown {uid.group(1)} tls/server.key secrets/db-password" in COMPOSE
    assert "chmod 600 tls/server.key secrets/db-password" in COMPOSE
