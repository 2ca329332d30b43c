"""Thin HTTP layer of the FHIR REST interactions (FHIR R4 http.html).

Routes are registered per served type so the OpenAPI document has typed paths and
named schemas for every type; each handler reads HTTP, calls the repository once
and answers through app/fhir/responses.py. Unknown types fall through to the
catch-all routes at the end, which answer 404 ``not-supported``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.deps import CursorDep, RepositoryDep, SettingsDep, read_body
from app.fhir.errors import (
    BadRequest,
    Issue,
    MethodNotAllowed,
    NotFound,
    UnsupportedMediaType,
    operation_outcome,
)
from app.fhir.params import parse_count, parse_etag, parse_instant, parse_version_id
from app.fhir.repository import FhirRepository
from app.fhir.responses import (
    FormatDep,
    OutputFormat,
    PreferDep,
    check_request_media_type,
    history_bundle,
    json_response,
    resource_response,
    version_headers,
    write_response,
)
from app.fhir.search_params import registry
from app.fhir.search_service import run_search
from app.fhir.types import SERVED_TYPES
from app.fhir.validation import check_id, check_resource_type, parse_resource
from app.settings import Settings

FHIR_JSON_CONTENT = "application/fhir+json"

router = APIRouter(prefix="/fhir")

INTERACTIONS: dict[str, list[str]] = {}
"""Per type, the R4 interaction codes routed here; the CapabilityStatement reads it."""

SYSTEM_INTERACTIONS: list[str] = []


def _schema(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _content(name: str) -> dict[str, Any]:
    return {"content": {FHIR_JSON_CONTENT: {"schema": _schema(name)}}}


def _responses(ok: int, name: str, *errors: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {ok: {"description": "Success", **_content(name)}}
    for status in errors:
        out[status] = {"description": "OperationOutcome", **_content("OperationOutcome")}
    return out


async def _history(
    request: Request,
    repo: FhirRepository,
    settings: Settings,
    cursors: Any,
    fmt: OutputFormat,
    *,
    resource_type: str | None = None,
    fhir_id: str | None = None,
) -> Response:
    query = request.query_params
    since_value = query.get("_since")
    since = parse_instant(since_value, "_since") if since_value else None
    count = parse_count(
        query.get("_count"), default=settings.history_default_count, maximum=settings.history_max_count
    )
    token = query.get("_cursor")
    cursor = cursors.decode(token) if token else None
    if cursor is not None and not isinstance(cursor, int):
        raise BadRequest("_cursor: not a history cursor", expression=("_cursor",))
    page = await repo.history(
        resource_type=resource_type, fhir_id=fhir_id, since=since, count=count, cursor=cursor
    )
    path = "/".join(part for part in (resource_type, fhir_id) if part)
    url = f"{settings.fhir_base}/{path + '/' if path else ''}_history"
    kept = {k: v for k, v in (("_since", since_value), ("_count", str(count))) if v is not None}
    first_url = f"{url}?{urlencode(kept)}"
    self_url = f"{url}?{urlencode({**kept, '_cursor': token})}" if token else first_url
    next_url = (
        f"{url}?{urlencode({**kept, '_cursor': cursors.encode(page.next_cursor)})}"
        if page.next_cursor
        else None
    )
    body = history_bundle(
        page.versions, base=settings.fhir_base, self_url=self_url, next_url=next_url, first_url=first_url
    )
    return json_response(body, fmt)


async def _search_pairs(request: Request, settings: Settings, *, form: bool) -> list[tuple[str, str]]:
    """Query parameters, plus the form body of ``POST .../_search`` (search.html#Introduction)."""
    pairs = list(request.query_params.multi_items())
    if form:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded parameters")
        raw = await read_body(request, settings.max_body_bytes)
        try:
            pairs.extend(parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False))
        except UnicodeDecodeError as exc:
            raise BadRequest("the form body is not UTF-8") from exc
    return pairs


def _search_parameters_doc(resource_type: str) -> list[dict[str, Any]]:
    """OpenAPI query parameters of a type's search: every R4 search parameter it supports."""
    documented = [
        {
            "in": "query",
            "name": name,
            "required": False,
            "schema": {"type": "string"},
            "description": f"{param.type} search parameter ({param.url})",
        }
        for name, param in sorted(registry().for_type(resource_type).items())
    ]
    for name, description in (
        ("_count", "Page size (default 20, maximum 1000)"),
        ("_sort", "Comma-separated sort keys; prefix - for descending"),
        ("_include", "Type:parameter[:target] to include referenced resources"),
        ("_revinclude", "Type:parameter to include resources that reference the matches"),
        ("_total", "none | estimate | accurate"),
        ("_summary", "true | text | data | count | false"),
        ("_elements", "Comma-separated top-level elements to return"),
        ("_cursor", "Opaque paging cursor from a Bundle link"),
    ):
        documented.append(
            {
                "in": "query",
                "name": name,
                "required": False,
                "schema": {"type": "string"},
                "description": description,
            }
        )
    return documented


