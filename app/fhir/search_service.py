"""A search interaction end to end: parse, page, include, render (R4 search.html).

Routers call :func:`run_search`; it parses the parameters, decodes the paging cursor,
asks the repository for one page and renders the ``searchset`` Bundle with
``self``/``first``/``next``/``previous`` links that carry only the parameters applied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus

from app.audit.fhir import AUDIT_TYPE, parse_audit_search
from app.fhir import jsonio
from app.fhir.cursors import CursorCodec
from app.fhir.errors import BadRequest, operation_outcome
from app.fhir.models import REQUIRED_ELEMENTS, SUMMARY_ELEMENTS
from app.fhir.repository import FhirRepository, Found, StoredVersion, cursor_value, fhir_instant, new_id
from app.fhir.search import SearchRequest, parse_search
from app.fhir.search_params import registry

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
ALWAYS_KEPT = frozenset({"resourceType", "id", "meta"})


@dataclass(frozen=True)
class SearchBundle:
    """A rendered ``searchset`` Bundle and how many resources it carries (matches and includes)."""

    text: str
    resources: int


async def run_search(
    repo: FhirRepository,
    *,
    resource_types: tuple[str, ...],
    pairs: list[tuple[str, str]],
    cursors: CursorCodec,
    strict: bool,
    path: str,
    compartment: tuple[str, str] | None = None,
) -> str:
    """A search interaction's ``searchset`` Bundle (JSON text)."""
    found = await search_bundle(
        repo,
        resource_types=resource_types,
        pairs=pairs,
        cursors=cursors,
        strict=strict,
        path=path,
        compartment=compartment,
    )
    return found.text


async def search_bundle(
    repo: FhirRepository,
    *,
    resource_types: tuple[str, ...],
    pairs: list[tuple[str, str]],
    cursors: CursorCodec,
    strict: bool,
    path: str,
    compartment: tuple[str, str] | None = None,
) -> SearchBundle:
    """:func:`run_search`, with the count of resources a Bundle's search entry adds to the
    response's budget (app/fhir/bundles.py), so that the text is not parsed again to count them."""
    if resource_types == (AUDIT_TYPE,):  # the audit store (app/audit), not the clinical tables
        request = parse_audit_search(
            pairs,
            fhir_base=repo.fhir_base,
            strict=strict,
            access=repo.access,
            compartment=compartment,
            limits=repo.search_limits,
        )
    else:
        request = parse_search(
            resource_types,
            pairs,
            registry=registry(),
            fhir_base=repo.fhir_base,
            strict=strict,
            compartment=compartment,
            access=repo.access,
            limits=repo.search_limits,
        )
    after: tuple[Any, ...] | None = None
    backwards = False
    if request.cursor:
        payload = cursors.decode(request.cursor)
        if not isinstance(payload, dict) or payload.get("f") != request.fingerprint:
            raise BadRequest("_cursor: does not belong to this query", expression=("_cursor",))
        after = tuple(payload["k"])
        backwards = bool(payload.get("b"))
    page = await repo.search(request, after, backwards)
    url = f"{repo.fhir_base}/{path}" if path else repo.fhir_base

    first = f"{url}?{query_string([p for p in request.applied if p[0] != '_count'])}&_count={request.count}"

    def link(keys: tuple[Any, ...], *, back: bool = False) -> str:
        token = cursors.encode({"f": request.fingerprint, "k": [cursor_value(k) for k in keys], "b": back})
        return f"{first}&{query_string([('_cursor', token)])}"

    links = [
        {"relation": "self", "url": first if not request.cursor else f"{first}&_cursor={request.cursor}"},
        {"relation": "first", "url": first},
    ]
    if page.previous_keys is not None:
        links.append({"relation": "previous", "url": link(page.previous_keys, back=True)})
    if page.next_keys is not None:
        links.append({"relation": "next", "url": link(page.next_keys)})
    head: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": new_id(),
        "meta": {"lastUpdated": fhir_instant(datetime.now(UTC))},
        "type": "searchset",
    }
    if page.total is not None:
        head["total"] = page.total
    head["link"] = links
    entries = [bundle_entry(repo.fhir_base, found, "match", request) for found in page.matches]
    entries.extend(bundle_entry(repo.fhir_base, found, "include", None) for found in page.included)
    if request.issues:
        outcome = json.dumps(operation_outcome(request.issues), separators=(",", ":"))
        entries.append('{"resource":' + outcome + ',"search":{"mode":"outcome"}}')
    rendered = json.dumps(head, separators=(",", ":"))
    resources = len(page.matches) + len(page.included)
    if not entries:
        return SearchBundle(rendered, resources)  # FHIR JSON has no empty arrays (json.html)
    return SearchBundle(rendered[:-1] + ',"entry":[' + ",".join(entries) + "]}", resources)


