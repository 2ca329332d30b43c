"""Parse and validate a resource body on write (FHIR R4 http.html#create, #update).

Structure is checked with the R4B models (app/fhir/models.py). Before them, with the R4 JSON
schema's element types (generated into generated/bindings.json), this module checks what the
models do not, or only leniently (pydantic turns ``"yes"`` into a boolean and ``"1"`` into an
integer, and accepts ``null`` and empty arrays): that every primitive has the JSON type R4
json.html gives it, that null appears only to align a repeating primitive with its
``_element`` array, that no array is empty, and the required bindings of code elements (the
``enum`` of the R4 JSON schema). The resource is not changed: what is stored is what was sent
(decimals keep their precision). Each problem becomes an OperationOutcome issue whose
``expression`` names the element.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from typing import Any

from pydantic import ValidationError

from app.fhir import jsonio
from app.fhir.errors import BadRequest, InvalidResource, Issue, NotSupported, PayloadTooLarge
from app.fhir.models import validate_structure
from app.fhir.types import SERVED_TYPE_SET

ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
"""R4 datatypes.html#id."""

FORBIDDEN_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
"""R4 datatypes.html#string: no code points below 32 except tab, CR and LF; no lone surrogates."""


@lru_cache(maxsize=1)
def _bindings() -> dict[str, dict[str, dict[str, Any]]]:
    text = resources.files("app.fhir").joinpath("generated/bindings.json").read_text()
    table: dict[str, dict[str, dict[str, Any]]] = json.loads(text)
    for props in table.values():
        for rule in props.values():
            if "codes" in rule:
                rule["codes"] = frozenset(rule["codes"])
    return table


def binding_rules(definition: str | None) -> dict[str, dict[str, Any]]:
    """Per element of an R4 definition: its complex type ("type") or FHIR primitive type
    ("primitive"), cardinality ("many"), contained resources ("resource") and required codes."""
    return _bindings().get(definition or "", {})


def check_resource_type(resource_type: str) -> None:
    if resource_type not in SERVED_TYPE_SET:
        raise NotSupported(f"resource type '{resource_type}' is not supported by this server")


def check_id(resource_id: str) -> None:
    if not ID_PATTERN.match(resource_id):
        raise BadRequest(f"'{resource_id[:70]}' is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}})")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def parse_body(raw: bytes) -> Any:
    """Parse a request body as JSON, or raise a 400 that says why.

    A ``\\uD800``-style escape that does not form a pair gives a string no UTF-8 can carry:
    refused here, for the whole document (keys, a Bundle's ``request.url``, ``ifNoneExist``...),
    before any part of it is stored, searched with or quoted back in an OperationOutcome."""
    if not raw.strip():
        raise InvalidResource("request body is empty")
    try:
        document = jsonio.loads(raw)
    except jsonio.JSONDepthError as exc:
        raise InvalidResource(str(exc), code="too-costly") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidResource("request body is not valid JSON", code="structure") from exc
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(document):
        raise InvalidResource("request body holds an unpaired UTF-16 surrogate (\\uD800-\\uDFFF)")
    if _nests_deeper(document, BODY_MAX_DEPTH):
        # Before anything walks it recursively (a transaction's reference rewriting does).
        raise InvalidResource(f"request body nests deeper than {BODY_MAX_DEPTH} levels", code="too-costly")
    return document


BODY_MAX_DEPTH = jsonio.MAX_DEPTH + 8
"""A resource nests at most jsonio.MAX_DEPTH levels; a Bundle adds a few around its entries."""


def _nests_deeper(document: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values() if isinstance(child, dict | list))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node if isinstance(child, dict | list))
    return False


def _has_lone_surrogate(node: Any) -> bool:
    if isinstance(node, str):
        return _SURROGATE.search(node) is not None
    if isinstance(node, dict):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(value) for key, value in node.items())
    if isinstance(node, list):
        return any(_has_lone_surrogate(item) for item in node)
    return False


def parse_resource(raw: bytes, resource_type: str, *, url_id: str | None = None) -> dict[str, Any]:
    """Parse and validate a resource body for ``resource_type``.

    ``url_id`` is given for update (PUT): the body SHALL carry an identical ``id``
    (http.html#update). On create the body's ``id`` is ignored and replaced.
    """
    data = parse_body(raw)
    return validate_resource(data, resource_type, url_id=url_id)


