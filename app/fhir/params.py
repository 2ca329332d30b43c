"""Parsing of the HTTP-level parameters of the REST interactions (http.html)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from app.fhir.errors import BadRequest
from app.fhir.fhirdate import date_range

_ETAG = re.compile(r'^\s*(?:W/)?"?([0-9]{1,9})"?\s*$')
_NUMBER = re.compile(r"[0-9]{1,9}")
"""ASCII digits only (``str.isdigit`` alone admits ``²``, which ``int`` refuses)."""


def parse_etag(value: str | None, header: str = "If-Match") -> int | None:
    """``W/"3"`` (or ``"3"``, ``3``) -> 3 (http.html#concurrency)."""
    if value is None:
        return None
    match = _ETAG.match(value)
    if not match:
        raise BadRequest(f"{header}: '{value[:40]}' is not a version ETag like W/\"3\"")
    return int(match.group(1))


def parse_version_id(value: str) -> int:
    if not _NUMBER.fullmatch(value):
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
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(
            f"{parameter}: '{value[:20]}' is not a non-negative integer", expression=(parameter,)
        )
    return maximum if len(value) > 9 else min(int(value), maximum)


def declared_length(value: str | None) -> int | None:
    """A Content-Length header's value, or None when it is absent or not a plain number."""
    if not value or not (value.isascii() and value.isdigit()):
        return None
    return int(value) if len(value) <= 18 else 1 << 62
