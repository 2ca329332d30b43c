"""Generate the tables carecoord needs from the official FHIR R4 definitions.

Usage: python tools/generate.py [path/to/shared/fhir-r4]

Writes into app/fhir/generated/ (committed; the product never reads ../shared):
- bindings.json: for each R4 JSON-schema definition reachable from the served types (and from
  every R4 resource type, which a served resource may contain), per property: the definition
  it refers to, whether it is an array, the FHIR primitive type of a primitive element (which
  fixes its JSON type, R4 json.html#primitive), and the code enums of its required bindings
  (the R4 JSON schema encodes required bindings as `enum`).
- search_params.json: every R4 search parameter of the served types, each FHIRPath
  expression compiled into JSON-key paths (tools/search_params.py), and the R4 Patient
  CompartmentDefinition's parameters per type; then the SearchParameters carecoord ships from
  implementation guides (tools/ig/*.json, Bundles of SearchParameter resources, e.g. the SDOH
  Clinical Care IG's), compiled the same way and marked ``custom``. A new or changed parameter
  reaches stored resources through ``carecoord reindex`` (app/reindex.py), not a migration.
  Token parameters bound to an ordered code system (request-priority) carry its codes in order
  (``order``), so that ``_sort`` follows the code system's order, not the alphabet.
- openapi_schemas.json: the R4 JSON-schema definitions reachable from the served types
  (plus Bundle, OperationOutcome, CapabilityStatement, Parameters, OperationDefinition), rewritten
  for OpenAPI components.
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

EXTRA_DEFINITIONS = ("Bundle", "OperationOutcome", "CapabilityStatement", "Parameters", "OperationDefinition")
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
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name == "ResourceList":
            continue
        seen.add(name)
        for prop in defs[name].get("properties", {}).values():
            target = _ref_name(prop) or _ref_name(prop.get("items", {}))
            if target:
                stack.append(target)
    return sorted(seen)


def _r4_resource_types(defs: dict[str, Any], shared: Path) -> list[str]:
    """Every R4 resource type (what ``contained`` may hold): the members of the schema's
    ResourceList that the R4 Patient CompartmentDefinition names (it lists every resource type;
    this schema file also defines a few non-R4 types, which are left out)."""
    compartment = json.loads((shared / "compartmentdefinition-patient.json").read_text())
    r4 = {entry["code"] for entry in compartment["resource"]}
    members = [_ref_name(option) for option in defs["ResourceList"]["oneOf"]]
    return sorted(name for name in members if name in r4)


def _primitives(defs: dict[str, Any]) -> dict[str, str]:
    """FHIR primitive type name -> the JSON type R4 json.html gives it (xhtml is a string)."""
    return {
        name: definition.get("type", "string")
        for name, definition in defs.items()
        if name[:1].islower() and "properties" not in definition
    }


def _primitive_type(prop_name: str, prop: dict[str, Any], primitives: dict[str, str]) -> str | None:
    """The FHIR primitive type of a property, or None for complex ones.

    Most properties refer to the primitive's definition; the R4 schema inlines the choice types
    (``valueDecimal``, ``deceasedBoolean``...) as ``{"type", "pattern"}``, named after their type."""
    node = prop.get("items", prop)
    target = _ref_name(node)
    if target is not None:
        return target if target in primitives else None
    if "enum" in node:
        return "code"
    json_type = node.get("type")
    if json_type not in ("boolean", "number", "string"):
        return None
    named = [
        name
        for name, kind in primitives.items()
        if kind == json_type and prop_name.endswith(name[0].upper() + name[1:])
    ]
    if not named:
        raise SystemExit(f"cannot tell the FHIR type of the inline {json_type} property {prop_name}")
    return max(named, key=len)  # valueDateTime is a dateTime, not a time


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
    primitives = _primitives(defs)
    for name in names:
        props = defs[name].get("properties")
        if not props:
            continue
        entry: dict[str, Any] = {}
        for prop_name, prop in props.items():
            if prop_name.startswith("_") or prop_name == "resourceType":
                # _element (id and extensions of a primitive) is checked as an Element by the
                # validator, next to its primitive; resourceType is checked on its own.
                continue
            target = _ref_name(prop) or _ref_name(prop.get("items", {}))
            enum = prop.get("enum") or prop.get("items", {}).get("enum")
            if enum:
                entry[prop_name] = {"codes": enum}
            elif target == "ResourceList":
                entry[prop_name] = {"resource": True}
            elif target and defs.get(target, {}).get("properties"):
                entry[prop_name] = {"type": target}
            primitive = _primitive_type(prop_name, prop, primitives)
            if primitive is not None:
                entry.setdefault(prop_name, {})["primitive"] = primitive
            if prop.get("type") == "array":
                entry.setdefault(prop_name, {})["many"] = True
        for (definition, prop_name), value_set in CODE_BINDINGS.items():
            if definition == name:
                entry[prop_name]["codes"] = value_sets[value_set][1]
        for (definition, prop_name), value_set in CODEABLE_BINDINGS.items():
            if definition == name:
                system, codes = value_sets[value_set]
                entry[prop_name].update(coding_system=system, codes=codes)
        if entry:
            table[name] = entry
    return table


ORDERED_CODE_SYSTEMS = ("request-priority",)
"""Value sets whose codes are ordered (R4 valueset-request-priority: routine < urgent < asap <
stat), listed in that order by their code system."""


def _ordered_codes(params: dict[str, Any], value_sets: dict[str, tuple[str, list[str]]]) -> None:
    """Give a token parameter over a code bound to an ordered value set its codes in order."""
    for (definition, prop_name), value_set in CODE_BINDINGS.items():
        if value_set not in ORDERED_CODE_SYSTEMS:
            continue
        for spec in params.get(definition, {}).values():
            paths = spec.get("paths", [])
            if spec["type"] == "token" and paths and all(p["steps"] == [["key", prop_name]] for p in paths):
                spec["order"] = value_sets[value_set][1]


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
    bindings = _bindings(
        defs, _closure(defs, [*SERVED_TYPES, *_r4_resource_types(defs, shared)]), _value_sets(shared)
    )
    (out_dir / "bindings.json").write_text(json.dumps(bindings, sort_keys=True, separators=(",", ":")) + "\n")
    (out_dir / "openapi_schemas.json").write_text(
        json.dumps(_openapi(defs, names), sort_keys=True, separators=(",", ":")) + "\n"
    )
    params = build_table(json.loads((shared / "search-parameters.json").read_text()), defs, SERVED_TYPES)
    for path in sorted((ROOT / "tools" / "ig").glob("*.json")):
        shipped = build_table(json.loads(path.read_text()), defs, SERVED_TYPES, custom=True)
        for resource_type, by_name in shipped.items():
            for name, spec in by_name.items():
                if name in params[resource_type]:
                    raise SystemExit(f"{path.name}: {resource_type} already has a parameter '{name}'")
                params[resource_type][name] = spec
    _ordered_codes(params, _value_sets(shared))
    search = {
        "params": params,
        "patient_compartment": compartment(
            json.loads((shared / "compartmentdefinition-patient.json").read_text()), SERVED_TYPES
        ),
    }
    (out_dir / "search_params.json").write_text(json.dumps(search, sort_keys=True, indent=0) + "\n")
    print(f"generated {len(bindings)} binding definitions, {len(names)} OpenAPI schemas into {out_dir}")


if __name__ == "__main__":
    main()
