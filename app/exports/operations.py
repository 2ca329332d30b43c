"""The ``$export`` kick-off (Bulk Data Access IG v2.0.0 export.html#bulk-data-kick-off-request):
``[base]/$export``, ``[base]/Patient/$export`` and ``[base]/Group/[id]/$export``, by GET or by
POST with a Parameters body.

The kick-off checks every parameter (a 400 with an OperationOutcome before anything is stored;
with ``Prefer: handling=lenient`` what is unsupported is skipped and reported in the export's
error file instead), resolves the types and patients, records the export with the caller's
access context and the database snapshot it will read (``transactionTime``), queues its job,
and answers 202 with ``Content-Location``: the status URL (app/exports/router.py).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from fastapi.responses import Response

from app.exports import store
from app.exports.jobs import EXPIRE_KIND, EXPORT_KIND, access_record
from app.exports.query import batch_query, compartment_types
from app.fhir.context import FhirContext
from app.fhir.errors import BadRequest, Forbidden, Issue
from app.fhir.operations import Operation, OperationParameter, OperationParameters
from app.fhir.params import parse_instant
from app.fhir.search import RESULT_PARAMETERS, SearchLimits
from app.fhir.types import SERVED_TYPES
from app.jobs import queue

BULK_DATA = "http://hl7.org/fhir/uv/bulkdata"
CAPABILITY_STATEMENT = f"{BULK_DATA}/CapabilityStatement/bulk-data"
NDJSON_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
_ELEMENT = re.compile(r"^([A-Z][A-Za-z]+\.)?[a-z][A-Za-z0-9]*(\[x\])?$")


def _prefer(ctx: FhirContext) -> tuple[bool, bool]:
    """(``respond-async`` asked for, ``handling=lenient`` asked for) from the Prefer headers."""
    tokens: dict[str, str] = {}
    for header in ctx.request.headers.getlist("prefer"):
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            tokens[name.strip().lower()] = value.strip().strip('"').lower()
    return "respond-async" in tokens, tokens.get("handling") == "lenient"


def _listed(parameters: OperationParameters, name: str) -> list[str]:
    """A repeatable, comma-separated string parameter's values."""
    values: list[str] = []
    for value in parameters.all(name):
        text = value.text() or ""
        values.extend(v.strip() for v in text.split(",") if v.strip())
    return values


class _Checks:
    """Collects what ``Prefer: handling=lenient`` lets the kick-off skip (reported in the error file)."""

    def __init__(self, lenient: bool) -> None:
        self.lenient = lenient
        self.issues: list[Issue] = []

    def unsupported(self, message: str, name: str, *, forbidden: bool = False) -> None:
        if not self.lenient:
            if forbidden:
                raise Forbidden(message, expression=(name,))
            raise BadRequest(message, code="not-supported", expression=(name,))
        self.issues.append(Issue("forbidden" if forbidden else "not-supported", message, "warning", (name,)))


async def kickoff(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    """Start an export (export.html#bulk-data-kick-off-request); 202 and the status URL."""
    respond_async, lenient = _prefer(ctx)
    if not respond_async:
        raise BadRequest(
            "$export runs asynchronously: send the header 'Prefer: respond-async'"
            " (Bulk Data IG export.html#headers)",
            code="invalid",
        )
    checks = _Checks(lenient)
    access = ctx.repo.access
    level = "system" if resource_type is None else ("patient" if fhir_id is None else "group")

    output_format = parameters.text("_outputFormat")
    if output_format is not None and output_format not in NDJSON_FORMATS:
        raise BadRequest(
            f"_outputFormat: only NDJSON is produced ({', '.join(NDJSON_FORMATS)})",
            code="not-supported",
            expression=("_outputFormat",),
        )
    for value in parameters.all("includeAssociatedData"):
        checks.unsupported(
            f"includeAssociatedData={str(value.text())[:40]}: associated data is not supported",
            "includeAssociatedData",
        )

    candidates = list(SERVED_TYPES) if level == "system" else compartment_types(SERVED_TYPES)
    requested = _listed(parameters, "_type")
    types: list[str] = []
    for name in requested:
        if name not in candidates:
            where = "served" if level == "system" else "in the Patient compartment"
            checks.unsupported(f"_type: {name[:64]} is not a resource type {where} here", "_type")
        elif not access.allows(name, "s"):
            checks.unsupported(
                f"_type: the access token does not allow reading {name}", "_type", forbidden=True
            )
        elif name not in types:
            types.append(name)
    if not requested:
        types = [t for t in candidates if access.allows(t, "s")]
    if not types and not checks.issues:
        raise Forbidden("the access token allows reading none of the types this export would contain")

    since = parameters.text("_since")
    since_at = parse_instant(since, "_since") if since else None

    elements = _listed(parameters, "_elements")
    for element in elements:
        if not _ELEMENT.match(element):
            raise BadRequest(f"_elements: '{element[:64]}' is not [Type.]element", expression=("_elements",))

    limits = SearchLimits.from_settings(ctx.settings)
    type_filters: dict[str, list[list[tuple[str, str]]]] = {}
    for value in parameters.all("_typeFilter"):
        text = value.text() or ""
        target, mark, query = text.partition("?")
        if not mark or target not in candidates:
            raise BadRequest(
                f"_typeFilter: '{text[:80]}' is not [type]?[search parameters] of an exported type",
                expression=("_typeFilter",),
            )
        pairs = parse_qsl(query, keep_blank_values=True)
        for name, _ in pairs:
            if name.split(":", 1)[0] in RESULT_PARAMETERS:
                raise BadRequest(
                    f"_typeFilter: '{name[:40]}' is not allowed in an export filter (search parameters"
                    " only; no _include, _revinclude, _sort or other result parameters)",
                    code="not-supported",
                    expression=("_typeFilter",),
                )
        if target not in types:
            checks.unsupported(f"_typeFilter: {target} is not among the exported types", "_typeFilter")
            continue
        # Compiled now, so that an unknown or malformed parameter is a 400 before anything starts.
        batch_query(
            target,
            kind="output",
            access=access,
            fhir_base=ctx.settings.fhir_base,
            limits=limits,
            type_filters=[pairs],
            strict=not lenient,
        )
        type_filters.setdefault(target, []).append(pairs)

    patients: list[str] | None = None
    given = parameters.all("patient")
    if given:
        if level == "system":
            raise BadRequest(
                "patient: only a Patient or Group level export takes patients", expression=("patient",)
            )
        patients = []
        for value in given:
            reference = value.value.get("reference") if isinstance(value.value, dict) else None
            kind, _, patient_id = str(reference or "").rpartition("/")
            if not kind.endswith("Patient") or not patient_id:
                raise BadRequest(
                    "patient: each value must be a Reference to a Patient", expression=("patient",)
                )
            patients.append(patient_id)
    if level == "group":
        assert fhir_id is not None
        members = await _group_members(ctx, fhir_id)
        patients = members if patients is None else [p for p in patients if p in set(members)]

    record: dict[str, Any] = {
        "types": types,
        "since": since_at.isoformat() if since_at else None,
        "elements": elements,
        "type_filters": type_filters,
        "compartment": level != "system",
        "patients": patients,
        "issues": [issue.as_json() for issue in checks.issues],
        "output_format": output_format or NDJSON_FORMATS[0],
    }
    settings = ctx.settings
    async with ctx.request.app.state.pool.acquire() as conn, conn.transaction():
        export = await store.create(
            conn,
            client_id=access.client_id,
            access=access_record(access),
            level=level,
            request_url=str(ctx.request.url),
            parameters=record,
            retention=settings.export_retention,
        )
        await queue.enqueue(conn, EXPORT_KIND, {"export": export.id}, key=export.id)
        await queue.enqueue(
            conn, EXPIRE_KIND, {"export": export.id}, key=export.id, not_before=export.expires_at
        )
    status_url = f"{settings.base_url}/bulkstatus/{export.id}"
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": f"export {export.id} accepted",
            }
        ],
    }
    return Response(
        json.dumps(outcome),
        status_code=202,
        media_type="application/fhir+json",
        headers={"Content-Location": status_url},
    )


