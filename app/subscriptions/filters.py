"""Subscription filters (Backport IG ``backport-filter-criteria``): parsed once when the
Subscription is written, judged in memory against the very version a change wrote.

A filter is search syntax, ``Task?owner=Organization/1&status=requested,accepted``: several
parameters must all match (AND), the comma-separated values of one are alternatives (OR), as
in R4 search.html. The values are compared with the resource's search-index rows as
app/fhir/indexing.py extracts them (the rows a search would use), not with the current index
in the database: by the time an event is matched its resource may have changed again, and the
event is about the version it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from app.fhir.errors import BadRequest
from app.fhir.fhirdate import date_range
from app.fhir.indexing import IndexRows, normalize, split_reference
from app.fhir.search_params import registry
from app.subscriptions.topics import Topic

_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
SUPPORTED_TYPES = frozenset({"token", "reference", "date", "string", "uri"})


@dataclass(frozen=True)
class Criterion:
    """One ``name[:modifier]=v1,v2`` of a filter."""

    name: str
    type: str
    modifier: str | None
    values: tuple[str, ...]


@dataclass(frozen=True)
class Filter:
    criteria: tuple[Criterion, ...]

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"name": c.name, "type": c.type, "modifier": c.modifier, "values": list(c.values)}
            for c in self.criteria
        ]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> Filter:
        return cls(tuple(Criterion(d["name"], d["type"], d["modifier"], tuple(d["values"])) for d in data))


def parse_filters(topic: Topic, texts: list[str]) -> Filter:
    """The filters of a Subscription on ``topic``; 400 naming what is wrong.

    Each text is ``[Type]?name=value&...`` (the type, when given, must be the topic's); only
    the topic's ``canFilterBy`` parameters are accepted.
    """
    criteria: list[Criterion] = []
    for text in texts:
        resource_type, _, query = text.rpartition("?")
        if resource_type and resource_type != topic.resource_type:
            raise BadRequest(
                f"filter criteria {text!r} are for {resource_type},"
                f" but the topic is about {topic.resource_type}"
            )
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
        if not pairs:
            raise BadRequest(f"filter criteria {text!r} name no search parameter")
        for raw_name, value in pairs:
            name, _, modifier = raw_name.partition(":")
            if name not in topic.can_filter_by:
                raise BadRequest(
                    f"the topic {topic.url} cannot be filtered by {name!r}"
                    f" (it can by: {', '.join(topic.can_filter_by)})"
                )
            kind = _type_of(topic.resource_type, name)
            if modifier and not (modifier == "not" and kind == "token"):
                raise BadRequest(f"filter modifier :{modifier} is not supported on {name!r}")
            values = tuple(v for v in value.split(",") if v)
            if not values:
                raise BadRequest(f"filter parameter {name!r} has no value")
            for item in values:
                _check_value(kind, name, item)
            criteria.append(Criterion(name, kind, modifier or None, values))
    return Filter(tuple(criteria))


def _type_of(resource_type: str, name: str) -> str:
    if name == "_id":
        return "id"
    if name == "_lastUpdated":
        return "lastUpdated"
    param = registry().for_type(resource_type).get(name)
    if param is None or param.type not in SUPPORTED_TYPES or param.components:
        raise BadRequest(f"filter parameter {name!r} is not supported on {resource_type}")
    return param.type


def _check_value(kind: str, name: str, value: str) -> None:
    if kind in ("date", "lastUpdated"):
        prefix, text = _split_prefix(value)
        if date_range(text) is None or prefix in ("sa", "eb"):
            raise BadRequest(f"filter parameter {name!r}: {value!r} is not a date with a supported prefix")


def _split_prefix(value: str) -> tuple[str, str]:
    if value[:2] in _PREFIXES and value[2:3].isdigit():
        return value[:2], value[2:]
    return "eq", value


def matches(flt: Filter, fhir_id: str, last_updated: datetime, rows: IndexRows, fhir_base: str) -> bool:
    """Whether a version (its id, lastUpdated and index rows) passes every criterion."""
    return all(_criterion(c, fhir_id, last_updated, rows, fhir_base) for c in flt.criteria)


def _criterion(c: Criterion, fhir_id: str, last_updated: datetime, rows: IndexRows, base: str) -> bool:
    if c.type == "id":
        return fhir_id in c.values
    if c.type == "lastUpdated":
        return any(_date(v, last_updated, last_updated) for v in c.values)
    if c.type == "token":
        tokens = [(r[1], r[2]) for r in rows.token if r[0] == c.name]
        found = any(_token(v, system, code) for v in c.values for system, code in tokens)
        return not found if c.modifier == "not" else found
    if c.type == "reference":
        refs = [(r[1], r[2], r[3]) for r in rows.reference if r[0] == c.name]
        return any(_reference(v, ref, base) for v in c.values for ref in refs)
    if c.type == "date":
        spans = [(r[1], r[2]) for r in rows.date if r[0] == c.name]
        return any(_date(v, low, high) for v in c.values for low, high in spans)
    if c.type == "string":
        texts = [r[1] for r in rows.string if r[0] == c.name]
        return any(t.startswith(normalize(v)) for v in c.values for t in texts)
    if c.type == "uri":
        return any(r[1] in c.values for r in rows.uri if r[0] == c.name)
    return False


def _token(value: str, system: str | None, code: str | None) -> bool:
    """search.html#token: ``code``, ``system|code``, ``|code`` (no system), ``system|``."""
    if "|" not in value:
        return code == value
    wanted_system, wanted_code = value.split("|", 1)
    if not wanted_system:
        return system is None and code == wanted_code
    if not wanted_code:
        return system == wanted_system
    return system == wanted_system and code == wanted_code


def _reference(value: str, ref: tuple[str | None, str | None, str | None], base: str) -> bool:
    target_type, target_id, url = ref
    wanted_type, wanted_id, wanted_url = split_reference(value, base)
    if wanted_id is not None:
        return (target_type, target_id) == (wanted_type, wanted_id)
    if wanted_url is not None and "/" in wanted_url:
        return url == wanted_url
    return target_id == value  # a bare id, of whatever type the parameter allows


def _date(value: str, low: datetime, high: datetime) -> bool:
    """search.html#prefix: the value's implicit range ``[v_low, v_high)`` (its end exclusive)
    against the element's range ``[low, high]``."""
    prefix, text = _split_prefix(value)
    span = date_range(text)
    if span is None:
        return False
    v_low, v_high = span
    within = v_low <= low and high <= v_high and low < v_high
    if prefix == "eq":
        return within
    if prefix == "ne":
        return not within
    if prefix == "gt":
        return high >= v_high
    if prefix == "lt":
        return low < v_low
    if prefix == "ge":
        return high >= v_low
    if prefix == "le":
        return low < v_high
    return False
