"""Generate the tables carecoord needs from the official FHIR R4 definitions.

Usage: python tools/generate.py [path/to/shared/fhir-r4]

Writes into app/fhir/generated/ (committed; the product never reads ../shared):
- bindings.json: for each R4 JSON-schema definition reachable from the served types,
  its properties that are references to other definitions and the code enums of its
  required bindings (the R4 JSON schema encodes required bindings as `enum`).
- search_params.json: every R4 search parameter of the served types, each FHIRPath
  expression compiled into JSON-key paths (tools/search_params.py), and the R4 Patient
  CompartmentDefinition's parameters per type.
- openapi_schemas.json: the R4 JSON-schema definitions reachable from the served types
  (plus Bundle, OperationOutcome, CapabilityStatement), rewritten for OpenAPI components.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.fhir.types import SERVED_TYPES  # noqa: E402
from tools.search_params import build_table, compartment  # noqa: E402

EXTRA_DEFINITIONS = ("Bundle", "OperationOutcome", "CapabilityStatement", "Parameters")
GENERIC_RESOURCE = {
    "type": "object",
    "description": "Any FHIR R4 resource, identified by resourceType.",
    "properties": {"resourceType": {"type": "string"}, "id": {"type": "string"}},
    "required": ["resourceType"],
    "additionalProperties": True,
}


def _ref_name(node: dict[str, Any]) -> str | None:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/definitions/"):
        return ref.removeprefix("#/definitions/")
    return None


def _closure(defs: dict[str, Any], roots: list[str]) -> list[str]:
    seen: list[str] = []
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name == "ResourceList":
            continue
        seen.append(name)
        for prop in defs[name].get("properties", {}).values():
            target = _ref_name(prop) or _ref_name(prop.get("items", {}))
            if target:
                stack.append(target)
    return sorted(seen)


# Required bindings the R4 JSON schema leaves as plain `code` (it only inlines enums of
# single-use value sets), from the resource pages' Terminology Bindings tables.
CODE_BINDINGS = {
    ("CarePlan", "status"): "request-status",
    ("CarePlan", "intent"): "care-plan-intent",
    ("CarePlan_Detail", "status"): "care-plan-activity-status",
    ("ServiceRequest", "status"): "request-status",
    ("ServiceRequest", "intent"): "request-intent",
    ("ServiceRequest", "priority"): "request-priority",
    ("Task", "priority"): "request-priority",
    ("Procedure", "status"): "event-status",
    ("Communication", "status"): "event-status",
    ("Communication", "priority"): "request-priority",
}
# Required bindings on CodeableConcepts: codings in the bound code system must be valid codes.
CODEABLE_BINDINGS = {
    ("Condition", "clinicalStatus"): "condition-clinical",
    ("Condition", "verificationStatus"): "condition-ver-status",
}


def _concepts(concepts: list[dict[str, Any]]) -> list[str]:
    codes: list[str] = []
    for concept in concepts:
        codes.append(concept["code"])
        codes.extend(_concepts(concept.get("concept", [])))
    return codes


def _value_sets(shared: Path) -> dict[str, tuple[str, list[str]]]:
    """ValueSet id -> (code system URL, codes), expanded from the care-coordination bundle."""
    bundle = json.loads((shared / "valuesets-care-coordination.json").read_text())
    systems = {
        entry["resource"]["url"]: _concepts(entry["resource"].get("concept", []))
        for entry in bundle["entry"]
        if entry["resource"]["resourceType"] == "CodeSystem"
    }
    expanded: dict[str, tuple[str, list[str]]] = {}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] != "ValueSet":
            continue
        includes = resource.get("compose", {}).get("include", [])
        if len(includes) != 1 or "system" not in includes[0]:
            continue
        include = includes[0]
        codes = (
            [c["code"] for c in include["concept"]]
            if "concept" in include
            else systems.get(include["system"], [])
        )
        if codes:
            expanded[resource["id"]] = (include["system"], codes)
    return expanded


def _bindings(
    defs: dict[str, Any], names: list[str], value_sets: dict[str, tuple[str, list[str]]]
) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name in names:
        props = defs[name].get("properties")
        if not props:
            continue
        entry: dict[str, Any] = {}
        for prop_name, prop in props.items():
            if prop_name.startswith("_"):
                continue
            target = _ref_name(prop) or _ref_name(prop.get("items", {}))
            enum = prop.get("enum") or prop.get("items", {}).get("enum")
            if enum and prop_name != "resourceType":
                entry[prop_name] = {"codes": enum}
            elif target == "ResourceList":
                entry[prop_name] = {"resource": True}
            elif target and defs.get(target, {}).get("properties"):
                entry[prop_name] = {"type": target}
            if prop.get("type") == "array":
                entry.setdefault(prop_name, {})["many"] = True
        for (definition, prop_name), value_set in CODE_BINDINGS.items():
            if definition == name:
                entry[prop_name] = {"codes": value_sets[value_set][1]}
        for (definition, prop_name), value_set in CODEABLE_BINDINGS.items():
            if definition == name:
                system, codes = value_sets[value_set]
                entry[prop_name] = {"coding_system": system, "codes": codes}
        if entry:
            table[name] = entry
    return table


def _openapi(defs: dict[str, Any], names: list[str]) -> dict[str, Any]:
    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("$ref") == "#/definitions/ResourceList":
                return {"$ref": "#/components/schemas/Resource"}
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    out[key] = value.replace("#/definitions/", "#/components/schemas/")
                elif key == "const":
                    out["enum"] = [value]
                else:
                    out[key] = rewrite(value)
            return out
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    schemas = {name: rewrite(defs[name]) for name in names}
    schemas["Resource"] = GENERIC_RESOURCE
    return schemas


def main() -> None:
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "fhir-r4"
    defs = json.loads((shared / "fhir.schema.json").read_text())["definitions"]
    names = _closure(defs, [*SERVED_TYPES, *EXTRA_DEFINITIONS])
    out_dir = ROOT / "app" / "fhir" / "generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    bindings = _bindings(defs, _closure(defs, list(SERVED_TYPES)), _value_sets(shared))
    (out_dir / "bindings.json").write_text(json.dumps(bindings, sort_keys=True, separators=(",", ":")) + "\n")
    (out_dir / "openapi_schemas.json").write_text(
        json.dumps(_openapi(defs, names), sort_keys=True, separators=(",", ":")) + "\n"
    )
    search = {
        "params": build_table(
            json.loads((shared / "search-parameters.json").read_text()), defs, SERVED_TYPES
        ),
        "patient_compartment": compartment(
            json.loads((shared / "compartmentdefinition-patient.json").read_text()), SERVED_TYPES
        ),
    }
    (out_dir / "search_params.json").write_text(json.dumps(search, sort_keys=True, indent=0) + "\n")
    print(f"generated {len(bindings)} binding definitions, {len(names)} OpenAPI schemas into {out_dir}")


if __name__ == "__main__":
    main()
