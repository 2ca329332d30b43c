"""Search-index extraction on write (R4 search.html, search parameter types).

Each served type's search parameters come from the generated table (app/fhir/search_params.py),
whose FHIRPath expressions were compiled into JSON-key paths; here those paths are walked over
the resource and the values reached become typed index rows, written in the same statement
as the resource version (see repository.py). Strings are normalized (case folded, accents
removed) so that default string search is case- and accent-insensitive.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from app.fhir.errors import InvalidResource
from app.fhir.fhirdate import HIGHEST, LOWEST, date_range, is_date_text
from app.fhir.search_params import PathSpec, SearchParam, registry

# Index values are cut so a btree key (type, param, value, system) stays under PostgreSQL's
# ~2.7 kB limit even for 4-byte UTF-8 characters.
MAX_STRING = 255
MAX_TOKEN = 256


def normalize(text: str) -> str:
    """Case- and accent-insensitive form of a string (search.html#string)."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(char for char in decomposed if not unicodedata.combining(char))
    return " ".join(stripped.casefold().split())[:MAX_STRING]


@dataclass
class IndexRows:
    """Column arrays per index table, ready for ``INSERT ... SELECT FROM unnest(...)``."""

    token: list[tuple[str, str | None, str | None, str | None, str | None, str | None]] = field(
        default_factory=list
    )
    string: list[tuple[str, str, str]] = field(default_factory=list)
    date: list[tuple[str, datetime, datetime]] = field(default_factory=list)
    reference: list[tuple[str, str | None, str | None, str | None, str | None, str | None]] = field(
        default_factory=list
    )
    quantity: list[tuple[str, Decimal, str | None, str | None, str | None]] = field(default_factory=list)
    uri: list[tuple[str, str]] = field(default_factory=list)
    position: list[tuple[str, float, float]] = field(default_factory=list)
    worklist: list[
        tuple[str, str | None, str, str | None, int, datetime, datetime, datetime, datetime]
    ] = field(default_factory=list)

    def columns(self, table: str, width: int) -> list[list[Any]]:
        rows = list(dict.fromkeys(getattr(self, table)))
        return [[row[i] for row in rows] for i in range(width)] if rows else [[] for _ in range(width)]


def split_reference(reference: str, fhir_base: str) -> tuple[str | None, str | None, str | None]:
    """``Type/id`` (relative, or absolute on this server) -> (type, id, None); other URLs -> url."""
    if reference.startswith("#") or not reference:
        return None, None, None
    local = reference
    if "://" in reference or reference.startswith("urn:"):
        if not reference.startswith(fhir_base + "/"):
            return None, None, reference.split("|", 1)[0]
        local = reference[len(fhir_base) + 1 :]
    parts = local.split("/")
    if len(parts) in (2, 4) and parts[0][:1].isupper() and (len(parts) == 2 or parts[2] == "_history"):
        return parts[0], parts[1], None
    return None, None, reference


def _walk(nodes: list[Any], steps: tuple[tuple[str, ...], ...], fhir_base: str) -> list[Any]:
    for step in steps:
        kind = step[0]
        out: list[Any] = []
        for node in nodes:
            if not isinstance(node, dict):
                continue
            if kind == "key":
                value = node.get(step[1])
                if isinstance(value, list):
                    out.extend(value)
                elif value is not None:
                    out.append(value)
            elif kind == "where":
                if node.get(step[1]) == step[2]:
                    out.append(node)
            elif kind == "resolve":
                reference = node.get("reference")
                target = split_reference(reference, fhir_base)[0] if isinstance(reference, str) else None
                if (target or node.get("type")) == step[1]:
                    out.append(node)
        nodes = out
    return nodes


def extract(resource_type: str, data: dict[str, Any], fhir_base: str) -> IndexRows:
    """All index rows of one resource."""
    rows = IndexRows()
    for param in registry().for_type(resource_type).values():
        if param.column or param.components:
            continue
        for path in param.paths:
            first = path.steps[0] if path.steps else None
            if first is not None and first[0] == "key" and first[1] not in data:
                continue  # most parameters' elements are absent: skip the walk
            values = _walk([data], path.steps, fhir_base)
            if path.special == "deceased":
                _deceased(rows, param, path, values)
                continue
            for value in values:
                _add(rows, param, path.element_type, value, fhir_base)
    if "deceased" in registry().for_type(resource_type) and not any(r[0] == "deceased" for r in rows.token):
        rows.token.append(("deceased", None, "false", None, None, None))
    for element in REFERRAL_GRANTS.get(resource_type, ()):
        _grant_references(rows, data.get(element), fhir_base)
    if resource_type == "Task":
        _worklist(rows, data, fhir_base)
    return rows


WORKLIST_PARAM = "_worklist"


def _worklist(rows: IndexRows, data: dict[str, Any], fhir_base: str) -> None:
    """A Task's worklist row: its owner, status and the sort values of ``priority``,
    ``authored-on`` and ``period`` exactly as the general ``_sort`` computes them from the other
    index rows (app/fhir/search.py sort_key: the rank in the request-priority order or 0, the
    lowest start and highest end of the dates or the LOWEST stand-in), so that both give the
    same order. Only a Task with a literal owner reference has one."""
    owner = data.get("owner")
    reference = owner.get("reference") if isinstance(owner, dict) else None
    if not isinstance(reference, str):
        return
    owner_type, owner_id, _url = split_reference(reference, fhir_base)
    if owner_id is None:
        return

    def span(name: str) -> tuple[datetime, datetime]:
        dates = [(low, high) for param, low, high in rows.date if param == name]
        if not dates:
            return LOWEST, LOWEST
        return min(low for low, _ in dates), max(high for _, high in dates)

    order = registry().for_type("Task")["priority"].order
    priority = data.get("priority")
    rank = order.index(priority) + 1 if isinstance(priority, str) and priority in order else 0
    status = data.get("status")
    authored, period = span("authored-on"), span("period")
    rows.worklist.append(
        (
            WORKLIST_PARAM,
            owner_type,
            owner_id[:MAX_TOKEN],
            status[:MAX_TOKEN] if isinstance(status, str) else None,
            rank,
            *authored,
            *period,
        )
    )


REFERRAL_GRANTS: dict[str, tuple[str, ...]] = {
    "Task": ("focus", "for", "requester"),
    "ServiceRequest": ("subject", "requester", "supportingInfo", "reasonReference"),
}
"""The elements through which a referral lets its partner organisation read what it points to
(app/fhir/access.py): the ServiceRequest, the Patient, the Consent, the Conditions and
Observations that are its reasons, and the requester (what a delivery Bundle carries,
app/referrals/bundle.py). Indexed as ``search_reference`` rows with param ``_grant``; no other
reference of a Task or ServiceRequest grants anything (a partner's ``Task.input`` pointing at
another partner's Endpoint must not make it readable). ``supportingInfo`` and
``reasonReference`` have no R4 search parameter, hence rows of their own.
"""
GRANT_PARAM = "_grant"


def local_references(node: Any, fhir_base: str) -> set[tuple[str, str]]:
    """(type, id) of every literal reference to this server anywhere in ``node`` (relative
    ``Type/id`` or absolute under ``fhir_base``; contained resources included), indexed or not."""
    found: set[tuple[str, str]] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "reference" and isinstance(value, str):
                    target_type, target_id, _url = split_reference(value, fhir_base)
                    if target_type and target_id:
                        found.add((target_type, target_id))
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _grant_references(rows: IndexRows, value: Any, fhir_base: str) -> None:
    for item in value if isinstance(value, list) else [value]:
        reference = item.get("reference") if isinstance(item, dict) else None
        if isinstance(reference, str):
            target_type, target_id, _url = split_reference(reference, fhir_base)
            if target_type and target_id:
                rows.reference.append((GRANT_PARAM, target_type, target_id, None, None, None))


def _deceased(rows: IndexRows, param: SearchParam, path: PathSpec, values: list[Any]) -> None:
    for value in values:
        alive = value is False
        rows.token.append((param.name, None, "false" if alive else "true", None, None, None))


def _token(text: Any) -> str | None:
    return str(text)[:MAX_TOKEN] if text is not None else None


def _coding_rows(
    name: str, coding: dict[str, Any]
) -> list[tuple[str, str | None, str | None, str | None, None, None]]:
    display = coding.get("display")
    return [
        (
            name,
            _token(coding.get("system")),
            _token(coding.get("code")),
            normalize(display) if isinstance(display, str) else None,
            None,
            None,
        )
    ]


def _add(rows: IndexRows, param: SearchParam, element_type: str, value: Any, fhir_base: str) -> None:
    name = param.name
    kind = param.type
    if kind == "token":
        _add_token(rows, name, element_type, value)
    elif kind == "string":
        _add_string(rows, name, element_type, value)
    elif kind == "date":
        _add_date(rows, name, element_type, value)
    elif kind == "reference":
        _add_reference(rows, name, element_type, value, fhir_base)
    elif kind in ("quantity", "number"):
        _add_quantity(rows, name, element_type, value)
    elif kind == "uri" and isinstance(value, str):
        rows.uri.append((name, value[:MAX_TOKEN]))
    elif kind == "special" and element_type == "Location_Position":
        _add_position(rows, name, value)


def _add_token(rows: IndexRows, name: str, element_type: str, value: Any) -> None:
    if element_type == "CodeableConcept" and isinstance(value, dict):
        for coding in value.get("coding") or []:
            if isinstance(coding, dict):
                rows.token.extend(_coding_rows(name, coding))
        if isinstance(value.get("text"), str):
            rows.token.append((name, None, None, normalize(value["text"]), None, None))
    elif element_type == "Coding" and isinstance(value, dict):
        rows.token.extend(_coding_rows(name, value))
    elif element_type == "Identifier" and isinstance(value, dict):
        # One row per type coding, so :of-type matches any of them; the type's text
        # (or display) serves :text (search.html#token).
        raw_type = value.get("type")
        identifier_type: dict[str, Any] = raw_type if isinstance(raw_type, dict) else {}
        type_codings = [c for c in identifier_type.get("coding") or [] if isinstance(c, dict)] or [{}]
        type_text = identifier_type.get("text") or type_codings[0].get("display")
        for coding in type_codings:
            rows.token.append(
                (
                    name,
                    _token(value.get("system")),
                    _token(value.get("value")),
                    normalize(type_text) if isinstance(type_text, str) else None,
                    _token(coding.get("system")),
                    _token(coding.get("code")),
                )
            )
    elif element_type == "ContactPoint" and isinstance(value, dict):
        rows.token.append((name, _token(value.get("system")), _token(value.get("value")), None, None, None))
    elif isinstance(value, bool):
        rows.token.append((name, None, "true" if value else "false", None, None, None))
    elif isinstance(value, str):
        rows.token.append((name, None, _token(value), None, None, None))


_NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")


def _add_string(rows: IndexRows, name: str, element_type: str, value: Any) -> None:
    texts: list[str] = []
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, dict):
        parts = (
            _NAME_PARTS
            if element_type == "HumanName"
            else _ADDRESS_PARTS
            if element_type == "Address"
            else ()
        )
        for part in parts:
            item = value.get(part)
            texts.extend(t for t in (item if isinstance(item, list) else [item]) if isinstance(t, str))
    for text in texts:
        rows.string.append((name, normalize(text), text[:MAX_TOKEN]))


