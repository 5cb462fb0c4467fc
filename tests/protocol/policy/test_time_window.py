"""Time windows: half-open hours, windows across midnight, time zones and DST transitions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.policy.time_window import (
    ALL_DAYS,
    MINUTES_PER_DAY,
    TimeWindow,
    parse_hours,
    parse_timezone,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
ZONES = [ZoneInfo(name) for name in (
    "UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata",
    "Pacific/Chatham", "America/Santiago",
)]
UTC_ZONE = ZoneInfo("UTC")
SUNDAY = 6
FRIDAY = 4


def _window(hours: str, zone: ZoneInfo = UTC_ZONE,
            days: frozenset[int] = ALL_DAYS) -> TimeWindow:
    start, end = parse_hours(hours)
    return TimeWindow(days, start, end, zone)


def _matching_minutes(window: TimeWindow, start: datetime, minutes: int) -> list[datetime]:
    return [
        instant
        for instant in (start + timedelta(minutes=n) for n in range(minutes))
        if window.contains(instant)
    ]


def test_hours_include_their_start_and_exclude_their_end() -> None:
    window = _window("09:00-17:00")
    day = datetime(2027, 6, 2, tzinfo=UTC)
    assert not window.contains(day.replace(hour=8, minute=59, second=59, microsecond=999999))
    assert window.contains(day.replace(hour=9))
    assert window.contains(day.replace(hour=16, minute=59, second=59, microsecond=999999))
    assert not window.contains(day.replace(hour=17))


def test_a_window_to_24_00_runs_to_the_end_of_the_day() -> None:
    window = _window("18:00-24:00")
    day = datetime(2027, 6, 2, tzinfo=UTC)
    assert window.contains(day.replace(hour=23, minute=59, second=59))
    assert not window.contains(day + timedelta(days=1))


def test_a_window_across_midnight_belongs_to_the_day_it_opens() -> None:
    window = _window("22:00-06:00", days=frozenset({FRIDAY}))
    friday = datetime(2027, 6, 4, tzinfo=UTC)
    assert friday.weekday() == FRIDAY
    assert window.contains(friday.replace(hour=22))
    assert window.contains(friday.replace(hour=23, minute=59))
    assert window.contains(friday + timedelta(days=1, hours=5, minutes=59))
    assert not window.contains(friday + timedelta(days=1, hours=6))
    assert not window.contains(friday + timedelta(days=1, hours=22))
    assert not window.contains(friday.replace(hour=5))  # that morning belongs to Thursday
    assert not window.contains(friday.replace(hour=12))


def test_the_window_follows_the_zone_wall_clock_not_utc() -> None:
    window = _window("09:00-17:00", BERLIN)
    # Winter: Berlin is UTC+1; summer: UTC+2.
    assert window.contains(datetime(2027, 1, 12, 8, 0, tzinfo=UTC))
    assert not window.contains(datetime(2027, 1, 12, 7, 59, tzinfo=UTC))
    assert window.contains(datetime(2027, 7, 12, 7, 0, tzinfo=UTC))
    assert not window.contains(datetime(2027, 7, 12, 15, 0, tzinfo=UTC))


def test_a_window_in_the_skipped_hour_never_matches_on_the_spring_forward_day() -> None:
    window = _window("02:00-03:00", BERLIN, days=frozenset({SUNDAY}))
    spring_forward = datetime(2027, 3, 27, 22, 0, tzinfo=UTC)  # Sunday 00:00 local
    assert _matching_minutes(window, spring_forward, 24 * 60) == []
    week_before = spring_forward - timedelta(days=7)
    assert len(_matching_minutes(window, week_before, 24 * 60)) == 60


def test_a_window_in_the_repeated_hour_matches_both_times_on_the_fall_back_day() -> None:
    window = _window("02:00-03:00", BERLIN, days=frozenset({SUNDAY}))
    fall_back = datetime(2027, 10, 30, 22, 0, tzinfo=UTC)  # Sunday 00:00 local (CEST)
    matches = _matching_minutes(window, fall_back, 25 * 60)
    assert len(matches) == 120
    assert matches[0] == datetime(2027, 10, 31, 0, 0, tzinfo=UTC)
    assert matches[-1] == datetime(2027, 10, 31, 1, 59, tzinfo=UTC)


def test_new_york_one_to_two_matches_twice_when_clocks_fall_back() -> None:
    window = _window("01:00-02:00", NEW_YORK)
    fall_back = datetime(2027, 11, 7, 4, 0, tzinfo=UTC)  # 00:00 EDT
    assert len(_matching_minutes(window, fall_back, 25 * 60)) == 120


def test_a_working_day_is_an_hour_shorter_in_real_time_when_it_spans_spring_forward() -> None:
    window = _window("00:00-12:00", BERLIN, days=frozenset({SUNDAY}))
    sunday_start = datetime(2027, 3, 27, 23, 0, tzinfo=UTC)  # 00:00 CET
    assert len(_matching_minutes(window, sunday_start, 24 * 60)) == 11 * 60


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _window("09:00-17:00").contains(datetime(2027, 1, 1, 10, 0))  # noqa: DTZ001


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00:00-24:00", (0, MINUTES_PER_DAY)),
        ("23:59-00:01", (1439, 1)),
        ("09:30-17:45", (570, 1065)),
    ],
)
def test_hours_parse_to_minutes(text: str, expected: tuple[int, int]) -> None:
    assert parse_hours(text) == expected


@pytest.mark.parametrize("text", ["9:00-17:00", "09:00-17:60", "24:00-01:00", "09:00-24:01",
                                  "10:00-10:00", "00:00-00:00", "09:00 - 17:00", ""])
def test_malformed_hours_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hours(text)


@pytest.mark.parametrize("name", ["Nowhere/City", "/etc/localtime", "../UTC", "localtime",
                                  "a" * 65, "Europe/Berlin\n"])
def test_unknown_or_path_like_time_zones_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        parse_timezone(name)


def _reference_contains(
    days: frozenset[int], start: int, end: int, zone: ZoneInfo, instant: datetime
) -> bool:
    """The specification, computed by hand from the UTC offset and the Unix epoch."""
    offset = zone.utcoffset(instant.astimezone(zone))
    assert offset is not None
    local_seconds = int(instant.timestamp()) + int(offset.total_seconds())
    local_minute = (local_seconds // 60) % MINUTES_PER_DAY
    weekday = (local_seconds // 86400 + 3) % 7  # 1970-01-01 was a Thursday
    if start < end:
        return weekday in days and start <= local_minute < end
    if local_minute >= start:
        return weekday in days
    return local_minute < end and (weekday - 1) % 7 in days


@settings(max_examples=400, deadline=None)
@given(
    days=st.frozensets(st.integers(min_value=0, max_value=6), min_size=1),
    start=st.integers(min_value=0, max_value=MINUTES_PER_DAY - 1),
    end=st.integers(min_value=1, max_value=MINUTES_PER_DAY),
    zone=st.sampled_from(ZONES),
    instant=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
)
def test_contains_agrees_with_the_specification(
    days: frozenset[int], start: int, end: int, zone: ZoneInfo, instant: datetime
) -> None:
    if start == end:
        return
    window = TimeWindow(days, start, end, zone)
    instant = instant.replace(second=0, microsecond=0)
    assert window.contains(instant) == _reference_contains(days, start, end, zone, instant)


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(min_value=1, max_value=MINUTES_PER_DAY - 1),
    instant=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
    zone=st.sampled_from(ZONES),
)
def test_a_minute_is_in_exactly_one_of_two_complementary_windows(
    start: int, instant: datetime, zone: ZoneInfo
) -> None:
    before = TimeWindow(ALL_DAYS, 0, start, zone)
    after = TimeWindow(ALL_DAYS, start, MINUTES_PER_DAY, zone)
    assert before.contains(instant) != after.contains(instant)
