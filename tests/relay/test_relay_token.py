"""Relay tokens: what the relay accepts, the reason it gives for what it does not, the UDP MAC."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import TokenError
from protocol.identity import SigningIdentity, b64url
from protocol.relay_token import (
    MAX_RELAY_TOKEN_LIFETIME_SECONDS,
    RELAY_TOKEN_LEEWAY_SECONDS,
    UDP_CREDENTIAL_SIZE,
    ClockSkewEstimate,
    RelayTokenExpiredError,
    RelayTokenNotYetValidError,
    RelayTokenWrongRelayError,
    Side,
    credential_mac,
    credential_mac_is_valid,
    issue_relay_token,
    read_own_relay_token,
    verify_relay_token,
)
from protocol.tokens import RELAY_TOKEN_TYPE, SESSION_GRANT_TYPE, issue_token

NOW = 1_800_000_000
SIGNER = SigningIdentity.generate()
KEYS = {SIGNER.public.key_id: SIGNER.public}


def issue(**overrides):
    values = dict(session_id="sess", side=Side.AGENT, relay_id="r1", now=NOW, lifetime=60)
    values.update(overrides)
    signer = values.pop("signer", SIGNER)
    return issue_relay_token(signer, **values)


def verify(token, **overrides):
    values = dict(relay_id="r1", issuer="tucdesk-rendezvous", now=NOW + 1)
    values.update(overrides)
    return verify_relay_token(token, KEYS, **values)


def test_a_fresh_token_verifies_with_all_its_claims():
    credential = bytes(range(32))
    claims = verify(issue(udp_credential=credential, token_id="tid-1"))
    assert (claims.session_id, claims.side, claims.relay_id, claims.token_id) == (
        "sess", Side.AGENT, "r1", "tid-1"
    )
    assert claims.udp_credential == credential
    assert claims.expires_at == NOW + 60


def test_the_udp_credential_never_appears_in_repr():
    credential = b"\xaa" * UDP_CREDENTIAL_SIZE
    claims = verify(issue(udp_credential=credential))
    assert credential.hex() not in repr(claims) and repr(credential) not in repr(claims)


def test_token_ids_are_random_by_default():
    assert verify(issue()).token_id != verify(issue()).token_id


def test_expired_token_is_refused_as_expired():
    token = issue()
    with pytest.raises(RelayTokenExpiredError):
        verify(token, now=NOW + 60 + RELAY_TOKEN_LEEWAY_SECONDS + 1)
    verify(token, now=NOW + 60 + RELAY_TOKEN_LEEWAY_SECONDS)


def test_token_from_the_future_is_refused_as_not_yet_valid_not_as_expired():
    # A relay whose clock is behind the rendezvous's sees tokens issued in its future.
    token = issue(now=NOW + 1 + RELAY_TOKEN_LEEWAY_SECONDS + 3)
    with pytest.raises(RelayTokenNotYetValidError):
        verify(token)
    with pytest.raises(RelayTokenNotYetValidError):
        verify(issue(now=NOW + 3600))
    verify(issue(now=NOW + 1 + RELAY_TOKEN_LEEWAY_SECONDS))


def test_a_not_before_in_the_future_is_refused_as_not_yet_valid():
    token = issue_token(
        SIGNER, typ=RELAY_TOKEN_TYPE, issuer="tucdesk-rendezvous", audience="r1", subject=None,
        issued_at=NOW, lifetime_seconds=60, not_before=NOW + 30,
        claims={"sid": "s", "side": "agent", "jti": "j", "udpk": b64url(bytes(32))},
    )
    with pytest.raises(RelayTokenNotYetValidError):
        verify(token)
    assert verify(token, now=NOW + 30).token_id == "j"


def test_clock_skew_is_named_only_when_distinct_refused_tokens_agree():
    estimate = ClockSkewEstimate()
    # The same token again is no new evidence.
    assert estimate.observe("a", -8.0, NOW) is None
    assert estimate.observe("a", -8.0, NOW + 1) is None
    assert estimate.observe("a", -8.0, NOW + 2) is None
    assert estimate.observe("b", -8.4, NOW + 30) is None
    assert estimate.observe("c", -7.9, NOW + 60) == -8.0
    # Ages that disagree (replayed old tokens, slow clients) name no clock.
    scattered = ClockSkewEstimate()
    for number, age in enumerate((70.0, 400.0, 95.0)):
        assert scattered.observe(str(number), age, NOW) is None
    # Agreement long ago does not count now.
    stale = ClockSkewEstimate()
    stale.observe("a", 90.0, NOW)
    stale.observe("b", 90.0, NOW)
    assert stale.observe("c", 90.0, NOW + 3600) is None


def test_a_time_refusal_is_described_with_the_clock_hint_once_consistent():
    estimate = ClockSkewEstimate()
    lines = [
        estimate.describe_refusal(
            issue(now=NOW + 8 + minute * 60), not_yet_valid=True, now=NOW + minute * 60
        )
        for minute in range(3)
    ]
    assert lines[0] == "token issued 8 s ahead of the relay's clock"
    assert "clock may be off" not in lines[1]
    assert lines[2] == (
        "token issued 8 s ahead of the relay's clock; the relay's clock may be off by about "
        "8 s (behind the rendezvous's): check NTP"
    )
    ahead = ClockSkewEstimate()
    for minute in range(3):
        line = ahead.describe_refusal(
            issue(now=NOW - 90 + minute * 60), not_yet_valid=False, now=NOW + minute * 60
        )
    assert line == (
        "token issued 90 s before the relay's clock; the relay's clock may be off by about "
        "90 s (ahead of the rendezvous's): check NTP"
    )
    assert estimate.describe_refusal("not-a-token", not_yet_valid=True, now=NOW) is None


def test_token_for_another_relay_is_refused_as_wrong_relay():
    with pytest.raises(RelayTokenWrongRelayError):
        verify(issue(relay_id="r2"))


def test_forged_token_for_another_relay_is_plainly_invalid():
    forged = issue(signer=SigningIdentity.generate(), relay_id="r2")
    with pytest.raises(TokenError) as refused:
        verify(forged)
    assert not isinstance(refused.value, RelayTokenWrongRelayError)


def test_wrong_issuer_is_refused():
    with pytest.raises(TokenError):
        verify(issue(issuer="someone-else"))


def test_another_token_type_is_refused():
    grant = issue_token(
        SIGNER, typ=SESSION_GRANT_TYPE, issuer="tucdesk-rendezvous", audience="r1",
        subject=None, issued_at=NOW, lifetime_seconds=60,
        claims={"sid": "sess", "side": "agent", "jti": "x", "udpk": "A" * 43},
    )
    with pytest.raises(TokenError):
        verify(grant)


def test_lifetimes_beyond_the_relay_maximum_are_neither_issued_nor_accepted():
    with pytest.raises(TokenError):
        issue(lifetime=MAX_RELAY_TOKEN_LIFETIME_SECONDS + 1)
    long_lived = issue_token(
        SIGNER, typ="tucdesk-relay+jwt", issuer="tucdesk-rendezvous", audience="r1",
        subject=None, issued_at=NOW, lifetime_seconds=MAX_RELAY_TOKEN_LIFETIME_SECONDS * 10,
        claims={"sid": "sess", "side": "agent", "jti": "x", "udpk": "A" * 43},
    )
    with pytest.raises(TokenError):
        verify(long_lived)


@pytest.mark.parametrize(
    "claims",
    [
        {"sid": "sess", "side": "observer", "jti": "x", "udpk": "A" * 43},
        {"sid": "", "side": "agent", "jti": "x", "udpk": "A" * 43},
        {"sid": "sess", "side": "agent", "udpk": "A" * 43},
        {"sid": "sess", "side": "agent", "jti": "x", "udpk": "short"},
        {"sid": "sess", "side": "agent", "jti": "x"},
    ],
)
def test_tokens_with_bad_relay_claims_are_refused(claims):
    token = issue_token(
        SIGNER, typ="tucdesk-relay+jwt", issuer="tucdesk-rendezvous", audience="r1",
        subject=None, issued_at=NOW, lifetime_seconds=60, claims=claims,
    )
    with pytest.raises(TokenError):
        verify(token)


def test_holder_reads_its_own_session_side_and_credential():
    credential = b"\x01" * 32
    own = read_own_relay_token(issue(udp_credential=credential, side=Side.OPERATOR))
    assert (own.session_id, own.side, own.udp_credential) == ("sess", Side.OPERATOR, credential)
    with pytest.raises(TokenError):
        read_own_relay_token("garbage")


@settings(max_examples=50, deadline=None)
@given(
    credential=st.binary(min_size=32, max_size=32),
    session_id=st.text(min_size=1, max_size=20),
    side=st.sampled_from(list(Side)),
    kind=st.sampled_from([3, 4]),
    counter=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_credential_mac_verifies_only_for_the_exact_fields(
    credential, session_id, side, kind, counter
):
    mac = credential_mac(credential, session_id=session_id, side=side, kind=kind, counter=counter)
    fields = dict(session_id=session_id, side=side, kind=kind, counter=counter)
    assert credential_mac_is_valid(credential, mac, **fields)
    other_key = bytes(32) if credential != bytes(32) else b"\x01" * 32
    assert not credential_mac_is_valid(other_key, mac, **fields)
    assert not credential_mac_is_valid(credential, mac, **{**fields, "counter": counter ^ 1})
    assert not credential_mac_is_valid(credential, mac, **{**fields, "side": side.other})
    assert not credential_mac_is_valid(credential, mac, **{**fields, "kind": 7 - kind})


def test_tokens_issued_together_and_late_together_name_no_clock():
    # A fan-out to several agents from a laptop that slept: the same lateness, the same iat.
    together = ClockSkewEstimate()
    for number in range(5):
        assert together.observe(str(number), 600.0, NOW + number * 0.1) is None
    # The same lateness from tokens issued minutes apart does point at the relay's clock.
    apart = ClockSkewEstimate()
    assert apart.observe("a", 600.0, NOW) is None
    assert apart.observe("b", 600.0, NOW + 40) is None
    assert apart.observe("c", 600.0, NOW + 80) == 600.0
