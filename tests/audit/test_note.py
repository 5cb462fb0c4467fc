"""C2SP signed notes and tlog-checkpoints."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.checkpoint import (
    Checkpoint,
    open_checkpoint,
    origin_for,
    parse_checkpoint_body,
    sign_checkpoint,
)
from audit.errors import NoteError
from audit.note import note_key_hash, open_note, parse_note, sign_note, verifier_key
from protocol.identity import PublicIdentity
from tests.audit.builders import AUDIT_KEY, OTHER_KEY

# The example from golang.org/x/mod/sumdb/note: proves our format interoperates with Go's.
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_NOTE = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
    "\n"
    "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqd"
    "ngotpRZb6KE6RyyBwJnAM=\n"
).encode()
GO_KEY = PublicIdentity(base64.b64decode(GO_VKEY.split("+")[2])[1:])


def test_go_reference_note_verifies_and_key_hash_matches() -> None:
    assert verifier_key("PeterNeumann", GO_KEY) == GO_VKEY
    assert note_key_hash("PeterNeumann", GO_KEY).hex() == "c74f20a3"
    text, signer = open_note(GO_NOTE, [GO_KEY])
    assert text.startswith("If you think") and signer == GO_KEY


def test_signed_note_round_trips_and_names_its_signer() -> None:
    note = sign_note("hello\nworld\n", "example.com/log", AUDIT_KEY)
    assert note.startswith(b"hello\nworld\n\n\xe2\x80\x94 example.com/log ")
    assert open_note(note, [OTHER_KEY.public, AUDIT_KEY.public]) == (
        "hello\nworld\n",
        AUDIT_KEY.public,
    )


def test_note_signed_by_an_unpinned_key_is_refused() -> None:
    note = sign_note("hello\n", "example.com/log", OTHER_KEY)
    with pytest.raises(NoteError, match="no signature by a pinned key"):
        open_note(note, [AUDIT_KEY.public])


def test_note_with_edited_text_is_refused() -> None:
    note = sign_note("size 5\n", "example.com/log", AUDIT_KEY)
    with pytest.raises(NoteError, match="does not verify"):
        open_note(note.replace(b"size 5", b"size 6"), [AUDIT_KEY.public])


def test_signature_lines_by_unknown_keys_are_ignored() -> None:
    ours = sign_note("hello\n", "example.com/log", AUDIT_KEY)
    theirs = sign_note("hello\n", "witness.example", OTHER_KEY)
    combined = ours + theirs.split(b"\n\n", 1)[1]
    assert open_note(combined, [AUDIT_KEY.public])[1] == AUDIT_KEY.public
    assert len(parse_note(combined).signatures) == 2


@pytest.mark.parametrize(
    "note",
    [
        b"no blank line\n",
        b"text\n\nnot a signature line\n",
        b"text\n\n\xe2\x80\x94 name notbase64!\n",
        b"text\n\n\xe2\x80\x94 name AAAA\n",
        b"text\n\n\xe2\x80\x94 name\n",
        b"\xff\xfe\n\n",
        b"text\x01\n\n\xe2\x80\x94 name AAAAAAAA\n",
        b"text\n\n\xe2\x80\x94 name AAAAAAAA",
        b"x" * 20000,
    ],
)
def test_malformed_notes_are_refused(note: bytes) -> None:
    with pytest.raises(NoteError):
        open_note(note, [AUDIT_KEY.public])


def test_checkpoint_body_has_origin_size_and_base64_root() -> None:
    checkpoint = Checkpoint(origin_for("desk.example.com", "team-7"), 12, bytes(range(32)))
    assert checkpoint.body() == (
        "desk.example.com/audit/team-7\n12\n" + base64.b64encode(bytes(range(32))).decode() + "\n"
    )
    assert checkpoint.team_id == "team-7"
    note = sign_checkpoint(checkpoint, AUDIT_KEY)
    assert open_checkpoint(note, [AUDIT_KEY.public]) == (checkpoint, AUDIT_KEY.public)


@pytest.mark.parametrize(
    "body",
    [
        "desk/audit/t\n012\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        "desk/audit/t\n-1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        "desk/audit/t\n1\nAAAA\n",
        "desk/audit/t\n1\n",
        "desk/t\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        "desk/audit/t\n１\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        "desk/audit/t\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=\n",
    ],
)
def test_non_canonical_checkpoint_bodies_are_refused(body: str) -> None:
    with pytest.raises(NoteError):
        parse_checkpoint_body(body)


@pytest.mark.parametrize("team", ["", "has space", "a+b", "x/audit/y"])
def test_origin_refuses_team_ids_that_cannot_be_a_key_name(team: str) -> None:
    with pytest.raises(NoteError):
        origin_for("desk.example.com", team)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_note_parser_never_fails_with_anything_but_note_error(data: bytes) -> None:
    try:
        open_checkpoint(data, [AUDIT_KEY.public])
    except NoteError:
        pass