async def _group_members(ctx: FhirContext, group_id: str) -> list[str]:
    """The Patients of an actual Group (its ``member.entity``, leaving out inactive members),
    read with the caller's access (404 when the caller may not see the Group)."""
    version = await ctx.repo.read("Group", group_id)
    group = json.loads(version.body or "{}")
    if group.get("actual") is not True:
        raise BadRequest(
            f"Group/{group_id} is not an actual group (Group.actual = true): it has no members to export",
            code="business-rule",
        )
    members: list[str] = []
    for member in group.get("member") or []:
        if member.get("inactive") is True:
            continue
        reference = str((member.get("entity") or {}).get("reference") or "")
        kind, _, patient_id = reference.rpartition("/")
        if kind.endswith("Patient") and patient_id and patient_id not in members:
            members.append(patient_id)
    return members


_PARAMETERS = (
    OperationParameter(
        "_outputFormat",
        "in",
        "string",
        documentation="application/fhir+ndjson (default), application/ndjson or ndjson",
    ),
    OperationParameter("_since", "in", "instant", documentation="Only resources changed after this instant"),
    OperationParameter("_type", "in", "string", max="*", documentation="Comma-separated resource types"),
    OperationParameter(
        "_elements", "in", "string", max="*", documentation="Comma-separated [Type.]element to keep"
    ),
    OperationParameter(
        "includeAssociatedData",
        "in",
        "code",
        max="*",
        documentation="Not supported: refused (or skipped with Prefer: handling=lenient)",
    ),
    OperationParameter(
        "_typeFilter",
        "in",
        "string",
        max="*",
        documentation="[type]?[search parameters]; alternatives per type",
    ),
)
_PATIENT = OperationParameter(
    "patient", "in", "Reference", max="*", documentation="Patients to export (POST only)"
)
_DESCRIPTION = (
    "Bulk Data Access IG v2.0.0 export: asynchronous (Prefer: respond-async), answered 202 with the"
    " status URL in Content-Location; poll it for the manifest of NDJSON files."
)
_ERRORS = (400, 401, 403, 404, 405)

EXPORT = Operation(
    name="export",
    title="Export all data (Bulk Data)",
    description=_DESCRIPTION,
    levels=("system",),
    handler=kickoff,
    parameters=_PARAMETERS,
    base=f"{BULK_DATA}/OperationDefinition/export",
    definition_id="export",
    get_allowed=True,
    errors=_ERRORS,
)
PATIENT_EXPORT = Operation(
    name="export",
    title="Export the data of all patients (Bulk Data)",
    description=_DESCRIPTION,
    levels=("type",),
    resource_types=("Patient",),
    handler=kickoff,
    parameters=(*_PARAMETERS, _PATIENT),
    base=f"{BULK_DATA}/OperationDefinition/patient-export",
    definition_id="patient-export",
    get_allowed=True,
    errors=_ERRORS,
)
GROUP_EXPORT = Operation(
    name="export",
    title="Export the data of a group's patients (Bulk Data)",
    description=_DESCRIPTION,
    levels=("instance",),
    resource_types=("Group",),
    handler=kickoff,
    parameters=(*_PARAMETERS, _PATIENT),
    base=f"{BULK_DATA}/OperationDefinition/group-export",
    definition_id="group-export",
    get_allowed=True,
    errors=_ERRORS,
)
