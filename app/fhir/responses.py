"""FHIR JSON responses: media types, versioning headers, Prefer, bundles.

Implements the response side of FHIR R4 http.html: ``ETag: W/"n"``,
``Last-Modified``, ``Location`` with ``_history/n`` (#create, #update),
``Prefer: return=...`` (#ops), ``_format``/``Accept`` negotiation and ``_pretty``
(#mime, #parameters). Stored bodies are passed through as text, never re-parsed,
unless the client asked for ``_pretty``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import Response

from app.fhir import jsonio
from app.fhir.errors import (
    FHIR_JSON,
    ONLY_JSON,
    Issue,
    NotAcceptable,
    UnsupportedMediaType,
    operation_outcome,
)
from app.fhir.repository import StoredVersion, fhir_instant, version_headers

JSON_TYPES = frozenset(
    {"application/fhir+json", "application/json", "application/json+fhir", "json", "text/json"}
)
_FORMAT_ALIASES = {"json": FHIR_JSON, "text/json": "application/json", "application/json+fhir": FHIR_JSON}


@dataclass(frozen=True)
class OutputFormat:
    """How to write the response body: media type and pretty-printing (http.html#mime)."""

    media_type: str = FHIR_JSON
    pretty: bool = False

    @property
    def content_type(self) -> str:
        return f"{self.media_type}; charset=utf-8"


def _media_types(header: str) -> list[str]:
    return [part.split(";")[0].strip().lower() for part in header.split(",") if part.strip()]


async def negotiate(request: Request) -> OutputFormat:
    """Choose the response format from ``_format`` or ``Accept``; XML and others are 406."""
    pretty = request.query_params.get("_pretty", "false").lower() == "true"
    requested = request.query_params.get("_format")
    if requested is not None:
        # An unencoded "+" in a query string arrives as a space ("application/fhir json").
        kind = requested.split(";")[0].strip().lower().replace(" ", "+")
        if kind not in JSON_TYPES:
            raise NotAcceptable(ONLY_JSON)
        return OutputFormat(_FORMAT_ALIASES.get(kind, kind), pretty)
    accept = request.headers.get("accept")
    if not accept:
        return OutputFormat(FHIR_JSON, pretty)
    kinds = _media_types(accept)
    for kind in kinds:
        if kind in JSON_TYPES:
            return OutputFormat(_FORMAT_ALIASES.get(kind, kind), pretty)
    if any(kind in ("*/*", "application/*") for kind in kinds):
        return OutputFormat(FHIR_JSON, pretty)
    raise NotAcceptable(ONLY_JSON)


FormatDep = Annotated[OutputFormat, Depends(negotiate)]


def check_request_media_type(request: Request, *, allow_form: bool = False) -> None:
    """A request body must be FHIR JSON (or a form, where search allows it); else 415."""
    content_type = request.headers.get("content-type")
    if not content_type:
        return
    kind = content_type.split(";")[0].strip().lower()
    if kind in JSON_TYPES or (allow_form and kind == "application/x-www-form-urlencoded"):
        return
    raise UnsupportedMediaType(
        ONLY_JSON if "xml" in kind else f"unsupported Content-Type '{kind[:60]}'; {ONLY_JSON}"
    )


@dataclass(frozen=True)
class Prefer:
    """The parts of RFC 7240 ``Prefer`` that FHIR defines (http.html#ops, search.html#errors)."""

    return_: str = "representation"
    handling: str = "lenient"


async def parse_prefer(request: Request) -> Prefer:
    values: dict[str, str] = {}
    for header in request.headers.getlist("prefer"):
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            values[name.strip().lower()] = value.strip().strip('"')
    return_ = values.get("return", "representation")
    if return_ not in ("minimal", "representation", "OperationOutcome"):
        return_ = "representation"
    return Prefer(return_=return_, handling=values.get("handling", "lenient"))


def not_modified(request: Request, version: StoredVersion) -> bool:
    """Conditional read (http.html#cread): If-None-Match on the ETag, If-Modified-Since on lastUpdated."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return f'"{version.version_id}"' in tags or "*" in tags
    since = request.headers.get("if-modified-since")
    if since:
        try:
            moment = parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
        if moment.tzinfo is None:
            return False
        return version.last_updated.replace(microsecond=0) <= moment
    return False


def render(body: bytes | str, fmt: OutputFormat) -> bytes:
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if fmt.pretty:
        return jsonio.dumps(jsonio.loads(raw), pretty=True)
    return raw


def json_response(
    content: dict[str, Any] | str,
    fmt: OutputFormat,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    # Bytes throughout: a large Bundle is not decoded and encoded again on its way out.
    body = content.encode("utf-8") if isinstance(content, str) else jsonio.dumps(content)
    return Response(render(body, fmt), status_code=status, media_type=fmt.content_type, headers=headers)


def resource_response(version: StoredVersion, fmt: OutputFormat, *, status: int = 200) -> Response:
    """A read/vread answer: the stored body with its version headers."""
    assert version.body is not None
    return Response(
        render(version.body, fmt),
        status_code=status,
        media_type=fmt.content_type,
        headers=version_headers(version),
    )


def write_response(
    version: StoredVersion, fmt: OutputFormat, prefer: Prefer, *, status: int, base: str, location: bool
) -> Response:
    """A create/update answer honouring ``Prefer: return=`` (http.html#ops)."""
    headers = version_headers(version)
    if location:
        headers["Location"] = (
            f"{base}/{version.resource_type}/{version.fhir_id}/_history/{version.version_id}"
        )
    if prefer.return_ == "minimal" or version.body is None:
        return Response(status_code=status, headers=headers)
    if prefer.return_ == "OperationOutcome":
        verb = "created" if status == 201 else "updated"
        outcome = operation_outcome(
            [
                Issue(
                    "informational",
                    f"{version.resource_type}/{version.fhir_id} {verb}",
                    severity="information",
                )
            ]
        )
        return json_response(outcome, fmt, status=status, headers=headers)
    return Response(
        render(version.body, fmt), status_code=status, media_type=fmt.content_type, headers=headers
    )


def history_bundle(
    versions: list[StoredVersion], *, base: str, self_url: str, next_url: str | None, first_url: str
) -> str:
    """A ``history`` Bundle (http.html#history); stored bodies are spliced in as text."""
    links = [{"relation": "self", "url": self_url}, {"relation": "first", "url": first_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    entries = []
    for version in versions:
        url = f"{version.resource_type}/{version.fhir_id}"
        status = {"POST": "201 Created", "DELETE": "204 No Content"}.get(version.method, "200 OK")
        if version.method == "PUT" and version.version_id == 1:
            status = "201 Created"
        request_url = version.resource_type if version.method == "POST" else url
        meta = {
            "fullUrl": f"{base}/{url}",
            "request": {"method": version.method, "url": request_url},
            "response": {
                "status": status,
                "etag": f'W/"{version.version_id}"',
                "lastModified": fhir_instant(version.last_updated),
            },
        }
        entry = json.dumps(meta, separators=(",", ":"))
        if version.body is not None:
            entry = entry[:-1] + ',"resource":' + version.body + "}"
        entries.append(entry)
    head = json.dumps({"resourceType": "Bundle", "type": "history", "link": links}, separators=(",", ":"))
    if not entries:
        return head  # FHIR JSON has no empty arrays (json.html)
    return head[:-1] + ',"entry":[' + ",".join(entries) + "]}"
