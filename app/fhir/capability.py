"""The CapabilityStatement (FHIR R4 capabilitystatement.html), generated from the
type registry and the interactions actually routed, so it cannot drift from the code."""

from __future__ import annotations

from typing import Any

from app.fhir.models import FHIR_VERSION
from app.fhir.search_params import SearchRegistry, registry
from app.fhir.types import SERVED_TYPES

SOFTWARE_VERSION = "0.1.0"
RELEASE_DATE = "2026-11-25"


def capability_statement(
    *,
    fhir_base: str,
    interactions: dict[str, list[str]],
    system_interactions: list[str],
    conditional_delete_max: int = 1,
) -> dict[str, Any]:
    resources = []
    search = registry()
    for resource_type in SERVED_TYPES:
        routed = interactions.get(resource_type, [])
        entry: dict[str, Any] = {
            "type": resource_type,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
            "interaction": [{"code": code} for code in routed],
            "versioning": "versioned-update",
            "readHistory": "vread" in routed,
            "updateCreate": "update" in routed,
            "conditionalCreate": "create" in routed,
            "conditionalRead": "full-support",
            "conditionalUpdate": "update" in routed,
            "conditionalDelete": "multiple" if conditional_delete_max > 1 else "single",
        }
        if "search-type" in routed:
            entry.update(_search_capabilities(search, resource_type))
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": RELEASE_DATE,
        "publisher": "carecoord",
        "kind": "instance",
        "software": {"name": "carecoord", "version": SOFTWARE_VERSION},
        "implementation": {"description": "carecoord FHIR R4 care-coordination API", "url": fhir_base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "resource": resources,
                "interaction": [{"code": code} for code in system_interactions],
                "searchParam": [
                    {"name": name, "definition": param.url, "type": param.type}
                    for name, param in sorted(search.for_type("Patient").items())
                    if name in ("_id", "_lastUpdated", "_tag", "_profile", "_security", "_source")
                ],
            }
        ],
    }


def _search_capabilities(search: SearchRegistry, resource_type: str) -> dict[str, Any]:
    """searchParam, searchInclude and searchRevInclude from the generated parameter table."""
    params = search.for_type(resource_type)
    references = sorted(name for name, param in params.items() if param.type == "reference")
    revincludes = sorted(
        f"{other}:{name}"
        for other in SERVED_TYPES
        for name, param in search.for_type(other).items()
        if param.type == "reference" and (resource_type in param.targets or not param.targets)
    )
    return {
        "searchInclude": ["*", *(f"{resource_type}:{name}" for name in references)],
        "searchRevInclude": revincludes,
        "searchParam": [
            {"name": name, "definition": param.url, "type": param.type}
            for name, param in sorted(params.items())
        ],
    }