def _indexable_date(value: Any, name: str) -> tuple[datetime, datetime] | None:
    """A date value's range; a FHIR date whose start cannot be represented in UTC (year 0 once
    its offset is applied) is refused (400) rather than stored unsearchable."""
    if not isinstance(value, str):
        return None
    span = date_range(value)
    if span is None and is_date_text(value):
        raise InvalidResource(
            f"{name}: '{value[:40]}' lies outside the dates this server supports"
            " (0001-01-01 to 9999-12-31 in UTC)",
            code="value",
        )
    return span


def _add_date(rows: IndexRows, name: str, element_type: str, value: Any) -> None:
    if isinstance(value, str):
        span = _indexable_date(value, name)
        if span:
            rows.date.append((name, *span))
    elif element_type == "Period" and isinstance(value, dict):
        start = _indexable_date(value.get("start"), name)
        end = _indexable_date(value.get("end"), name)
        if start or end:
            rows.date.append((name, start[0] if start else LOWEST, end[1] if end else HIGHEST))
    elif element_type == "Timing" and isinstance(value, dict):
        for event in value.get("event") or []:
            span = _indexable_date(event, name)
            if span:
                rows.date.append((name, *span))
        bounds = (value.get("repeat") or {}).get("boundsPeriod")
        if isinstance(bounds, dict):
            _add_date(rows, name, "Period", bounds)


