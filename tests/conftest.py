"""Fixtures for every test.

* Logging is put back after each test (the root logger and ``tucdesk``, which the relay sets up
  for its own). A test that runs a service's set-up in this process (the rendezvous's ``serve``
  calls ``basicConfig``, the relay's ``configure_logging`` gives ``tucdesk`` a handler) would
  otherwise leave a handler on the stream pytest captured for it, which is closed by the next
  test: later log lines then fail with "--- Logging error ---" on stderr, and a lowered level
  lets INFO lines into other tests' output.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from agent import login_records

RESTORED_LOGGERS = ("", "tucdesk")
# Where an agent's config takes its utmp/wtmp files from the environment (agent/config.py).
LOGIN_RECORD_VARIABLES = {"utmp": "TUCDESK_AGENT_UTMP_FILE", "wtmp": "TUCDESK_AGENT_WTMP_FILE"}


@pytest.fixture(autouse=True, scope="session")
def _login_records_in_throwaway_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """PTY sessions of the agents the tests run write their login records (utmp while they run,
    wtmp login and logout) to throwaway files, never this machine's /var/run/utmp and
    /var/log/wtmp: CI runs as root, where the agent writes them. Agents started as processes
    inherit the variables; configs made in this process take the module's defaults."""
    directory = tmp_path_factory.mktemp("login-records")
    files = {kind: directory / kind for kind in LOGIN_RECORD_VARIABLES}
    for path in files.values():
        path.touch()
    saved_environment = {name: os.environ.get(name) for name in LOGIN_RECORD_VARIABLES.values()}
    saved_defaults = (login_records.UTMP_FILE, login_records.WTMP_FILE)
    for kind, name in LOGIN_RECORD_VARIABLES.items():
        os.environ[name] = str(files[kind])
    login_records.UTMP_FILE, login_records.WTMP_FILE = files["utmp"], files["wtmp"]
    yield
    login_records.UTMP_FILE, login_records.WTMP_FILE = saved_defaults
    for name, value in saved_environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in RESTORED_LOGGERS]
    saved = [(list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
