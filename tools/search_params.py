"""Compile the R4 SearchParameter definitions of the served types into a compact table.

Each FHIRPath ``expression`` is split at its top-level ``|`` into the parts that start at
the resource type, and each part is compiled against the R4 JSON schema into one or more
*paths*: a list of steps over JSON keys plus the element type at the end, so the indexer
(app/fhir/indexing.py) extracts values with plain dictionary walks instead of a FHIRPath
engine. The forms the served types use are: member access, choice types (``as``,
``.as()``, ``.ofType()``, or a bare choice element = all its types),
``where(resolve() is Type)``, ``where(field='value')`` and ``exists()``.
"""

from __future__ import annotations

import re
from typing import Any

Step = list[str]
RESOURCE_LEVEL = {"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"}
NOT_INDEXED = {"_query", "_content", "_text"}  # no FHIRPath, or full-text: not supported


class UnsupportedExpression(ValueError):
    pass


def split_top(expression: str, separator: str = "|") -> list[str]:
    parts, depth, quoted, current = [], 0, False, ""
    for char in expression:
        if char == "'":
            quoted = not quoted
        if not quoted:
            depth += char == "("
            depth -= char == ")"
        if char == separator and depth == 0 and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [p for p in parts if p]


def _strip_outer(part: str) -> str:
    while part.startswith("(") and _matching(part, 0) == len(part) - 1:
        part = part[1:-1].strip()
    return part


def _matching(text: str, start: int) -> int:
    depth = 0
    for index in range(start, len(text)):
        depth += text[index] == "("
        depth -= text[index] == ")"
        if depth == 0:
            return index
    return -1


_AS_SPACE = re.compile(r"^\((.+) as ([A-Za-z]+)\)(.*)$")


def _normalize(part: str) -> str:
    """``(X as T).rest`` -> ``X.as(T).rest``; ``X as T`` -> ``X.as(T)``."""
    part = part.strip()
    match = _AS_SPACE.match(part)
    if match and _matching(part, 0) == len(match.group(1)) + len(match.group(2)) + 5:
        return f"{_normalize(match.group(1))}.as({match.group(2)}){match.group(3)}"
    part = _strip_outer(part)
    if " as " in part and "(" not in part.split(" as ")[0]:
        left, right = part.split(" as ", 1)
        return f"{left.strip()}.as({right.strip()})"
    return part


def _tokens(part: str) -> list[str]:
    return split_top(part, ".")


def compile_part(part: str, defs: dict[str, Any]) -> list[dict[str, Any]]:
    """Compile one union member into paths ``{"steps": [...], "type": T}``."""
    part = _normalize(part)
    if part.endswith(".exists() and Patient.deceased != false"):
        return [
            {"steps": [["key", "deceasedBoolean"]], "type": "boolean", "special": "deceased"},
            {"steps": [["key", "deceasedDateTime"]], "type": "dateTime", "special": "deceased"},
        ]
    tokens = _tokens(part)
    root = tokens[0]
    paths: list[tuple[list[Step], str]] = [([], root)]
    for token in tokens[1:]:
        new_paths: list[tuple[list[Step], str]] = []
        for steps, current in paths:
            new_paths.extend(_apply(token, steps, current, defs))
        paths = new_paths
    return [{"steps": steps, "type": current} for steps, current in paths]


def _type_of(prop: dict[str, Any]) -> str:
    ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
    if ref:
        return str(ref).rsplit("/", 1)[-1]
    if "enum" in prop or "enum" in prop.get("items", {}):
        return "code"
    raise UnsupportedExpression(f"no type for {prop}")


_PRIMITIVES = {
    "boolean",
    "integer",
    "string",
    "dateTime",
    "date",
    "instant",
    "time",
    "decimal",
    "uri",
    "url",
    "canonical",
    "code",
    "id",
    "oid",
    "uuid",
    "markdown",
    "base64Binary",
    "positiveInt",
    "unsignedInt",
}


def _choice_type(base: str, name: str) -> str:
    """``effectiveDateTime`` -> ``dateTime``; ``valueQuantity`` -> ``Quantity``."""
    suffix = name[len(base) :]
    lowered = suffix[0].lower() + suffix[1:]
    return lowered if lowered in _PRIMITIVES else suffix


