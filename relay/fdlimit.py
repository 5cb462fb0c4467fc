"""Raise the open-file limit to what the configured maxima need, or say why it cannot be done.

Shared with the rendezvous (``raise_open_file_limit_to_hard``): each accepted connection is a
file, and the default soft limit of 1024 is reached by a busy instance.
"""

from __future__ import annotations

import resource

# What "unlimited" hard limits are raised to (the kernel refuses RLIM_INFINITY as a soft limit).
FALLBACK_OPEN_FILES = 65536


def raise_open_file_limit(needed: int) -> tuple[int, str | None]:
    """Raise RLIMIT_NOFILE's soft limit towards ``needed``; return (limit now, warning or None)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft >= needed:
        return soft, None
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed, None
        except (ValueError, OSError):
            pass
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        return soft, (
            f"open-file limit is {soft} but the configured maxima need {needed}, and raising it "
            f"failed ({error}); lower --max-sessions or raise LimitNOFILE / ulimit -n"
        )
    if target < needed:
        return target, (
            f"open-file limit raised to the hard limit {hard}, but the configured maxima need "
            f"{needed}; lower --max-sessions or raise the hard limit (LimitNOFILE= in the "
            f"systemd unit, or ulimit -Hn as root)"
        )
    return target, None


def raise_open_file_limit_to_hard() -> tuple[int, int, str | None]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (to ``FALLBACK_OPEN_FILES`` when the hard
    limit is unlimited); return (soft limit now, hard limit, warning or None)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FALLBACK_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as error:
            failure = f"raising the open-file limit from {soft} to {wanted} failed ({error})"
            return soft, hard, failure
        soft = wanted
    return soft, hard, None
