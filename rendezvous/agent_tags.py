"""What an agent tag may be, for registration keys (tags of the agents they enroll) and for an
admin's later change of an agent's tags: the form protocol/identifiers.py defines (lower-case,
1..MAX_TAG_LENGTH of a-z 0-9 - _ . : =), which policy documents are checked against too."""

from __future__ import annotations

from collections.abc import Sequence

from protocol.identifiers import MAX_TAG_LENGTH, TAG_FORM, is_agent_tag
from rendezvous.errors import BadRequest


def normalised_tags(tags: Sequence[str]) -> list[str]:
    """``tags`` stripped, lower-cased and without repeats, in order; BadRequest names a bad one."""
    cleaned: list[str] = []
    for tag in tags:
        tag = tag.strip().lower()
        if not is_agent_tag(tag):
            raise BadRequest(f"tag {tag[:MAX_TAG_LENGTH]!r} must be {TAG_FORM}")
        if tag not in cleaned:
            cleaned.append(tag)
    return cleaned
