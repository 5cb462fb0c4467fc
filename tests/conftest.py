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
from collections.abc import Iterator

import pytest

RESTORED_LOGGERS = ("", "tucdesk")


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in RESTORED_LOGGERS]
    saved = [(list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
