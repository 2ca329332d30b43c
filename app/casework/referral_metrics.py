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
  from the version history (``resource_history.last_updated`` of each version), never from
  ``meta.lastUpdated`` of the current version; ``percentile_cont`` at the database;
- ``closedLoopRate``: completed / sent (the loop is closed when the partner reports the
  service delivered).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi.responses import Response

from app.fhir.context import FhirContext
from app.fhir.errors import BadRequest
from app.fhir.fhirdate import date_range
from app.fhir.operations import Operation, OperationParameter, OperationParameters
from app.fhir.repository import fhir_instant
from app.fhir.responses import json_response
from app.fhir.search import parse_search
from app.fhir.search_params import registry
from app.referrals.state_machine import TASK_CODE_SYSTEM

UCUM = "http://unitsofmeasure.org"
COUNTS = ("sent", "accepted", "rejected", "completed", "cancelled", "failed", "open", "overdue")
DURATIONS = ("medianTimeToAccept", "p90TimeToAccept", "medianTimeToComplete", "p90TimeToComplete")

_STATEMENT = """
WITH referral AS (
    SELECT r.rid, r.body::json AS body, r.body::json #>> '{{restriction,period,end}}' AS due_text,
           COALESCE(p.target_type || '/' || p.target_id, p.url) AS partner
    FROM resource r
    LEFT JOIN LATERAL (
        SELECT ref.target_type, ref.target_id, ref.url FROM search_reference ref
        WHERE ref.rid = r.rid AND ref.resource_type = 'Task' AND ref.param = {partner_param}
        LIMIT 1
    ) p ON TRUE
    WHERE {where}
      AND EXISTS (
        SELECT 1 FROM search_reference f
        WHERE f.rid = r.rid AND f.resource_type = 'Task' AND f.param = 'focus'
          AND f.target_type = 'ServiceRequest'
      )
), version AS (
    SELECT h.rid, h.last_updated, h.body::json ->> 'status' AS status
    FROM resource_history h JOIN referral USING (rid)
    WHERE h.body IS NOT NULL
), moment AS (
    SELECT rid,
           min(last_updated) FILTER (WHERE status <> 'draft') AS sent_at,
           min(last_updated) FILTER (
               WHERE status IN ('accepted', 'in-progress', 'on-hold', 'completed')) AS accepted_at,
           min(last_updated) FILTER (WHERE status = 'completed') AS completed_at
    FROM version GROUP BY rid
), task AS (
    SELECT referral.partner, referral.body ->> 'status' AS status,
           -- The end of restriction.period as an instant (a dateTime's implicit precision: a
           -- day ends at midnight after it); values without a zone are UTC (app/fhir/fhirdate.py).
           CASE
               WHEN due_text LIKE '____-__-__T%' THEN (CASE
                   WHEN due_text ~ '(Z|[+-][0-9]{{2}}:[0-9]{{2}})$' THEN due_text
                   ELSE due_text || 'Z' END)::timestamptz
               WHEN length(due_text) = 10 THEN (due_text || 'T00:00:00Z')::timestamptz + interval '1 day'
               WHEN length(due_text) = 7 THEN (due_text || '-01T00:00:00Z')::timestamptz + interval '1 month'
               WHEN length(due_text) = 4 THEN (due_text || '-01-01T00:00Z')::timestamptz + interval '1 year'
           END AS due,
           moment.sent_at, moment.accepted_at, moment.completed_at
    FROM referral JOIN moment USING (rid)
    WHERE moment.sent_at IS NOT NULL AND referral.body ->> 'status' <> 'entered-in-error'
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


async def referral_metrics(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    """``Task/$referral-metrics`` (see the module docstring)."""
    requester = parameters.text("requester")
    owner = parameters.text("owner")
    if (requester is None) == (owner is None):
        raise BadRequest(
            "give requester (referrals an organisation sent) or owner (referrals it received)",
            code="required",
            expression=("requester", "owner"),
        )
    pairs = [
        ("requester", requester) if requester is not None else ("owner", str(owner)),
        ("intent", "order"),
        ("code", f"{TASK_CODE_SYSTEM}|fulfill"),
    ]
    repo = ctx.repo
    request = parse_search(
        ("Task",),
        pairs,
        registry=registry(),
        fhir_base=repo.fhir_base,
        strict=True,
        access=repo.access,
        limits=repo.search_limits,
    )
    bind = request.binder
    where = " AND ".join(
        [f"r.resource_type = {request.type_placeholder}", "NOT r.deleted", *request.conditions]
    )
    period_sql, period = _period([v.text() or "" for v in parameters.all("period")], bind)
    partner_param = bind("owner" if requester is not None else "requester")
    sql = _STATEMENT.format(where=where, partner_param=partner_param, period=period_sql)
    rows = await repo.connection.fetch(sql, *bind.values)
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
