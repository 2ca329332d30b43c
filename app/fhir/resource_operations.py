"""The R4 operations on Resource that carecoord offers: ``$validate`` and ``$meta``.

Declared from the R4 (4.0.1) definitions http://hl7.org/fhir/OperationDefinition/Resource-validate
(operation-resource-validate.html) and http://hl7.org/fhir/OperationDefinition/Resource-meta
(operation-resource-meta.html); the served OperationDefinitions are generated from these
declarations (app/fhir/operations.py). Both read through the request's repository, so they see
what the caller's token may see and nothing else.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response

from app.fhir import jsonio
from app.fhir.context import FhirContext
from app.fhir.errors import BadRequest, InvalidResource, Issue, operation_outcome
from app.fhir.operations import Operation, OperationParameter, OperationParameters
from app.fhir.repository import IMMUTABLE_TYPES
from app.fhir.responses import json_response
from app.fhir.validation import validate_resource

VALIDATION_MODES = ("create", "update", "delete", "profile")
"""R4 ValueSet resource-validation-mode (required binding of $validate's ``mode``)."""

BASE_PROFILE = "http://hl7.org/fhir/StructureDefinition/{type}"

_ALL_OK = Issue("informational", "All OK", severity="information")


async def validate(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    """R4 Resource-validate: would the content be acceptable generally, as a create, as an
    update of this resource, or is this resource allowed to be deleted? 200 with an
    OperationOutcome listing the problems ("All OK" when there are none); 4xx when the
    validation could not be done (a bad request, a resource the token cannot see)."""
    assert resource_type is not None  # type and instance levels only
    mode = parameters.text("mode")
    profile = parameters.text("profile")
    resource = parameters.resource("resource")
    access = ctx.repo.access
    if mode in ("update", "delete") and fhir_id is None:
        raise BadRequest(f"mode {mode} validates against a resource: use {resource_type}/[id]/$validate")
    if mode == "create" and fhir_id is not None:
        raise BadRequest(f"mode create validates a new resource: use {resource_type}/$validate")
    if mode == "profile" and profile is None:
        raise BadRequest("mode profile needs a profile parameter", code="required", expression=("profile",))
    if profile is not None and profile != BASE_PROFILE.format(type=resource_type):
        raise BadRequest(
            f"this server validates against the base R4 profile of {resource_type} only"
            f" ({BASE_PROFILE.format(type=resource_type)})",
            code="not-supported",
            expression=("profile",),
        )
    if resource is None and mode != "delete":
        raise BadRequest("the resource to validate is missing", code="required", expression=("resource",))
    if mode in ("create", "update", "delete") and resource_type in IMMUTABLE_TYPES:
        # Server policy, whatever the token: nothing to look up, nothing revealed.
        refused = Issue(
            "not-supported", f"{resource_type} resources are written by the server, not by clients"
        )
        return json_response(operation_outcome([refused]), ctx.fmt)
    issues: list[Issue] = []
    if fhir_id is not None:
        # Read through the repository with the letter of the interaction being checked: 403 or
        # 404 exactly where that interaction would answer so, and nothing about hidden rows.
        letter = {"update": "u", "delete": "d"}.get(mode or "", "r")
        current = await ctx.repo.current_for(resource_type, fhir_id, letter)
        if mode == "delete" and current.deleted:
            issues.append(
                Issue(
                    "informational", f"{resource_type}/{fhir_id} is already deleted", severity="information"
                )
            )
    elif mode == "create":
        access.require(resource_type, "c")
    elif not any(access.allows(resource_type, letter) for letter in "cruds"):
        access.require(resource_type, "r")  # 403: the token has no scope on this type
    if resource is not None and mode != "delete":
        try:
            validate_resource(resource, resource_type, url_id=fhir_id if mode == "update" else None)
        except InvalidResource as exc:
            issues.extend(exc.all_issues())
    return json_response(operation_outcome(issues or [_ALL_OK]), ctx.fmt)


async def meta(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    """R4 Resource-meta: the meta of the current version of a resource, or the profiles, tags
    and security labels in use on a type or the whole system (without versionId and
    lastUpdated), limited to what the token may read or search."""
    if resource_type is not None and fhir_id is not None:
        version = await ctx.repo.read(resource_type, fhir_id)
        assert version.body is not None
        found: dict[str, Any] = jsonio.loads(version.body).get("meta", {})
    else:
        found = await ctx.repo.labels(resource_type)
    return json_response(
        {"resourceType": "Parameters", "parameter": [{"name": "return", "valueMeta": found}]}, ctx.fmt
    )


VALIDATE = Operation(
    name="validate",
    definition_id="Resource-validate",
    base="http://hl7.org/fhir/OperationDefinition/Resource-validate",
    title="Validate a resource",
    description=(
        "Checks whether the content would be acceptable generally (no mode), as a create, as an"
        " update of the resource named in the URL, or whether that resource may be deleted. The"
        " content is checked as a write checks it (R4 JSON types, structure, required bindings);"
        " profile, if given, must be the base R4 profile of the type. Nothing is stored. The"
        " answer is 200 with an OperationOutcome (information 'All OK' when nothing is wrong);"
        " modes update and delete need the instance level. The resource may be POSTed by itself"
        " (mode and profile then in the URL) or in a Parameters resource."
    ),
    levels=("type", "instance"),
    handler=validate,
    body_resource="resource",
    ok_schema="OperationOutcome",
    errors=(400, 403, 404, 405, 410, 413, 415),
    parameters=(
        OperationParameter(
            "resource", "in", "Resource", documentation='Must be present unless the mode is "delete"'
        ),
        OperationParameter(
            "mode",
            "in",
            "code",
            documentation="Default is 'no action'; (e.g. general validation)",
            value_set="http://hl7.org/fhir/ValueSet/resource-validation-mode|4.0.1",
            codes=VALIDATION_MODES,
        ),
        OperationParameter(
            "profile",
            "in",
            "uri",
            documentation="If this is nominated, then the resource is validated against this specific"
            " profile. Only the base R4 profile of the type is supported: another one is an error.",
        ),
        OperationParameter(
            "return",
            "out",
            "OperationOutcome",
            min=1,
            documentation="If the operation outcome does not list any errors, and a mode was specified,"
            " then this is an indication that the operation would be expected to succeed",
        ),
    ),
)

META = Operation(
    name="meta",
    definition_id="Resource-meta",
    base="http://hl7.org/fhir/OperationDefinition/Resource-meta",
    title="Access a list of profiles, tags, and security labels",
    description=(
        "The profiles, tags and security labels of the current version of a resource (the meta a"
        " read returns), or those in use on the resources of a type or of the whole server that the"
        " access token may search (no versionId or lastUpdated at these levels)."
    ),
    levels=("system", "type", "instance"),
    handler=meta,
    ok_schema="Parameters",
    errors=(400, 403, 404, 405, 410),
    parameters=(
        OperationParameter(
            "return", "out", "Meta", min=1, documentation="The meta returned by the operation"
        ),
    ),
)
