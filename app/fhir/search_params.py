"""The R4 search parameters of the served types, from the generated table.

``generated/search_params.json`` is produced by tools/generate.py from the official
R4 SearchParameter definitions and the implementation guides' ones shipped in tools/ig
(FHIRPath compiled into JSON-key paths) and the R4
Patient CompartmentDefinition; this module gives it types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class PathSpec:
    """One compiled FHIRPath alternative: steps over JSON keys and the element type reached."""

    steps: tuple[tuple[str, ...], ...]
    element_type: str
    special: str | None = None


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: str
    url: str
    paths: tuple[PathSpec, ...] = ()
    targets: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    column: bool = False
    custom: bool = False
    """Shipped from an implementation guide (tools/ig), not an R4 parameter."""
    order: tuple[str, ...] = ()
    """Codes of an ordered code system, lowest first (request-priority): what ``_sort`` follows."""

    @property
    def kind(self) -> str:
        """Which index table holds the values: number and quantity share one; the one special
        parameter indexed (``Location.near``) has positions."""
        return {"number": "quantity", "special": "position"}.get(self.type, self.type)


@dataclass(frozen=True)
class SearchRegistry:
    params: dict[str, dict[str, SearchParam]]
    patient_compartment: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def for_type(self, resource_type: str) -> dict[str, SearchParam]:
        return self.params.get(resource_type, {})

    def get(self, resource_type: str, name: str) -> SearchParam | None:
        return self.params.get(resource_type, {}).get(name)


def _param(name: str, raw: dict[str, Any]) -> SearchParam:
    return SearchParam(
        name=name,
        type=raw["type"],
        url=raw["url"],
        paths=tuple(
            PathSpec(tuple(tuple(step) for step in p["steps"]), p["type"], p.get("special"))
            for p in raw.get("paths", [])
        ),
        targets=tuple(raw.get("targets", ())),
        components=tuple(raw.get("components", ())),
        column=bool(raw.get("column")),
        custom=bool(raw.get("custom")),
        order=tuple(raw.get("order", ())),
    )


@lru_cache(maxsize=1)
def registry() -> SearchRegistry:
    text = resources.files("app.fhir").joinpath("generated/search_params.json").read_text()
    raw = json.loads(text)
    params = {
        resource_type: {name: _param(name, spec) for name, spec in by_name.items()}
        for resource_type, by_name in raw["params"].items()
    }
    compartment = {k: tuple(v) for k, v in raw["patient_compartment"].items()}
    return SearchRegistry(params, compartment)
