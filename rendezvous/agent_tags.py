"""What an agent tag may be, for registration keys (tags of the agents they enroll) and for an
admin's later change of an agent's tags: lower-case, 1..MAX_TAG_LENGTH of a-z 0-9 - _ . : =."""

from __future__ import annotations

from collections.abc import Sequence

from rendezvous.errors import BadRequest
from rendezvous.schemas import MAX_TAG_LENGTH

TAG_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.:=")


def normalised_tags(tags: Sequence[str]) -> list[str]:
    """``tags`` stripped, lower-cased and without repeats, in order; BadRequest names a bad one."""
    cleaned: list[str] = []
    for tag in tags:
        tag = tag.strip().lower()
        if not tag or len(tag) > MAX_TAG_LENGTH or not set(tag) <= TAG_CHARACTERS:
            raise BadRequest(
                f"tag {tag[:MAX_TAG_LENGTH]!r} must be 1..{MAX_TAG_LENGTH} of a-z 0-9 - _ . : ="
            )
        if tag not in cleaned:
            cleaned.append(tag)
    return cleaned