def validate_resource(data: Any, resource_type: str, *, url_id: str | None = None) -> dict[str, Any]:
    """Validate an already parsed resource (also used for Bundle entries)."""
    if not isinstance(data, dict):
        raise InvalidResource("a resource must be a JSON object", code="structure")
    body_type = data.get("resourceType")
    if not isinstance(body_type, str):
        raise InvalidResource("resourceType is missing", code="required", expression=("resourceType",))
    if body_type != resource_type:
        raise InvalidResource(
            f"resourceType '{body_type[:64]}' does not match the endpoint type '{resource_type}'",
            expression=("resourceType",),
        )
    if url_id is not None:
        body_id = data.get("id")
        if body_id is None:
            raise InvalidResource(
                "the resource must carry an id equal to the id in the URL",
                code="required",
                expression=(f"{resource_type}.id",),
            )
        if body_id != url_id:
            raise InvalidResource(
                "the id in the body differs from the id in the URL", expression=(f"{resource_type}.id",)
            )
    issues: list[Issue] = []
    _walk(resource_type, data, resource_type, 0, issues)
    if not issues:
        issues = _structure_issues(resource_type, data)
    if issues:
        raise InvalidResource("resource failed validation", issues=issues[:50])
    return data


def _structure_issues(resource_type: str, data: dict[str, Any]) -> list[Issue]:
    try:
        validate_structure(resource_type, data)
    except ValidationError as exc:
        return [
            _pydantic_issue(resource_type, error)
            for error in exc.errors(include_input=False, include_url=False)
        ]
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
        # fhir.resources raises bare KeyErrors for e.g. an unknown contained resourceType.
        return [Issue("structure", "resource structure is not valid FHIR R4", expression=(resource_type,))]
    return []


def _pydantic_issue(resource_type: str, error: Any) -> Issue:
    path = resource_type
    for part in error.get("loc", ()):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part and not str(part).startswith("__"):
            path += f".{part}"
    kind = error.get("type", "")
    code = "structure" if kind == "extra_forbidden" else ("required" if kind == "missing" else "value")
    message = "unknown element" if kind == "extra_forbidden" else str(error.get("msg", "invalid value"))
    return Issue(code, f"{path}: {message}", expression=(path,))


def _bad_text(value: Any, path: str, issues: list[Issue]) -> bool:
    """Record a string that breaks the R4 string rules; True when it did."""
    if isinstance(value, str) and FORBIDDEN_CHARACTERS.search(value):
        issues.append(
            Issue("invalid", f"{path}: contains a control character or invalid Unicode", expression=(path,))
        )
        return True
    return False


INT32_MAX = 2**31 - 1
_INTEGER_MINIMUM = {"integer": -(2**31), "unsignedInt": 0, "positiveInt": 1}
"""R4 datatypes.html: integer is 32-bit signed; unsignedInt >= 0; positiveInt > 0."""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float | Decimal):
        return f"the number {str(value)[:40]}"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _primitive_problem(kind: str, value: Any) -> str | None:
    """Why ``value`` is not the JSON form of a FHIR primitive of type ``kind`` (json.html#primitive:
    boolean -> JSON boolean; integer, positiveInt, unsignedInt, decimal -> JSON number; every other
    primitive -> JSON string), or None. Numbers are judged as parsed by jsonio: an int had no
    fraction nor exponent, a Decimal had one."""
    if kind in _INTEGER_MINIMUM:
        if type(value) is not int:  # bool is an int subclass: excluded
            return f"must be a JSON number without fraction or exponent ({kind}), not {_json_type(value)}"
        minimum = _INTEGER_MINIMUM[kind]
        if not minimum <= value <= INT32_MAX:
            return f"{value} is outside the range of {kind} ({minimum}..{INT32_MAX})"
        return None
    if kind == "boolean":
        return (
            None
            if isinstance(value, bool)
            else f"must be a JSON boolean (true or false), not {_json_type(value)}"
        )
    if kind == "decimal":
        if (
            type(value) is int
            or (isinstance(value, Decimal) and value.is_finite())
            or (type(value) is float and math.isfinite(value))
        ):
            return None
        return f"must be a JSON number (decimal), not {_json_type(value)}"
    return None if isinstance(value, str) else f"must be a JSON string ({kind}), not {_json_type(value)}"


