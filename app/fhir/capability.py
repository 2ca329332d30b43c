"""The CapabilityStatement (FHIR R4 capabilitystatement.html), generated from the
type registry, the interactions actually routed and the operation registry, so it cannot
drift from the code."""

from __future__ import annotations

from typing import Any

from app.audit.fhir import search_capabilities as audit_search_capabilities
from app.fhir.models import FHIR_VERSION
from app.fhir.operations import Level, OperationRegistry, definition_url
from app.fhir.repository import IMMUTABLE_TYPES
from app.fhir.search_params import SearchRegistry, registry
from app.fhir.types import SERVED_TYPES

SOFTWARE_VERSION = "0.1.0"
RELEASE_DATE = "2026-11-25"


def capability_statement(
    *,
    fhir_base: str,
    base_url: str,
    interactions: dict[str, list[str]],
    system_interactions: list[str],
    operations: OperationRegistry | None = None,
    conditional_delete_max: int = 1,
    cors: bool = True,
    resource_details: dict[str, dict[str, Any]] | None = None,
    instantiates: tuple[str, ...] = (),
) -> dict[str, Any]:
    resources = []
    search = registry()
    for resource_type in SERVED_TYPES:
        routed = [
            code
            for code in interactions.get(resource_type, [])
            # AuditEvents: read-only, one version each, in the audit store (app/audit/fhir.py).
            if not (resource_type in IMMUTABLE_TYPES and code not in ("read", "vread", "search-type"))
        ]
        entry: dict[str, Any] = {
            "type": resource_type,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
            "interaction": [{"code": code} for code in routed],
            # An AuditEvent has one version (versionId 1): vread works, there is no past version.
            "versioning": "versioned" if resource_type in IMMUTABLE_TYPES else "versioned-update",
            "readHistory": "vread" in routed and resource_type not in IMMUTABLE_TYPES,
            "updateCreate": "update" in routed,
            "conditionalCreate": "create" in routed,
            "conditionalRead": "full-support",
            "conditionalUpdate": "update" in routed,
            "conditionalDelete": (
                ("multiple" if conditional_delete_max > 1 else "single")
                if "delete" in routed
                else "not-supported"
            ),
        }
        if resource_type in IMMUTABLE_TYPES:
            entry.update(audit_search_capabilities())
        elif "search-type" in routed:
            entry.update(_search_capabilities(search, resource_type))
        # What a feature adds to its type's entry (the subscription topics on Subscription).
        entry.update((resource_details or {}).get(resource_type, {}))
        if operations is not None:
            listed = _operations(operations, fhir_base, resource_type)
            if listed:
                entry["operation"] = listed
        resources.append(entry)
    system_operations = []
    if operations is not None:
        resources.append(OPERATION_DEFINITION_RESOURCE)
        system_operations = _operations(operations, fhir_base, None)
    statement: dict[str, Any] = {
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
                "security": _security(base_url, cors=cors),
                "resource": resources,
                "interaction": [{"code": code} for code in system_interactions],
                **({"operation": system_operations} if system_operations else {}),
                "searchParam": [
                    {"name": name, "definition": param.url, "type": param.type}
                    for name, param in sorted(search.for_type("Patient").items())
                    if name in ("_id", "_lastUpdated", "_tag", "_profile", "_security", "_source")
                ],
            }
        ],
    }
    if instantiates:
        # What the server conforms to besides core FHIR (Bulk Data IG: CapabilityStatement/bulk-data).
        statement["instantiates"] = list(instantiates)
    return statement


OPERATION_DEFINITION_RESOURCE: dict[str, Any] = {
    "type": "OperationDefinition",
    "profile": "http://hl7.org/fhir/StructureDefinition/OperationDefinition",
    "interaction": [{"code": "read"}, {"code": "search-type"}],
    "searchParam": [
        {"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token"},
        {
            "name": "code",
            "definition": "http://hl7.org/fhir/SearchParameter/OperationDefinition-code",
            "type": "token",
        },
        {
            "name": "name",
            "definition": "http://hl7.org/fhir/SearchParameter/conformance-name",
            "type": "string",
        },
        {"name": "url", "definition": "http://hl7.org/fhir/SearchParameter/conformance-url", "type": "uri"},
    ],
}
"""The definitions of the server's operations (app/fhir/operations.py), read-only and open like
this statement (app/routers/metadata.py)."""


def _operations(
    operations: OperationRegistry, fhir_base: str, resource_type: str | None
) -> list[dict[str, Any]]:
    """rest.operation (system level, ``resource_type`` None) or rest.resource.operation (the type
    and instance levels of a type): name without ``$`` and the served definition's canonical."""
    levels: tuple[Level, ...] = ("system",) if resource_type is None else ("type", "instance")
    found = {o.name: o for level in levels for o in operations.at(level, resource_type)}
    return [{"name": name, "definition": definition_url(o, fhir_base)} for name, o in sorted(found.items())]


def _security(base_url: str, *, cors: bool) -> dict[str, Any]:
    """rest.security: SMART on FHIR, with the OAuth endpoints (SMART App Launch 2.x
    conformance.html; the well-known document is the primary source, this is for clients
    that still read the CapabilityStatement)."""
    return {
        "cors": cors,  # CARECOORD_CORS_ORIGINS (app/main.py)
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ],
                "text": "OAuth2 bearer tokens with SMART on FHIR scopes (App Launch standalone, Backend"
                " Services)",
            }
        ],
        "extension": [
            {
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [
                    {"url": "authorize", "valueUri": f"{base_url}/auth/authorize"},
                    {"url": "token", "valueUri": f"{base_url}/auth/token"},
                    {"url": "introspect", "valueUri": f"{base_url}/auth/introspect"},
                    {"url": "revoke", "valueUri": f"{base_url}/auth/revoke"},
                ],
            }
        ],
        "description": (
            "Every /fhir interaction except metadata and reading OperationDefinitions needs a bearer"
            " access token."
        ),
    }


def _search_capabilities(search: SearchRegistry, resource_type: str) -> dict[str, Any]:
    """searchParam, searchInclude and searchRevInclude from the generated parameter table."""
    params = search.for_type(resource_type)
    references = sorted(name for name, param in params.items() if param.type == "reference")
    revincludes = sorted(
        f"{other}:{name}"
        for other in SERVED_TYPES
        if other not in IMMUTABLE_TYPES  # the audit store is searched on its own
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
