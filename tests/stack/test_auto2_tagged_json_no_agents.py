"""exec --tag --json with no agent carrying the tag ends with one JSON document saying why,
and exits 255 (nothing could be set up), as documented in --help."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from operator_cli.local_stack import LocalStack

pytestmark = pytest.mark.slow

EXIT_NOTHING_SET_UP = 255


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("auto2-tag")) as started:
        started.create_certificates()
        started.init_rendezvous()
        started.start_relay()
        started.start_rendezvous()
        started.create_operator()
        yield started


def test_a_tag_no_agent_carries_gives_a_json_document_and_exit_255(stack: LocalStack) -> None:
    completed = stack.run_tucdesk("exec", "--tag", "nobody-has-this", "--json", "--", "true")
    assert completed.returncode == EXIT_NOTHING_SET_UP, completed.stderr
    document = json.loads(completed.stdout)
    assert document["succeeded"] == 0 and document["total"] == 0 and document["agents"] == []
    assert "no agent of your team carries the tag nobody-has-this" in document["error"]
    assert completed.stderr.decode().count("tucdesk: no agent") == 1


def test_the_exit_statuses_of_tag_are_in_the_help(stack: LocalStack, tmp_path: Path) -> None:
    helped = stack.run_tucdesk("exec", "--help", home=tmp_path)
    text = " ".join(helped.stdout.decode().split())
    assert "255 if nothing could be set up" in text