def _issue(issues: list[Issue], path: str, message: str, code: str = "structure") -> None:
    issues.append(Issue(code, f"{path}: {message}", expression=(path,)))


def _walk(definition: str | None, node: dict[str, Any], path: str, depth: int, issues: list[Issue]) -> None:
    """Check one JSON object as an element of the R4 JSON-schema ``definition``: the JSON type of
    every primitive (json.html#primitive), no null (but in the arrays of a repeating primitive and
    its ``_element``, aligned), no empty array, the required-binding codes, and nesting depth
    everywhere. Elements the schema does not know are left to the structural validation."""
    if depth > jsonio.MAX_DEPTH:
        raise InvalidResource(f"resource nests deeper than {jsonio.MAX_DEPTH} levels", code="too-costly")
    rules = _bindings().get(definition or "", _NO_RULES)
    for key, value in node.items():
        rule = rules.get(key)
        if rule is None:
            base = rules.get(key[1:]) if key[:1] == "_" else None
            if base is not None and "primitive" in base:
                _walk_extensions(node, key, base, f"{path}.{key}", depth + 1, issues)
            else:
                _walk_untyped(value, f"{path}.{key}", depth + 1, issues)
            continue
        kind = rule.get("primitive")
        if kind is not None and type(value) is str and kind not in _NON_STRING and "many" not in rule:
            # The common case, a single string-typed primitive, with no work beyond the text rules.
            if FORBIDDEN_CHARACTERS.search(value) or ("codes" in rule and value not in rule["codes"]):
                _check_primitive(rule, kind, value, f"{path}.{key}", issues)
            continue
        child_path = f"{path}.{key}"
        if value is None:
            _issue(issues, child_path, "null is not allowed (leave the element out)")
            continue
        if isinstance(value, list):
            if not rule.get("many"):
                _issue(issues, child_path, "must not be an array (the element does not repeat)")
                continue
            if not value:
                _issue(issues, child_path, "an array may not be empty (leave the element out)")
                continue
            if kind is not None:
                extensions = node.get(f"_{key}")
                for index, item in enumerate(value):
                    item_path = f"{child_path}[{index}]"
                    if item is None:
                        if not (
                            isinstance(extensions, list)
                            and len(extensions) == len(value)
                            and isinstance(extensions[index], dict)
                        ):
                            _issue(issues, item_path, f"null is allowed only where _{key} gives an extension")
                    else:
                        _check_primitive(rule, kind, item, item_path, issues)
                continue
            for index, item in enumerate(value):
                _walk_child(rule, item, f"{child_path}[{index}]", depth + 2, issues)
            continue
        if rule.get("many"):
            _issue(issues, child_path, f"must be a JSON array, not {_json_type(value)}")
            continue
        if kind is not None:
            _check_primitive(rule, kind, value, child_path, issues)
        else:
            _walk_child(rule, value, child_path, depth + 1, issues)


_NO_RULES: dict[str, dict[str, Any]] = {}
_NON_STRING = frozenset(("boolean", "decimal", *_INTEGER_MINIMUM))
"""Primitive types whose JSON type is not string."""


def _check_primitive(rule: dict[str, Any], kind: str, value: Any, path: str, issues: list[Issue]) -> None:
    problem = _primitive_problem(kind, value)
    if problem is not None:
        _issue(issues, path, problem, "value")
    elif not _bad_text(value, path, issues) and "codes" in rule and value not in rule["codes"]:
        issues.append(
            Issue(
                "code-invalid", f"{path}: '{value[:64]}' is not in the required value set", expression=(path,)
            )
        )


def _walk_child(rule: dict[str, Any], item: Any, path: str, depth: int, issues: list[Issue]) -> None:
    """One value of a complex element (a datatype, a backbone element or a contained resource)."""
    if not isinstance(item, dict):
        what = "a resource" if rule.get("resource") else "an element"
        _issue(issues, path, f"must be a JSON object ({what}), not {_json_type(item)}")
        return
    if rule.get("resource"):
        contained_type = item.get("resourceType")
        _walk(contained_type if isinstance(contained_type, str) else None, item, path, depth, issues)
        return
    if "coding_system" in rule:
        _check_codings(rule, item, path, issues)
    _walk(rule.get("type"), item, path, depth, issues)


