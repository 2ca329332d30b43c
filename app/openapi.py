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


def build_openapi(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(
        title="carecoord FHIR R4 API",
        version=app.version,
        description=(
            "FHIR R4 (4.0.1) care-coordination API. Bodies are FHIR JSON (application/fhir+json); "
            "errors are OperationOutcome resources."
        ),
        routes=app.routes,
    )
    fhir_schemas = json.loads(resources.files("app.fhir").joinpath("generated/openapi_schemas.json").read_text())
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.update(fhir_schemas)
    return document


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def openapi_json(app: FastAPI) -> str:
    return json.dumps(build_openapi(app), indent=1, sort_keys=True) + "\n"
