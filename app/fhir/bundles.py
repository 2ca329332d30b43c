"""Batch and transaction Bundles (FHIR R4 http.html#transaction, #batch).

A transaction is all-or-nothing in the request's database transaction: entries run in the
R4 order (DELETE, POST, PUT/PATCH, GET: http.html#trules), the ids of POST entries are chosen
first so every ``urn:uuid:``/``urn:oid:`` placeholder, and every conditional reference
(``Patient?identifier=...``), is rewritten before anything is written, and any failing
entry fails the whole Bundle with an OperationOutcome that names the entry. The resources
the DELETE, POST, PUT and PATCH entries act on (conditional ones resolved first) may not
overlap; the GET entries, which run last, may name anything: they read the state the writes
left, so a read of a resource the transaction deleted answers 410 in its own entry (as HAPI
does) and a search simply does not find it. A batch runs each entry in its own savepoint, so
one failing entry does not affect the others.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from app.fhir import jsonio
from app.fhir.conditional import (
    GrowthBudget,
    condition_pairs,
    conditional_create,
    conditional_delete,
    conditional_update,
    find_ids,
    lock,
    patch,
)
from app.fhir.errors import (
    BadRequest,
    FHIRError,
    Gone,
    Issue,
    PayloadTooLarge,
    PreconditionFailed,
    operation_outcome,
)
from app.fhir.params import parse_etag, parse_version_id
from app.fhir.repository import FhirRepository, StoredVersion, fhir_instant, new_id
from app.fhir.responses import Prefer
from app.fhir.search_service import search_bundle
from app.fhir.validation import check_id, check_resource_type, parse_body, validate_resource

METHOD_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
RESPONSE_SIZE_FACTOR = 10
"""A Bundle's response carries at most this many times the largest resource a write may store."""
MAX_CONDITIONAL_REFERENCES = 1000
"""Distinct conditional references one Bundle may resolve (issue 15: one request, bounded work)."""
PLACEHOLDER_PREFIXES = ("urn:uuid:", "urn:oid:")


@dataclass
class Entry:
    """One parsed Bundle entry."""

    index: int
    method: str
    resource_type: str
    fhir_id: str | None
    version: str | None
    query: str
    resource: dict[str, Any] | None
    full_url: str | None
    if_none_exist: str | None
    if_match: int | None
    if_none_match: str | None
    patch_body: Any = None
    json_patch: bool = False
    planned_id: str | None = None
    planned_deletes: list[str] | None = None
    """A transaction's conditional DELETE: the ids its condition matched while planning."""
    existing: bool = False
    response: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"


def _entry_error(entry_index: int, exc: FHIRError) -> FHIRError:
    """The same error, saying which entry failed."""
    where = f"Bundle.entry[{entry_index}]"
    issues = [
        Issue(i.code, f"{where}: {i.diagnostics}", i.severity, i.expression or (where,))
        for i in exc.all_issues()
    ]
    return type(exc)(
        diagnostics=f"{where}: {exc.diagnostics}",
        issues=issues,
        headers=exc.headers,
        status=exc.status,
        code=exc.code,
    )


