"""Generate the tables carecoord needs from the official FHIR R4 definitions.

Usage: python tools/generate.py [path/to/shared/fhir-r4]

Writes into app/fhir/generated/ (committed; the product never reads ../shared):
- bindings.json: for each R4 JSON-schema definition reachable from the served types,
  its properties that are references to other definitions and the code enums of its
  required bindings (the R4 JSON schema encodes required bindings as `enum`).
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


def _bindings(defs: dict[str, Any], names: list[str]) -> dict[str, Any]:
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
    bindings = _bindings(defs, _closure(defs, list(SERVED_TYPES)))
    (out_dir / "bindings.json").write_text(json.dumps(bindings, sort_keys=True, separators=(",", ":")) + "\n")
    (out_dir / "openapi_schemas.json").write_text(
        json.dumps(_openapi(defs, names), sort_keys=True, separators=(",", ":")) + "\n"
    )
    print(f"generated {len(bindings)} binding definitions, {len(names)} OpenAPI schemas into {out_dir}")


if __name__ == "__main__":
    main()
