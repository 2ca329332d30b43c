"""``GET /fhir/metadata``: the CapabilityStatement (http.html#capabilities); no auth needed."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.deps import SettingsDep
from app.fhir import jsonio
from app.fhir.capability import capability_statement
from app.fhir.responses import FormatDep, json_response
from app.routers.fhir import INTERACTIONS, SYSTEM_INTERACTIONS

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
            conditional_delete_max=settings.conditional_delete_max,
            cors=bool(settings.cors_origins.strip()),
        )
        cached = request.app.state.capability_json = jsonio.dumps(statement).decode("utf-8")
    return json_response(cached, fmt)