def _parse_entry(index: int, raw: Any, fhir_base: str) -> Entry:
    if not isinstance(raw, dict):
        raise BadRequest("an entry must be an object")
    request = raw.get("request")
    if not isinstance(request, dict):
        raise BadRequest("entry.request is required", code="required")
    method = request.get("method")
    url = request.get("url")
    if method not in METHOD_ORDER or not isinstance(url, str) or not url:
        raise BadRequest("entry.request needs a method (GET, HEAD, POST, PUT, PATCH, DELETE) and a url")
    if url.startswith(fhir_base + "/"):
        url = url[len(fhir_base) + 1 :]
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        raise BadRequest(f"entry.request.url '{url[:80]}' is not on this server")
    segments = [s for s in parts.path.split("/") if s]
    if not segments:
        raise BadRequest("entry.request.url names no resource type")
    if any(segment.startswith("$") for segment in segments):
        # Not to be taken for the interaction its other segments spell (Patient/1/$meta as a read).
        raise BadRequest(
            "operations ($name) are not supported in a batch or transaction", code="not-supported"
        )
    resource_type = segments[0]
    check_resource_type(resource_type)
    fhir_id = segments[1] if len(segments) > 1 else None
    if fhir_id is not None and fhir_id != "_history":
        check_id(fhir_id)
    version = segments[3] if len(segments) == 4 and segments[2] == "_history" else None
    resource = raw.get("resource")
    if resource is not None and not isinstance(resource, dict):
        raise BadRequest("entry.resource must be a resource object")
    for field_name in ("ifNoneExist", "ifMatch", "ifNoneMatch"):
        if request.get(field_name) is not None and not isinstance(request.get(field_name), str):
            raise BadRequest(f"entry.request.{field_name} must be a string")
    entry = Entry(
        index=index,
        method=method,
        resource_type=resource_type,
        fhir_id=fhir_id,
        version=version,
        query=parts.query,
        resource=resource,
        full_url=raw.get("fullUrl") if isinstance(raw.get("fullUrl"), str) else None,
        if_none_exist=request.get("ifNoneExist"),
        if_match=parse_etag(request.get("ifMatch")),
        if_none_match=request.get("ifNoneMatch"),
    )
    if method in ("POST", "PUT") and resource is None:
        raise BadRequest(f"{method} entries need a resource", code="required")
    if method == "PATCH":
        entry.patch_body, entry.json_patch = _patch_body(resource)
    return entry


def _patch_body(resource: dict[str, Any] | None) -> tuple[Any, bool]:
    """A transaction PATCH: a Binary holding a JSON Patch, or FHIRPath Patch Parameters."""
    if resource is None:
        raise BadRequest("PATCH entries need a Binary (JSON Patch) or Parameters (FHIRPath Patch) resource")
    if resource.get("resourceType") == "Parameters":
        return resource, False
    if resource.get("resourceType") == "Binary" and isinstance(resource.get("data"), str):
        try:
            operations = parse_body(base64.b64decode(resource["data"], validate=True))
        except binascii.Error as exc:
            raise BadRequest("the Binary's data is not base64-encoded JSON Patch") from exc
        return operations, True
    raise BadRequest("PATCH entries need a Binary (JSON Patch) or Parameters (FHIRPath Patch) resource")


def _rewrite(node: Any, mapping: dict[str, str]) -> Any:
    """Replace every string equal to a placeholder (references, URIs) by its resolved reference."""
    if isinstance(node, dict):
        return {key: _rewrite(value, mapping) for key, value in node.items()}
    if isinstance(node, list):
        return [_rewrite(item, mapping) for item in node]
    if isinstance(node, str) and node in mapping:
        return mapping[node]
    return node


def _conditional_references(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str) and "?" in reference and "/" not in reference.split("?", 1)[0]:
            found.add(reference)
        for value in node.values():
            _conditional_references(value, found)
    elif isinstance(node, list):
        for item in node:
            _conditional_references(item, found)


