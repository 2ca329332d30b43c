"""The OpenAPI document for mobile and integration clients.

FastAPI describes the routes; the component schemas of the FHIR types come from the
official R4 JSON schema (generated into app/fhir/generated/openapi_schemas.json), so
a generated client gets one typed model per served type.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.routers.fhir import docs_router


def build_openapi(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(
        title="carecoord FHIR R4 API",
        version=app.version,
        description=(
            "FHIR R4 (4.0.1) care-coordination API. Bodies are FHIR JSON (application/fhir+json); "
            "errors are OperationOutcome resources."
        ),
        routes=[*app.routes, *docs_router.routes],
    )
    _document_fhir_parameters(document)
    fhir_schemas = json.loads(
        resources.files("app.fhir").joinpath("generated/openapi_schemas.json").read_text()
    )
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.update(fhir_schemas)
    _document_security(document)
    return document


OPEN_PATHS = (
    "/fhir/metadata",
    "/fhir/.well-known/smart-configuration",
    "/fhir/OperationDefinition",
    "/fhir/OperationDefinition/{definition_id}",
)


def _document_security(document: dict[str, Any]) -> None:
    """OAuth2 authorization code (SMART App Launch) and client credentials (SMART Backend
    Services) on every FHIR interaction, and the
    401/403 OperationOutcomes they can answer (issue 4)."""
    document["components"]["securitySchemes"] = {
        "smart": {
            "type": "oauth2",
            "description": "SMART on FHIR. Apps that sign a person in: the authorization code flow with"
            " PKCE S256 (SMART App Launch standalone launch; public clients send client_id only); send"
            " aud={FHIR base} on the authorization request. Backend services: client_credentials with"
            " private_key_jwt or a client secret. Scopes are SMART 2.x (system|user|patient)/(Type|*).cruds",
            "flows": {
                "authorizationCode": {
                    "authorizationUrl": "/auth/authorize",
                    "tokenUrl": "/auth/token",
                    "refreshUrl": "/auth/token",
                    "scopes": {
                        "openid": "an id_token for the signed-in person",
                        "fhirUser": "the person's FHIR resource in the id_token (fhirUser)",
                        "launch/patient": "choose a patient at sign-in (the token's patient context)",
                        "offline_access": "a refresh token that outlives the app session",
                        "online_access": "a refresh token for the app session",
                        "patient/*.rs": "read and search the chosen patient's records",
                        "patient/*.cruds": "read and write the chosen patient's records",
                        "user/*.rs": "read and search what the signed-in person may see",
                        "user/*.cruds": "read and write what the signed-in person may see",
                    },
                },
                "clientCredentials": {
                    "tokenUrl": "/auth/token",
                    "scopes": {
                        "system/*.cruds": "everything",
                        "system/*.rs": "read and search every type",
                        "patient/*.rs": "read and search one patient's compartment",
                    },
                },
            },
        },
    }
    outcome = {
        "content": {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}}
    }
    for path, operations in document.get("paths", {}).items():
        if not path.startswith("/fhir") or path in OPEN_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"smart": []}]
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", {"description": "No or invalid access token", **outcome})
            responses.setdefault("403", {"description": "The token's scopes do not allow this", **outcome})


_QUERY = {
    "_format": "Response format: json, application/json or application/fhir+json (XML is not served)",
    "_pretty": "true to indent the JSON response",
}
_HISTORY_QUERY = {
    "_count": "Page size (history default 50, maximum 1000)",
    "_since": "Only versions written at or after this instant",
    "_cursor": "Opaque paging cursor from a Bundle link",
}
_HEADERS = {
    "put": {
        "If-Match": 'Version the update is based on, W/"n" (412 when stale)',
        "Prefer": "return=minimal|representation|OperationOutcome",
    },
    "post": {"Prefer": "return=minimal|representation|OperationOutcome"},
    "delete": {"If-Match": 'Version the delete is based on, W/"n"', "Prefer": "return=minimal for 204"},
}


def _document_fhir_parameters(document: dict[str, Any]) -> None:
    """Describe the FHIR HTTP parameters every interaction accepts (http.html#parameters)."""
    for path, operations in document.get("paths", {}).items():
        if not path.startswith("/fhir"):
            continue
        for method, operation in operations.items():
            responses = operation.get("responses", {})
            responses.pop("422", None) if "HTTPValidationError" in json.dumps(
                responses.get("422", {})
            ) else None
            params = operation.setdefault("parameters", [])
            query = dict(_QUERY)
            if path.endswith("/_history"):
                query.update(_HISTORY_QUERY)
            for name, description in query.items():
                params.append(
                    {
                        "in": "query",
                        "name": name,
                        "required": False,
                        "description": description,
                        "schema": {"type": "string"},
                    }
                )
            for name, description in _HEADERS.get(method, {}).items():
                params.append(
                    {
                        "in": "header",
                        "name": name,
                        "required": False,
                        "description": description,
                        "schema": {"type": "string"},
                    }
                )
    schemas = document.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and unused not in json.dumps(document["paths"]):
            schemas.pop(unused)


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def openapi_json(app: FastAPI) -> str:
    return json.dumps(build_openapi(app), indent=1, sort_keys=True) + "\n"
