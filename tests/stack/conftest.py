"""Fixtures for whole-stack tests: real rendezvous, relay and agent processes on loopback.

* ``stack`` — one SQLite stack per test module (operator_cli.local_stack.LocalStack), with the
  relay behind a RelayTap so every byte between the two sides and the relay is captured. Tests
  that only run sessions share it; it is started once per module to keep the suite quick.
* ``backend_stack`` — one stack per module and per storage backend (``sqlite``/``postgres``),
  for the tests where storage matters.
* ``stack_factory`` — fresh stacks a test owns and may break (kill the relay, restart the
  rendezvous); stopped at the end of the test.

PostgreSQL comes from tests/rendezvous/conftest.py's session cluster and skips (or fails under
CI=true) the same way when PostgreSQL is not installed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from operator_cli.local_stack import LocalStack
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.conftest import BACKENDS, postgres_cluster  # noqa: F401 (a fixture)
from tests.stack.relay_tap import RelayTap

_database_numbers = itertools.count(1)


class TappedStack(LocalStack):
    """A LocalStack whose rendezvous hands out the address of a RelayTap in front of the relay."""

    tap: RelayTap | None = None

    def start_with_tap(self) -> None:
        """Start everything, with the tap between the sessions and the relay."""
        self.create_certificates()
        self.init_rendezvous()
        relay = self.start_relay()
        self.tap = RelayTap(relay).__enter__()
        self.relay_address = ("127.0.0.1", self.tap.port)  # what the rendezvous advertises
        self.start_rendezvous()
        self.create_operator()
        self.enroll_agent()
        self.start_agent()
        self.wait_agent_online()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.tap is not None:
                self.tap.close()


StackFactory = Callable[..., TappedStack]


def _database_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    if backend == "sqlite":
        return None
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database(f"stack_{os.getpid()}_{next(_database_numbers)}")


def _started(stack: TappedStack) -> TappedStack:
    try:
        stack.start_with_tap()
    except BaseException:
        print(_logs(stack))
        stack.close()
        raise
    return stack


def _logs(stack: LocalStack) -> str:
    parts = []
    for path in sorted(stack.log_dir.glob("*.log")) if stack.log_dir.exists() else []:
        parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TappedStack]:
    """A started SQLite stack shared by the tests of one module."""
    started = _started(TappedStack(tmp_path_factory.mktemp("stack")))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module", params=BACKENDS)
def backend_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TappedStack]:
    """A started stack on each storage backend, shared by the tests of one module."""
    url = _database_url(request.param, request)
    started = _started(TappedStack(tmp_path_factory.mktemp(f"stack-{request.param}"), url))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def stack_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StackFactory]:
    """Make fresh, started stacks (``backend="sqlite"|"postgres"``); all stopped after the test."""
    made: list[TappedStack] = []
    request.node.tucdesk_stacks = made  # for the failure report below

    def make(backend: str = "sqlite") -> TappedStack:
        url = _database_url(backend, request)
        stack = _started(TappedStack(tmp_path / f"stack-{len(made)}", url))
        made.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in made:
            stack.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On failure, attach the logs of the stacks the test used (the cause is usually there)."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    used = [funcargs.get(name) for name in ("stack", "backend_stack")]
    used += getattr(item, "tucdesk_stacks", [])
    for number, stack in enumerate(used):
        if isinstance(stack, LocalStack):
            report.sections.append((f"stack {number} logs", _logs(stack)))
