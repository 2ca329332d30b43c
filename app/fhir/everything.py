"""``Patient/[id]/$everything`` and ``Patient/$everything`` (R4 patient-operation-everything.html,
OperationDefinition http://hl7.org/fhir/OperationDefinition/Patient-everything).

What one invocation returns, as a ``searchset`` Bundle, each resource once:

- the record (``search.mode`` = ``match``): the Patient and every resource of its R4 Patient
  compartment (CompartmentDefinition/patient: the ``patient_compartment`` parameters of the
  generated search-parameter table), live, in the care-date window;
- what the record points to outside the compartment (``search.mode`` = ``include``, as HAPI
  marks them): the Practitioner, PractitionerRole, Organization, Location, HealthcareService,
  Endpoint... that a record resource references through a search parameter (one level, as an
  ``_include`` would; a PractitionerRole's own Practitioner is not followed).

At the type level (``Patient/$everything``, system clients only) the record is every Patient and
every resource in some Patient's compartment, and the included resources are what those point to.

Parameters (the OperationDefinition's):

- ``start`` / ``end`` (date): keep resources whose care date (:data:`CARE_DATES`, one search
  parameter per type) overlaps the window; a resource of a type without a care date, or without
  a value for it, is kept (the window cannot exclude it). Included resources follow the record
  resources that point to them.
- ``_since`` (instant): only resources whose last change is at or after it (all entries).
- ``_type`` (code, comma lists, repeatable): only these resource types (all entries). AuditEvents
  are never part of the result: they are the server's access log (every read adds one, this
  operation's own included), kept in the audit store of app/audit, not among the record's
  resources; ``AuditEvent?patient=ID`` reads them.
- ``_count``: entries per page (default :data:`DEFAULT_COUNT`, at most :data:`MAX_COUNT`).

Paging is keyset paging over the resource row id (search.html#paging): the ``next`` link carries
a signed cursor (app/fhir/cursors.py) with the last row id, so writes between pages neither
repeat nor skip what was there throughout. What the caller may read is decided inside the SQL by
its AccessContext (``row_filter`` through the search compiler, as ``_include`` does), with the
``r`` (read) interaction: nothing is filtered after a query.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import urlencode

from fastapi.responses import Response

from app.fhir.conditions import render
from app.fhir.context import FhirContext
from app.fhir.errors import BadRequest, Forbidden
from app.fhir.fhirdate import date_range
from app.fhir.operations import Operation, OperationParameter, OperationParameters
from app.fhir.params import parse_count, parse_instant
from app.fhir.repository import FhirRepository, Found, fhir_instant
from app.fhir.responses import json_response
from app.fhir.search import Binder, SearchCompiler, split_values
from app.fhir.search_params import registry
from app.fhir.search_service import bundle_entry
from app.fhir.types import SERVED_TYPE_SET, SERVED_TYPES

DEFAULT_COUNT = 100
MAX_COUNT = 1000

CARE_DATES: dict[str, str] = {
    "Appointment": "date",  # Appointment.start
    "Basic": "created",  # Basic.created
    "CarePlan": "date",  # CarePlan.period
    "CareTeam": "date",  # CareTeam.period
    "Communication": "sent",  # Communication.sent
    "Condition": "onset-date",  # Condition.onset[x] (dateTime, Period)
    "Consent": "date",  # Consent.dateTime
    "DocumentReference": "period",  # DocumentReference.context.period (the service documented)
    "EpisodeOfCare": "date",  # EpisodeOfCare.period
    "Goal": "start-date",  # Goal.start[x] (date)
    "Observation": "date",  # Observation.effective[x]
    "Procedure": "date",  # Procedure.performed[x]
    "Provenance": "when",  # Provenance.occurred[x] (dateTime)
    "QuestionnaireResponse": "authored",  # QuestionnaireResponse.authored
    "ServiceRequest": "occurrence",  # ServiceRequest.occurrence[x]
    "Task": "period",  # Task.executionPeriod
}
"""The care date of each Patient-compartment type: the search parameter (a ``date`` parameter of
the generated table) whose values ``start``/``end`` are compared with. The OperationDefinition:
"the date range relates to care dates, not record currency dates". Types not listed (Patient,
RelatedPerson, Group) have none: their resources are always kept. Also in README.md."""

ACCESS_LOG = "AuditEvent"
"""Never part of the result (module docstring)."""

_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")


@cache
def compartment_types() -> tuple[str, ...]:
    """The served types of the R4 Patient compartment, Patient first."""
    compartment = registry().patient_compartment
    return ("Patient", *(t for t in SERVED_TYPES if t in compartment and t != "Patient"))


@cache
def outside_types() -> tuple[str, ...]:
    """The served types a record resource may point to that are not record resources themselves."""
    inside = set(compartment_types())
    return tuple(t for t in SERVED_TYPES if t not in inside)


@dataclass(frozen=True)
class EverythingRequest:
    """One parsed invocation (the OperationDefinition's in-parameters and the paging cursor)."""

    patient_id: str | None
    """None at the type level (every patient)."""
    start: datetime | None
    end: datetime | None
    since: datetime | None
    types: tuple[str, ...] | None
    """``_type``, in the given order without repeats; None when absent (every type)."""
    count: int
    after: int | None
    """The row id the page starts after (from the cursor)."""
    applied: tuple[tuple[str, str], ...]
    """The parameters as given, for the links."""

    @property
    def fingerprint(self) -> str:
        """Identifies the query a cursor belongs to (a cursor is valid only for its query)."""
        text = "&".join(f"{k}={v}" for k, v in sorted(self.applied) if k != "_count")
        return hashlib.sha256(f"Patient/{self.patient_id or ''}/$everything?{text}".encode()).hexdigest()[:16]

    def returns(self, resource_type: str) -> bool:
        return resource_type != ACCESS_LOG and (self.types is None or resource_type in self.types)

    @property
    def record_types(self) -> tuple[str, ...]:
        """The compartment types whose resources make up the record (and point to the includes)."""
        return tuple(t for t in compartment_types() if t != ACCESS_LOG)


def _date(parameters: OperationParameters, name: str, edge: int) -> datetime | None:
    """``start`` (edge 0: the first moment of the date) or ``end`` (edge 1: the end of it)."""
    text = parameters.text(name)
    if text is None:
        return None
    span = date_range(text) if _DATE.match(text) else None
    if span is None:
        raise BadRequest(
            f"$everything: '{name}' must be a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD), not '{text[:40]}'",
            expression=(name,),
        )
    return span[edge]


def parse_request(
    patient_id: str | None, parameters: OperationParameters, cursor: Any | None
) -> EverythingRequest:
    """The in-parameters of R4 Patient-everything, checked: a malformed one is a 400."""
    start = _date(parameters, "start", 0)
    end = _date(parameters, "end", 1)
    if start is not None and end is not None and start >= end:
        raise BadRequest("$everything: 'start' must not be after 'end'", expression=("start", "end"))
    since_text = parameters.text("_since")
    since = parse_instant(since_text, "_since") if since_text is not None else None
    types: tuple[str, ...] | None = None
    type_values = parameters.all("_type")
    if type_values:
        names: list[str] = []
        for value in type_values:
            for name in split_values(value.text() or ""):
                name = name.strip()
                if name not in SERVED_TYPE_SET:
                    raise BadRequest(
                        f"$everything: _type '{name[:64]}' is not a resource type served here",
                        expression=("_type",),
                    )
                names.append(name)
        types = tuple(dict.fromkeys(names))
    count = parse_count(parameters.text("_count"), default=DEFAULT_COUNT, maximum=MAX_COUNT)
    if count == 0:
        raise BadRequest("$everything: _count must be at least 1", expression=("_count",))
    applied: list[tuple[str, str]] = []
    for name in ("start", "end", "_since"):
        text = parameters.text(name)
        if text is not None:
            applied.append((name, text))
    if types is not None:
        applied.append(("_type", ",".join(types)))
    request = EverythingRequest(patient_id, start, end, since, types, count, None, tuple(applied))
    if cursor is None:
        return request
    if (
        not isinstance(cursor, dict)
        or cursor.get("f") != request.fingerprint
        or not isinstance(cursor.get("k"), int)
    ):
        raise BadRequest("_cursor: does not belong to this query", expression=("_cursor",))
    return EverythingRequest(patient_id, start, end, since, types, count, cursor["k"], tuple(applied))


@dataclass
class EverythingPage:
    record: list[Found]
    included: list[Found]
    entries: list[tuple[Found, bool]]
    """Every entry in row-id order, with whether it is a record resource (a match)."""
    total: int | None
    next_after: int | None


class EverythingQuery:
    """The SQL of one page. Every value is a bind parameter; identifiers are fixed here or come
    from the generated parameter table and the access model."""

    def __init__(self, repo: FhirRepository, request: EverythingRequest) -> None:
        self.repo = repo
        self.request = request
        self.compiler = SearchCompiler(registry(), repo.fhir_base, Binder(), repo.access)
        self.bind = self.compiler.bind
        self._statement: tuple[str, list[Any]] | None = None

    # -- building blocks ---------------------------------------------------------------------

    def _array(self, values: list[str] | tuple[str, ...]) -> str:
        return f"CAST({self.bind(list(values))} AS text[])"

    def _compartment_pairs(self) -> str:
        """(type, parameter) pairs by which a resource belongs to a Patient's compartment."""
        compartment = registry().patient_compartment
        pairs = [(t, p) for t in self.request.record_types for p in compartment.get(t, ())]
        types = self._array([t for t, _ in pairs])
        params = self._array([p for _, p in pairs])
        return f"unnest({types}, {params}) AS c(resource_type, param)"

    def _care_date(self, alias: str) -> str | None:
        """``start``/``end`` on rows ``alias``: kept unless they have a care date and none of its
        values overlaps the window (dates are half-open ranges, app/fhir/fhirdate.py)."""
        start, end = self.request.start, self.request.end
        if start is None and end is None:
            return None
        dated = [(t, p) for t, p in CARE_DATES.items() if t in self.request.record_types]
        if not dated:
            return None
        pairs = f"unnest({self._array([t for t, _ in dated])}, {self._array([p for _, p in dated])})"
        window = []
        if end is not None:
            window.append(f"cd.low < {self.bind(end)}")
        if start is not None:
            window.append(f"cd.high > {self.bind(start)}")
        care_rows = (
            f"SELECT 1 FROM search_date cd JOIN {pairs} AS cp(resource_type, param)"
            f" ON cp.resource_type = cd.resource_type AND cp.param = cd.param WHERE cd.rid = {alias}.rid"
        )
        return f"(NOT EXISTS ({care_rows}) OR EXISTS ({care_rows} AND {' AND '.join(window)}))"

    def _record_limits(self, alias: str) -> str:
        """Care window and the caller's access over record rows ``alias``."""
        clauses = [f"NOT {alias}.deleted"]
        care = self._care_date(alias)
        if care:
            clauses.append(care)
        access = self.repo.access.row_filter(self.compiler, alias, "r", self.request.record_types)
        if access is not None:
            clauses.append(render(access))
        return " AND ".join(clauses)

    def _result_filters(self, alias: str) -> list[str]:
        """``_type`` and ``_since`` over every entry."""
        clauses = []
        if self.request.types is not None:
            clauses.append(f"{alias}.resource_type = ANY({self._array(self.request.types)})")
        if self.request.since is not None:
            clauses.append(f"{alias}.last_updated >= {self.bind(self.request.since)}")
        return clauses

    def _included_access(self, alias: str) -> str:
        access = self.repo.access.row_filter(self.compiler, alias, "r", outside_types())
        return f" AND {render(access)}" if access is not None else ""

    # -- statements --------------------------------------------------------------------------

    def instance_sql(self) -> str:
        """One patient: its record from the reference index (the rows that point at it through a
        compartment parameter), what the record points to outside the compartment, then the page."""
        request = self.request
        assert request.patient_id is not None
        patient = self.bind(request.patient_id)
        pairs = self._compartment_pairs()
        members = (
            f"SELECT k.rid, k.resource_type FROM search_reference k JOIN {pairs}"
            " ON c.resource_type = k.resource_type AND c.param = k.param"
            f" WHERE k.target_id = {patient} AND k.target_type = 'Patient'"
        )
        limit = self.repo.access.row_filter(self.compiler, "r", "r", request.record_types)
        access = None if limit is None else render(limit)
        patient_row = "SELECT p.rid, p.resource_type FROM resource p WHERE p.resource_type = 'Patient'"
        if access is None and request.since is None:
            # Index rows exist only for live resources (a deletion drops them), so without access
            # limits or _since the record comes from the index alone: no resource row is read
            # until the page's bodies are.
            care = self._care_date("m")
            record = (
                f"SELECT m.rid, m.resource_type, NULL::timestamptz AS last_updated FROM ({members}"
                f" UNION {patient_row} AND p.fhir_id = {patient} AND NOT p.deleted) m"
                + (f" WHERE {care}" if care else "")
            )
        else:
            care = self._care_date("r")
            limits = " AND ".join(c for c in ("NOT r.deleted", care, access) if c)
            record = (
                "SELECT r.rid, r.resource_type, r.last_updated FROM resource r"
                f" WHERE r.rid IN (SELECT m.rid FROM ({members} UNION ALL {patient_row}"
                f" AND p.fhir_id = {patient}) m) AND {limits}"
            )
        outside = self._array(outside_types())
        included_access = self._included_access("t")
        filters = self._result_filters("e")
        after = f" AND e.rid > {self.bind(request.after)}" if request.after is not None else ""
        where = f" WHERE {' AND '.join(filters)}" if filters else ""
        return (
            f"WITH record AS MATERIALIZED ({record}),"
            " included AS MATERIALIZED ("
            " SELECT t.rid, t.resource_type, t.last_updated FROM ("
            "  SELECT DISTINCT i.target_type, i.target_id"
            "  FROM search_reference i WHERE i.rid IN (SELECT rid FROM record)"
            f"  AND i.target_type = ANY({outside})) d"
            " JOIN resource t ON t.resource_type = d.target_type AND t.fhir_id = d.target_id"
            f" WHERE NOT t.deleted{included_access}),"
            " entries AS ("
            " SELECT e.rid, e.record, count(*) OVER () AS total FROM ("
            "  SELECT rid, resource_type, last_updated, TRUE AS record FROM record"
            "  UNION ALL SELECT rid, resource_type, last_updated, FALSE FROM included) e"
            f"{where})"
            # The page is cut before the bodies are read: only its rows are fetched.
            " SELECT f.record, f.total, r.rid, r.resource_type, r.fhir_id, r.version_id, r.body"
            " FROM ("
            f" SELECT e.rid, e.record, e.total FROM entries e WHERE TRUE{after}"
            f" ORDER BY e.rid LIMIT {request.count + 1}) f"
            " JOIN resource r ON r.rid = f.rid ORDER BY f.rid"
        )

    def type_sql(self) -> str:
        """Every patient: the resource rows in row-id order, each kept when it is a record
        resource (a Patient, or a compartment resource pointing at a Patient) or is pointed at by
        one. Scanned in rid order, so a page stops after ``_count`` rows."""
        request = self.request
        record_types = self._array(request.record_types)
        outside = self._array(outside_types())

        def record(alias: str) -> str:
            member = (
                f"({alias}.resource_type = 'Patient' OR EXISTS (SELECT 1 FROM search_reference k"
                f"{alias} JOIN {self._compartment_pairs()} ON c.resource_type = k{alias}.resource_type"
                f" AND c.param = k{alias}.param WHERE k{alias}.rid = {alias}.rid"
                f" AND k{alias}.target_type = 'Patient'))"
            )
            limits = self._record_limits(alias)
            return f"{alias}.resource_type = ANY({record_types}) AND {member} AND {limits}"

        included = (
            f"r.resource_type = ANY({outside}) AND NOT r.deleted{self._included_access('r')}"
            " AND EXISTS (SELECT 1 FROM search_reference i JOIN resource m ON m.rid = i.rid"
            f" WHERE i.target_id = r.fhir_id AND i.target_type = r.resource_type AND {record('m')})"
        )
        clauses = [f"(({record('r')}) OR ({included}))", *self._result_filters("r")]
        if request.after is not None:
            clauses.append(f"r.rid > {self.bind(request.after)}")
        return (
            f"SELECT r.resource_type = ANY({record_types}) AS record, NULL::bigint AS total,"
            " r.rid, r.resource_type, r.fhir_id, r.version_id, r.body"
            f" FROM resource r WHERE {' AND '.join(clauses)} ORDER BY r.rid LIMIT {request.count + 1}"
        )

    def statement(self) -> tuple[str, list[Any]]:
        """The page's SQL and its bind values (built once: building binds the values)."""
        if self._statement is None:
            sql = self.instance_sql() if self.request.patient_id is not None else self.type_sql()
            self._statement = (sql, list(self.bind.values))
        return self._statement

    async def page(self) -> EverythingPage:
        sql, values = self.statement()
        connection = await self.repo.db()
        rows = await connection.fetch(sql, *values)
        more = len(rows) > self.request.count
        rows = rows[: self.request.count]
        entries = [
            (Found(row["rid"], row["resource_type"], row["fhir_id"], row["body"]), bool(row["record"]))
            for row in rows
        ]
        # The interaction's AuditEvent lists what was returned (app/auth/audit.py caps the list).
        self.repo.touched.extend((row["resource_type"], row["fhir_id"], row["version_id"]) for row in rows)
        total = rows[0]["total"] if rows and self.request.patient_id is not None else None
        return EverythingPage(
            record=[found for found, is_record in entries if is_record],
            included=[found for found, is_record in entries if not is_record],
            entries=entries,
            total=int(total) if total is not None else None,
            next_after=entries[-1][0].rid if more and entries else None,
        )


async def everything(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    """R4 Patient-everything at the instance or type level: a searchset Bundle with self/next links."""
    repo = ctx.repo
    cursor_text = parameters.text("_cursor")
    cursor = ctx.cursors.decode(cursor_text) if cursor_text else None
    request = parse_request(fhir_id, parameters, cursor)
    if fhir_id is not None:
        # 403 without Patient read, 404 when unknown or outside the token's limits, 410 when deleted.
        await repo.read("Patient", fhir_id)
    else:
        repo.access.require("Patient", "r")
        if not repo.access.system_level("Patient", "r"):
            raise Forbidden(
                "Patient/$everything (every patient) is for system clients; use Patient/[id]/$everything"
            )
    page = await EverythingQuery(repo, request).page()
    path = f"Patient/{fhir_id}/$everything" if fhir_id is not None else "Patient/$everything"
    return json_response(render_bundle(ctx, request, page, path, cursor_text), ctx.fmt)


def render_bundle(
    ctx: FhirContext, request: EverythingRequest, page: EverythingPage, path: str, cursor_text: str | None
) -> str:
    """The searchset Bundle (R4 bundle.html#searchset): record entries ``match``, the rest
    ``include``, in row-id order; ``self`` and ``next`` links (GET URLs, whatever the method)."""
    base = ctx.settings.fhir_base
    url = f"{base}/{path}"
    params = [*request.applied, ("_count", str(request.count))]
    self_params = params + ([("_cursor", cursor_text)] if cursor_text else [])
    links = [{"relation": "self", "url": f"{url}?{urlencode(self_params)}"}]
    if page.next_after is not None:
        token = ctx.cursors.encode({"f": request.fingerprint, "k": page.next_after})
        links.append({"relation": "next", "url": f"{url}?{urlencode([*params, ('_cursor', token)])}"})
    head: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": fhir_instant(datetime.now(UTC))},
        "type": "searchset",
    }
    if page.total is not None:
        head["total"] = page.total
    head["link"] = links
    rendered = json.dumps(head, separators=(",", ":"))
    if not page.entries:
        return rendered  # FHIR JSON has no empty arrays (json.html)
    entries = [
        bundle_entry(base, found, "match" if is_record else "include", None)
        for found, is_record in page.entries
    ]
    return rendered[:-1] + ',"entry":[' + ",".join(entries) + "]}"


EVERYTHING = Operation(
    name="everything",
    definition_id="Patient-everything",
    base="http://hl7.org/fhir/OperationDefinition/Patient-everything",
    title="Fetch Patient Record",
    description=(
        "The patient's record: the Patient, every resource of its R4 Patient compartment, and the"
        " resources they reference outside it (Practitioner, PractitionerRole, Organization, Location,"
        " HealthcareService...), each once, as a searchset Bundle (record entries search.mode match,"
        " referenced ones include) paged with next links. At the type level (system clients only):"
        " every patient's record. What the access token may not read is left out."
    ),
    levels=("type", "instance"),
    resource_types=("Patient",),
    handler=everything,
    ok_schema="Bundle",
    errors=(400, 401, 403, 404, 405, 410),
    query_only=("_cursor",),
    parameters=(
        OperationParameter(
            "start",
            "in",
            "date",
            documentation=(
                "Start of the care-date window (a care date per type, see the README); resources"
                " without a care date are kept. Without it: everything before end."
            ),
        ),
        OperationParameter(
            "end",
            "in",
            "date",
            documentation="End of the care-date window (inclusive). Without it: everything after start.",
        ),
        OperationParameter(
            "_since",
            "in",
            "instant",
            documentation="Only resources changed at or after this instant.",
        ),
        OperationParameter(
            "_type",
            "in",
            "code",
            max="*",
            documentation=(
                "Only these resource types (comma-separated, repeatable); never AuditEvents (audit store)."
            ),
        ),
        OperationParameter(
            "_count",
            "in",
            "integer",
            documentation=f"Entries per page (default {DEFAULT_COUNT}, at most {MAX_COUNT}).",
        ),
        OperationParameter(
            "return", "out", "Bundle", min=1, documentation="The searchset Bundle of the record."
        ),
    ),
)
