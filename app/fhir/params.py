"""Parsing of the HTTP-level parameters of the REST interactions (http.html)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from app.fhir.errors import BadRequest
from app.fhir.fhirdate import date_range

_ETAG = re.compile(r'^\s*(?:W/)?"?(\d{1,9})"?\s*$')


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
    span = date_range(value)
    if span is None:
        raise BadRequest(f"{parameter}: '{value[:40]}' is not a FHIR dateTime", expression=(parameter,))
    return span[0].astimezone(UTC)


def parse_count(value: str | None, *, default: int, maximum: int, parameter: str = "_count") -> int:
    """``_count``: a page size; the server may return fewer (search.html#count)."""
    if value is None or value == "":
        return default
    if not value.isdigit():
        raise BadRequest(
            f"{parameter}: '{value[:20]}' is not a non-negative integer", expression=(parameter,)
        )
    return min(int(value), maximum)
