"""A refusal's error code comes from the server, so it is shown escaped like its message.

A small HTTP server on loopback plays a hostile or broken rendezvous whose error code holds
escape codes and a line break; the CLI's one line must not let them reach the terminal.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from operator_cli.home import CliHome, Settings
from operator_cli.main import main

pytestmark = pytest.mark.timeout(60)

HOSTILE_CODE = "forbidden\x1b]0;owned\x07\x1b[2J\nfake line"


class RefusingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        body = json.dumps({"error": HOSTILE_CODE, "message": "no \x1b[31mred\x1b[0m"}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RefusingHandler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    cli_home = CliHome(tmp_path / "home")
    cli_home.save_settings(Settings(server=f"http://127.0.0.1:{httpd.server_address[1]}"))
    cli_home.create_key()
    cli_home.save_token({"access_token": "test-token", "expires_at": time.time() + 3600})
    try:
        yield cli_home.path
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_a_refusal_code_with_control_characters_is_shown_escaped(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--home", str(home), "agents"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("tucdesk: the server refused: ")
    assert "\x1b" not in err and "\x07" not in err
    assert "(forbidden" in err
