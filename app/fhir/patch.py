"""PATCH: JSON Patch (RFC 6902) and FHIRPath Patch (R4 http.html#patch, fhirpatch.html).

Both produce a new resource dict from the current one; the caller validates it like any
other write, so an invalid patch, or one whose result is not a valid resource, changes
nothing. FHIRPath Patch paths support the forms clients use: member access, ``[n]``,
``where(field='value')`` and ``first()``/``last()``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import jsonpatch
import jsonpointer

from app.fhir.errors import BadRequest, BusinessRule, PayloadTooLarge
from app.fhir.validation import binding_rules


def json_size(value: Any, limit: int) -> int:
    """About how many bytes ``value`` takes as JSON (numbers by their digits), counted only up
    to ``limit`` (one more means "over"): never more work than the limit, whatever the value."""
    size = 0
    stack = [value]
    while stack and size <= limit:
        item = stack.pop()
        if isinstance(item, dict):
            size += 2 + 2 * len(item)
            for key, child in item.items():
                size += len(str(key)) + 2
                stack.append(child)
        elif isinstance(item, list):
            size += 2 + len(item)
            stack.extend(item)
        elif isinstance(item, str):
            size += len(item) + 2
        elif isinstance(item, bool) or item is None:
            size += 5
        else:  # int, float, Decimal: as many characters as digits (a number may be 100,000 long)
            size += len(str(item))
    return min(size, limit + 1)


def apply_json_patch(current: dict[str, Any], operations: Any, *, max_bytes: int) -> dict[str, Any]:
    """RFC 6902, one operation at a time, keeping the document under ``max_bytes``: a ``copy``
    doubles what it copies, so 25 of them in a 1 KB patch would otherwise build gigabytes
    before validation ever sees the result (issue 15)."""
    if not isinstance(operations, list) or not all(isinstance(op, dict) for op in operations):
        raise BadRequest("a JSON Patch document is an array of operations", code="structure")
    for op in operations:
        path = op.get("path")
        if (
            isinstance(path, str)
            and path.split("/")[1:2] in (["id"], ["resourceType"])
            and op.get("op") != "test"
        ):
            raise BusinessRule(f"JSON Patch may not change {path}", expression=(path,))
    patched: Any = copy.deepcopy(current)
    # Only ``copy`` can make a patch build more than it carries: each one's copied value counts
    # (and the count never goes down), so the work stays within a few times the limit; the
    # result itself is measured once at the end.
    grown = json_size(patched, max_bytes)
    try:
        for op in operations:
            if op.get("op") == "copy" and isinstance(op.get("from"), str):
                grown += json_size(jsonpointer.resolve_pointer(patched, op["from"]), max_bytes)
                if grown > max_bytes:
                    raise PayloadTooLarge(
                        f"the patched resource would exceed {max_bytes} bytes", code="too-costly"
                    )
            patched = jsonpatch.apply_patch(patched, [op], in_place=True)
        if json_size(patched, max_bytes) > max_bytes:
            raise PayloadTooLarge(f"the patched resource would exceed {max_bytes} bytes", code="too-costly")
    except jsonpatch.JsonPatchTestFailed as exc:
        # The library's message quotes the stored value: never echo it (a token may update without
        # reading, and a failed test must not become a way to read).
        raise BusinessRule("JSON Patch test operation failed", code="conflict") from exc
    except (
        jsonpatch.JsonPatchException,
        jsonpointer.JsonPointerException,
        TypeError,
        ValueError,
        KeyError,
        IndexError,
    ) as exc:
        raise BadRequest(f"JSON Patch cannot be applied: {exc}"[:300], code="processing") from exc
    if not isinstance(patched, dict):
        raise BadRequest("JSON Patch must leave a resource object", code="processing")
    return patched


# -- FHIRPath Patch ----------------------------------------------------------------------------

_STEP = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")
_WHERE = re.compile(r"^where\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*'((?:[^'\\]|\\.)*)'\s*\)$")


@dataclass
class _Location:
    """An element reached by a path: ``container[key]`` (and ``[index]`` in a list)."""

    container: dict[str, Any]
    key: str
    index: int | None
    definition: str | None

    def get(self) -> Any:
        value = self.container[self.key]
        return value[self.index] if self.index is not None else value


def _split_path(path: str) -> list[str]:
    parts, depth, quoted, current = [], 0, False, ""
    for char in path:
        if char == "'" and (not current or current[-1] != "\\"):
            quoted = not quoted
        if not quoted:
            depth += char == "("
            depth -= char == ")"
        if char == "." and depth == 0 and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts]


def _evaluate(resource: dict[str, Any], resource_type: str, path: str) -> list[_Location | dict[str, Any]]:
    """Evaluate a FHIRPath Patch path; the resource itself is returned as a bare dict."""
    steps = _split_path(path)
    if not steps or steps[0] != resource_type:
        raise BadRequest(f"path '{path[:80]}' must start with {resource_type}", expression=(path[:80],))
    nodes: list[_Location | dict[str, Any]] = [resource]
    for step in steps[1:]:
        nodes = _apply_step(nodes, step, path, resource_type)
    return nodes


def _definition_of(node: _Location | dict[str, Any], resource_type: str) -> str | None:
    if isinstance(node, _Location):
        rule = binding_rules(node.definition).get(node.key, {})
        return rule.get("type")
    return resource_type


def _apply_step(
    nodes: list[_Location | dict[str, Any]], step: str, path: str, resource_type: str
) -> list[_Location | dict[str, Any]]:
    if step in ("first()", "last()"):
        return nodes[:1] if step == "first()" else nodes[-1:]
    where = _WHERE.match(step)
    if where:
        field, wanted = where.group(1), where.group(2).replace("\\'", "'")
        return [n for n in nodes if isinstance(_value(n), dict) and _value(n).get(field) == wanted]
    match = _STEP.match(step)
    if not match:
        raise BadRequest(f"path '{path[:80]}': '{step[:40]}' is not supported", expression=(path[:80],))
    name, index = match.group(1), match.group(2)
    out: list[_Location | dict[str, Any]] = []
    for node in nodes:
        container = _value(node)
        if not isinstance(container, dict) or name not in container:
            continue
        definition = _definition_of(node, resource_type)
        value = container[name]
        if isinstance(value, list):
            indexes = [int(index)] if index is not None else range(len(value))
            out.extend(_Location(container, name, i, definition) for i in indexes if i < len(value))
        elif index in (None, "0"):
            out.append(_Location(container, name, None, definition))
    return out


def _value(node: _Location | dict[str, Any]) -> Any:
    return node.get() if isinstance(node, _Location) else node


def _part(parts: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    found = [p for p in parts if isinstance(p, dict) and p.get("name") == name]
    return found[0] if found else None


def _part_value(part: dict[str, Any] | None) -> Any:
    if part is None:
        return None
    for key, value in part.items():
        if key.startswith("value") and key[5:6].isupper():
            return value
    nested = part.get("part")
    if isinstance(nested, list):
        return {p["name"]: _part_value(p) for p in nested if isinstance(p, dict) and "name" in p}
    return None


def _single(nodes: list[Any], path: str, operation: str) -> Any:
    if len(nodes) != 1:
        raise BusinessRule(
            f"{operation}: path '{path[:80]}' matches {len(nodes)} elements, not 1", expression=(path[:80],)
        )
    return nodes[0]


def apply_fhirpath_patch(current: dict[str, Any], parameters: Any, resource_type: str) -> dict[str, Any]:
    """Apply a FHIRPath Patch ``Parameters`` resource (R4 fhirpatch.html)."""
    if not isinstance(parameters, dict) or parameters.get("resourceType") != "Parameters":
        raise BadRequest("a FHIRPath Patch is a Parameters resource", code="structure")
    patched = copy.deepcopy(current)
    operations = parameters.get("parameter")
    if not isinstance(operations, list) or not operations:
        raise BadRequest("FHIRPath Patch has no operations", code="required")
    for position, operation in enumerate(operations):
        parts = operation.get("part") if isinstance(operation, dict) else None
        if (
            not isinstance(operation, dict)
            or operation.get("name") != "operation"
            or not isinstance(parts, list)
        ):
            raise BadRequest(
                f"Parameters.parameter[{position}] is not an operation",
                expression=(f"Parameters.parameter[{position}]",),
            )
        try:
            _operation(patched, parts, resource_type)
        except BadRequest as exc:
            raise BadRequest(
                f"operation {position}: {exc.diagnostics}",
                code=exc.code,
                expression=(f"Parameters.parameter[{position}]",),
            ) from exc
    for key in ("id", "resourceType"):
        if patched.get(key) != current.get(key):
            raise BusinessRule(f"FHIRPath Patch may not change {key}", expression=(f"{resource_type}.{key}",))
    return patched


def _operation(resource: dict[str, Any], parts: list[dict[str, Any]], resource_type: str) -> None:
    kind = _part_value(_part(parts, "type"))
    path = _part_value(_part(parts, "path"))
    if not isinstance(path, str) or kind not in ("add", "insert", "delete", "replace", "move"):
        raise BadRequest("each operation needs a type (add|insert|delete|replace|move) and a path")
    nodes = _evaluate(resource, resource_type, path)
    if kind == "delete":
        if not nodes:
            return  # deleting nothing is not an error (fhirpatch.html)
        target = _single(nodes, path, kind)
        if not isinstance(target, _Location):
            raise BusinessRule("cannot delete the resource itself")
        _remove(target)
        return
    if kind == "add":
        name = _part_value(_part(parts, "name"))
        value = _part_value(_part(parts, "value"))
        if not isinstance(name, str) or value is None:
            raise BadRequest("add needs a name and a value")
        target = _single(nodes, path, kind)
        container = _value(target)
        if not isinstance(container, dict):
            raise BusinessRule(f"add: '{path[:80]}' is not an element that can have children")
        definition = _definition_of(target, resource_type) if isinstance(target, _Location) else resource_type
        many = binding_rules(definition).get(name, {}).get("many", False)
        if many:
            container.setdefault(name, []).append(value)
        elif name in container:
            raise BusinessRule(f"add: {name} already has a value; use replace")
        else:
            container[name] = value
        return
    target = _single(nodes, path, kind)
    if not isinstance(target, _Location):
        raise BusinessRule(f"{kind}: the resource itself cannot be the target")
    if kind == "replace":
        value = _part_value(_part(parts, "value"))
        if value is None:
            raise BadRequest("replace needs a value")
        if target.index is not None:
            target.container[target.key][target.index] = value
        else:
            target.container[target.key] = value
        return
    items = target.container.get(target.key)
    if not isinstance(items, list):
        items = [items]
    if kind == "insert":
        value = _part_value(_part(parts, "value"))
        index = _part_value(_part(parts, "index"))
        if value is None or not isinstance(index, int) or not 0 <= index <= len(items):
            raise BadRequest("insert needs a value and an index within the list")
        items.insert(index, value)
    else:  # move
        source = _part_value(_part(parts, "source"))
        destination = _part_value(_part(parts, "destination"))
        if (
            not isinstance(source, int)
            or not isinstance(destination, int)
            or not (0 <= source < len(items) and 0 <= destination < len(items))
        ):
            raise BadRequest("move needs source and destination indexes within the list")
        items.insert(destination, items.pop(source))
    target.container[target.key] = items


def _remove(target: _Location) -> None:
    if target.index is None:
        del target.container[target.key]
        return
    items = target.container[target.key]
    del items[target.index]
    if not items:
        del target.container[target.key]


__all__ = ["apply_fhirpath_patch", "apply_json_patch"]
