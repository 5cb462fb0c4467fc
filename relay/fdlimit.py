"""Raise the open-file limit to what the configured maxima need, or say why it cannot be done."""

from __future__ import annotations

import resource


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
