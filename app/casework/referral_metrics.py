"""``Task/$referral-metrics``: how referrals to (or from) each partner organisation fare.

Referral Tasks are those of the SDOH Clinical Care referral workflow (app/referrals/
state_machine.py ``is_referral``): ``intent`` order, ``code`` task-code#fulfill, ``focus`` a
ServiceRequest. ``requester=Organization/X`` looks at the referrals X sent, one row per owner
(the partner that received them); ``owner=Organization/Y`` at those Y received, one row per
requester. ``period`` (date search syntax, ``ge``/``gt``/``le``/``lt``, at most twice) keeps
the referrals sent in it. Only Tasks the access token may search are counted: the criteria and
the token's limits are compiled into the statement by the search compiler (app/fhir/search.py).

Per partner, and in total:

- ``sent``: referrals that left draft (entered-in-error ones are not counted at all);
- ``accepted``: ever accepted (accepted, in-progress, on-hold or completed at some version);
- ``rejected``, ``completed``, ``cancelled``, ``failed``: current status;
- ``open``: not in a final status; ``overdue``: open with ``restriction.period.end`` passed;
- ``medianTimeToAccept``/``p90TimeToAccept``, ``medianTimeToComplete``/``p90TimeToComplete``:
  seconds from the first version that left draft to the first accepted (completed) version,
  from the version history (each version's ``last_updated``, kept per referral version in
  ``referral_version``, app/casework/storage.py), never from ``meta.lastUpdated`` of the
  current version; ``percentile_cont`` at the database;
- ``closedLoopRate``: completed / sent (the loop is closed when the partner reports the
  service delivered).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi.responses import Response

from app.fhir.access import AccessContext
from app.fhir.context import FhirContext
from app.fhir.errors import BadRequest
from app.fhir.fhirdate import date_range
from app.fhir.operations import Operation, OperationParameter, OperationParameters
from app.fhir.repository import FhirRepository, StoredVersion, fhir_instant
from app.fhir.responses import json_response
from app.fhir.search import SearchLimits, parse_search
from app.fhir.search_params import registry
from app.referrals.state_machine import is_referral

UCUM = "http://unitsofmeasure.org"
COUNTS = ("sent", "accepted", "rejected", "completed", "cancelled", "failed", "open", "overdue")
DURATIONS = ("medianTimeToAccept", "p90TimeToAccept", "medianTimeToComplete", "p90TimeToComplete")

_STATEMENT = """
WITH referral AS MATERIALIZED (
    SELECT r.fhir_id, r.version_id, COALESCE(p.target_type || '/' || p.target_id, p.url) AS partner
    FROM resource r
    LEFT JOIN LATERAL (
        SELECT ref.target_type, ref.target_id, ref.url FROM search_reference ref
        WHERE ref.rid = r.rid AND ref.resource_type = 'Task' AND ref.param = {partner_param}
        LIMIT 1
    ) p ON TRUE
    WHERE {where}
), task AS (
    SELECT referral.partner, moment.status, moment.due,
           moment.sent_at, moment.accepted_at, moment.completed_at
    FROM referral CROSS JOIN LATERAL (
        -- Each referral's versions (referral_version, by its key): a few rows per referral.
        SELECT max(v.version_id) AS latest,
               (array_agg(v.status ORDER BY v.version_id DESC))[1] AS status,
               (array_agg(v.due ORDER BY v.version_id DESC))[1] AS due,
               min(v.recorded) FILTER (WHERE v.status <> 'draft') AS sent_at,
               min(v.recorded) FILTER (
                   WHERE v.status IN ('accepted', 'in-progress', 'on-hold', 'completed')) AS accepted_at,
               min(v.recorded) FILTER (WHERE v.status = 'completed') AS completed_at
        FROM referral_version v
        WHERE v.task_id = referral.fhir_id
    ) moment
    -- The current version is a referral (its row exists), it was sent, and not in error.
    WHERE moment.latest = referral.version_id
      AND moment.sent_at IS NOT NULL AND moment.status <> 'entered-in-error'
      {period}
)
SELECT GROUPING(partner) AS total, partner,
       count(*) AS sent,
       count(accepted_at) AS accepted,
       count(*) FILTER (WHERE status = 'rejected') AS rejected,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status NOT IN ('completed', 'failed', 'rejected', 'cancelled')) AS open,
       count(*) FILTER (
           WHERE status NOT IN ('completed', 'failed', 'rejected', 'cancelled')
             AND due < now()) AS overdue,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - sent_at))
           AS "medianTimeToAccept",
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - sent_at))
           AS "p90TimeToAccept",
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - sent_at))
           AS "medianTimeToComplete",
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - sent_at))
           AS "p90TimeToComplete"
