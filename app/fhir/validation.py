"""Parse and validate a resource body on write (FHIR R4 http.html#create, #update).

Structure is checked with the R4B models (app/fhir/models.py); because fhir.resources
does not check codes, the required bindings of code elements (the ``enum`` of the R4
JSON schema, generated into generated/bindings.json) are checked here too. Each
problem becomes an OperationOutcome issue whose ``expression`` names the element.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from pydantic import ValidationError

from app.fhir import jsonio
from app.fhir.errors import BadRequest, InvalidResource, Issue, NotSupported
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
    """Per element of an R4 definition: its type, cardinality ("many") and required codes."""
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


def _walk(definition: str | None, node: Any, path: str, depth: int, issues: list[Issue]) -> None:
    """Check nesting depth everywhere and required-binding codes where the schema knows the element."""
    if depth > jsonio.MAX_DEPTH:
        raise InvalidResource(f"resource nests deeper than {jsonio.MAX_DEPTH} levels", code="too-costly")
    if isinstance(node, list):
        for index, item in enumerate(node):
            if not _bad_text(item, f"{path}[{index}]", issues):
                _walk(definition, item, f"{path}[{index}]", depth + 1, issues)
        return
    if not isinstance(node, dict):
        return
    rules = _bindings().get(definition or "", {})
    for key, value in node.items():
        if _bad_text(value, f"{path}.{key}", issues):
            continue
        rule = rules.get(key)
        child_path = f"{path}.{key}"
        if rule is None:
            if isinstance(value, (dict, list)):
                _walk(None, value, child_path, depth + 1, issues)
            continue
        if "coding_system" in rule:
            _check_codings(rule, value, child_path, issues)
        elif "codes" in rule:
            values = value if isinstance(value, list) else [value]
            for item in values:
                if isinstance(item, str) and item not in rule["codes"]:
                    issues.append(
                        Issue(
                            "code-invalid",
                            f"{child_path}: '{item[:64]}' is not in the required value set",
                            expression=(child_path,),
                        )
                    )
        elif rule.get("resource"):
            for index, item in enumerate(value if isinstance(value, list) else [value]):
                contained_type = item.get("resourceType") if isinstance(item, dict) else None
                _walk(
                    contained_type if isinstance(contained_type, str) else None,
                    item,
                    f"{child_path}[{index}]",
                    depth + 1,
                    issues,
                )
        else:
            _walk(rule.get("type"), value, child_path, depth + 1, issues)


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
