"""FHIR JSON in and out, keeping decimal precision.

FHIR decimals carry their precision (``1.50`` is not ``1.5``, R4 datatypes.html#decimal).
orjson and the standard library turn JSON numbers into floats and lose it, so bodies
are parsed with simplejson's ``use_decimal`` and written back the same way.
"""

from __future__ import annotations

import json
from typing import Any

import simplejson

MAX_DEPTH = 64
"""Deepest element nesting a resource may have; checked while validating."""


class JSONDepthError(ValueError):
    """The document nests deeper than any FHIR resource legitimately does."""


def loads(raw: bytes | str) -> Any:
    """Parse JSON text; numbers with a fraction become Decimal. Raises ValueError."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    try:
        return simplejson.loads(text, use_decimal=True)
    except RecursionError as exc:
        raise JSONDepthError("JSON nests too deeply") from exc


def dumps_plain(value: Any) -> str:
    """Compact JSON text of a document the server built itself (no Decimal values): the
    standard library's C encoder, twice as fast as simplejson's (AuditEvents, per read)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def stored(text: str) -> simplejson.RawJSON:
    """A JSON document this server already wrote (a stored resource body, a rendered searchset),
    for a document :func:`dumps` writes: it is spliced in as it is. Parsing it to write it back
    unchanged cost a transaction Bundle's response more than its rendering (issue 14)."""
    return simplejson.RawJSON(text)


def dumps(value: Any, *, pretty: bool = False) -> bytes:
    """Serialize to compact (or indented) UTF-8 JSON, keeping Decimal precision; :func:`stored`
    documents are copied into it unchanged (compact, also when ``pretty``)."""
    if pretty:
        text = simplejson.dumps(value, use_decimal=True, indent=2, ensure_ascii=False)
    else:
        text = simplejson.dumps(value, use_decimal=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")