def _register_type(resource_type: str) -> None:
    """Routes of the instance and type interactions of one served type."""
    tag = resource_type
    errors = (400, 404, 410)

    async def read(id: str, repo: RepositoryDep, fmt: FormatDep) -> Response:
        check_id(id)
        return resource_response(await repo.read(resource_type, id), fmt)

    async def vread(id: str, vid: str, repo: RepositoryDep, fmt: FormatDep) -> Response:
        check_id(id)
        return resource_response(await repo.vread(resource_type, id, parse_version_id(vid)), fmt)

    async def create(
        request: Request, repo: RepositoryDep, settings: SettingsDep, fmt: FormatDep, prefer: PreferDep
    ) -> Response:
        check_request_media_type(request)
        data = parse_resource(await read_body(request, settings.max_body_bytes), resource_type)
        version = await repo.create(resource_type, data)
        return write_response(version, fmt, prefer, status=201, base=settings.fhir_base, location=True)

    async def update(
        id: str,
        request: Request,
        repo: RepositoryDep,
        settings: SettingsDep,
        fmt: FormatDep,
        prefer: PreferDep,
    ) -> Response:
        check_id(id)
        check_request_media_type(request)
        if_match = parse_etag(request.headers.get("if-match"))
        data = parse_resource(await read_body(request, settings.max_body_bytes), resource_type, url_id=id)
        version, created = await repo.update(resource_type, id, data, if_match=if_match)
        return write_response(
            version, fmt, prefer, status=201 if created else 200, base=settings.fhir_base, location=created
        )

    async def delete(
        id: str, request: Request, repo: RepositoryDep, fmt: FormatDep, prefer: PreferDep
    ) -> Response:
        check_id(id)
        if_match = parse_etag(request.headers.get("if-match"))
        version = await repo.delete(resource_type, id, if_match=if_match)
        headers = {"ETag": f'W/"{version.version_id}"'}
        if prefer.return_ == "minimal":
            return Response(status_code=204, headers=headers)
        outcome = operation_outcome(
            [Issue("informational", f"{resource_type}/{id} deleted", severity="information")]
        )
        return json_response(outcome, fmt, headers=headers)

    async def instance_history(
        id: str,
        request: Request,
        repo: RepositoryDep,
        settings: SettingsDep,
        cursors: CursorDep,
        fmt: FormatDep,
    ) -> Response:
        check_id(id)
        return await _history(request, repo, settings, cursors, fmt, resource_type=resource_type, fhir_id=id)

    async def type_history(
        request: Request, repo: RepositoryDep, settings: SettingsDep, cursors: CursorDep, fmt: FormatDep
    ) -> Response:
        return await _history(request, repo, settings, cursors, fmt, resource_type=resource_type)

    async def search_type(
        request: Request,
        repo: RepositoryDep,
        settings: SettingsDep,
        cursors: CursorDep,
        fmt: FormatDep,
        prefer: PreferDep,
    ) -> Response:
        pairs = await _search_pairs(request, settings, form=request.method == "POST")
        body = await run_search(
            repo,
            resource_types=(resource_type,),
            pairs=pairs,
            cursors=cursors,
            strict=prefer.handling == "strict",
            path=resource_type,
        )
        return json_response(body, fmt)

    async def compartment_search(
        id: str, request: Request, repo: RepositoryDep, cursors: CursorDep, fmt: FormatDep, prefer: PreferDep
    ) -> Response:
        check_id(id)
        body = await run_search(
            repo,
            resource_types=(resource_type,),
            pairs=list(request.query_params.multi_items()),
            cursors=cursors,
            strict=prefer.handling == "strict",
            path=f"Patient/{id}/{resource_type}",
            compartment=("Patient", id),
        )
        return json_response(body, fmt)

    body_spec = {"requestBody": {"required": True, **_content(resource_type)}}
    search_spec = {"parameters": _search_parameters_doc(resource_type)}
    form_spec = {
        "requestBody": {
            "required": False,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {"type": "object", "additionalProperties": {"type": "string"}}
                }
            },
        }
    }
    base = f"/{resource_type}"
    routes: list[tuple[str, str, Callable[..., Any], str, str, dict[str, Any] | None, Any]] = [
        (
            "GET",
            f"{base}/_history",
            type_history,
            "history-type",
            f"Type history of {resource_type}",
            None,
            _responses(200, "Bundle", 400),
        ),
        (
            "GET",
            base,
            search_type,
            "search-type",
            f"Search {resource_type} resources",
            search_spec,
            _responses(200, "Bundle", 400),
        ),
        (
            "POST",
            f"{base}/_search",
            search_type,
            "search-type-post",
            f"Search {resource_type} (form body)",
            {**search_spec, **form_spec},
            _responses(200, "Bundle", 400, 415),
        ),
        (
            "POST",
            base,
            create,
            "create",
            f"Create a {resource_type}",
            body_spec,
            _responses(201, resource_type, 400, 413, 415, 422),
        ),
        (
            "GET",
            f"{base}/{{id}}",
            read,
            "read",
            f"Read a {resource_type}",
            None,
            _responses(200, resource_type, *errors),
        ),
        (
            "PUT",
            f"{base}/{{id}}",
            update,
            "update",
            f"Update (or create) a {resource_type}",
            body_spec,
            _responses(200, resource_type, 400, 412, 413, 415, 422),
        ),
        (
            "DELETE",
            f"{base}/{{id}}",
            delete,
            "delete",
            f"Delete a {resource_type}",
            None,
            _responses(200, "OperationOutcome", 404, 412),
        ),
        (
            "GET",
            f"{base}/{{id}}/_history",
            instance_history,
            "history-instance",
            f"History of one {resource_type}",
            None,
            _responses(200, "Bundle", 404),
        ),
        (
            "GET",
            f"{base}/{{id}}/_history/{{vid}}",
            vread,
            "vread",
            f"Read one version of a {resource_type}",
            None,
            _responses(200, resource_type, *errors),
        ),
    ]
    if resource_type == "Patient" or resource_type in registry().patient_compartment:
        routes.append(
            (
                "GET",
                f"/Patient/{{id}}/{resource_type}",
                compartment_search,
                "search-compartment",
                f"Search {resource_type} in a Patient's compartment",
                search_spec,
                _responses(200, "Bundle", 400),
            )
        )
    for method, path, endpoint, interaction, summary, extra, responses in routes:
        router.add_api_route(
            path,
            endpoint,
            methods=[method],
            summary=summary,
            tags=[tag],
            operation_id=f"{interaction.replace('-', '_')}_{resource_type}",
            openapi_extra=extra,
            responses=responses,
            response_class=Response,
        )
        if interaction in ("search-type-post", "search-compartment"):
            continue  # forms of search-type, not separate capability interactions
        INTERACTIONS.setdefault(resource_type, []).append(interaction)


