"""Relay tokens: what the relay accepts, the reason it gives for what it does not, the UDP MAC."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import TokenError
from protocol.identity import SigningIdentity
from protocol.relay_token import (
    MAX_RELAY_TOKEN_LIFETIME_SECONDS,
    RELAY_TOKEN_LEEWAY_SECONDS,
    UDP_CREDENTIAL_SIZE,
    RelayTokenExpiredError,
    RelayTokenWrongRelayError,
    Side,
    credential_mac,
    credential_mac_is_valid,
    issue_relay_token,
    read_own_relay_token,
    verify_relay_token,
)
from protocol.tokens import SESSION_GRANT_TYPE, issue_token

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


def test_token_from_the_future_is_refused_as_not_yet_valid():
    with pytest.raises(RelayTokenExpiredError):
        verify(issue(now=NOW + 3600))


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