def _walk_extensions(
    node: dict[str, Any], key: str, base: dict[str, Any], path: str, depth: int, issues: list[Issue]
) -> None:
    """``_element``: the id and extensions of a primitive (json.html#primitive). For a repeating
    primitive it is an array aligned with the values, null where a value has neither."""
    if not base.get("many"):
        if isinstance(value := node[key], dict):
            _walk("Element", value, path, depth, issues)
        else:
            _issue(
                issues,
                path,
                f"must be a JSON object (the element's id and extensions), not {_json_type(value)}",
            )
        return
    extensions = node[key]
    if not isinstance(extensions, list) or not extensions:
        _issue(issues, path, "must be a non-empty JSON array aligned with the element's values")
        return
    values = node.get(key[1:])
    if isinstance(values, list) and len(values) != len(extensions):
        _issue(issues, path, f"has {len(extensions)} items for {len(values)} values: the arrays must align")
        return
    for index, item in enumerate(extensions):
        item_path = f"{path}[{index}]"
        if item is None:
            if not isinstance(values, list) or values[index] is None:
                _issue(issues, item_path, "null is allowed only where the element has a value")
        elif isinstance(item, dict):
            _walk("Element", item, item_path, depth + 1, issues)
        else:
            _issue(issues, item_path, f"must be a JSON object or null, not {_json_type(item)}")


def _walk_untyped(value: Any, path: str, depth: int, issues: list[Issue]) -> None:
    """A value the schema does not describe here (an unknown element, which the structural
    validation refuses): the text rules, no null, no empty array, and depth."""
    if depth > jsonio.MAX_DEPTH:
        raise InvalidResource(f"resource nests deeper than {jsonio.MAX_DEPTH} levels", code="too-costly")
    if value is None:
        _issue(issues, path, "null is not allowed (leave the element out)")
    elif isinstance(value, dict):
        for key, child in value.items():
            _walk_untyped(child, f"{path}.{key}", depth + 1, issues)
    elif isinstance(value, list):
        if not value:
            _issue(issues, path, "an array may not be empty (leave the element out)")
        for index, item in enumerate(value):
            if item is not None:
                _walk_untyped(item, f"{path}[{index}]", depth + 1, issues)
    else:
        _bad_text(value, path, issues)


def _check_codings(rule: dict[str, Any], value: Any, path: str, issues: list[Issue]) -> None:
    """A CodeableConcept with a required binding: codings of the bound system must use its codes."""
    concepts = value if isinstance(value, list) else [value]
    for concept in concepts:
        codings = concept.get("coding") if isinstance(concept, dict) else None
        for index, coding in enumerate(codings if isinstance(codings, list) else []):
            if not isinstance(coding, dict) or coding.get("system") != rule["coding_system"]:
                continue
            code = coding.get("code")
            if isinstance(code, str) and code not in rule["codes"]:
                where = f"{path}.coding[{index}].code"
                issues.append(
                    Issue(
                        "code-invalid",
                        f"{where}: '{code[:64]}' is not in the required value set",
                        expression=(where,),
                    )
                )


def check_attachments(resource_type: str, data: dict[str, Any], limit: int) -> None:
    """Refuse an inline attachment (``Attachment.data``, base64, R4 datatypes.html#Attachment)
    whose decoded size exceeds ``limit`` (CARECOORD_ATTACHMENT_MAX_BYTES): 413 naming the
    element. A document that large belongs at ``Attachment.url``. Contained resources count."""
    stack: list[tuple[str | None, Any, str]] = [(resource_type, data, resource_type)]
    while stack:
        definition, node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        if definition == "Attachment" and isinstance(node.get("data"), str):
            encoded = node["data"]
            size = len(encoded) * 3 // 4 - encoded[-2:].count("=")
            if size > limit:
                raise PayloadTooLarge(
                    f"{path}.data: an inline attachment of {size} bytes exceeds the limit of {limit}"
                    " (CARECOORD_ATTACHMENT_MAX_BYTES); give its location in Attachment.url instead",
                    expression=(f"{path}.data",),
                )
        for name, rule in binding_rules(definition).items():
            value = node.get(name)
            if value is None or not ("type" in rule or rule.get("resource")):
                continue
            for position, item in enumerate(value if isinstance(value, list) else [value]):
                child = f"{path}.{name}[{position}]" if isinstance(value, list) else f"{path}.{name}"
                kind = item.get("resourceType") if rule.get("resource") and isinstance(item, dict) else None
                stack.append((kind if rule.get("resource") else rule["type"], item, child))
