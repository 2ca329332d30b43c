"""Thin HTTP layer of the FHIR REST interactions (FHIR R4 http.html, search.html).

Dispatch uses one generic route per interaction (``/fhir/{resource_type}/{id}``...), so
routing costs the same for every type. The OpenAPI document instead gets one path set per
served type with named schemas (see ``docs_router``), built from the same interaction table
and the same endpoint functions, so the documentation cannot drift from what is routed. Each
endpoint reads HTTP, calls the repository (or the search service) once and answers through
app/fhir/responses.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.convertors import Convertor, register_url_convertor

from app.audit.fhir import SEARCH_PARAMETERS as AUDIT_SEARCH_PARAMETERS
from app.casework.extract import EXTRACT
from app.casework.progress import PROGRESS
from app.casework.referral_metrics import REFERRAL_METRICS
from app.deps import read_body, repository_scope
from app.exports.operations import EXPORT, GROUP_EXPORT, PATIENT_EXPORT
from app.fhir.bundles import process_bundle
from app.fhir.conditional import conditional_create, conditional_delete, conditional_update, patch
from app.fhir.context import FhirContext
from app.fhir.errors import (
    BadRequest,
    Forbidden,
    Issue,
    MethodNotAllowed,
    NotFound,
    UnsupportedMediaType,
    operation_outcome,
)
from app.fhir.everything import EVERYTHING
from app.fhir.operations import Level, Operation, OperationParameters, OperationRegistry, parse_parameters
from app.fhir.params import parse_count, parse_etag, parse_instant, parse_version_id
from app.fhir.repository import IMMUTABLE_TYPES, version_headers
from app.fhir.resource_operations import META, VALIDATE
from app.fhir.responses import (
    check_request_media_type,
    history_bundle,
    json_response,
    negotiate,
    not_modified,
    parse_prefer,
    resource_response,
    write_response,
)
from app.fhir.search_params import registry
from app.fhir.search_service import run_search, subset_version
from app.fhir.types import SERVED_TYPES
from app.fhir.validation import check_id, check_resource_type, parse_body, parse_resource
from app.subscriptions.operations import (
    SUBSCRIPTION_EVENTS,
    SUBSCRIPTION_STATUS,
    SUBSCRIPTION_WS_BINDING_TOKEN,
)

FHIR_JSON_CONTENT = "application/fhir+json"

router = APIRouter(prefix="/fhir")
"""What the application dispatches: generic routes."""

hot_router = APIRouter(prefix="/fhir")
"""The everyday interactions again, matched first (app/main.py includes this router before all
others). FastAPI tries routes in order at a few microseconds each, and the generic routes
come after some 45 others (docs, health, metadata, auth, operations): about a tenth of a
read's CPU (issue 14). These copies only take paths whose type and id have the R4 shapes
(``fhirtype``, ``fhirid``), which no earlier route serves, so every request is dispatched to
the same endpoint as before; anything else falls through to ``router`` unchanged."""


class FhirTypeConvertor(Convertor[str]):
    """A resource type name (R4 ``[A-Z][A-Za-z]+``). OperationDefinition is served by the
    metadata router (app/routers/metadata.py), which must see its paths first."""

    regex = "(?!OperationDefinition(?![A-Za-z]))[A-Z][A-Za-z]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class FhirIdConvertor(Convertor[str]):
    """A logical id (R4 datatypes.html#id): never ``_history``, ``_search`` or ``$operation``."""

    regex = "[A-Za-z0-9\\-.]{1,64}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("fhirtype", FhirTypeConvertor())
register_url_convertor("fhirid", FhirIdConvertor())

docs_router = APIRouter(prefix="/fhir")
"""Per-type copies of the same endpoints, for the OpenAPI document only (never dispatched)."""

INTERACTIONS: dict[str, list[str]] = {}
"""Per type, the R4 interaction codes routed here; the CapabilityStatement reads it."""

SYSTEM_INTERACTIONS: list[str] = ["transaction", "batch", "history-system", "search-system"]


async def fhir_context(request: Request) -> AsyncIterator[FhirContext]:
    """The request's context around its repository (app/deps.py ``get_repository``): one
    dependency for FastAPI to resolve instead of four, tens of microseconds less per request
    (issue 14)."""
    state = request.app.state
    async with repository_scope(request) as repo:
        fmt, prefer = await negotiate(request), await parse_prefer(request)
        yield FhirContext(request, repo, state.settings, state.cursors, fmt, prefer)


ContextDep = Annotated[FhirContext, Depends(fhir_context, scope="function")]


# -- interactions ----------------------------------------------------------------------------


async def read(ctx: FhirContext, resource_type: str) -> Response:
    """http.html#read, and conditional read (If-None-Match, If-Modified-Since -> 304)."""
    fhir_id = ctx.param("id")
    check_id(fhir_id)
    version = await ctx.repo.read(resource_type, fhir_id)
    if not_modified(ctx.request, version):
        return Response(status_code=304, headers=version_headers(version))
    return resource_response(subset_version(version, ctx.request.query_params), ctx.fmt)


async def vread(ctx: FhirContext, resource_type: str) -> Response:
    """http.html#vread"""
    fhir_id = ctx.param("id")
    check_id(fhir_id)
    version = await ctx.repo.vread(resource_type, fhir_id, parse_version_id(ctx.param("vid")))
    return resource_response(subset_version(version, ctx.request.query_params), ctx.fmt)


async def create(ctx: FhirContext, resource_type: str) -> Response:
    """http.html#create"""
    check_request_media_type(ctx.request)
    data = parse_resource(await read_body(ctx.request, ctx.settings.max_body_bytes), resource_type)
    condition = ctx.request.headers.get("if-none-exist")
    if condition is not None:
        version, created = await conditional_create(ctx.repo, resource_type, data, condition)
    else:
        version, created = await ctx.repo.create(resource_type, data), True
    return write_response(
        version,
        ctx.fmt,
        ctx.prefer,
        status=201 if created else 200,
        base=ctx.settings.fhir_base,
        location=True,
    )


async def conditional_update_type(ctx: FhirContext, resource_type: str) -> Response:
    """http.html#cond-update: ``PUT [type]?criteria``."""
    check_request_media_type(ctx.request)
    if_match = parse_etag(ctx.request.headers.get("if-match"))
    data = parse_resource(await read_body(ctx.request, ctx.settings.max_body_bytes), resource_type)
    version, created = await conditional_update(
        ctx.repo, resource_type, data, ctx.request.url.query, if_match=if_match
    )
    return write_response(
        version,
        ctx.fmt,
        ctx.prefer,
        status=201 if created else 200,
        base=ctx.settings.fhir_base,
        location=created,
    )


async def conditional_delete_type(ctx: FhirContext, resource_type: str) -> Response:
    """http.html#cdelete: ``DELETE [type]?criteria``."""
    deleted = await conditional_delete(
        ctx.repo, resource_type, ctx.request.url.query, max_matches=ctx.settings.conditional_delete_max
    )
    if ctx.prefer.return_ == "minimal" or not deleted:
        return Response(status_code=204)
    names = ", ".join(f"{v.resource_type}/{v.fhir_id}" for v in deleted)
    outcome = operation_outcome([Issue("informational", f"deleted {names}", severity="information")])
    return json_response(outcome, ctx.fmt)


async def patch_instance(ctx: FhirContext, resource_type: str) -> Response:
    """http.html#patch: JSON Patch (application/json-patch+json) or FHIRPath Patch (Parameters)."""
    fhir_id = ctx.param("id")
    check_id(fhir_id)
    content_type = ctx.request.headers.get("content-type", "").split(";")[0].strip().lower()
    json_patch = content_type == "application/json-patch+json"
    if not json_patch:
        check_request_media_type(ctx.request)
    if_match = parse_etag(ctx.request.headers.get("if-match"))
    body = parse_body(await read_body(ctx.request, ctx.settings.max_body_bytes))
    if isinstance(body, list):
        json_patch = True
    version = await patch(ctx.repo, resource_type, fhir_id, body, json_patch=json_patch, if_match=if_match)
    return write_response(
        version, ctx.fmt, ctx.prefer, status=200, base=ctx.settings.fhir_base, location=False
    )


async def update(ctx: FhirContext, resource_type: str) -> Response:
    """http.html#update, including update-as-create and If-Match (http.html#concurrency)."""
    fhir_id = ctx.param("id")
    check_id(fhir_id)
    check_request_media_type(ctx.request)
    if_match = parse_etag(ctx.request.headers.get("if-match"))
    data = parse_resource(
        await read_body(ctx.request, ctx.settings.max_body_bytes), resource_type, url_id=fhir_id
    )
    version, created = await ctx.repo.update(resource_type, fhir_id, data, if_match=if_match)
    return write_response(
        version,
        ctx.fmt,
        ctx.prefer,
        status=201 if created else 200,
        base=ctx.settings.fhir_base,
        location=created,
    )


async def delete(ctx: FhirContext, resource_type: str) -> Response:
    """http.html#delete"""
    fhir_id = ctx.param("id")
    check_id(fhir_id)
    if_match = parse_etag(ctx.request.headers.get("if-match"))
    version = await ctx.repo.delete(resource_type, fhir_id, if_match=if_match)
    headers = {"ETag": f'W/"{version.version_id}"'}
    if ctx.prefer.return_ == "minimal":
        return Response(status_code=204, headers=headers)
    outcome = operation_outcome(
        [Issue("informational", f"{resource_type}/{fhir_id} deleted", severity="information")]
    )
    return json_response(outcome, ctx.fmt, headers=headers)


async def history(ctx: FhirContext, resource_type: str | None, fhir_id: str | None = None) -> Response:
    """http.html#history for an instance, a type or the system; keyset-paged."""
    query = ctx.request.query_params
    since_value = query.get("_since")
    since = parse_instant(since_value, "_since") if since_value else None
    settings = ctx.settings
    count = parse_count(
        query.get("_count"), default=settings.history_default_count, maximum=settings.history_max_count
    )
    token = query.get("_cursor")
    cursor = ctx.cursors.decode(token) if token else None
    if cursor is not None and not isinstance(cursor, int):
        raise BadRequest("_cursor: not a history cursor", expression=("_cursor",))
    page = await ctx.repo.history(
        resource_type=resource_type, fhir_id=fhir_id, since=since, count=count, cursor=cursor
    )
    path = "/".join(part for part in (resource_type, fhir_id) if part)
    url = f"{settings.fhir_base}/{path + '/' if path else ''}_history"
    kept = {k: v for k, v in (("_since", since_value), ("_count", str(count))) if v is not None}
    first_url = f"{url}?{urlencode(kept)}"
    self_url = f"{url}?{urlencode({**kept, '_cursor': token})}" if token else first_url
    next_url = (
        f"{url}?{urlencode({**kept, '_cursor': ctx.cursors.encode(page.next_cursor)})}"
        if page.next_cursor
        else None
    )
    body = history_bundle(
        page.versions, base=settings.fhir_base, self_url=self_url, next_url=next_url, first_url=first_url
    )
    return json_response(body, ctx.fmt)


async def instance_history(ctx: FhirContext, resource_type: str) -> Response:
    fhir_id = ctx.param("id")
    check_id(fhir_id)
    return await history(ctx, resource_type, fhir_id)


async def type_history(ctx: FhirContext, resource_type: str) -> Response:
    return await history(ctx, resource_type)


async def _search_pairs(ctx: FhirContext) -> list[tuple[str, str]]:
    """Query parameters, plus the form body of ``POST .../_search`` (search.html#Introduction)."""
    request = ctx.request
    pairs = list(request.query_params.multi_items())
    if request.method == "POST":
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded parameters")
        raw = await read_body(request, ctx.settings.max_body_bytes)
        try:
            pairs.extend(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError as exc:
            raise BadRequest("the form body is not UTF-8") from exc
    return pairs


async def search_type(ctx: FhirContext, resource_type: str) -> Response:
    """search.html: ``GET [type]?...`` and ``POST [type]/_search``."""
    body = await run_search(
        ctx.repo,
        resource_types=(resource_type,),
        pairs=await _search_pairs(ctx),
        cursors=ctx.cursors,
        strict=ctx.prefer.handling == "strict",
        path=resource_type,
    )
    return json_response(body, ctx.fmt)


async def compartment_search(ctx: FhirContext, resource_type: str) -> Response:
    """``GET Patient/[id]/[type]?...`` (R4 CompartmentDefinition/patient)."""
    patient_id = ctx.param("id")
    check_id(patient_id)
    body = await run_search(
        ctx.repo,
        resource_types=(resource_type,),
        pairs=await _search_pairs(ctx),
        cursors=ctx.cursors,
        strict=ctx.prefer.handling == "strict",
        path=f"Patient/{patient_id}/{resource_type}",
        compartment=("Patient", patient_id),
    )
    return json_response(body, ctx.fmt)


# -- operations (R4 operations.html) ------------------------------------------------------------

OPERATIONS = OperationRegistry(
    (
        VALIDATE,
        META,
        SUBSCRIPTION_STATUS,
        SUBSCRIPTION_EVENTS,
        SUBSCRIPTION_WS_BINDING_TOKEN,
        EXPORT,
        PATIENT_EXPORT,
        GROUP_EXPORT,
        EVERYTHING,
        EXTRACT,
        PROGRESS,
        REFERRAL_METRICS,
    )
)
"""Every ``$operation`` the server offers; routes, OperationDefinitions, the CapabilityStatement
and the OpenAPI document all come from it. Register a new operation here."""

OPERATION_PATHS: tuple[tuple[Level, str], ...] = (
    ("system", "/${operation}"),
    ("type", "/{resource_type}/${operation}"),
    ("instance", "/{resource_type}/{id}/${operation}"),
)
"""Routed before the generic interaction and compartment routes: ``Patient/1/$everything`` is an
operation (unknown until one is registered), not a compartment search of type ``$everything``."""

_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]


async def _operation_parameters(ctx: FhirContext, operation: Operation) -> OperationParameters:
    """operations.html#request: the query string, plus a POST body (Parameters, or the
    operation's body resource by itself); an empty POST body carries no parameters."""
    request = ctx.request
    body = None
    if request.method == "POST":
        raw = await read_body(request, ctx.settings.max_body_bytes)
        if raw.strip():
            check_request_media_type(request)
            body = parse_body(raw)
    return parse_parameters(operation, request.query_params.multi_items(), body)


def _operation_endpoint(level: Level) -> Callable[[ContextDep], Awaitable[Response]]:
    async def endpoint(ctx: ContextDep) -> Response:
        path = ctx.request.path_params
        resource_type: str | None = path.get("resource_type")
        fhir_id: str | None = path.get("id")
        if resource_type is not None:
            check_resource_type(resource_type)
        if fhir_id is not None:
            check_id(fhir_id)
        operation = OPERATIONS.resolve(path["operation"], level, resource_type, ctx.request.method)
        ctx.repo.interaction = "operation"
        parameters = await _operation_parameters(ctx, operation)
        return await operation.handler(ctx, resource_type, fhir_id, parameters)

    return endpoint


def _typed_operation_endpoint(
    operation: Operation, resource_type: str | None
) -> Callable[[ContextDep], Awaitable[Response]]:
    """A documented copy (docs_router) of one operation at one level and type."""

    async def endpoint(ctx: ContextDep) -> Response:
        fhir_id = ctx.request.path_params.get("id")
        parameters = await _operation_parameters(ctx, operation)
        return await operation.handler(ctx, resource_type, fhir_id, parameters)

    return endpoint


def _operation_body_doc(operation: Operation, resource_type: str | None) -> dict[str, Any]:
    """A Parameters resource, or the operation's body resource by itself."""
    schema: dict[str, Any] = {"$ref": "#/components/schemas/Parameters"}
    if operation.body_resource is not None and resource_type is not None:
        schema = {"oneOf": [schema, {"$ref": f"#/components/schemas/{resource_type}"}]}
    required = any(p.min > 0 for p in operation.inputs) or operation.body_resource is not None
    return {"required": required, "content": {FHIR_JSON_CONTENT: {"schema": schema}}}


def _operation_doc(
    operation: Operation, level: Level, resource_type: str | None, method: str
) -> dict[str, Any]:
    parameters = _path_doc(["id"]) if level == "instance" else []
    extra: dict[str, Any] = {"parameters": parameters}
    primitives = [p for p in operation.inputs if p.kind == "primitive"]
    if method == "GET" or operation.body_resource is not None:
        # With a body resource by itself, primitives travel in the URL (operations.html#request).
        for parameter in primitives:
            doc = _query_doc(parameter.name, parameter.documentation or f"{parameter.type} parameter")
            if parameter.codes:
                doc["schema"] = {"type": "string", "enum": list(parameter.codes)}
            parameters.append(doc)
    if method == "GET":
        for name in operation.query_only:
            parameters.append(_query_doc(name, "Paging state from a next link (opaque; do not build it)"))
    if method == "POST":
        extra["requestBody"] = _operation_body_doc(operation, resource_type)
    return extra


def _register_operations() -> None:
    for level, path in OPERATION_PATHS:
        router.add_api_route(
            path,
            _operation_endpoint(level),
            methods=_EVERY_METHOD,
            include_in_schema=False,
            response_class=Response,
        )
    for operation in OPERATIONS:
        for level in operation.levels:
            types: tuple[str | None, ...] = (None,) if level == "system" else operation.types
            for resource_type in types:
                prefix = "" if resource_type is None else f"/{resource_type}"
                path = prefix + ("/{id}" if level == "instance" else "") + f"/${operation.name}"
                for method in operation.methods:
                    suffix = "" if method == "GET" or len(operation.methods) == 1 else "_post"
                    target = f"_{resource_type}" if resource_type else ""
                    docs_router.add_api_route(
                        path,
                        _typed_operation_endpoint(operation, resource_type),
                        methods=[method],
                        tags=[resource_type or "system"],
                        summary=f"${operation.name} ({level} level): {operation.title}",
                        description=operation.description,
                        operation_id=f"{operation.name.replace('-', '_')}_{level}{target}{suffix}",
                        response_class=Response,
                        openapi_extra=_operation_doc(operation, level, resource_type, method),
                        responses=_responses(
                            200, operation.ok_schema.format(type=resource_type), operation.errors
                        ),
                    )


# -- routing ---------------------------------------------------------------------------------

Handler = Callable[[FhirContext, str], Awaitable[Response]]


@dataclass(frozen=True)
class Interaction:
    code: str  # CapabilityStatement interaction code ("" = a form of another interaction)
    method: str
    path: str  # below /fhir/{type}
    handler: Handler
    summary: str
    ok: int
    ok_schema: str  # "{type}" or a schema name
    errors: tuple[int, ...]
    body: str | None = None  # "resource" or "form"


INTERACTION_TABLE: tuple[Interaction, ...] = (
    Interaction(
        "history-type", "GET", "/_history", type_history, "Type history of {type}", 200, "Bundle", (400,)
    ),
    Interaction("search-type", "GET", "", search_type, "Search {type} resources", 200, "Bundle", (400,)),
    Interaction(
        "",
        "POST",
        "/_search",
        search_type,
        "Search {type} (form body)",
        200,
        "Bundle",
        (400, 415),
        body="form",
    ),
    Interaction(
        "create", "POST", "", create, "Create a {type}", 201, "{type}", (400, 413, 415, 422), body="resource"
    ),
    Interaction("read", "GET", "/{id}", read, "Read a {type}", 200, "{type}", (400, 404, 410)),
    Interaction(
        "update",
        "PUT",
        "/{id}",
        update,
        "Update (or create) a {type}",
        200,
        "{type}",
        (400, 412, 413, 415, 422),
        body="resource",
    ),
    Interaction(
        "delete", "DELETE", "/{id}", delete, "Delete a {type}", 200, "OperationOutcome", (400, 404, 412)
    ),
    Interaction(
        "patch",
        "PATCH",
        "/{id}",
        patch_instance,
        "Patch a {type} (JSON Patch or FHIRPath Patch)",
        200,
        "{type}",
        (400, 404, 412, 415, 422),
        body="patch",
    ),
    Interaction(
        "",
        "PUT",
        "",
        conditional_update_type,
        "Conditional update of a {type} (PUT ?criteria)",
        200,
        "{type}",
        (400, 412, 413, 415, 422),
        body="resource",
    ),
    Interaction(
        "",
        "DELETE",
        "",
        conditional_delete_type,
        "Conditional delete of {type} (DELETE ?criteria)",
        200,
        "OperationOutcome",
        (400, 412),
    ),
    Interaction(
        "history-instance",
        "GET",
        "/{id}/_history",
        instance_history,
        "History of one {type}",
        200,
        "Bundle",
        (400, 404),
    ),
    Interaction(
        "vread",
        "GET",
        "/{id}/_history/{vid}",
        vread,
        "Read one version of a {type}",
        200,
        "{type}",
        (400, 404, 410),
    ),
)


def _content(name: str) -> dict[str, Any]:
    return {"content": {FHIR_JSON_CONTENT: {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _responses(ok: int, name: str, errors: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {ok: {"description": "Success", **_content(name)}}
    for status in errors:
        out[status] = {"description": "OperationOutcome", **_content("OperationOutcome")}
    return out


def _query_doc(name: str, description: str) -> dict[str, Any]:
    return {
        "in": "query",
        "name": name,
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


SEARCH_RESULT_PARAMETERS = (
    ("_count", "Page size (default 20, maximum 1000)"),
    ("_sort", "Comma-separated sort keys; prefix - for descending"),
    ("_include", "Type:parameter[:target] to include referenced resources"),
    ("_revinclude", "Type:parameter to include resources that reference the matches"),
    ("_total", "none | estimate | accurate"),
    ("_summary", "true | text | data | count | false"),
    ("_elements", "Comma-separated top-level elements to return"),
    ("_cursor", "Opaque paging cursor from a Bundle link"),
)


def _search_parameters_doc(resource_type: str) -> list[dict[str, Any]]:
    """A type's search parameters for OpenAPI: every R4 search parameter it supports."""
    documented = [
        _query_doc(name, f"{param.type} search parameter ({param.url})")
        for name, param in sorted(registry().for_type(resource_type).items())
        if resource_type not in IMMUTABLE_TYPES or name in AUDIT_SEARCH_PARAMETERS
    ]
    results: tuple[tuple[str, str], ...] = SEARCH_RESULT_PARAMETERS
    if resource_type in IMMUTABLE_TYPES:  # the audit store: sorted by date, no includes
        results = tuple(p for p in results if p[0] not in ("_include", "_revinclude"))
    return documented + [_query_doc(name, text) for name, text in results]


def _path_doc(names: list[str]) -> list[dict[str, Any]]:
    return [{"in": "path", "name": n, "required": True, "schema": {"type": "string"}} for n in names]


def _generic_endpoint(handler: Handler) -> Callable[[ContextDep], Awaitable[Response]]:
    async def endpoint(ctx: ContextDep) -> Response:
        resource_type = ctx.param("resource_type")
        check_resource_type(resource_type)
        return await handler(ctx, resource_type)

    return endpoint


def _typed_endpoint(handler: Handler, resource_type: str) -> Callable[[ContextDep], Awaitable[Response]]:
    async def endpoint(ctx: ContextDep) -> Response:
        return await handler(ctx, resource_type)

    return endpoint


def _openapi_extra(interaction: Interaction, resource_type: str, path: str) -> dict[str, Any]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    parameters = _path_doc(names)
    if interaction.handler in (search_type, compartment_search):
        parameters += _search_parameters_doc(resource_type)
    extra: dict[str, Any] = {"parameters": parameters}
    if interaction.body == "resource":
        extra["requestBody"] = {"required": True, **_content(resource_type)}
    elif interaction.body == "patch":
        extra["requestBody"] = {
            "required": True,
            "content": {
                "application/json-patch+json": {"schema": {"type": "array", "items": {"type": "object"}}},
                FHIR_JSON_CONTENT: {"schema": {"$ref": "#/components/schemas/Parameters"}},
            },
        }
    elif interaction.body == "form":
        form = {"schema": {"type": "object", "additionalProperties": {"type": "string"}}}
        extra["requestBody"] = {"required": False, "content": {"application/x-www-form-urlencoded": form}}
    return extra


_UNLISTED_OPERATIONS: dict[Handler, str] = {
    search_type: "search-post",
    conditional_update_type: "conditional-update",
    conditional_delete_type: "conditional-delete",
}


READ_ONLY_HANDLERS: frozenset[Handler] = frozenset({read, vread, search_type, compartment_search})
"""What the read-only types (repository.IMMUTABLE_TYPES) document and list."""


HOT_HANDLERS: frozenset[Handler] = frozenset({read, search_type, create, update})
"""The interactions ``hot_router`` matches first."""


def _dispatch_methods(method: str) -> list[str]:
    """HEAD is answered wherever GET is: the same headers, no body (RFC 9110 9.3.2)."""
    return [method, "HEAD"] if method == "GET" else [method]


def _register() -> None:
    for interaction in INTERACTION_TABLE:
        router.add_api_route(
            "/{resource_type}" + interaction.path,
            _generic_endpoint(interaction.handler),
            methods=_dispatch_methods(interaction.method),
            include_in_schema=False,
            response_class=Response,
        )
    compartment = Interaction(
        "", "GET", "", compartment_search, "Search {type} in a Patient's compartment", 200, "Bundle", (400,)
    )
    router.add_api_route(
        "/Patient/{id}/{resource_type}",
        _generic_endpoint(compartment_search),
        methods=_dispatch_methods("GET"),
        include_in_schema=False,
        response_class=Response,
    )
    for interaction in INTERACTION_TABLE:
        if interaction.handler in HOT_HANDLERS:
            hot_router.add_api_route(
                "/{resource_type:fhirtype}" + interaction.path.replace("{id}", "{id:fhirid}"),
                _generic_endpoint(interaction.handler),
                methods=_dispatch_methods(interaction.method),
                include_in_schema=False,
                response_class=Response,
            )
    for resource_type in SERVED_TYPES:
        in_compartment = resource_type == "Patient" or resource_type in registry().patient_compartment
        entries = [(i, f"/{resource_type}{i.path}") for i in INTERACTION_TABLE]
        if in_compartment:
            entries.append((compartment, f"/Patient/{{id}}/{resource_type}"))
        for interaction, path in entries:
            if resource_type in IMMUTABLE_TYPES and interaction.handler not in READ_ONLY_HANDLERS:
                continue  # AuditEvent: read-only (app/audit/fhir.py); writes and history answer 405
            operation = interaction.code or _UNLISTED_OPERATIONS.get(
                interaction.handler, "search-compartment"
            )
            docs_router.add_api_route(
                path,
                _typed_endpoint(interaction.handler, resource_type),
                methods=[interaction.method],
                tags=[resource_type],
                summary=interaction.summary.format(type=resource_type),
                operation_id=f"{operation.replace('-', '_')}_{resource_type}",
                response_class=Response,
                openapi_extra=_openapi_extra(interaction, resource_type, path),
                responses=_responses(
                    interaction.ok, interaction.ok_schema.format(type=resource_type), interaction.errors
                ),
            )
            if interaction.code:
                INTERACTIONS.setdefault(resource_type, []).append(interaction.code)


@router.api_route("/_history", methods=["GET", "HEAD"], include_in_schema=False, response_class=Response)
async def _system_history_route(ctx: ContextDep) -> Response:
    return await history(ctx, None)


async def system_search(ctx: FhirContext) -> Response:
    """System-level search (search.html#Introduction): common parameters over ``_type``."""
    pairs = await _search_pairs(ctx)
    requested = [t for value in (v for k, v in pairs if k == "_type") for t in value.split(",") if t]
    access = ctx.repo.access
    for resource_type in requested:
        check_resource_type(resource_type)
        access.require(resource_type, "s")
    if len(set(requested)) > 1 and set(requested) & IMMUTABLE_TYPES:
        raise BadRequest(
            "AuditEvent is searched on its own (_type=AuditEvent alone, or GET [base]/AuditEvent)",
            expression=("_type",),
        )
    # Without _type: every type the token may search (SMART: "s" on each), the clinical store's;
    # the audit trail (its own store) only when asked for.
    types = tuple(dict.fromkeys(requested)) or tuple(
        t for t in SERVED_TYPES if t not in IMMUTABLE_TYPES and access.allows(t, "s")
    )
    if not types:
        raise Forbidden("the access token does not allow searching any resource type")
    body = await run_search(
        ctx.repo,
        resource_types=types,
        pairs=pairs,
        cursors=ctx.cursors,
        strict=ctx.prefer.handling == "strict",
        path="",
    )
    return json_response(body, ctx.fmt)


async def _system_search_route(ctx: ContextDep) -> Response:
    return await system_search(ctx)


async def _bundle_route(ctx: ContextDep) -> Response:
    """http.html#transaction and #batch: ``POST [base]`` with a Bundle."""
    check_request_media_type(ctx.request)
    raw = parse_body(await read_body(ctx.request, ctx.settings.max_body_bytes))
    if isinstance(raw, dict) and raw.get("type") in ("batch", "transaction"):
        ctx.repo.interaction = raw["type"]
    result = await process_bundle(
        ctx.repo,
        raw,
        max_entries=ctx.settings.max_bundle_entries,
        conditional_delete_max=ctx.settings.conditional_delete_max,
        prefer=ctx.prefer,
        cursors=ctx.cursors,
        max_resources=ctx.settings.max_bundle_resources,
    )
    return json_response(result, ctx.fmt)


router.add_api_route(
    "",
    _system_search_route,
    methods=_dispatch_methods("GET"),
    include_in_schema=False,
    response_class=Response,
)
router.add_api_route(
    "/_search", _system_search_route, methods=["POST"], include_in_schema=False, response_class=Response
)
docs_router.add_api_route(
    "/_history",
    _system_history_route,
    methods=["GET"],
    tags=["system"],
    operation_id="history_system",
    summary="History of the whole server",
    response_class=Response,
    responses=_responses(200, "Bundle", (400,)),
)
docs_router.add_api_route(
    "",
    _system_search_route,
    methods=["GET"],
    tags=["system"],
    operation_id="search_system",
    summary="Search several types (_type) or all",
    response_class=Response,
    openapi_extra={"parameters": [_query_doc("_type", "Comma-separated resource types")]},
    responses=_responses(200, "Bundle", (400,)),
)
docs_router.add_api_route(
    "/_search",
    _system_search_route,
    methods=["POST"],
    tags=["system"],
    operation_id="search_system_post",
    summary="Search several types (form body)",
    response_class=Response,
    responses=_responses(200, "Bundle", (400, 415)),
)
router.add_api_route("", _bundle_route, methods=["POST"], include_in_schema=False, response_class=Response)
docs_router.add_api_route(
    "",
    _bundle_route,
    methods=["POST"],
    tags=["system"],
    operation_id="transaction_or_batch",
    summary="Process a batch or transaction Bundle",
    response_class=Response,
    openapi_extra={"requestBody": {"required": True, **_content("Bundle")}},
    responses=_responses(200, "Bundle", (400, 404, 409, 412, 413, 415, 422)),
)
_register_operations()  # before the generic routes: their {id} and {resource_type} match $names
_register()


def unsupported_routes() -> APIRouter:
    """Registered last: any other path under /fhir is a 404 OperationOutcome (405 for a wrong method)."""
    catch_all = APIRouter(prefix="/fhir", include_in_schema=False)
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]

    @catch_all.api_route("/{resource_type}", methods=methods)
    @catch_all.api_route("/{resource_type}/{rest:path}", methods=methods)
    async def unsupported(resource_type: str, request: Request) -> Response:
        check_resource_type(resource_type)
        rest = request.path_params.get("rest", "")
        if rest.count("/") >= 3:
            raise NotFound(f"unknown path {request.url.path}")
        raise MethodNotAllowed(f"{request.method} is not supported on {request.url.path}")

    return catch_all
