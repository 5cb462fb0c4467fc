"""What the CLI says when the server cannot be reached or trusted, when its token cache is
damaged, and when a name is shared: through the whole real stack, as a user runs it."""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from operator_cli.local_ca import create_local_certificates
from operator_cli.local_stack import LocalStack

pytestmark = pytest.mark.slow

EXIT_FAILURE = 1
EXIT_CONNECTION_FAILED = 255


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("cli-messages")) as started:
        started.start()
        assert started.run_tucdesk("exec", started.agent_name, "--", "true").returncode == 0
        yield started


def home_copy(stack: LocalStack, tmp_path: Path, **settings: str) -> Path:
    """A copy of the operator's CLI home with some settings changed."""
    home = tmp_path / "cli"
    shutil.copytree(stack.cli_home, home)
    saved = json.loads((home / "settings.json").read_text())
    saved.update(settings)
    (home / "settings.json").write_text(json.dumps(saved))
    return home


def stderr_lines(completed: object) -> list[str]:
    stderr = getattr(completed, "stderr", b"")
    assert isinstance(stderr, bytes)
    return stderr.decode().strip().splitlines()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed again: connecting is refused


def test_a_refused_connection_names_the_url_and_says_so_in_words(
    stack: LocalStack, tmp_path: Path
) -> None:
    url = f"https://127.0.0.1:{closed_port()}"
    home = home_copy(stack, tmp_path, server=url)
    expected = (
        f"tucdesk: cannot reach {url}: connection refused (nothing listening at that host and "
        "port?); check --server"
    )
    listed = stack.run_tucdesk("whoami", home=home)
    assert (listed.returncode, stderr_lines(listed)) == (EXIT_FAILURE, [expected])
    session = stack.run_tucdesk("exec", stack.agent_name, "--", "true", home=home)
    assert (session.returncode, stderr_lines(session)) == (EXIT_CONNECTION_FAILED, [expected])


def test_an_untrusted_certificate_is_not_called_unreachable(
    stack: LocalStack, tmp_path: Path
) -> None:
    other = create_local_certificates(tmp_path / "other-ca")
    home = home_copy(stack, tmp_path, ca_file=str(other.ca_cert))
    completed = stack.run_tucdesk("whoami", home=home)
    [line] = stderr_lines(completed)
    assert completed.returncode == EXIT_FAILURE
    assert line.startswith(f"tucdesk: TLS certificate of {stack.server_url} not trusted: ")
    assert line.endswith("; pass --ca-file with the CA that signed it")
    assert "cannot reach" not in line


def test_a_missing_ca_file_is_named(stack: LocalStack, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    completed = stack.run_tucdesk("login", "--server", stack.server_url, "--ca-file",
                                  str(missing), home=tmp_path / "new-home")
    assert completed.returncode == EXIT_FAILURE
    assert stderr_lines(completed) == [
        f"tucdesk: cannot use the CA file {missing} (--ca-file): No such file or directory"
    ]


@pytest.mark.parametrize("damage", [b'{"access_tok', b"[1]", b'{"access_token": 5}'])
def test_a_damaged_token_cache_is_replaced_with_one_warning(
    stack: LocalStack, tmp_path: Path, damage: bytes
) -> None:
    home = home_copy(stack, tmp_path)
    token = home / "token.json"
    token.write_bytes(damage)  # keeps its 0600 mode
    first = stack.run_tucdesk("whoami", home=home)
    assert first.returncode == 0, first.stderr
    assert stderr_lines(first) == [
        f"tucdesk: the cached token in {token} is damaged; it is ignored and will be replaced"
    ]
    assert json.loads(token.read_text())["access_token"]
    again = stack.run_tucdesk("agents", home=home)
    # No warning again; only the table's note, which `agents` writes on stderr (stdout: table).
    assert (again.returncode, stderr_lines(again)) == (0, ["team policy version: none signed"])
    token.write_bytes(damage)
    logout = stack.run_tucdesk("logout", home=home)
    assert logout.returncode == 0, logout.stderr
    assert not token.exists()


def test_too_open_token_permissions_are_still_refused(stack: LocalStack, tmp_path: Path) -> None:
    home = home_copy(stack, tmp_path)
    (home / "token.json").chmod(0o644)
    completed = stack.run_tucdesk("whoami", home=home)
    assert completed.returncode == EXIT_FAILURE
    assert "too open" in completed.stderr.decode()


def test_a_shared_agent_name_lists_the_agents_it_could_mean(
    stack: LocalStack, tmp_path: Path
) -> None:
    # Last in the module: from here on the stack has two agents with the same name.
    original = stack.agent
    assert original is not None
    stack.enroll_agent(stack.agent_name, state_dir=tmp_path / "twin")  # enrolled, not running
    completed = stack.run_tucdesk("exec", stack.agent_name, "--", "true")
    assert completed.returncode == EXIT_CONNECTION_FAILED
    [line] = stderr_lines(completed)
    assert line.startswith(f"tucdesk: several agents are called {stack.agent_name!r}: ")
    assert f"{original.id} ({stack.agent_name}, online)" in line
    others = re.findall(rf"(agt_\w+) \({re.escape(stack.agent_name)}, offline\)", line)
    assert len(others) == 1 and others[0] != original.id, line
    assert line.endswith("; use the agent id")


def test_close_names_put_a_different_case_first_then_near_spellings() -> None:
    from operator_cli.session_commands import suggested_names

    names = ["db-1", "web-1", "web-2", "worker"]
    assert suggested_names("WEB-1", names)[0] == "web-1"
    assert sorted(suggested_names("web", names)) == ["web-1", "web-2"]
    assert suggested_names("wbe-1", names)[0] == "web-1"
    assert suggested_names("mail", names) == []