async def process_bundle(
    repo: FhirRepository,
    raw: Any,
    *,
    max_entries: int,
    conditional_delete_max: int,
    prefer: Prefer,
    cursors: Any,
    max_resources: int = 10000,
) -> dict[str, Any]:
    """Run a ``batch`` or ``transaction`` Bundle; returns the response Bundle.

    Its reads and searches return at most ``max_resources`` resources together: a small
    Bundle of many large searches must not build a response of hundreds of megabytes (issue
    15). An entry that would pass the limit is refused (400 ``too-costly``): in a batch that
    entry alone, a transaction as a whole."""
    if not isinstance(raw, dict) or raw.get("resourceType") != "Bundle":
        raise BadRequest(
            "POST to the base takes a Bundle of type batch or transaction",
            expression=("Bundle.resourceType",),
        )
    kind = raw.get("type")
    if kind not in ("batch", "transaction"):
        raise BadRequest("Bundle.type must be batch or transaction", expression=("Bundle.type",))
    entries = raw.get("entry") or []
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be an array", expression=("Bundle.entry",))
    if len(entries) > max_entries:
        raise PayloadTooLarge(f"the Bundle has {len(entries)} entries; the limit is {max_entries}")
    runner = _Runner(repo, conditional_delete_max, prefer, cursors, max_resources)
    if kind == "transaction":
        responses = await runner.transaction(entries)
    else:
        responses = await runner.batch(entries)
    return (
        {"resourceType": "Bundle", "type": f"{kind}-response", "entry": responses}
        if responses
        else {"resourceType": "Bundle", "type": f"{kind}-response"}
    )


