"""Parsing of the HTTP-level parameters of the REST interactions (http.html)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from app.fhir.errors import BadRequest

_ETAG = re.compile(r'^\s*(?:W/)?"?(\d{1,9})"?\s*$')
_DATETIME = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def parse_etag(value: str | None, header: str = "If-Match") -> int | None:
    """``W/"3"`` (or ``"3"``, ``3``) -> 3 (http.html#concurrency)."""
    if value is None:
        return None
    match = _ETAG.match(value)
    if not match:
        raise BadRequest(f"{header}: '{value[:40]}' is not a version ETag like W/\"3\"")
    return int(match.group(1))


def parse_version_id(value: str) -> int:
    if not value.isdigit() or len(value) > 9:
        raise BadRequest(f"'{value[:40]}' is not a version id of this server")
    return int(value)


def parse_instant(value: str, parameter: str) -> datetime:
    """A FHIR date, dateTime or instant as the earliest moment it denotes (UTC when no zone)."""
    match = _DATETIME.match(value.strip())
    if not match:
        raise BadRequest(f"{parameter}: '{value[:40]}' is not a FHIR dateTime", expression=(parameter,))
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        moment = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int(float(fraction) * 1_000_000) if fraction else 0,
            tzinfo=UTC,
        )
        if zone and zone != "Z":
            moment = datetime.fromisoformat(moment.replace(tzinfo=None).isoformat() + zone)
    except ValueError as exc:
        raise BadRequest(f"{parameter}: '{value[:40]}' is not a valid date", expression=(parameter,)) from exc
    return moment.astimezone(UTC)


def parse_count(value: str | None, *, default: int, maximum: int, parameter: str = "_count") -> int:
    """``_count``: a page size; the server may return fewer (search.html#count)."""
    if value is None or value == "":
        return default
    if not value.isdigit():
        raise BadRequest(
            f"{parameter}: '{value[:20]}' is not a non-negative integer", expression=(parameter,)
        )
    return min(int(value), maximum)
