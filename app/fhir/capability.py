"""The CapabilityStatement (FHIR R4 capabilitystatement.html), generated from the
type registry and the interactions actually routed, so it cannot drift from the code."""

from __future__ import annotations

from typing import Any

from app.fhir.models import FHIR_VERSION
from app.fhir.types import SERVED_TYPES

SOFTWARE_VERSION = "0.1.0"
RELEASE_DATE = "2026-11-25"


def capability_statement(
    *, fhir_base: str, interactions: dict[str, list[str]], system_interactions: list[str]
) -> dict[str, Any]:
    resources = []
    for resource_type in SERVED_TYPES:
        routed = interactions.get(resource_type, [])
        resources.append(
            {
                "type": resource_type,
                "profile": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
                "interaction": [{"code": code} for code in routed],
                "versioning": "versioned-update",
                "readHistory": "vread" in routed,
                "updateCreate": "update" in routed,
            }
        )
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
            }
        ],
    }