def _apply(token: str, steps: list[Step], current: str, defs: dict[str, Any]) -> list[tuple[list[Step], str]]:
    props = defs.get(current, {}).get("properties", {})
    cast = re.fullmatch(r"(?:as|ofType)\(([A-Za-z]+)\)", token)
    if cast:
        wanted = cast.group(1)
        if steps and steps[-1][0] == "choice":
            key = steps[-1][1] + wanted[0].upper() + wanted[1:]
            return [([*steps[:-1], ["key", key]], wanted)]
        if steps and steps[-1][0] == "key" and steps[-1][1].endswith(wanted[0].upper() + wanted[1:]):
            return [(steps, wanted)]  # the choice alternative already named this type
        return [(steps, wanted)] if current == wanted else []
    resolve = re.fullmatch(r"where\(resolve\(\) is ([A-Za-z]+)\)", token)
    if resolve:
        return [([*steps, ["resolve", resolve.group(1)]], current)]
    where = re.fullmatch(r"where\(([A-Za-z]+) ?= ?'([^']*)'\)", token)
    if where:
        return [([*steps, ["where", where.group(1), where.group(2)]], current)]
    if not re.fullmatch(r"[A-Za-z]+", token):
        raise UnsupportedExpression(token)
    if token in props:
        return [([*steps, ["key", token]], _type_of(props[token]))]
    choices = [name for name in props if name.startswith(token) and name[len(token) :][:1].isupper()]
    if choices:
        # A choice element: a following as()/ofType() picks one type, otherwise all of them.
        out: list[tuple[list[Step], str]] = [([*steps, ["choice", token]], current)]
        out.extend(([*steps, ["key", name]], _choice_type(token, name)) for name in choices)
        return out
    raise UnsupportedExpression(f"{current}.{token}")


def _finish(paths: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the placeholder 'choice' paths that no cast consumed, and duplicates."""
    out: list[dict[str, Any]] = []
    for path in paths:
        if not any(step[0] == "choice" for step in path["steps"]) and path not in out:
            out.append(path)
    return out


def build_table(
    bundle: dict[str, Any], defs: dict[str, Any], served: tuple[str, ...], *, custom: bool = False
) -> dict[str, Any]:
    """The parameters of ``bundle`` (SearchParameter entries) per served type; ``custom``: they
    come from an implementation guide, not the R4 specification (marked so)."""
    table: dict[str, dict[str, Any]] = {name: {} for name in served}
    by_url: dict[str, dict[str, Any]] = {}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        by_url[resource["url"]] = resource
    for entry in bundle["entry"]:
        sp = entry["resource"]
        code = sp["code"]
        bases = sp["base"]
        if code in NOT_INDEXED:
            continue
        targets_for = ["Resource"] if "Resource" in bases else ([b for b in bases if b in table] or [])
        if "Resource" in bases or "DomainResource" in bases:
            targets_for = list(served)
        for resource_type in targets_for:
            if resource_type not in table:
                continue
            spec: dict[str, Any] = {"type": sp["type"], "url": sp["url"]}
            if custom:
                spec["custom"] = True
            if sp.get("target"):
                spec["targets"] = sp["target"]
            if code == "_id" or code == "_lastUpdated":
                spec["column"] = True
            elif sp["type"] == "composite":
                spec["components"] = [
                    by_url[c["definition"]]["code"]
                    for c in sp.get("component", [])
                    if c["definition"] in by_url
                ]
            else:
                paths: list[dict[str, Any]] = []
                for part in split_top(sp["expression"]):
                    head = _normalize(part).split(".")[0].lstrip("(")
                    if head not in (resource_type, "Resource", "DomainResource"):
                        continue
                    if head in ("Resource", "DomainResource"):
                        part = resource_type + _normalize(part)[len(head) :]
                    paths.extend(p for p in _finish(compile_part(part, defs)) if p not in paths)
                if not paths:
                    continue
                spec["paths"] = paths
            table[resource_type][code] = spec
    return table


def compartment(definition: dict[str, Any], served: tuple[str, ...]) -> dict[str, list[str]]:
    return {r["code"]: r["param"] for r in definition["resource"] if r["code"] in served and r.get("param")}
