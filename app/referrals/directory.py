"""The partner directory, FHIR-native (issue 6): a partner is an Organization whose
``endpoint`` names an active Endpoint with connectionType ``hl7-fhir-rest``; its
``address`` is the partner's FHIR base. A partner without one works in "light" mode (its
clients poll carecoord's worklist), so nothing is delivered to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asyncpg import Connection

from app.fhir import jsonio

CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
FHIR_REST = "hl7-fhir-rest"

_BODY = "SELECT body FROM resource WHERE resource_type = $1 AND fhir_id = $2 AND NOT deleted"


@dataclass(frozen=True)
class Partner:
    """A delivery target: a local Organization and its FHIR REST Endpoint."""

    organization_id: str
    endpoint_id: str
    base_url: str
    """Endpoint.address: the partner's FHIR base, without a trailing slash."""


def _is_fhir_rest(endpoint: dict[str, Any]) -> bool:
    coding = endpoint.get("connectionType") or {}
    return (
        endpoint.get("status") == "active"
        and coding.get("code") == FHIR_REST
        and coding.get("system", CONNECTION_TYPE_SYSTEM) == CONNECTION_TYPE_SYSTEM
        and isinstance(endpoint.get("address"), str)
        and endpoint["address"].startswith(("http://", "https://"))
    )


async def find_partner(conn: Connection, organization_id: str) -> Partner | None:
    """The FHIR REST endpoint of a partner Organization, or None (light mode, or not a partner)."""
    body = await conn.fetchval(_BODY, "Organization", organization_id)
    if body is None:
        return None
    organization = jsonio.loads(body)
    for reference in organization.get("endpoint") or []:
        target = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(target, str) or not target.startswith("Endpoint/"):
            continue
        endpoint_id = target.split("/", 1)[1]
        endpoint_body = await conn.fetchval(_BODY, "Endpoint", endpoint_id)
        if endpoint_body is None:
            continue
        endpoint = jsonio.loads(endpoint_body)
        if _is_fhir_rest(endpoint):
            return Partner(organization_id, endpoint_id, endpoint["address"].rstrip("/"))
    return None
