"""`tucdesk audit export`: progress on a terminal, and nothing but a whole bundle ever lands.

A broken download is simulated by a small HTTP server on loopback that sends part of a real
bundle and then closes (a real rendezvous aborts the chunked body the same way when its export
fails midway); the happy path also runs against the real service.
"""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from audit.progress import ERASE_LINE
from audit.verify import verify_bundle
from operator_cli.audit_export import verify_hint
from operator_cli.home import CliHome, Settings
from operator_cli.main import main
from rendezvous.credentials import hash_secret, new_invite_code
from rendezvous.service_keys import load_service_keys
from rendezvous.store import open_store
from tests.audit.builders import AUDIT_KEY, typical_bundle
from tests.audit.terminal import run_with_terminal_stderr
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.timeout(60)
WAIT_SECONDS = 20

BUNDLE = typical_bundle(commands=400).bundle  # ~280 KB: several 64 KiB reads
BUNDLE_LINES = BUNDLE.count(b"\n")
CUT_AT = 100_000
# What the fake server sends for GET /v1/audit/export.
WHOLE_CHUNKED = "whole, chunked"
WHOLE_SIZED = "whole, with Content-Length"
CUT_CHUNKED = "cut, chunked (the rendezvous aborting)"
CUT_SIZED = "cut, shorter than its Content-Length"
CUT_UNSIZED_AT_LINE = "cut at a line end, delimited by closing"
STALLED = "part, then nothing until the test ends"
OLD_EXPORT = b"an earlier export the user kept\n"


class ExportHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = WHOLE_CHUNKED
    stalled: threading.Event
    release: threading.Event

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        assert self.path == "/v1/audit/export"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        if self.mode in (WHOLE_SIZED, CUT_SIZED):
            self.send_header("Content-Length", str(len(BUNDLE)))
        elif self.mode == CUT_UNSIZED_AT_LINE:
            self.send_header("Connection", "close")
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.mode == WHOLE_SIZED:
            self.wfile.write(BUNDLE)
        elif self.mode == CUT_SIZED:
            self.wfile.write(BUNDLE[:CUT_AT])
        elif self.mode == CUT_UNSIZED_AT_LINE:
            self.wfile.write(BUNDLE[: BUNDLE.rindex(b"\n", 0, CUT_AT) + 1])
        else:
            body = BUNDLE if self.mode == WHOLE_CHUNKED else BUNDLE[:CUT_AT]
            for start in range(0, len(body), 30_000):
                piece = body[start : start + 30_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            if self.mode == WHOLE_CHUNKED:
                self.wfile.write(b"0\r\n\r\n")
            elif self.mode == STALLED:
                self.wfile.flush()
                self.stalled.set()
                self.release.wait(WAIT_SECONDS)
        self.close_connection = self.mode != WHOLE_CHUNKED


@dataclass
class FakeService:
    home: Path
    handler: type[ExportHandler]

    def serve(self, mode: str) -> None:
        self.handler.mode = mode


@pytest.fixture
def service(tmp_path: Path) -> Iterator[FakeService]:
    events = {"stalled": threading.Event(), "release": threading.Event()}
    handler = type("BoundHandler", (ExportHandler,), events)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    home = CliHome(tmp_path / "home")
    home.save_settings(Settings(server=f"http://127.0.0.1:{httpd.server_address[1]}"))
    home.create_key()
    home.save_token({"access_token": "test-token", "expires_at": time.time() + 3600})
    try:
        yield FakeService(home.path, handler)
    finally:
        handler.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def export(
    service: FakeService, capsys: pytest.CaptureFixture[bytes], *options: str
) -> tuple[int, bytes, str]:
    capsys.readouterr()
    code = main(["--home", str(service.home), "audit", "export", *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.decode()


@pytest.mark.parametrize("mode", [WHOLE_CHUNKED, WHOLE_SIZED])
def test_whole_export_lands_in_place_private(
    service: FakeService, tmp_path: Path, mode: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    service.serve(mode)
    target = tmp_path / "audit.jsonl"
    target.write_bytes(OLD_EXPORT)
    code, out, err = export(service, capsysbinary, "-o", str(target))
    assert code == 0 and out == b""
    assert err.startswith(f"wrote {target} ({BUNDLE_LINES} lines)") and err.count("\n") == 1
    assert target.read_bytes() == BUNDLE and verify_bundle(target, [AUDIT_KEY.public]).ok
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == ["audit.jsonl", "home"]


@pytest.mark.parametrize("mode", [CUT_CHUNKED, CUT_SIZED, CUT_UNSIZED_AT_LINE])
def test_broken_stream_leaves_no_file_and_says_so_in_one_line(
    service: FakeService, tmp_path: Path, mode: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    service.serve(mode)
    target = tmp_path / "audit.jsonl"
    code, out, err = export(service, capsysbinary, "-o", str(target))
    assert code == 1 and out == b""
    assert err.startswith("tucdesk: the export ") and err.count("\n") == 1
    assert err.endswith(f"; nothing was written to {target}\n")
    assert "Traceback" not in err and "cannot reach the server" not in err
    assert not target.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["home"]  # no partial left


def test_aborted_chunked_stream_is_named_as_stopped(
    service: FakeService, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    service.serve(CUT_CHUNKED)
    _, _, err = export(service, capsysbinary, "-o", str(tmp_path / "audit.jsonl"))
    assert err.startswith("tucdesk: the export stopped after ") and "(IncompleteRead)" in err


@pytest.mark.parametrize("mode", [CUT_CHUNKED, CUT_UNSIZED_AT_LINE])
def test_broken_stream_does_not_clobber_an_existing_export(
    service: FakeService, tmp_path: Path, mode: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    service.serve(mode)
    target = tmp_path / "audit.jsonl"
    target.write_bytes(OLD_EXPORT)
    target.chmod(0o644)
    code, _, _ = export(service, capsysbinary, "-o", str(target))
    assert code == 1
    assert target.read_bytes() == OLD_EXPORT and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(path.name for path in tmp_path.iterdir()) == ["audit.jsonl", "home"]


def test_broken_stream_to_stdout_exits_one(
    service: FakeService, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    service.serve(CUT_CHUNKED)
    code, out, err = export(service, capsysbinary)
    assert code == 1 and BUNDLE.startswith(out) and len(out) < len(BUNDLE)
    assert err.endswith("; the output is incomplete\n") and err.count("\n") == 1


def test_whole_export_to_stdout_is_the_bundle(
    service: FakeService, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    service.serve(WHOLE_CHUNKED)
    code, out, err = export(service, capsysbinary, "--progress")
    assert code == 0 and out == BUNDLE
    assert err.startswith(ERASE_LINE + "downloading audit export: ") and err.endswith(ERASE_LINE)


def test_forced_progress_is_erased_before_the_result_line(
    service: FakeService, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    service.serve(WHOLE_CHUNKED)
    target = tmp_path / "audit.jsonl"
    code, _, quiet = export(service, capsysbinary, "-o", str(target))
    assert code == 0 and quiet.startswith("wrote ")
    code, _, err = export(service, capsysbinary, "-o", str(target), "--progress")
    assert code == 0 and err.startswith(ERASE_LINE + "downloading audit export: ")
    assert " lines" in err and err.endswith(ERASE_LINE + quiet)
    service.serve(CUT_CHUNKED)
    code, _, err = export(service, capsysbinary, "-o", str(target), "--progress")
    assert code == 1 and ERASE_LINE + "tucdesk: the export stopped" in err


def test_progress_follows_the_terminal(service: FakeService, tmp_path: Path) -> None:
    service.serve(WHOLE_CHUNKED)
    target = tmp_path / "audit.jsonl"
    argv = ["--home", str(service.home), "audit", "export", "-o", str(target)]
    code, _, terminal = run_with_terminal_stderr("tucdesk", argv)
    assert code == 0 and target.read_bytes() == BUNDLE
    assert terminal.startswith(ERASE_LINE.encode() + b"downloading audit export: ")
    assert ERASE_LINE.encode() + b"wrote " in terminal
    code, _, terminal = run_with_terminal_stderr("tucdesk", [*argv, "--no-progress"])
    assert code == 0 and terminal.startswith(b"wrote ")


def test_interrupted_export_leaves_no_file(service: FakeService, tmp_path: Path) -> None:
    service.serve(STALLED)
    target = tmp_path / "audit.jsonl"
    script = Path(sys.executable).parent / "tucdesk"
    argv = [str(script), "--home", str(service.home), "audit", "export", "-o", str(target)]
    with subprocess.Popen(argv, stderr=subprocess.PIPE) as child:
        assert service.handler.stalled.wait(WAIT_SECONDS)
        deadline = time.monotonic() + WAIT_SECONDS
        while not list(tmp_path.glob(".audit.jsonl.*.partial")):  # the download has begun
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.01)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=WAIT_SECONDS)
    assert child.returncode == 130
    assert err.decode() == f"tucdesk: interrupted; nothing was written to {target}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["home"]


def test_a_directory_is_refused_before_anything_is_fetched(
    service: FakeService, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, _, err = export(service, capsysbinary, "-o", str(tmp_path))
    assert code == 1 and err == f"tucdesk: {tmp_path} is a directory; give a file name with -o\n"


# ---- against the real service ----------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.mark.anyio
async def test_export_from_the_real_service_lands_whole_with_progress(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    database = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    async with open_store(database) as store:
        team = await store.create_team("ops", time.time())
        invite = new_invite_code()
        now = time.time()
        await store.create_invite(
            team.id, "auditor@example.test", "auditor", hash_secret(invite), now + 600, "test", now
        )
    home, target = tmp_path / "home", tmp_path / "audit.jsonl"
    async with live_service(tmp_path / "data", database) as (url, config):
        login = ["--home", str(home), "login", "--server", url, "--invite", invite]
        assert await trio.to_thread.run_sync(main, login) == 0
        capsysbinary.readouterr()
        command = ["--home", str(home), "audit", "export", "-o", str(target), "--progress"]
        assert await trio.to_thread.run_sync(main, command) == 0
    err = capsysbinary.readouterr().err.decode()
    assert err.startswith(ERASE_LINE + "downloading audit export: ")
    lines = target.read_bytes().count(b"\n")
    assert f"{ERASE_LINE}wrote {target} ({lines} lines); check it with: " in err
    assert err.endswith(" (or your administrator)\n") and err.count("\n") == 1
    audit_key = load_service_keys(config.data_dir).audit_signer.public
    verified = verify_bundle(target, [audit_key])
    assert verified.ok and verified.record_count >= 3, verified.summary()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_an_unwritable_destination_is_named_not_the_temporary_file(
    service: FakeService, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    target = tmp_path / "no-such-dir" / "x.jsonl"
    code, _, err = export(service, capsysbinary, "-o", str(target))
    assert code == 1
    # endswith: the fake service's thread may log the connection the CLI dropped, before it.
    assert err.endswith(f"tucdesk: cannot write {target}: No such file or directory\n")
    assert ".partial" not in err


def test_the_verify_hint_says_how_to_check_the_key_fingerprint() -> None:
    hint = verify_hint(Path("x.jsonl"))
    assert "tucdesk-audit verify x.jsonl --key AUDIT_KEY" in hint
    assert "tucdesk-audit key AUDIT_KEY" in hint and "tucdesk-rendezvous keys show" in hint