class _Runner:
    def __init__(
        self,
        repo: FhirRepository,
        conditional_delete_max: int,
        prefer: Prefer,
        cursors: Any,
        max_resources: int,
    ) -> None:
        self.repo = repo
        self.conditional_delete_max = conditional_delete_max
        self.prefer = prefer
        self.cursors = cursors
        self.resources_left = max_resources
        """How many more resources the response may carry (reads and search results)."""
        self.bytes_left = RESPONSE_SIZE_FACTOR * repo.max_resource_bytes
        """How many more bytes of resources the response may carry (reads, searches, and the
        representations of what was written)."""
        self.growth = GrowthBudget(repo.max_resource_bytes)
        """What the Bundle's PATCH entries may add to what is stored, together."""
        self.conditional_references: dict[str, str] = {}
        """Conditional references (``Patient?identifier=...``) resolved so far: each is searched once."""
        self.deleted: set[str] = set()
        """``Type/id`` of what this transaction's DELETE entries deleted."""

    def _spend(self, resources: int, size: int) -> None:
        if resources > self.resources_left or size > self.bytes_left:
            self.resources_left = 0  # what is left is not enough for anything but reads
            raise BadRequest(
                "the Bundle's reads and searches return more resources than this server puts in one"
                " response (CARECOORD_MAX_BUNDLE_RESOURCES, or their size); page through the search"
                " instead",
                code="too-costly",
            )
        self.resources_left -= resources
        self.bytes_left -= size

    # -- transaction ---------------------------------------------------------------------

    async def transaction(self, raw_entries: list[Any]) -> list[dict[str, Any]]:
        entries: list[Entry] = []
        for index, raw in enumerate(raw_entries):
            try:
                entries.append(_parse_entry(index, raw, self.repo.fhir_base))
            except FHIRError as exc:
                raise _entry_error(index, exc) from exc
        mapping = await self._plan_ids(entries)
        self._check_overlaps(entries)
        self.repo.expect_creates(
            [(e.resource_type, e.planned_id) for e in entries if e.method == "POST" and e.planned_id]
        )
        self._check_conditional_references(entries)
        for entry in entries:
            try:
                await self._resolve_references(entry, mapping)
            except FHIRError as exc:
                raise _entry_error(entry.index, exc) from exc
        for entry in sorted(entries, key=lambda e: (METHOD_ORDER[e.method], e.index)):
            try:
                entry.response = await self._execute(entry)
            except Gone as exc:
                if (
                    entry.method not in ("GET", "HEAD")
                    or f"{entry.resource_type}/{entry.fhir_id}" not in self.deleted
                ):
                    raise _entry_error(entry.index, exc) from exc
                # Reads run after the writes (http.html#trules): a read of what this transaction
                # deleted answers what a read after it would, 410, in its own entry.
                entry.response = _error_response(exc)
            except FHIRError as exc:
                raise _entry_error(entry.index, exc) from exc
        return [entry.response for entry in entries]

    @staticmethod
    def _check_overlaps(entries: list[Entry]) -> None:
        """http.html#trules: the resources the DELETE, POST, PUT and PATCH entries act on
        (conditional ones as resolved while planning) may not overlap; GETs do not count. Two
        conditional creates that found the same existing resource write nothing and may."""
        seen: dict[str, Entry] = {}
        for entry in entries:
            for key in _identities(entry):
                earlier = seen.get(key)
                if earlier is not None and not (earlier.existing and entry.existing):
                    raise BadRequest(
                        f"Bundle.entry[{entry.index}]: {key} is also written by entry {earlier.index}",
                        expression=(f"Bundle.entry[{entry.index}]",),
                    )
                seen.setdefault(key, entry)

    async def _plan_ids(self, entries: list[Entry]) -> dict[str, str]:
        """Choose the id of every POST (and conditional PUT) entry; map placeholders to them."""
        mapping: dict[str, str] = {}
        for entry in entries:
            try:
                if entry.method == "POST":
                    if entry.if_none_exist:
                        pairs = condition_pairs(entry.if_none_exist, "ifNoneExist")
                        await lock(self.repo, entry.resource_type, pairs)
                        ids = await find_ids(self.repo, entry.resource_type, pairs, 2, "c")
                        if len(ids) > 1:
                            raise PreconditionFailed(
                                "ifNoneExist matches more than one resource", code="duplicate"
                            )
                        entry.existing = bool(ids)
                        entry.planned_id = ids[0] if ids else new_id()
                    else:
                        entry.planned_id = new_id()
                elif entry.method == "PUT" and entry.query and not entry.fhir_id:
                    pairs = condition_pairs(entry.query)
                    await lock(self.repo, entry.resource_type, pairs)
                    ids = await find_ids(self.repo, entry.resource_type, pairs, 2, "u")
                    if len(ids) > 1:
                        raise PreconditionFailed(
                            "the condition matches more than one resource", code="multiple-matches"
                        )
                    body_id = (entry.resource or {}).get("id")
                    entry.planned_id = ids[0] if ids else (body_id if isinstance(body_id, str) else new_id())
                elif entry.method == "PUT":
                    entry.planned_id = entry.fhir_id
                elif entry.method == "DELETE" and entry.query and not entry.fhir_id:
                    pairs = condition_pairs(entry.query)
                    await lock(self.repo, entry.resource_type, pairs)
                    limit = self.conditional_delete_max
                    entry.planned_deletes = await find_ids(
                        self.repo, entry.resource_type, pairs, limit + 1, "d"
                    )
                    if len(entry.planned_deletes) > limit:
                        raise PreconditionFailed(
                            f"the condition matches more than {limit} resource(s)", code="multiple-matches"
                        )
            except FHIRError as exc:
                raise _entry_error(entry.index, exc) from exc
            if entry.full_url and entry.planned_id and entry.full_url.startswith(PLACEHOLDER_PREFIXES):
                mapping[entry.full_url] = f"{entry.resource_type}/{entry.planned_id}"
        return mapping

    @staticmethod
    def _check_conditional_references(entries: list[Entry]) -> None:
        """Each distinct conditional reference is a search: at most MAX_CONDITIONAL_REFERENCES,
        counted before the first one runs."""
        found: set[str] = set()
        for entry in entries:
            _conditional_references(entry.resource, found)
            _conditional_references(entry.patch_body, found)
        if len(found) > MAX_CONDITIONAL_REFERENCES:
            raise BadRequest(
                f"the Bundle holds {len(found)} distinct conditional references; the limit is"
                f" {MAX_CONDITIONAL_REFERENCES} (each is a search)",
                code="too-costly",
            )

    async def _resolve_references(self, entry: Entry, mapping: dict[str, str]) -> None:
        if entry.resource is None:
            return
        conditional: set[str] = set()
        _conditional_references(entry.resource, conditional)
        local = dict(mapping)
        for reference in conditional:
            resolved = self.conditional_references.get(reference)
            if resolved is None:
                resource_type, _, query = reference.partition("?")
                check_resource_type(resource_type)
                ids = await find_ids(self.repo, resource_type, condition_pairs(query, "reference"), 2, "s")
                if len(ids) != 1:
                    raise PreconditionFailed(
                        f"conditional reference {reference[:80]} matches {len(ids)} resources, not 1",
                        code="not-found" if not ids else "multiple-matches",
                    )
                resolved = self.conditional_references[reference] = f"{resource_type}/{ids[0]}"
            local[reference] = resolved
        if local:
            entry.resource = _rewrite(entry.resource, local)
        if entry.method == "PATCH":
            entry.patch_body = _rewrite(entry.patch_body, local) if local else entry.patch_body

    # -- batch ---------------------------------------------------------------------------

    async def batch(self, raw_entries: list[Any]) -> list[dict[str, Any]]:
        responses: list[dict[str, Any]] = []
        for index, raw in enumerate(raw_entries):
            try:
                async with self.repo.savepoint():
                    entry = _parse_entry(index, raw, self.repo.fhir_base)
                    responses.append(await self._execute(entry))
            except FHIRError as exc:
                responses.append(_error_response(exc))
        return responses

    # -- one entry -----------------------------------------------------------------------

    async def _execute(self, entry: Entry) -> dict[str, Any]:
        repo = self.repo
        if entry.method == "DELETE":
            if entry.fhir_id:
                version = await repo.delete(entry.resource_type, entry.fhir_id, if_match=entry.if_match)
                self.deleted.add(f"{entry.resource_type}/{entry.fhir_id}")
                return {"response": {"status": "200 OK", "etag": f'W/"{version.version_id}"'}}
            if entry.planned_deletes is not None:  # a transaction's, resolved while planning
                deleted = [await repo.delete(entry.resource_type, i) for i in entry.planned_deletes]
            else:
                deleted = await conditional_delete(
                    repo, entry.resource_type, entry.query, max_matches=self.conditional_delete_max
                )
            self.deleted.update(f"{v.resource_type}/{v.fhir_id}" for v in deleted)
            return {"response": {"status": "200 OK" if deleted else "204 No Content"}}
        if entry.method in ("GET", "HEAD"):
            return await self._read(entry)
        if entry.method == "PATCH":
            if not entry.fhir_id:
                raise BadRequest("PATCH entries need Type/id")
            version = await patch(
                repo,
                entry.resource_type,
                entry.fhir_id,
                entry.patch_body,
                json_patch=entry.json_patch,
                if_match=entry.if_match,
                growth=self.growth,
            )
            return self._write_response(version, "200 OK")
        assert entry.resource is not None
        if entry.method == "POST":
            data = validate_resource(entry.resource, entry.resource_type)
            if entry.existing and entry.planned_id:
                # ifNoneExist matched (resolved while planning the transaction's ids)
                return self._write_response(await repo.read(entry.resource_type, entry.planned_id), "200 OK")
            if entry.if_none_exist and entry.planned_id is None:
                # a batch entry: the condition is resolved now
                version, created = await conditional_create(
                    repo, entry.resource_type, data, entry.if_none_exist
                )
                return self._write_response(version, "201 Created" if created else "200 OK")
            version = await repo.create(entry.resource_type, data, fhir_id=entry.planned_id)
            return self._write_response(version, "201 Created")
        # PUT
        if entry.query and not entry.fhir_id:
            if entry.planned_id is None:
                data = validate_resource(entry.resource, entry.resource_type)
                version, created = await conditional_update(
                    repo, entry.resource_type, data, entry.query, if_match=entry.if_match
                )
                return self._write_response(version, "201 Created" if created else "200 OK")
            body = {**entry.resource, "id": entry.planned_id}
            data = validate_resource(body, entry.resource_type, url_id=entry.planned_id)
            version, created = await repo.update(
                entry.resource_type, entry.planned_id, data, if_match=entry.if_match
            )
            return self._write_response(version, "201 Created" if created else "200 OK")
        if not entry.fhir_id:
            raise BadRequest("PUT entries need Type/id or Type?criteria")
        data = validate_resource(entry.resource, entry.resource_type, url_id=entry.fhir_id)
        version, created = await repo.update(
            entry.resource_type, entry.fhir_id, data, if_match=entry.if_match
        )
        return self._write_response(version, "201 Created" if created else "200 OK")

    async def _read(self, entry: Entry) -> dict[str, Any]:
        repo = self.repo
        if entry.fhir_id == "_history" or (
            entry.fhir_id and entry.version is None and "_history" in entry.query
        ):
            raise BadRequest("history inside a Bundle is not supported")
        if entry.fhir_id:
            if entry.version is not None:
                version = await repo.vread(
                    entry.resource_type, entry.fhir_id, parse_version_id(entry.version)
                )
            else:
                version = await repo.read(entry.resource_type, entry.fhir_id)
            if entry.if_none_match and parse_etag(entry.if_none_match, "ifNoneMatch") == version.version_id:
                return {"response": {"status": "304 Not Modified", "etag": f'W/"{version.version_id}"'}}
            assert version.body is not None
            self._spend(1, len(version.body))
            return {"resource": jsonio.stored(version.body), "response": _response_meta(version, "200 OK")}
        if self.resources_left <= 0:
            self._spend(1, 0)
        pairs = parse_qsl(entry.query, keep_blank_values=True)
        found = await search_bundle(
            repo,
            resource_types=(entry.resource_type,),
            pairs=pairs,
            cursors=self.cursors,
            strict=self.prefer.handling == "strict",
            path=entry.resource_type,
        )
        self._spend(found.resources, len(found.text))
        return {"resource": jsonio.stored(found.text), "response": {"status": "200 OK"}}

    def _write_response(self, version: StoredVersion, status: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.prefer.return_ == "representation" and version.body is not None:
            # A representation is a preference (http.html#ops): past the response's size budget
            # an entry answers with its location and version only.
            if len(version.body) <= self.bytes_left:
                self.bytes_left -= len(version.body)
                out["resource"] = jsonio.stored(version.body)
        elif self.prefer.return_ == "OperationOutcome":
            out["response"] = {
                "outcome": operation_outcome(
                    [
                        Issue(
                            "informational",
                            f"{version.resource_type}/{version.fhir_id} written",
                            "information",
                        )
                    ]
                )
            }
        out.setdefault("response", {}).update(_response_meta(version, status))
        return out


def _identities(entry: Entry) -> list[str]:
    """``Type/id`` of the resources a transaction entry writes (or, for a conditional create
    that found one, names); none for reads."""
    if entry.method == "DELETE":
        ids = [entry.fhir_id] if entry.fhir_id else (entry.planned_deletes or [])
    elif entry.method in ("POST", "PUT"):
        ids = [entry.planned_id] if entry.planned_id else []
    elif entry.method == "PATCH":
        ids = [entry.fhir_id] if entry.fhir_id else []
    else:
        ids = []
    return [f"{entry.resource_type}/{fhir_id}" for fhir_id in ids]


def _response_meta(version: StoredVersion, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "location": f"{version.resource_type}/{version.fhir_id}/_history/{version.version_id}",
        "etag": f'W/"{version.version_id}"',
        "lastModified": fhir_instant(version.last_updated),
    }


def _error_response(exc: FHIRError) -> dict[str, Any]:
    reasons = {
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        409: "Conflict",
        410: "Gone",
        412: "Precondition Failed",
        413: "Payload Too Large",
        422: "Unprocessable Entity",
    }
    status = f"{exc.status} {reasons.get(exc.status, 'Error')}"
    return {"response": {"status": status, "outcome": operation_outcome(exc.all_issues())}}
