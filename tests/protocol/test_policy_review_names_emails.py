"""Name globs and emails that could never match are refused at sign time (the reviewer's
p1_names.py): agent names are host names (protocol/identifiers.py, what registration accepts),
so a glob with a space, a Cyrillic or full-width letter denies no one; an email not in Unicode
NFKC form never equals the roster's. Bundles already signed still load."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rendezvous.routes_agents
from protocol import identifiers
from protocol.identifiers import is_hostname, new_id
from protocol.policy.decide import decide
from protocol.policy.document import parse_policy
from protocol.policy.errors import PolicyDocumentError
from protocol.policy.request import AccessRequest, Action, RequestingOperator, TargetAgent

NOW = datetime(2027, 6, 2, 12, 0, tzinfo=UTC)
FRANK = RequestingOperator("frank@example.com", "operator", "thumb-frank")
DB_1 = TargetAgent(new_id("agt"), "db-1", frozenset({"db"}))
JOSE_NFC = unicodedata.normalize("NFC", "jos\u00e9@example.com")
JOSE_NFD = unicodedata.normalize("NFD", JOSE_NFC)


def _names(glob: str) -> str:
    return f'{{ names = ["{glob}"] }}'


def _emails(email: str) -> str:
    return f'{{ emails = ["{email}"] }}'


def _blocklist(agents: str, operators: str = '{ roles = ["operator"] }') -> str:
    return (
        'version = 1\nmode = "blocklist"\n[[rules]]\nid = "r"\noutcome = "deny"\n'
        f"operators = {operators}\nagents = {agents}\n"
    )


@pytest.mark.parametrize(
    ("glob", "named"),
    [
        ("d\u042c-*", "CYRILLIC CAPITAL LETTER SOFT SIGN"),
        ("\u0434b-*", "CYRILLIC SMALL LETTER DE"),
        ("\uff44\uff42-*", "FULLWIDTH LATIN SMALL LETTER D"),
        ("db-* ", "a space"),
        (" db-*", "a space"),
        ("db *", "a space"),
        ("db-[1", "no ']' closes"),
        ("-db*", "never starts with '-'"),
        ("db-[\u0441]", "CYRILLIC SMALL LETTER ES"),
    ],
)
def test_a_name_glob_no_host_name_matches_is_refused_naming_the_character(
    glob: str, named: str
) -> None:
    with pytest.raises(PolicyDocumentError) as refused:
        parse_policy(_blocklist(_names(glob)))
    message = str(refused.value)
    assert "line 7" in message and "rules[0].agents.names[0]" in message
    assert "can never match an agent" in message and named in message
    # Signed before this check: still loads (and still matches nothing), as every bundle does.
    parse_policy(_blocklist(_names(glob)), already_signed=True)


@pytest.mark.parametrize(
    "glob", ["db-*", "DB-*", "db-[0-9]", "db-?", "[!w]*", "db-1", "d?-1*", "db-[!\u0441]"]
)
def test_a_host_name_glob_is_accepted_and_its_deny_rule_applies(glob: str) -> None:
    policy = parse_policy(_blocklist(_names(glob)))
    assert decide(policy, AccessRequest(FRANK, DB_1, Action.EXEC, ("id",)), NOW).result == "deny"


@given(st.from_regex(identifiers.HOSTNAME_PATTERN, fullmatch=True))
@settings(max_examples=200, deadline=None)
def test_every_host_name_is_an_accepted_glob_that_matches_itself(hostname: str) -> None:
    policy = parse_policy(_blocklist(_names(hostname)))
    agent = TargetAgent(new_id("agt"), hostname, frozenset())
    assert decide(policy, AccessRequest(FRANK, agent, Action.EXEC, ("id",)), NOW).result == "deny"


def test_an_email_not_in_nfkc_form_is_refused_naming_the_form_to_write() -> None:
    with pytest.raises(PolicyDocumentError) as refused:
        parse_policy(_blocklist('{ names = ["db-*"] }', _emails(JOSE_NFD)))
    message = str(refused.value)
    assert "line 6" in message and "rules[0].operators.emails[0]" in message
    assert "NFKC" in message and "write 'jos\u00e9@example.com' ('jos\\xe9@example.com')" in message
    # The NFC form, as the roster holds an invited email, is accepted and denies that operator.
    policy = parse_policy(_blocklist('{ names = ["db-*"] }', _emails(JOSE_NFC)))
    jose = RequestingOperator(JOSE_NFC, "operator", "thumb-jose")
    assert decide(policy, AccessRequest(jose, DB_1, Action.EXEC, ("id",)), NOW).result == "deny"


def test_a_full_width_email_is_refused_naming_the_ascii_form() -> None:
    full_width = "\uff46\uff52\uff41\uff4e\uff4b@example.com"
    with pytest.raises(PolicyDocumentError, match="write 'frank@example.com'"):
        parse_policy(_blocklist('{ names = ["db-*"] }', _emails(full_width)))
    parse_policy(  # already signed: loads
        _blocklist('{ names = ["db-*"] }', _emails(full_width)), already_signed=True
    )


def test_emails_still_compare_ignoring_case() -> None:
    policy = parse_policy(_blocklist('{ names = ["db-*"] }', '{ emails = ["Frank@Example.com"] }'))
    assert decide(policy, AccessRequest(FRANK, DB_1, Action.EXEC, ("id",)), NOW).result == "deny"


def test_registration_checks_host_names_with_the_one_definition() -> None:
    assert rendezvous.routes_agents.HOSTNAME_PATTERN is identifiers.HOSTNAME_PATTERN
    assert is_hostname("web-1.example.com") and is_hostname("A")
    # The old pattern's '$' let a trailing newline through .match(); fullmatch does not.
    for bad in ("web-1\n", "-web", "web 1", "d\u042c-1", "x" * 254, ""):
        assert not is_hostname(bad), bad