@router.get(
    "/_history",
    tags=["system"],
    operation_id="history_system",
    summary="History of the whole server",
    response_class=Response,
    responses=_responses(200, "Bundle", 400),
)
async def system_history(
    request: Request, repo: RepositoryDep, settings: SettingsDep, cursors: CursorDep, fmt: FormatDep
) -> Response:
    return await _history(request, repo, settings, cursors, fmt)


SYSTEM_INTERACTIONS.append("history-system")


@router.api_route(
    "",
    methods=["GET"],
    tags=["system"],
    operation_id="search_system",
    summary="Search several types (_type) or all",
    response_class=Response,
    responses=_responses(200, "Bundle", 400),
)
@router.api_route(
    "/_search",
    methods=["POST"],
    tags=["system"],
    operation_id="search_system_post",
    summary="Search several types (form body)",
    response_class=Response,
    responses=_responses(200, "Bundle", 400, 415),
)
async def system_search(
    request: Request,
    repo: RepositoryDep,
    settings: SettingsDep,
    cursors: CursorDep,
    fmt: FormatDep,
    prefer: PreferDep,
) -> Response:
    """System-level search (search.html#Introduction): common parameters over ``_type``."""
    pairs = await _search_pairs(request, settings, form=request.method == "POST")
    requested = [t for value in (v for k, v in pairs if k == "_type") for t in value.split(",") if t]
    for resource_type in requested:
        check_resource_type(resource_type)
    types = tuple(dict.fromkeys(requested)) or SERVED_TYPES
    body = await run_search(
        repo, resource_types=types, pairs=pairs, cursors=cursors, strict=prefer.handling == "strict", path=""
    )
    return json_response(body, fmt)


SYSTEM_INTERACTIONS.append("search-system")

for _type in SERVED_TYPES:
    _register_type(_type)


def unsupported_routes() -> APIRouter:
    """Catch-alls registered last: any type not served is 404 not-supported (http.html#read)."""
    catch_all = APIRouter(prefix="/fhir", include_in_schema=False)
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]

    @catch_all.api_route("/{resource_type}", methods=methods)
    @catch_all.api_route("/{resource_type}/{rest:path}", methods=methods)
    async def unsupported(resource_type: str, request: Request) -> Response:
        check_resource_type(resource_type)
        rest = request.path_params.get("rest", "")
        if rest.count("/") >= 2 or (rest.count("/") == 1 and "/_history" not in f"/{rest}"):
            raise NotFound(f"unknown path {request.url.path}")
        # A served type's own path with a method it has no route for.
        raise MethodNotAllowed(f"{request.method} is not supported on {request.url.path}")

    return catch_all


__all__ = ["router", "unsupported_routes", "version_headers"]
