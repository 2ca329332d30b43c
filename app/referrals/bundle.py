"""The referral as a FHIR transaction Bundle for the partner's server (pure functions).

standards.md §1.1 (SDOHCC Direct, FHIR Workflow option G): the source sends the referral Task
to the target. carecoord sends, in one transaction (R4 http.html#transaction), copies of the
Task, its ``focus`` ServiceRequest, its ``for`` Patient and what the ServiceRequest points to
(Consent in ``supportingInfo``, Conditions/Observations in ``reasonReference``, the requester),
so the partner has everything without reading back from carecoord.

Each copy carries an identifier carecoord assigns (system ``{source_base}/referral-identifier``,
value ``{Type}/{local id}``) and is a conditional create on it (``ifNoneExist``,
http.html#ccreate): sending the same referral again, after a timeout that hid a success,
creates nothing twice. Copies lose their ``id`` and server-assigned ``meta``; they get
``urn:uuid:`` fullUrls and every reference between them is rewritten to those (the partner
resolves them, http.html#trules); a relative reference to anything not in the Bundle becomes
an absolute reference to carecoord (references.html#literal), which the partner can resolve back
at the source.
"""

from __future__ import annotations

import copy
import re
import uuid
from typing import Any
from urllib.parse import quote

REFERRAL_IDENTIFIER = "referral-identifier"

# Types whose ``identifier`` is 0..1 rather than 0..* in R4.
_SINGLE_IDENTIFIER = frozenset({"QuestionnaireResponse", "Bundle", "Composition"})
# Types without ``identifier`` in R4: nothing to make a conditional create idempotent on.
_NO_IDENTIFIER = frozenset({"Provenance", "AuditEvent", "Binary", "Parameters", "OperationOutcome"})
# meta elements that describe the content (kept); versionId, lastUpdated, source and tags are
# the source server's bookkeeping (R4 resource.html#Meta).
_META_KEPT = ("profile", "security")

# A literal reference (R4 references.html#literal): [base/]Type/id[/_history/vid].
_REFERENCE = re.compile(
    r"(?:(?P<base>.+)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?"
)


def identifier_system(source_base: str) -> str:
    """The identifier system of carecoord's referral copies: ``{source_base}/referral-identifier``."""
    return f"{source_base.rstrip('/')}/{REFERRAL_IDENTIFIER}"


def identifier_for(resource_type: str, fhir_id: str, source_base: str) -> dict[str, str]:
    """The Identifier carecoord gives the partner's copy of ``resource_type/fhir_id``."""
    return {"system": identifier_system(source_base), "value": f"{resource_type}/{fhir_id}"}


def escape_search_value(value: str) -> str:
    """R4 search.html#escaping: ``\\``, ``,``, ``$`` and ``|`` inside a value get a backslash."""
    for special in ("\\", ",", "$", "|"):
        value = value.replace(special, "\\" + special)
    return value


def identifier_condition(identifier: dict[str, str]) -> str:
    """``identifier=system|value``, each part escaped and the whole value URL-encoded (an
    ifNoneExist is the query part of a URL, http.html#ccreate)."""
    token = f"{escape_search_value(identifier['system'])}|{escape_search_value(identifier['value'])}"
    return "identifier=" + quote(token, safe="")


def _local_target(reference: str, source_base: str) -> tuple[str, bool] | None:
    """(``Type/id``, whether relative) when ``reference`` is a literal reference to a resource
    at the source; None for contained (``#id``), ``urn:`` and other servers' references."""
    match = _REFERENCE.fullmatch(reference)
    if match is None:
        return None
    base = match.group("base")
    if base is not None and base.rstrip("/") != source_base.rstrip("/"):
        return None
    return f"{match.group('type')}/{match.group('id')}", base is None


def _local_key(reference: str, source_base: str) -> str | None:
    target = _local_target(reference, source_base)
    return None if target is None else target[0]


def _key(resource: dict[str, Any]) -> str:
    resource_type, fhir_id = resource.get("resourceType"), resource.get("id")
    if not isinstance(resource_type, str) or not isinstance(fhir_id, str) or not fhir_id:
        raise ValueError("every bundled resource needs its resourceType and local id")
    if resource_type in _NO_IDENTIFIER:
        raise ValueError(f"a {resource_type} has no identifier to send it idempotently")
    return f"{resource_type}/{fhir_id}"


def _full_url(key: str, source_base: str) -> str:
    # Deterministic: the same referral always makes the same Bundle (reproducible, testable).
    name = source_base.rstrip("/") + "/" + key
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"