def _add_reference(rows: IndexRows, name: str, element_type: str, value: Any, fhir_base: str) -> None:
    if isinstance(value, str):  # canonical
        rows.reference.append((name, None, None, value.split("|", 1)[0][:MAX_TOKEN], None, None))
        return
    if not isinstance(value, dict):
        return
    reference = value.get("reference")
    if isinstance(reference, str):
        target_type, target_id, url = split_reference(reference, fhir_base)
        if target_type or url:
            rows.reference.append((name, target_type, target_id, url and url[:MAX_TOKEN], None, None))
    identifier = value.get("identifier")
    if isinstance(identifier, dict) and identifier.get("value") is not None:
        rows.reference.append(
            (name, None, None, None, _token(identifier.get("system")), _token(identifier.get("value")))
        )


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = Decimal(str(value)) if isinstance(value, (int, float, Decimal, str)) else None
    except InvalidOperation:
        return None
    # Beyond PostgreSQL numeric's range (and any real quantity): stored, but not indexed.
    if number is None or not number.is_finite() or abs(number.adjusted()) > 100:
        return None
    return number


def _add_quantity(rows: IndexRows, name: str, element_type: str, value: Any) -> None:
    if element_type == "Range" and isinstance(value, dict):
        for bound in ("low", "high"):
            if isinstance(value.get(bound), dict):
                _add_quantity(rows, name, "Quantity", value[bound])
        return
    if isinstance(value, dict):
        number = _decimal(value.get("value"))
        if number is not None:
            rows.quantity.append(
                (
                    name,
                    number,
                    _token(value.get("system")),
                    _token(value.get("code")),
                    _token(value.get("unit")),
                )
            )
    else:
        number = _decimal(value)
        if number is not None:
            rows.quantity.append((name, number, None, None, None))


def _add_position(rows: IndexRows, name: str, value: Any) -> None:
    """``Location.position`` for ``near`` (R4 location.html#search): WGS84 decimal degrees.
    A position outside the earth's coordinates is stored but not indexed."""
    if not isinstance(value, dict):
        return
    latitude, longitude = _decimal(value.get("latitude")), _decimal(value.get("longitude"))
    if latitude is None or longitude is None:
        return
    if -90 <= latitude <= 90 and -180 <= longitude <= 180:
        rows.position.append((name, float(latitude), float(longitude)))
