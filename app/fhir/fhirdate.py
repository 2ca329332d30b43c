"""FHIR date/dateTime/instant values as time ranges (R4 search.html#date).

A FHIR date has an implicit precision: ``2024`` is the whole year, ``2024-03-05T10:00``
the whole minute. carecoord represents every date as the half-open range
``[low, high)`` it denotes; values without a time zone are taken as UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

_PATTERN = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d+)?)?(?P<z>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)

LOWEST = datetime(1, 1, 2, tzinfo=UTC)
HIGHEST = datetime(9999, 12, 30, tzinfo=UTC)


def is_date_text(value: str) -> bool:
    """Whether ``value`` is written as a FHIR date, dateTime or instant (in range or not)."""
    return _PATTERN.match(value.strip()) is not None


def date_range(value: str) -> tuple[datetime, datetime] | None:
    """The range a FHIR date/dateTime/instant denotes, in UTC, or None when it is not one or
    its start cannot be represented in UTC (``0001-01-01T00:00:00+14:00`` lies in year 0).

    An end past the last representable day (``9999-12-31`` runs to year 10000) is HIGHEST.
    """
    span = _local_range(value)
    if span is None:
        return None
    low, high = span
    try:
        low = low.astimezone(UTC)
    except OverflowError:
        return None
    try:
        high = min(high.astimezone(UTC), HIGHEST)
    except OverflowError:
        high = HIGHEST
    return low, max(low, high)


def _local_range(value: str) -> tuple[datetime, datetime] | None:
    match = _PATTERN.match(value.strip())
    if not match:
        return None
    parts = match.groupdict()
    zone = parts["z"]
    tz: timezone = UTC
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    try:
        year = int(parts["y"])
        if parts["m"] is None:
            return datetime(year, 1, 1, tzinfo=tz), (
                datetime(year + 1, 1, 1, tzinfo=tz) if year < 9999 else HIGHEST
            )
        month = int(parts["m"])
        if parts["d"] is None:
            low = datetime(year, month, 1, tzinfo=tz)
            high = datetime(year + 1, 1, 1, tzinfo=tz) if month == 12 and year < 9999 else (
                HIGHEST if month == 12 else datetime(year, month + 1, 1, tzinfo=tz)
            )
            return low, high
        day = datetime(year, month, int(parts["d"]), tzinfo=tz)
        if parts["H"] is None:
            return day, _later(day, timedelta(days=1))
        low = day.replace(hour=int(parts["H"]), minute=int(parts["M"]))
        if parts["S"] is None:
            return low, _later(low, timedelta(minutes=1))
        low = low.replace(second=int(parts["S"]))
        if parts["f"]:
            micros = int((parts["f"][1:] + "000000")[:6])
            low = low.replace(microsecond=micros)
            return low, _later(low, timedelta(microseconds=1 if len(parts["f"]) > 4 else 1000))
        return low, _later(low, timedelta(seconds=1))
    except (ValueError, OverflowError):
        return None


def _later(moment: datetime, step: timedelta) -> datetime:
    try:
        return moment + step
    except OverflowError:
        return HIGHEST
