"""The forms of the names the store issues and admins assign, in one place for every part.

Ids are random strings with a prefix naming the kind (``agt_mfrggzdfmztwq2lk``), made only by
``new_id``; ``is_issued_id`` recognises exactly that form. Agent tags are what an admin may
assign: lower-case, 1..MAX_TAG_LENGTH of a-z 0-9 - _ . : =. The rendezvous makes ids and checks
tags with these; a policy document refuses an id or tag outside these forms, since it could
never match an agent. Agent names are host names (``HOSTNAME_PATTERN``: what registration
accepts), so a policy's name globs may hold only those characters and glob syntax.
"""

from __future__ import annotations

import base64
import re
import secrets
import string

ID_RANDOM_BYTES = 10
MAX_HOSTNAME_LENGTH = 253
# What agent registration accepts as a host name, and so every agent name there is.
HOSTNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
HOSTNAME_CHARACTERS = frozenset(string.ascii_letters + string.digits + "._-")
HOSTNAME_FORM = "a letter or digit, then up to 252 of A-Z a-z 0-9 . _ -"
AGENT_ID_PREFIX = "agt"
MAX_TAG_LENGTH = 64
TAG_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.:=")
TAG_FORM = f"1..{MAX_TAG_LENGTH} of a-z 0-9 - _ . : ="
# base32 of ID_RANDOM_BYTES bytes, lower-cased, unpadded (10 bytes = 80 bits = 16 characters).
_ID_RANDOM_CHARACTERS = (ID_RANDOM_BYTES * 8 + 4) // 5
_ID_RANDOM = f"[a-z2-7]{{{_ID_RANDOM_CHARACTERS}}}"
_ID_PREFIX = re.compile(r"[a-z]{1,8}")


def new_id(prefix: str) -> str:
    """A fresh random id such as ``agt_mfrggzdfmztwq2lk``: the kind's prefix and 80 random bits."""
    raw = secrets.token_bytes(ID_RANDOM_BYTES)
    return f"{prefix}_{base64.b32encode(raw).decode('ascii').lower()}"


def is_issued_id(text: str, prefix: str) -> bool:
    """Whether ``text`` has the form ``new_id(prefix)`` gives (exactly, case included)."""
    if not _ID_PREFIX.fullmatch(prefix):
        raise ValueError(f"{prefix!r} is not an id prefix")
    return re.fullmatch(f"{prefix}_{_ID_RANDOM}", text) is not None


def id_form(prefix: str) -> str:
    """How an id of this kind looks, for error messages."""
    return f"{prefix}_ and {_ID_RANDOM_CHARACTERS} characters of a-z 2-7"


def is_agent_tag(tag: str) -> bool:
    """Whether ``tag`` is a tag an admin can assign: TAG_FORM exactly (so already lower-case)."""
    return 0 < len(tag) <= MAX_TAG_LENGTH and set(tag) <= TAG_CHARACTERS


def is_hostname(text: str) -> bool:
    """Whether ``text`` is a host name agent registration accepts (HOSTNAME_FORM exactly)."""
    return HOSTNAME_PATTERN.fullmatch(text) is not None
