"""The FHIR face of the audit store: AuditEvent read, vread and search (R4 http.html#read,
search.html, auditevent.html#search) over ``audit_event``, read-only (issue 14).

The repository sends AuditEvent reads here (app/fhir/repository.py) and the search service its
searches (app/fhir/search_service.py renders the Bundle, links and cursors as for every type).
Every statement carries the caller's access as a SQL condition over the table, built by the same
rules as for the clinical types (app/fhir/access.py ``AccessContext.condition``): AuditEvent
scopes only (a ``*`` scope does not reach the audit trail, app/auth/scopes.py), a ``patient/``
permission limits to the events naming the token's patient (R4 CompartmentDefinition/patient:
AuditEvent ``patient``), scope restrictions (``?outcome=4``) are search conditions, and a partner
organisation's clients see no AuditEvent (as before the store: none of its rows was theirs).

Supported parameters: ``_id``, ``_lastUpdated``, ``date``, ``action``, ``outcome``, ``type``,
``subtype``, ``site``, ``address``, ``agent`` (``:identifier`` for the OAuth client), ``entity``,
``patient``; ``_sort`` by ``date``/``_lastUpdated`` (default ``-date``, newest first), ``_count``,
``_total``, ``_summary``, ``_elements``, keyset paging. Other parameters are reported as not
supported (refused with ``Prefer: handling=strict``), as for every type.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from asyncpg import Connection

from app.auth.scopes import restriction_problem
from app.fhir.access import AccessContext
from app.fhir.conditions import FALSE, Node, Sql, render
from app.fhir.errors import BadRequest, NotFound
from app.fhir.fhirdate import date_range
from app.fhir.indexing import normalize, split_reference
from app.fhir.repository import Found, SearchPage, StoredVersion
from app.fhir.search import (
    RESULT_PARAMETERS,
    Binder,
    SearchLimits,
    SearchRequest,
    SortKey,
    _check_budget,
    _like_prefix,
    _prefix,
    _split_unescaped,
    result_options,
    split_values,
    too_costly,
    unescape,
)
from app.fhir.search_params import registry
from app.fhir.validation import FORBIDDEN_CHARACTERS

AUDIT_TYPE = "AuditEvent"
ACTION_SYSTEM = "http://hl7.org/fhir/audit-event-action"
OUTCOME_SYSTEM = "http://hl7.org/fhir/audit-event-outcome"

SEARCH_PARAMETERS = (
    "_id",
    "_lastUpdated",
    "action",
    "address",
    "agent",
    "date",
    "entity",
    "outcome",
    "patient",
    "site",
    "subtype",
    "type",
)
"""What AuditEvent search supports (the CapabilityStatement lists these, app/fhir/capability.py)."""

SORTS = {"date": "date", "_lastUpdated": "_lastUpdated"}


def search_capabilities() -> dict[str, Any]:
    """searchParam of the AuditEvent entry of the CapabilityStatement: the parameters above,
    with their R4 definitions; no includes (the audit trail is searched on its own)."""
    params = registry().for_type(AUDIT_TYPE)
    return {
        "searchInclude": [],
        "searchRevInclude": [],
        "searchParam": [
            {"name": name, "definition": params[name].url, "type": params[name].type}
            for name in sorted(SEARCH_PARAMETERS)
            if name in params
        ],
    }


class AuditCompiler:
    """Search parameters of AuditEvent as SQL over ``audit_event`` rows; the access rules'
    compiler (app/fhir/access.py ``ConditionCompiler``) for the same rows."""

    patient_column: str | None = "patient"
    """The Patients an event is about (a person's limits are over them: the audit store has no
    index rows)."""

    def __init__(self, fhir_base: str, binder: Binder) -> None:
        self.fhir_base = fhir_base
        self.bind = binder

    # -- ConditionCompiler ---------------------------------------------------------------------

    def bind_mark(self) -> int:
        return len(self.bind.values)

    def bind_rollback(self, mark: int) -> None:
        del self.bind.values[mark:]

    def in_patient_compartment(self, resource_type: str) -> bool:
        return True

    def compartment(self, alias: str, resource_type: str, patient_id: str) -> Sql:
        """R4 CompartmentDefinition/patient: AuditEvent by ``patient`` (an entity or agent)."""
        return Sql(f"{self.bind(patient_id)} = ANY({alias}.patient)")

    def restriction(self, alias: str, resource_type: str, name: str, raw: str) -> Sql | None:
        if restriction_problem(resource_type, [(name, raw)]) is not None:
            return None
        clause = self.condition(alias, resource_type, name, raw)
        return None if clause is None else Sql(clause)

    # -- parameters ------------------------------------------------------------------------------

    def condition(self, alias: str, resource_type: str, name: str, raw: str, depth: int = 0) -> str | None:
        """SQL for ``name=raw``; None for a parameter this store does not search."""
        if "." in name or name.startswith("_has"):
            return None
        base, _, modifier = name.partition(":")
        if base not in SEARCH_PARAMETERS:
            return None
        values = split_values(raw)
        if modifier == "missing":
            raise BadRequest(f"{name}: :missing is not supported on AuditEvent", expression=(name,))
        if base == "_id":
            return self._id(alias, name, modifier, values)
        if base in ("date", "_lastUpdated"):
            self._no_modifier(modifier, name)
            return _any(self._instant(f"{alias}.recorded", v, name) for v in values)
        if base in ("agent", "entity", "patient"):
            return self._reference(alias, base, modifier, values, name)
        if base == "address":
            return _any(self._string(f"{alias}.address", v, modifier, name) for v in values)
        # token parameters
        negate = modifier == "not"
        if modifier not in ("", "not"):
            raise BadRequest(f"{name}: modifier ':{modifier}' is not supported here", expression=(name,))
        clause = _any(self._token(alias, base, v, name) for v in values)
        return f"NOT COALESCE({clause}, false)" if negate else clause

    @staticmethod
    def _no_modifier(modifier: str, name: str) -> None:
        if modifier:
            raise BadRequest(f"{name}: modifier ':{modifier}' is not supported here", expression=(name,))

    def _id(self, alias: str, name: str, modifier: str, values: list[str]) -> str:
        if modifier not in ("", "not"):
            raise BadRequest(f"{name}: modifier ':{modifier}' is not supported on _id", expression=(name,))
        ids = [unescape(v) for v in values if v]
        if not ids:
            raise BadRequest(f"{name}: a value is required", expression=(name,))
        clause = f"{alias}.id = ANY({self.bind(ids)}::text[])"
        return f"NOT {clause}" if modifier == "not" else clause

    def _instant(self, column: str, value: str, name: str) -> str:
        """A date prefix against the instant ``recorded`` (search.html#prefix), written so that
        the (recorded) index and partition pruning apply."""
        prefix, text = _prefix(unescape(value))
        span = date_range(text)
        if span is None:
            raise BadRequest(
                f"{name}: '{value[:40]}' is not a valid date (0001-01-01 to 9999-12-31 in UTC)",
                expression=(name,),
            )
        start, end = span
        if prefix in ("gt", "sa"):
            return f"{column} >= {self.bind(end)}"
        if prefix in ("lt", "eb"):
            return f"{column} < {self.bind(start)}"
        if prefix == "ge":
            return f"{column} >= {self.bind(start)}"
        if prefix == "le":
            return f"{column} < {self.bind(end)}"
        if prefix == "ap":
            gap = max((end - start) / 10, (datetime.now(start.tzinfo) - start) / 10)
            return f"({column} >= {self.bind(start - gap)} AND {column} < {self.bind(end + gap)})"
        contained = f"({column} >= {self.bind(start)} AND {column} < {self.bind(end)})"
        return f"NOT {contained}" if prefix == "ne" else contained

    def _string(self, column: str, value: str, modifier: str, name: str) -> str:
        value = unescape(value)
        if not value:
            raise BadRequest(f"{name}: empty value", expression=(name,))
        if modifier == "exact":
            return f"{column} = {self.bind(value)}"
        pattern = _like_prefix(normalize(value))
        if modifier == "contains":
            pattern = "%" + pattern
        elif modifier:
            raise BadRequest(f"{name}: modifier ':{modifier}' is not supported here", expression=(name,))
        return f"lower({column}) LIKE {self.bind(pattern + '%')}"

    def _token(self, alias: str, base: str, value: str, name: str) -> str:
        if not value:
            raise BadRequest(f"{name}: empty value", expression=(name,))
        parts = _split_unescaped(value, "|", 1)
        system, code = (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        if base in ("action", "outcome", "site"):
            # code (action, outcome) and string (site) elements: their system is implied.
            implied = {"action": ACTION_SYSTEM, "outcome": OUTCOME_SYSTEM}.get(base)
            if system is not None and system not in ("", implied):
                return "FALSE"
            if not code:
                return f"{alias}.{base} IS NOT NULL"
            return f"{alias}.{base} = {self.bind(code)}"
        if base == "type":
            if system is None:
                return f"{alias}.type_code = {self.bind(code)}"
            if not system:
                return f"({alias}.type_system IS NULL AND {alias}.type_code = {self.bind(code)})"
            if not code:
                return f"{alias}.type_system = {self.bind(system)}"
            return f"({alias}.type_system = {self.bind(system)} AND {alias}.type_code = {self.bind(code)})"
        # subtype: a list of Codings
        if system is None:
            return f"{self.bind(code)} = ANY({alias}.subtype)"
        if not code:
            return (
                f"EXISTS (SELECT 1 FROM unnest({alias}.subtype_token) t(token)"
                f" WHERE t.token LIKE {self.bind(_like_prefix(system) + '|%')})"
            )
        return f"{self.bind(f'{system}|{code}')} = ANY({alias}.subtype_token)"

    def _reference(self, alias: str, base: str, modifier: str, values: list[str], name: str) -> str:
        clauses = []
        for value in values:
            if not value:
                raise BadRequest(f"{name}: empty value", expression=(name,))
            if modifier == "identifier":
                if base != "agent":
                    return "FALSE"  # entities and patients are recorded by reference only
                parts = _split_unescaped(value, "|", 1)
                system, ident = (None, parts[0]) if len(parts) == 1 else parts
                if system is not None and system != "urn:carecoord:oauth-client":
                    clauses.append("FALSE")
                else:
                    clauses.append(f"{alias}.agent_client = {self.bind(ident)}")
                continue
            if modifier and not modifier.isalpha():
                raise BadRequest(f"{name}: modifier ':{modifier}' is not supported here", expression=(name,))
            target_type, target_id, url = split_reference(unescape(value), self.fhir_base)
            if url is not None and "/" not in url and ":" not in url:
                target_id, url = url, None  # a bare id
            if modifier:
                if target_type and target_type != modifier:
                    clauses.append("FALSE")
                    continue
                target_type = modifier
            if base == "patient":
                if target_type not in (None, "Patient") or target_id is None:
                    clauses.append("FALSE")
                else:
                    clauses.append(f"{self.bind(target_id)} = ANY({alias}.patient)")
                continue
            if url is not None:
                short = url
            elif target_id is None:
                raise BadRequest(f"{name}: '{value[:60]}' is not a reference", expression=(name,))
            elif target_type is None:
                short = None
            else:
                short = f"{target_type}/{target_id}"
            if base == "entity":
                if short is not None:
                    clauses.append(f"{self.bind(short)} = ANY({alias}.entity)")
                else:
                    clauses.append(
                        f"EXISTS (SELECT 1 FROM unnest({alias}.entity) e(ref)"
                        f" WHERE split_part(e.ref, '/', 2) = {self.bind(target_id)})"
                    )
            elif short is not None:
                placeholder = self.bind(short)
                clauses.append(
                    f"({alias}.agent_user = {placeholder} OR {alias}.agent_organization = {placeholder})"
                )
            else:
                placeholder = self.bind(target_id)
                clauses.append(
                    f"(split_part({alias}.agent_user, '/', 2) = {placeholder}"
                    f" OR split_part({alias}.agent_organization, '/', 2) = {placeholder})"
                )
        return _any(clauses)


def _any(parts: Any) -> str:
    items = list(parts)
    return items[0] if len(items) == 1 else "(" + " OR ".join(items) + ")"


def access_condition(access: AccessContext, compiler: AuditCompiler, alias: str, letter: str) -> Node | None:
    """The rows of ``audit_event`` the token may use with ``letter`` (``r``, ``s``); 403 when no
    AuditEvent permission covers it (module docstring). A person's token (issue 11) sees the
    events naming one of its Patients (AuditCompiler ``patient_column``)."""
    if access.unrestricted:
        return None
    if access.organization is not None:
        access.require(AUDIT_TYPE, letter)
        return FALSE
    return access.condition(compiler, alias, AUDIT_TYPE, letter)


def parse_audit_search(
    pairs: list[tuple[str, str]],
    *,
    fhir_base: str,
    strict: bool,
    access: AccessContext,
    compartment: tuple[str, str] | None = None,
    limits: SearchLimits = SearchLimits(),
) -> SearchRequest:
    """An AuditEvent search's parameters as a SearchRequest over ``audit_event`` (alias ``a``);
    the same budget, result parameters, issues and fingerprint as every search (app/fhir/search.py)."""
    sort_specs = [v for name, raw in pairs if name == "_sort" for v in raw.split(",") if v]
    _check_budget(
        limits,
        pairs,
        sort_keys=len(sort_specs),
        include_directives=sum(
            len(split_values(raw)) for name, raw in pairs if name.startswith(("_include", "_revinclude"))
        ),
    )
    binder = Binder()
    compiler = AuditCompiler(fhir_base, binder)
    conditions: list[Node] = []
    applied: list[tuple[str, str]] = []
    unknown: list[str] = []
    options: dict[str, str] = {}
    if compartment is not None:
        conditions.append(compiler.compartment("a", AUDIT_TYPE, compartment[1]))
    for name, raw in pairs:
        if FORBIDDEN_CHARACTERS.search(raw) or FORBIDDEN_CHARACTERS.search(name):
            raise BadRequest(
                f"{name[:64]!r}: contains a control character or invalid Unicode", expression=(name[:64],)
            )
        base = name.split(":", 1)[0].split(".", 1)[0]
        if base in ("_include", "_revinclude"):
            unknown.append(name)
            continue
        if base in RESULT_PARAMETERS:
            if base not in ("_sort", "_format", "_pretty", "_type"):
                options[base] = raw
            if base not in ("_format", "_cursor"):
                applied.append((name, raw))
            continue
        clause = compiler.condition("a", AUDIT_TYPE, name, raw)
        if clause is None:
            unknown.append(name)
            continue
        conditions.append(Sql(clause))
        applied.append((name, raw))
    issues, count, total, summary, elements = result_options(options, unknown, strict, " on AuditEvent")
    if len(sort_specs) > 1 or (sort_specs and sort_specs[0].lstrip("-") not in SORTS):
        raise BadRequest("_sort: AuditEvent sorts by date or -date only", expression=("_sort",))
    descending = not sort_specs or sort_specs[0].startswith("-")
    limit = access_condition(access, compiler, "a", "s")
    if limit is not None:
        conditions.append(limit)
    if len(binder.values) > limits.bind_values:
        raise too_costly(limits, "bind_values", len(binder.values), "values to bind")
    return SearchRequest(
        resource_types=(AUDIT_TYPE,),
        conditions=conditions,
        binder=binder,
        applied=applied,
        sort=[SortKey("date", descending, "a.recorded", "timestamptz")],
        count=count,
        total="none" if total == "none" else "accurate",
        summary=summary,
        elements=elements,
        cursor=options.get("_cursor"),
        issues=issues,
        access=access,
        where_count=len(binder.values),
        store="audit_event",
    )


async def search(
    conn: Connection, request: SearchRequest, after: tuple[Any, ...] | None, backwards: bool
) -> SearchPage:
    """One keyset page over (recorded, id) in the request's direction, and the total when asked."""
    values = list(request.binder.values)
    where = " AND ".join(request.where()) or "TRUE"
    total = None
    if request.total == "accurate" or request.summary == "count":
        total = int(await conn.fetchval(f"SELECT count(*) FROM audit_event a WHERE {where}", *values))
    if request.summary == "count":
        return SearchPage([], [], total, None, None)
    descending = request.sort[0].descending
    # Backwards (a "previous" link) walks the other way from the cursor and turns the page round.
    walk_descending = descending != backwards
    keyset = ""
    if after is not None:
        try:
            moment = datetime.fromisoformat(str(after[0]))
            last_id = str(after[1])
        except (ValueError, IndexError) as exc:
            raise BadRequest("_cursor: not a cursor of this search", expression=("_cursor",)) from exc
        values += [moment, last_id]
        operator = "<" if walk_descending else ">"
        keyset = f" AND (a.recorded, a.id) {operator} (${len(values) - 1}, ${len(values)})"
    direction = "DESC" if walk_descending else "ASC"
    rows = await conn.fetch(
        f"SELECT a.id, a.recorded, a.body FROM audit_event a WHERE {where}{keyset}"
        f" ORDER BY a.recorded {direction}, a.id {direction} LIMIT {request.count + 1}",
        *values,
    )
    more = len(rows) > request.count
    rows = rows[: request.count]
    if backwards:
        rows = rows[::-1]
    found = [Found(0, AUDIT_TYPE, row["id"], row["body"], (row["recorded"], row["id"])) for row in rows]
    if not found:
        return SearchPage([], [], total, None, None)
    next_keys: tuple[Any, ...] | None
    previous_keys: tuple[Any, ...] | None
    if backwards:
        previous_keys = found[0].keys if more else None
        next_keys = found[-1].keys
    else:
        next_keys = found[-1].keys if more else None
        previous_keys = found[0].keys if after is not None else None
    return SearchPage(found, [], total, next_keys, previous_keys)


async def read(
    conn: Connection, access: AccessContext, fhir_base: str, fhir_id: str, letter: str
) -> StoredVersion:
    """http.html#read of one AuditEvent: 403 without an AuditEvent permission for ``letter``,
    404 when unknown or outside the token's limits (its existence is not revealed)."""
    binder = Binder()
    compiler = AuditCompiler(fhir_base, binder)
    binder(fhir_id)
    condition = access_condition(access, compiler, "a", letter)
    limit = "TRUE" if condition is None else render(condition)
    row = await conn.fetchrow(
        f"SELECT a.recorded, a.body FROM audit_event a WHERE a.id = $1 AND {limit} LIMIT 1",
        *binder.values,
    )
    if row is None:
        raise NotFound(f"{AUDIT_TYPE}/{fhir_id} is not known")
    return StoredVersion(AUDIT_TYPE, fhir_id, 1, row["recorded"], False, row["body"])
