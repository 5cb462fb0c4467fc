"""Refusals are logged at INFO with peer, reason and ids (never the token), rate-limited."""

from __future__ import annotations

import base64
import importlib.metadata
import json
import logging

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp, connect_udp
from relay.config import OPTIONS
from relay.errors import RelayRefusedError
from relay.refusal_log import RefusalLog
from relay.wire import Reason

from .harness import make_token, running_relay, trio_test, wait_until


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("refused ")]


@trio_test
async def test_wrong_relay_refusal_is_logged_with_peer_and_ids_but_not_the_token(signer, caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    token = make_token(signer, "sess-wr", Side.AGENT, relay_id="relay-elsewhere")
    async with running_relay(signer) as relay:
        with pytest.raises(RelayRefusedError) as refused:
            await connect_tcp(*relay.tcp_address, token)
        assert refused.value.reason == Reason.WRONG_RELAY
    [line] = refusal_lines(caplog)
    assert line.levelno == logging.INFO
    message = line.getMessage()
    assert message.startswith("refused transport=tcp reason=wrong_relay peer=127.0.0.1:")
    assert "sid='sess-wr' side='agent' relay_id='relay-elsewhere'" in message
    assert token not in caplog.text
    assert token.split(".")[1] not in caplog.text and token.split(".")[2] not in caplog.text


@trio_test
async def test_a_forged_token_refusal_logs_no_ids_from_it(caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    trusted, forger = SigningIdentity.generate(), SigningIdentity.generate()
    async with running_relay(trusted) as relay:
        with pytest.raises(RelayRefusedError):
            await connect_tcp(*relay.tcp_address, make_token(forger, "forged-sid", Side.AGENT))
    [line] = refusal_lines(caplog)
    assert "reason=token_invalid" in line.getMessage()
    assert "forged-sid" not in caplog.text


@trio_test
async def test_udp_refusal_names_the_peer_and_the_session(signer, caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    async with running_relay(signer) as relay:
        expired = make_token(signer, "sess-udp", Side.OPERATOR, now=1_000_000, lifetime=60)
        with pytest.raises(RelayRefusedError):
            await connect_udp(*relay.udp_address, expired, local_host="127.0.0.1")
    [line] = refusal_lines(caplog)
    message = line.getMessage()
    assert message.startswith("refused transport=udp reason=token_expired peer=127.0.0.1:")
    assert "sid='sess-udp' side='operator' relay_id='relay-test'" in message


@trio_test
async def test_ids_cannot_forge_a_log_line(signer, caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    async with running_relay(signer) as relay:
        token = make_token(signer, "x\nrefused transport=tcp reason=fake", Side.AGENT,
                           relay_id="relay-elsewhere")
        with pytest.raises(RelayRefusedError):
            await connect_tcp(*relay.tcp_address, token)
    [line] = refusal_lines(caplog)
    assert "\n" not in line.getMessage()


def test_a_flood_of_refusals_is_logged_a_few_lines_a_second_with_a_suppressed_count(caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    refusal_log = RefusalLog(lines_per_second=10)
    for index in range(500):
        refusal_log.refused(index / 1000, "tcp", "rate_limited", peer="192.0.2.1:4000")
    refusal_log.refused(0.2, "tcp", "bad_hello", peer="192.0.2.2:4000")
    refusal_log.flush(0.9)
    assert len(refusal_lines(caplog)) == 11
    assert "refusals_suppressed" not in caplog.text  # the window is not over yet
    refusal_log.flush(1.0)
    summaries = [r.getMessage() for r in caplog.records if "refusals_suppressed" in r.getMessage()]
    assert summaries == ["refusals_suppressed reason=rate_limited count=490 window_s=1"]
    refusal_log.refused(1.5, "tcp", "rate_limited", peer="192.0.2.1:4000")
    assert len(refusal_lines(caplog)) == 12


def test_a_peer_function_is_called_only_for_lines_written():
    calls = []

    def peer() -> str:
        calls.append(1)
        return "192.0.2.1:4000"

    refusal_log = RefusalLog(lines_per_second=3)
    for _ in range(100):
        refusal_log.refused(0.0, "tcp", "rate_limited", peer=peer)
    assert len(calls) == 3


@trio_test
async def test_start_line_names_version_addresses_and_key_fingerprints(signer, caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    async with running_relay(signer) as relay:
        host, port = relay.tcp_address
    [line] = [r.getMessage() for r in caplog.records if "relay_started" in r.getMessage()]
    version = importlib.metadata.version("tucdesk")
    assert f"version={version} " in line
    assert f"tcp={host}:{port} " in line
    assert f"keys={signer.public.fingerprint}" in line


@trio_test
async def test_sweep_writes_the_suppressed_summary_after_a_flood(signer, caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    async with running_relay(signer, idle_timeout=0.4, pair_timeout=0.4) as relay:
        relay.tcp.admission.refusal_log.lines_per_second = 2
        for index in range(6):
            with pytest.raises(RelayRefusedError):
                await connect_tcp(*relay.tcp_address, make_token(signer, f"f-{index}", Side.AGENT,
                                                                  now=1_000_000))
        with trio.fail_after(5):
            while "refusals_suppressed" not in caplog.text:  # noqa: ASYNC110 (the sweep's log)
                await trio.sleep(0.05)
    assert "refusals_suppressed reason=token_expired count=4" in caplog.text


def unsigned_token_with_key_id(key_id: str) -> str:
    def part(document: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()

    return part({"alg": "EdDSA", "typ": "tucdesk-relay", "kid": key_id}) + "." + part({}) + ".AAAA"


@trio_test
async def test_a_made_up_key_id_cannot_forge_fields_in_the_refusal_line(caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    token = unsigned_token_with_key_id("x peer=203.0.113.9:1 reason=closed sid=victim")
    async with running_relay(SigningIdentity.generate()) as relay:
        with pytest.raises(RelayRefusedError) as refused:
            await connect_tcp(*relay.tcp_address, token, pair_timeout=2)
        assert refused.value.reason == Reason.TOKEN_INVALID
    [line] = refusal_lines(caplog)
    message = line.getMessage()
    assert message.endswith("detail=unknown key id x?peer?203?0?113?9?1?reason?closed?sid?victim")
    assert " peer=203." not in message and " sid=" not in message
    assert message.count(" peer=") == 1 and message.count(" reason=") == 1


@trio_test
async def test_blurred_logs_cut_refusal_and_abandoned_hello_peers_to_their_network(caplog):
    caplog.set_level(logging.INFO, logger="tucdesk.relay")
    token = unsigned_token_with_key_id("made-up")
    async with running_relay(SigningIdentity.generate(), blur_logs=True) as relay:
        with pytest.raises(RelayRefusedError):
            await connect_tcp(*relay.tcp_address, token, pair_timeout=2)
        abandoned = await trio.open_tcp_stream(*relay.tcp_address)
        await abandoned.aclose()
        await wait_until(lambda: relay.metrics.refusal_count("tcp", "hello_abandoned") == 1)
    lines = [record.getMessage() for record in refusal_lines(caplog)]
    assert [line.split(" ")[2] for line in lines] == ["reason=token_invalid",
                                                      "reason=hello_abandoned"]
    assert all(" peer=127.0.0.0/24" in line for line in lines), lines
    assert not any("127.0.0.1" in line for line in lines), lines


def test_blur_logs_help_says_it_also_cuts_addresses():
    assert "addresses" in next(o.help for o in OPTIONS if o.name == "blur_logs")