FROM task
GROUP BY GROUPING SETS ((partner), ())
ORDER BY total, sent DESC, partner
"""

_PREFIXES = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _period(values: list[str], bind: Any) -> tuple[str, list[dict[str, str]]]:
    """SQL over ``sent_at`` for the ``period`` values, and the period they describe."""
    clauses = []
    shown: dict[str, str] = {}
    for raw in values:
        prefix, value = raw[:2], raw[2:]
        if prefix not in _PREFIXES:
            raise BadRequest(
                "period: use ge, gt, le or lt before a date (period=ge2026-01-01&period=lt2026-04-01)",
                expression=("period",),
            )
        found = date_range(value)
        if found is None:
            raise BadRequest(f"period: '{value[:40]}' is not a FHIR date", expression=("period",))
        low, high = found
        # The date's whole range counts: ge2026-01 starts on 1 January, le2026-01 ends with January.
        moment = low if prefix in ("ge", "lt") else high
        operator = {"ge": ">=", "gt": ">=", "le": "<", "lt": "<"}[prefix]
        clauses.append(f"sent_at {operator} {bind(moment)}")
        shown["start" if prefix in ("ge", "gt") else "end"] = value
    sql = "".join(f" AND {clause}" for clause in clauses)
    return sql, ([shown] if shown else [])


def _duration(seconds: float | None) -> dict[str, Any] | None:
    if seconds is None:
        return None
    return {"value": round(float(seconds), 3), "unit": "s", "system": UCUM, "code": "s"}


def _parts(row: Any) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"name": name, "valueInteger": int(row[name])} for name in COUNTS]
    for name in DURATIONS:
        duration = _duration(row[name])
        if duration is not None:
            parts.append({"name": name, "valueDuration": duration})
    if row["sent"]:
        parts.append({"name": "closedLoopRate", "valueDecimal": round(row["completed"] / row["sent"], 4)})
    return parts


def metrics_statement(
    fhir_base: str,
    access: AccessContext,
    limits: SearchLimits,
    *,
    requester: str | None,
    owner: str | None,
    periods: list[str],
) -> tuple[str, list[Any], list[dict[str, str]]]:
    """The statement (and its values) that computes the metrics, and the period asked for."""
    if (requester is None) == (owner is None):
        raise BadRequest(
            "give requester (referrals an organisation sent) or owner (referrals it received)",
            code="required",
            expression=("requester", "owner"),
        )
    # Which Tasks are referrals is in referral_version (one row per version of a referral).
    pairs = [("requester", requester) if requester is not None else ("owner", str(owner))]
    request = parse_search(
        ("Task",), pairs, registry=registry(), fhir_base=fhir_base, strict=True, access=access, limits=limits
    )
    bind = request.binder
    where = " AND ".join(
        [f"r.resource_type = {request.type_placeholder}", "NOT r.deleted", *request.where()]
    )
    period_sql, period = _period(periods, bind)
    partner_param = bind("owner" if requester is not None else "requester")
    sql = _STATEMENT.format(where=where, partner_param=partner_param, period=period_sql)
    return sql, list(bind.values), period


async def referral_metrics(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    """``Task/$referral-metrics`` (see the module docstring)."""
    repo = ctx.repo
    sql, values, period = metrics_statement(
        repo.fhir_base,
        repo.access,
        repo.search_limits,
        requester=parameters.text("requester"),
        owner=parameters.text("owner"),
        periods=[v.text() or "" for v in parameters.all("period")],
    )
    connection = await repo.db()
    rows = await connection.fetch(sql, *values)
    out: list[dict[str, Any]] = []
    if period:
        out.append({"name": "period", "valuePeriod": period[0]})
    out.append({"name": "generated", "valueInstant": fhir_instant(datetime.now().astimezone())})
    for row in rows:
        if row["total"]:
            out.append({"name": "total", "part": _parts(row)})
            continue
        partner = row["partner"]
        reference = {"reference": partner} if partner else {"display": "(no partner named)"}
        out.append(
            {"name": "partner", "part": [{"name": "organization", "valueReference": reference}, *_parts(row)]}
        )
    return json_response({"resourceType": "Parameters", "parameter": out}, ctx.fmt)


_METRICS = (
    *(OperationParameter(name, "out", "integer", min=1) for name in COUNTS),
    *(OperationParameter(name, "out", "Duration", documentation="seconds (UCUM s)") for name in DURATIONS),
    OperationParameter("closedLoopRate", "out", "decimal", documentation="completed / sent"),
)

REFERRAL_METRICS = Operation(
    name="referral-metrics",
    title="Referral metrics per partner organisation",
    description=(
        "For the referral Tasks (intent order, code fulfill, focus a ServiceRequest) an organisation"
        " sent (requester) or received (owner), per partner organisation and in total: referrals sent,"
        " accepted, rejected, completed, cancelled, failed, still open and overdue (restriction.period.end"
        " passed), median and 90th percentile seconds to accept and to complete, measured on the version"
        " history, and the closed-loop rate (completed / sent). period (ge/gt/le/lt and a date, at most"
        " twice) keeps the referrals sent in it. Only Tasks the access token may search are counted."
    ),
    levels=("type",),
    resource_types=("Task",),
    handler=referral_metrics,
    ok_schema="Parameters",
    errors=(400, 403, 405),
    parameters=(
        OperationParameter(
            "requester", "in", "string", documentation="Organization/ID: the referrals it sent, per owner"
        ),
        OperationParameter(
            "owner", "in", "string", documentation="Organization/ID: the referrals it received, per requester"
        ),
        OperationParameter(
            "period",
            "in",
            "string",
            max="2",
            documentation="When the referrals were sent: ge, gt, le or lt and a date (period=ge2026-01-01)",
        ),
        OperationParameter("period", "out", "Period", documentation="The period asked for"),
        OperationParameter("generated", "out", "instant", min=1),
        OperationParameter(
            "partner",
            "out",
            "",
            max="*",
            parts=(OperationParameter("organization", "out", "Reference", min=1), *_METRICS),
        ),
        OperationParameter("total", "out", "", parts=_METRICS),
    ),
)


def _due(end: Any, found: tuple[datetime, datetime] | None) -> datetime | None:
    """restriction.period.end as an instant: a dateTime as written, a date (or month, year) at
    the end of its implicit precision (the day ends at midnight after it), as migration 0021."""
    if found is None:
        return None
    return found[0] if "T" in str(end) else found[1]


class ReferralVersionHooks:
    """Record each version of a referral Task in ``referral_version`` (app/casework/storage.py),
    in the write's transaction, whoever writes it (API, partner mirror, CLI)."""

    types = frozenset({"Task"})

    async def before_write(
        self,
        repo: FhirRepository,
        resource_type: str,
        previous: dict[str, Any] | None,
        data: dict[str, Any] | None,
    ) -> None:
        return None

    async def after_write(
        self,
        repo: FhirRepository,
        version: StoredVersion,
        previous: dict[str, Any] | None,
        data: dict[str, Any] | None,
    ) -> None:
        if data is None or not is_referral(data) or not isinstance(data.get("status"), str):
            return
        end = ((data.get("restriction") or {}).get("period") or {}).get("end")
        found = date_range(end) if isinstance(end, str) else None
        connection = await repo.db()
        await connection.execute(
            "INSERT INTO referral_version (task_id, version_id, status, recorded, due)"
            " VALUES ($1, $2, $3, $4, $5)"
            # A version id is never reused, except after the tests empty the resource tables.
            " ON CONFLICT (task_id, version_id) DO UPDATE SET status = excluded.status,"
            " recorded = excluded.recorded, due = excluded.due",
            version.fhir_id,
            version.version_id,
            data["status"],
            version.last_updated,
            _due(end, found),
        )
