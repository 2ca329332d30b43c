"""``GET /fhir/metadata``: the CapabilityStatement (http.html#capabilities), and the
OperationDefinitions of the server's operations it points at (``/fhir/OperationDefinition``,
read and search); no auth needed: they describe the server, not its data."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.deps import SettingsDep
from app.exports.operations import CAPABILITY_STATEMENT as BULK_DATA_CAPABILITY
from app.fhir import jsonio
from app.fhir.capability import capability_statement
from app.fhir.errors import BadRequest, MethodNotAllowed, NotFound
from app.fhir.operations import operation_definition
from app.fhir.responses import FormatDep, json_response
from app.routers.fhir import INTERACTIONS, OPERATIONS, SYSTEM_INTERACTIONS
from app.settings import Settings
from app.subscriptions.topics import subscription_capabilities

router = APIRouter(prefix="/fhir", tags=["system"])


@router.get(
    "/metadata",
    operation_id="capabilities",
    summary="The server's CapabilityStatement",
    response_class=Response,
    responses={
        200: {
            "description": "CapabilityStatement",
            "content": {
                "application/fhir+json": {"schema": {"$ref": "#/components/schemas/CapabilityStatement"}}
            },
        }
    },
)
async def metadata(request: Request, settings: SettingsDep, fmt: FormatDep) -> Response:
    # Built once per application: it depends only on the registry, the routes and settings.
    cached: str | None = getattr(request.app.state, "capability_json", None)
    if cached is None:
        statement = capability_statement(
            fhir_base=settings.fhir_base,
            base_url=settings.base_url,
            interactions=INTERACTIONS,
            system_interactions=SYSTEM_INTERACTIONS,
            operations=OPERATIONS,
            conditional_delete_max=settings.conditional_delete_max,
            cors=bool(settings.cors_origins.strip()),
            resource_details={"Subscription": subscription_capabilities()},
            instantiates=(BULK_DATA_CAPABILITY,),
        )
        cached = request.app.state.capability_json = jsonio.dumps(statement).decode("utf-8")
    return json_response(cached, fmt)


_DEFINITION_CONTENT = {
    "application/fhir+json": {"schema": {"$ref": "#/components/schemas/OperationDefinition"}}
}
_OUTCOME = {
    "description": "OperationOutcome",
    "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}},
}
_READ_ONLY = ["POST", "PUT", "DELETE", "PATCH"]
_SEARCH_PARAMETERS = ("_id", "code", "name", "url")


def _definitions(settings: Settings) -> list[dict[str, Any]]:
    return [operation_definition(operation, settings.fhir_base) for operation in OPERATIONS]


@router.get(
    "/OperationDefinition/{definition_id}",
    operation_id="read_OperationDefinition",
    summary="Read the OperationDefinition of one of the server's operations",
    response_class=Response,
    responses={200: {"description": "OperationDefinition", "content": _DEFINITION_CONTENT}, 404: _OUTCOME},
)
async def read_operation_definition(definition_id: str, settings: SettingsDep, fmt: FormatDep) -> Response:
    operation = OPERATIONS.by_definition_id(definition_id)
    if operation is None:
        raise NotFound(f"OperationDefinition/{definition_id[:64]} is not known")
    return json_response(operation_definition(operation, settings.fhir_base), fmt)


@router.get(
    "/OperationDefinition",
    operation_id="search_OperationDefinition",
    summary="Search the OperationDefinitions of the server's operations (_id, code, name, url)",
    response_class=Response,
    openapi_extra={
        "parameters": [
            {"in": "query", "name": name, "required": False, "schema": {"type": "string"}}
            for name in _SEARCH_PARAMETERS
        ]
    },
    responses={
        200: {
            "description": "searchset Bundle",
            "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/Bundle"}}},
        },
        400: _OUTCOME,
    },
)
async def search_operation_definitions(request: Request, settings: SettingsDep, fmt: FormatDep) -> Response:
    """Exact matches on ``_id``, ``code``, ``name`` and ``url`` (several values: comma-separated,
    any of them); every definition without parameters."""
    found = _definitions(settings)
    for name, value in request.query_params.multi_items():
        if name in ("_format", "_pretty"):
            continue
        if name not in _SEARCH_PARAMETERS:
            raise BadRequest(
                f"unknown search parameter '{name[:64]}' for OperationDefinition", expression=(name[:64],)
            )
        wanted = set(value.split(","))
        key = "id" if name == "_id" else name
        found = [definition for definition in found if definition.get(key) in wanted]
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(found),
        "link": [{"relation": "self", "url": str(request.url)}],
        "entry": [
            {
                "fullUrl": definition["url"],
                "resource": definition,
                "search": {"mode": "match"},
            }
            for definition in found
        ],
    }
    if not found:
        bundle.pop("entry")
    return json_response(bundle, fmt)


router.add_api_route(
    "/OperationDefinition/{definition_id}",
    read_operation_definition,
    methods=["HEAD"],
    include_in_schema=False,
    response_class=Response,
)
router.add_api_route(
    "/OperationDefinition",
    search_operation_definitions,
    methods=["HEAD"],
    include_in_schema=False,
    response_class=Response,
)


@router.api_route("/OperationDefinition", methods=_READ_ONLY, include_in_schema=False)
@router.api_route("/OperationDefinition/{rest:path}", methods=_READ_ONLY, include_in_schema=False)
async def _read_only(request: Request) -> Response:
    raise MethodNotAllowed(
        f"{request.method} is not supported on {request.url.path}: OperationDefinitions are read-only",
        headers={"Allow": "GET, HEAD"},
    )
