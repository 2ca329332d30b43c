"""Conditional interactions and PATCH (FHIR R4 http.html#cond-update, #ccreate, #cdelete, #patch).

Each conditional write searches with the condition and acts on 0, 1 or several matches
exactly as http.html says, under a transaction-level advisory lock on the normalized
condition so that identical requests racing each other cannot both create.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from app.fhir import jsonio
from app.fhir.errors import BadRequest, PayloadTooLarge, PreconditionFailed
from app.fhir.patch import apply_fhirpath_patch, apply_json_patch, json_size
from app.fhir.repository import FhirRepository, StoredVersion
from app.fhir.search import RESULT_PARAMETERS, parse_search
from app.fhir.search_params import registry
from app.fhir.validation import validate_resource


def condition_pairs(condition: str, parameter: str = "condition") -> list[tuple[str, str]]:
    """The search parameters of a condition (``identifier=sys|val&...``); result parameters are dropped."""
    try:
        pairs = parse_qsl(condition.lstrip("?"), keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise BadRequest(f"{parameter}: not a query string", expression=(parameter,)) from exc
    pairs = [(k, v) for k, v in pairs if k.split(":", 1)[0] not in RESULT_PARAMETERS]
    if not pairs:
        raise BadRequest(
            f"{parameter}: a conditional interaction needs search criteria", expression=(parameter,)
        )
    return pairs


async def find_ids(
    repo: FhirRepository, resource_type: str, pairs: list[tuple[str, str]], limit: int, letter: str
) -> list[str]:
    """Ids of up to ``limit`` current resources matching the criteria; unknown parameters are a 400.

    A condition is a search: the token needs ``s`` on the type, and only resources it may
    both search and use with ``letter`` (the write's own SMART letter) are matched, so a
    condition never reveals, nor acts on, what the token may not see.
    """
    request = parse_search(
        (resource_type,),
        [*pairs, ("_count", str(limit))],
        registry=registry(),
        fhir_base=repo.fhir_base,
        strict=True,
        access=repo.access,
        letters=tuple(dict.fromkeys(("s", letter))),
        limits=repo.search_limits,
    )
    page = await repo.search(request, None, False)
    return [found.fhir_id for found in page.matches]


async def lock(repo: FhirRepository, resource_type: str, pairs: list[tuple[str, str]]) -> None:
    """Serialize conditional writes with the same normalized condition (see lock_condition)."""
    await repo.lock_condition(f"{resource_type}?{urlencode(sorted(pairs))}")


async def conditional_create(
    repo: FhirRepository, resource_type: str, data: dict[str, Any], condition: str
) -> tuple[StoredVersion, bool]:
    """http.html#ccreate: no match creates, one match returns it (200), several are a 412."""
    pairs = condition_pairs(condition, "If-None-Exist")
    await lock(repo, resource_type, pairs)
    ids = await find_ids(repo, resource_type, pairs, 2, "c")
    if len(ids) > 1:
        raise PreconditionFailed("If-None-Exist matches more than one resource", code="duplicate")
    if ids:
        return await repo.read(resource_type, ids[0]), False
    return await repo.create(resource_type, data), True


async def conditional_update(
    repo: FhirRepository, resource_type: str, data: dict[str, Any], condition: str, *, if_match: int | None
) -> tuple[StoredVersion, bool]:
    """http.html#cond-update: no match creates, one match updates it, several are a 412."""
    pairs = condition_pairs(condition)
    await lock(repo, resource_type, pairs)
    ids = await find_ids(repo, resource_type, pairs, 2, "u")
    if len(ids) > 1:
        raise PreconditionFailed("the condition matches more than one resource", code="multiple-matches")
    body_id = data.get("id")
    if ids:
        if body_id is not None and body_id != ids[0]:
            raise BadRequest(
                "the id in the body differs from the matching resource's id",
                expression=(f"{resource_type}.id",),
            )
        return await repo.update(resource_type, ids[0], {**data, "id": ids[0]}, if_match=if_match)
    if isinstance(body_id, str):
        return await repo.update(resource_type, body_id, data, if_match=if_match)
    return await repo.create(resource_type, data), True


async def conditional_delete(
    repo: FhirRepository, resource_type: str, condition: str, *, max_matches: int
) -> list[StoredVersion]:
    """http.html#cdelete: deletes the match(es); more than ``max_matches`` is a 412."""
    pairs = condition_pairs(condition)
    await lock(repo, resource_type, pairs)
    ids = await find_ids(repo, resource_type, pairs, max_matches + 1, "d")
    if len(ids) > max_matches:
        raise PreconditionFailed(
            f"the condition matches more than {max_matches} resource(s)", code="multiple-matches"
        )
    return [await repo.delete(resource_type, fhir_id) for fhir_id in ids]


@dataclass
class GrowthBudget:
    """How many more bytes the PATCHes of one request may add to what is stored (a Bundle's
    entries share one: each entry could otherwise grow a small resource to the size limit)."""

    remaining: int


async def patch(
    repo: FhirRepository,
    resource_type: str,
    fhir_id: str,
    body: Any,
    *,
    json_patch: bool,
    if_match: int | None,
    growth: GrowthBudget | None = None,
) -> StoredVersion:
    """http.html#patch: apply a JSON Patch or FHIRPath Patch to the locked current version.

    The result may not be larger than a write could store (``repo.max_resource_bytes``), nor
    grow by more than ``growth`` allows."""
    current = await repo.read_for_update(resource_type, fhir_id)
    if if_match is not None and if_match != current.version_id:
        raise PreconditionFailed(
            f"{resource_type}/{fhir_id} is at version {current.version_id}, not {if_match} (If-Match)",
            headers={"ETag": f'W/"{current.version_id}"'},
        )
    assert current.body is not None
    limit = repo.max_resource_bytes
    if growth is not None:
        limit = min(limit, len(current.body) + growth.remaining)
    document = jsonio.loads(current.body)
    if json_patch:
        patched = apply_json_patch(document, body, max_bytes=limit)
    else:
        patched = apply_fhirpath_patch(document, body, resource_type)
        if json_size(patched, limit) > limit:
            raise PayloadTooLarge(f"the patched resource would exceed {limit} bytes", code="too-costly")
    data = validate_resource(patched, resource_type, url_id=fhir_id)
    version, _ = await repo.update(resource_type, fhir_id, data, if_match=current.version_id)
    if growth is not None and version.body is not None:
        growth.remaining -= max(0, len(version.body) - len(current.body))
    return version