_ALWAYS_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
"""What ``quote_plus`` leaves as it is (RFC 3986 unreserved)."""
_QUOTED = {c: "+" if chr(c) == " " else f"%{c:02X}" for c in range(128) if chr(c) not in _ALWAYS_SAFE}


def query_string(params: list[tuple[str, str]]) -> str:
    """``urllib.parse.urlencode(params)``, the same text, with ASCII text quoted by one
    ``str.translate`` instead of a Python call per byte: a searchset's links were an eighth of
    a search's CPU (issue 14)."""
    return "&".join(f"{_quote_plus(name)}={_quote_plus(value)}" for name, value in params)


def _quote_plus(text: str) -> str:
    return text.translate(_QUOTED) if text.isascii() else quote_plus(text)


def bundle_entry(base: str, found: Found, mode: str, request: SearchRequest | None) -> str:
    """One searchset entry (bundle.html#searchset): fullUrl, the resource (subsetted when the
    search asks), search.mode."""
    body = found.body
    if request is not None and (request.elements or request.summary in ("true", "text", "data")):
        body = subset(body, found.resource_type, summary=request.summary, elements=request.elements)
    full_url = json.dumps(f"{base}/{found.resource_type}/{found.fhir_id}")
    return '{"fullUrl":' + full_url + ',"resource":' + body + ',"search":{"mode":"' + mode + '"}}'


def subset_version(version: StoredVersion, query: Mapping[str, str]) -> StoredVersion:
    """``_summary`` / ``_elements`` on a read or vread (search.html#summary applies to reads too)."""
    summary = query.get("_summary")
    elements = tuple(e.strip() for e in query.get("_elements", "").split(",") if e.strip())
    if version.body is None or not (elements or summary in ("true", "text", "data")):
        return version
    return replace(
        version, body=subset(version.body, version.resource_type, summary=summary, elements=elements)
    )


def subset(body: str, resource_type: str, *, summary: str | None, elements: tuple[str, ...]) -> str:
    """_summary and _elements (search.html#summary, #elements); marks the result SUBSETTED."""
    data: dict[str, Any] = jsonio.loads(body)
    if summary == "data":
        keep = set(data) - {"text"}
    elif summary == "text":
        keep = set(ALWAYS_KEPT | {"text"} | REQUIRED_ELEMENTS.get(resource_type, frozenset()))
    elif summary == "true":
        keep = set(ALWAYS_KEPT | SUMMARY_ELEMENTS.get(resource_type, frozenset()))
    else:
        keep = set(ALWAYS_KEPT | REQUIRED_ELEMENTS.get(resource_type, frozenset()))
        keep.update(elements)
    keep.update(f"_{name}" for name in list(keep))
    result = {key: value for key, value in data.items() if key in keep}
    meta = dict(result.get("meta") or {})
    meta["tag"] = [*(meta.get("tag") or []), SUBSETTED]
    result["meta"] = meta
    return jsonio.dumps(result).decode("utf-8")