def _rewrite_references(
    value: Any,
    full_urls: dict[str, str],
    source_base: str,
    directory: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Point references to bundled resources at their fullUrls, others absolutely at the source.

    A reference to a ``directory`` resource (the owner Organization, say) also gets its first
    identifier and its name, so that a partner can recognise itself (``Task?owner:identifier=``)
    though it knows the source's URL of it no better than any other."""
    if isinstance(value, list):
        for item in value:
            _rewrite_references(item, full_urls, source_base, directory)
        return
    if not isinstance(value, dict):
        return
    extra: dict[str, Any] = {}
    for name, item in value.items():
        if name == "reference" and isinstance(item, str):
            target = _local_target(item, source_base)
            if target is None:
                continue  # contained (#id), urn:, another server's URL: meaningful as they are
            key, relative = target
            if key in full_urls:
                value[name] = full_urls[key]
                continue
            if relative:
                value[name] = f"{source_base.rstrip('/')}/{item}"
            known = (directory or {}).get(key)
            if known is not None:
                identifiers = [i for i in known.get("identifier") or [] if i.get("system") and i.get("value")]
                if identifiers and "identifier" not in value:
                    extra["identifier"] = {
                        "system": identifiers[0]["system"],
                        "value": identifiers[0]["value"],
                    }
                if isinstance(known.get("name"), str) and "display" not in value:
                    extra["display"] = known["name"]
        else:
            _rewrite_references(item, full_urls, source_base, directory)
    value.update(extra)


def add_identifier(resource: dict[str, Any], identifier: dict[str, str]) -> dict[str, str]:
    """Put carecoord's identifier on the copy (keeping the others); the one to condition on."""
    resource_type = resource["resourceType"]
    if resource_type in _SINGLE_IDENTIFIER:
        existing = resource.get("identifier")
        if existing is None or existing.get("system") == identifier["system"]:
            resource["identifier"] = dict(identifier)
            return identifier
        if isinstance(existing.get("system"), str) and isinstance(existing.get("value"), str):
            return {"system": existing["system"], "value": existing["value"]}
        raise ValueError(f"the {resource_type}'s only identifier has no system and value")
    others = [
        item
        for item in resource.get("identifier") or []
        if not (isinstance(item, dict) and item.get("system") == identifier["system"])
    ]
    resource["identifier"] = [*others, dict(identifier)]
    return identifier


def set_identifier(resource: dict[str, Any], identifier: dict[str, str]) -> None:
    """Make ``identifier`` the one of carecoord's system on ``resource``, replacing any of that
    system; a type with a single identifier loses the one it had (the resource is then found by
    carecoord's identifier alone, never by one its sender chose)."""
    if resource["resourceType"] in _SINGLE_IDENTIFIER:
        resource["identifier"] = dict(identifier)
        return
    others = [
        item
        for item in resource.get("identifier") or []
        if not (isinstance(item, dict) and item.get("system") == identifier["system"])
    ]
    resource["identifier"] = [*others, dict(identifier)]


def _copy(resource: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(resource)
    result.pop("id", None)
    meta = result.pop("meta", None)
    if isinstance(meta, dict):
        kept = {name: meta[name] for name in _META_KEPT if meta.get(name)}
        if kept:
            result["meta"] = kept
    return result


def _expect_reference(element: Any, key: str, source_base: str, what: str) -> None:
    reference = element.get("reference") if isinstance(element, dict) else None
    if not isinstance(reference, str) or _local_key(reference, source_base) != key:
        raise ValueError(f"{what} must reference {key}")


def referral_bundle(
    *,
    task: dict[str, Any],
    service_request: dict[str, Any],
    patient: dict[str, Any],
    supporting: list[dict[str, Any]],
    source_base: str,
    directory: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The transaction Bundle that creates the referral at the partner (see the module docstring).

    ``task.for`` must reference ``patient`` and ``task.focus`` ``service_request`` (local or
    absolute at ``source_base``). ``directory``: resources that are referenced but not sent
    (``Type/id`` -> resource), whose identifier and name go with the references to them.
    The inputs are not modified.
    """
    task_key, request_key, patient_key = _key(task), _key(service_request), _key(patient)
    _expect_reference(task.get("for"), patient_key, source_base, "Task.for")
    _expect_reference(task.get("focus"), request_key, source_base, "Task.focus")

    resources: dict[str, dict[str, Any]] = {}
    for resource in (patient, *supporting, service_request, task):
        resources.setdefault(_key(resource), resource)
    # Task last, so that the bundle reads in dependency order (the server does not need it).
    for key in (request_key, task_key):
        resources[key] = resources.pop(key)

    full_urls = {key: _full_url(key, source_base) for key in resources}
    entries: list[dict[str, Any]] = []
    for key, resource in resources.items():
        resource_type, fhir_id = key.split("/", 1)
        body = _copy(resource)
        condition = add_identifier(body, identifier_for(resource_type, fhir_id, source_base))
        _rewrite_references(body, full_urls, source_base, directory)
        entries.append(
            {
                "fullUrl": full_urls[key],
                "resource": body,
                "request": {
                    "method": "POST",
                    "url": resource_type,
                    "ifNoneExist": identifier_condition(condition),
                },
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
