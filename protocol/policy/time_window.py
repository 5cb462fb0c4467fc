"""Time windows: the days and hours of local wall-clock time, in a named zone, when a rule applies.

A window is judged on the wall clock of its zone at the instant ``now``: ``now`` is converted to
the zone and its local weekday and time are compared. Around daylight-saving changes that means:

- on the spring-forward day the skipped local hour never happens, so a window inside it (e.g.
  ``02:00-03:00`` in Europe/Berlin on the last Sunday of March) does not match that day;
- on the fall-back day the repeated local hour happens twice, and a window covering it matches
  both times (``02:00-03:00`` in Europe/Berlin on the last Sunday of October is two real hours).

Hours are half-open, ``start <= time < end``, at minute resolution. A window whose end is before
its start crosses midnight, and belongs to the day on which it opens: ``fri 22:00-06:00`` is
Friday 22:00 until Saturday 06:00.
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass
from datetime import datetime

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ALL_DAYS = frozenset(range(7))
MINUTES_PER_DAY = 24 * 60
MAX_TIMEZONE_NAME_LENGTH = 64
DEFAULT_TIMEZONE = "UTC"
_HOURS = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
_TIMEZONE_NAME = re.compile(r"[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+)*")
# Names that exist in some zone directories but depend on the host, not on the policy.
_HOST_DEPENDENT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


@dataclass(frozen=True)
class TimeWindow:
    """Days of the week (0 = Monday) and a half-open range of minutes after local midnight."""

    days: frozenset[int]
    start_minute: int
    end_minute: int
    timezone: zoneinfo.ZoneInfo

    def __post_init__(self) -> None:
        if not self.days or not self.days <= ALL_DAYS:
            raise ValueError("a time window needs at least one day of 0..6")
        if not 0 <= self.start_minute < MINUTES_PER_DAY:
            raise ValueError("a time window starts within the day")
        if not 0 < self.end_minute <= MINUTES_PER_DAY or self.end_minute == self.start_minute:
            raise ValueError("a time window ends within the day, not where it starts")

    @property
    def crosses_midnight(self) -> bool:
        """Whether the window runs from one local day into the next."""
        return self.end_minute < self.start_minute

    def contains(self, now: datetime) -> bool:
        """Whether the aware instant ``now`` falls inside the window, on the zone's wall clock."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("the time must be timezone-aware")
        local = now.astimezone(self.timezone)
        minute = local.hour * 60 + local.minute
        weekday = local.weekday()
        if not self.crosses_midnight:
            return weekday in self.days and self.start_minute <= minute < self.end_minute
        if minute >= self.start_minute:
            return weekday in self.days
        if minute < self.end_minute:
            return (weekday - 1) % 7 in self.days
        return False


def parse_days(names: list[str]) -> frozenset[int]:
    """Day numbers (0 = Monday) for day names ``mon`` .. ``sun``; raise ValueError on others."""
    days = set()
    for name in names:
        if name not in DAY_NAMES:
            raise ValueError(f"day {name!r} must be one of {', '.join(DAY_NAMES)}")
        days.add(DAY_NAMES.index(name))
    return frozenset(days)


def parse_hours(text: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` as (start, end) minutes after midnight; the end may be ``24:00``."""
    match = _HOURS.fullmatch(text)
    if match is None:
        raise ValueError(f"hours {text!r} must look like \"09:00-17:00\"")
    start_hour, start_minute, end_hour, end_minute = (int(group) for group in match.groups())
    if start_hour > 23 or start_minute > 59 or end_minute > 59:
        raise ValueError(f"hours {text!r} name a time that does not exist")
    if end_hour > 24 or (end_hour == 24 and end_minute != 0):
        raise ValueError(f"hours {text!r} name a time that does not exist")
    start = start_hour * 60 + start_minute
    end = end_hour * 60 + end_minute
    if start == end:
        raise ValueError(f"hours {text!r} are empty; leave hours out for the whole day")
    return start, end


def parse_timezone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone called ``name`` (e.g. ``Europe/Berlin``); raise ValueError if unknown."""
    if (
        len(name) > MAX_TIMEZONE_NAME_LENGTH
        or not _TIMEZONE_NAME.fullmatch(name)
        or name in _HOST_DEPENDENT_ZONES
    ):
        raise ValueError(f"timezone {name!r} is not an IANA time zone name like \"Europe/Berlin\"")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"timezone {name!r} is not a known IANA time zone") from None
