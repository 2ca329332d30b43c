"""The only module that imports fhir.resources.

fhir.resources' top-level package is FHIR R5; carecoord serves R4 (4.0.1) and
validates with the R4B models, which are wire-identical to R4 for the served types
(see ../shared/docs/standards.md section 6). Nothing else may import fhir.resources
(a ruff banned-import rule enforces it).
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B import get_fhir_model_class  # noqa: TID251 - the one sanctioned import

from app.fhir.types import SERVED_TYPES

FHIR_VERSION = "4.0.1"

_MODELS: dict[str, Any] = {name: get_fhir_model_class(name) for name in SERVED_TYPES}


def validate_structure(resource_type: str, data: dict[str, Any]) -> None:
    """Validate ``data`` against the R4B model of ``resource_type``.

    Raises pydantic's ValidationError for structural problems. The model instance
    is discarded: carecoord stores and serves the client's JSON, not a re-dump.
    """
    _MODELS[resource_type].model_validate(data)


def _field_names(resource_type: str, flag: str) -> frozenset[str]:
    fields = _MODELS[resource_type].model_fields
    return frozenset(
        name
        for name, info in fields.items()
        if (isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get(flag))
        # fhir.resources flags required primitives; required complex elements are pydantic-required
        or (flag == "element_required" and info.is_required())
    )


SUMMARY_ELEMENTS: dict[str, frozenset[str]] = {
    name: _field_names(name, "summary_element_property") for name in SERVED_TYPES
}
"""Top-level elements marked isSummary in the R4 definitions (for ``_summary=true``)."""

REQUIRED_ELEMENTS: dict[str, frozenset[str]] = {
    name: _field_names(name, "element_required") for name in SERVED_TYPES
}
"""Top-level elements with a minimum cardinality of 1 (kept by ``_summary=text`` and ``_elements``)."""
