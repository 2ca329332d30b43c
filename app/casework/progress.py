"""Goal progress: ``Goal/[id]/$progress`` and ``CarePlan/[id]/$progress``.

For each ``Goal.target`` with a ``measure`` (R4 goal.html: measure, detail[x], due[x]) the
Observations of that measure (any coding of it, search parameter ``code``) about the Goal's
subject are read oldest first (``_sort=date``), through the search compiler with the caller's
AccessContext: only what the token may search is seen, and the limits are conditions of the
SQL, not a filter afterwards. From them come the latest value, whether it meets the target and
a suggested ``achievementStatus`` (R4 goal-achievement codes) with the rule that gave it:

====================  ===================================================================
achieved              the latest value meets the target
not-achieved          the due date has passed and the latest value does not meet it
in-progress           no value yet, or one value only, or values that cannot be compared
improving             the latest value is nearer the target than the one before it
worsening             the latest value is farther from the target than the one before it
no-change             the latest value is as far from the target as the one before it
====================  ===================================================================

"Meets": within ``detailRange`` (bounds included); against ``detailQuantity`` by its
comparator (``<``, ``<=``, ``>=``, ``>``; none: equal); ``detailCodeableConcept``: a coding
in common; boolean, integer and string: equal. Distance for numbers is how far the value lies
outside the target (0 inside). A Goal with several targets takes the first that applies of:
any not-achieved, any worsening, all achieved, any improving, all no-change, else in-progress.
A CarePlan rolls up its Goals (``CarePlan.goal``) the same way and counts them per status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from fastapi.responses import Response

from app.fhir import jsonio
from app.fhir.context import FhirContext
from app.fhir.errors import FHIRError, Forbidden, Gone, NotFound
from app.fhir.fhirdate import date_range
from app.fhir.operations import Operation, OperationParameter, OperationParameters
from app.fhir.repository import FhirRepository
from app.fhir.responses import json_response
from app.fhir.search import MAX_COUNT, parse_search
from app.fhir.search_params import registry

GOAL_ACHIEVEMENT = "http://terminology.hl7.org/CodeSystem/goal-achievement"
DISPLAYS = {
    "in-progress": "In Progress",
    "improving": "Improving",
    "worsening": "Worsening",
    "no-change": "No Change",
    "achieved": "Achieved",
    "not-achieved": "Not Achieved",
}
MAX_OBSERVATIONS = 5 * MAX_COUNT
"""Observations one target's series reads at most (the latest ones are what matter: a longer
series is cut from the oldest end and says so)."""
_DURATION_DAYS = {"min": 1 / 1440, "h": 1 / 24, "d": 1, "wk": 7, "mo": 30, "a": 365}


@dataclass
class Point:
    reference: str
    effective: str | None
    value_key: str | None
    value: Any


@dataclass
class TargetProgress:
    target: dict[str, Any]
    points: list[Point] = field(default_factory=list)
    truncated: bool = False
    due: datetime | None = None
    meets: bool | None = None
    status: str = "in-progress"
    rule: str = ""


@dataclass
class GoalProgress:
    goal_id: str
    goal: dict[str, Any]
    targets: list[TargetProgress]
    status: str
    rule: str


# -- values ------------------------------------------------------------------------------------


def _observation_value(observation: dict[str, Any]) -> tuple[str | None, Any]:
    for key in ("valueQuantity", "valueInteger", "valueCodeableConcept", "valueBoolean", "valueString"):
        if key in observation:
            return key, observation[key]
    return None, None


def _number(key: str | None, value: Any) -> Decimal | None:
    if (
        key == "valueQuantity"
        and isinstance(value, dict)
        and isinstance(value.get("value"), int | float | Decimal)
    ):
        return Decimal(str(value["value"]))
    if key == "valueInteger" and isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    return None


def _quantity(value: Any) -> Decimal | None:
    if isinstance(value, dict) and isinstance(value.get("value"), int | float | Decimal):
        return Decimal(str(value["value"]))
    return None


def _distance(target: dict[str, Any], number: Decimal) -> Decimal | None:
    """How far ``number`` lies outside the target's detail (0: meets it); None: not numeric."""
    if "detailRange" in target:
        low = _quantity((target["detailRange"] or {}).get("low"))
        high = _quantity((target["detailRange"] or {}).get("high"))
        if low is None and high is None:
            return None
        if low is not None and number < low:
            return low - number
        if high is not None and number > high:
            return number - high
        return Decimal(0)
    if "detailQuantity" in target:
        bound = _quantity(target["detailQuantity"])
        if bound is None:
            return None
        comparator = (target["detailQuantity"] or {}).get("comparator")
        if comparator == "<":
            return Decimal(0) if number < bound else number - bound + Decimal("1e-9")
        if comparator == "<=":
            return max(Decimal(0), number - bound)
        if comparator == ">":
            return Decimal(0) if number > bound else bound - number + Decimal("1e-9")
        if comparator == ">=":
            return max(Decimal(0), bound - number)
        return abs(number - bound)
    if "detailInteger" in target and isinstance(target["detailInteger"], int):
        return abs(number - Decimal(target["detailInteger"]))
    return None


def _codes(concept: Any) -> set[tuple[Any, Any]]:
    if not isinstance(concept, dict):
        return set()
    return {(c.get("system"), c.get("code")) for c in concept.get("coding") or [] if isinstance(c, dict)}


def _meets(target: dict[str, Any], point: Point) -> bool | None:
    number = _number(point.value_key, point.value)
    if number is not None:
        distance = _distance(target, number)
        if distance is not None:
            return distance == 0
    if "detailCodeableConcept" in target and point.value_key == "valueCodeableConcept":
        return bool(_codes(target["detailCodeableConcept"]) & _codes(point.value))
    for detail, key in (("detailBoolean", "valueBoolean"), ("detailString", "valueString")):
        if detail in target and point.value_key == key:
            return bool(target[detail] == point.value)
    return None


def _due(goal: dict[str, Any], target: dict[str, Any]) -> datetime | None:
    if isinstance(target.get("dueDate"), str):
        found = date_range(target["dueDate"])
        return found[1] if found else None
    duration = target.get("dueDuration")
    start = date_range(goal["startDate"]) if isinstance(goal.get("startDate"), str) else None
    if isinstance(duration, dict) and start is not None:
        days = _DURATION_DAYS.get(str(duration.get("code") or duration.get("unit")))
        amount = duration.get("value")
        if days is not None and isinstance(amount, int | float | Decimal):
            return start[0] + timedelta(days=float(amount) * days)
    return None


def judge(goal: dict[str, Any], target: TargetProgress, now: datetime) -> None:
    """Set ``meets``, ``status`` and ``rule`` of one target (the table of the module docstring)."""
    spec = target.target
    target.due = _due(goal, spec)
    if not target.points:
        target.status, target.rule = "in-progress", "no Observation of the measure yet"
        if target.due is not None and target.due <= now:
            target.status, target.rule = "not-achieved", "the due date passed without an Observation"
        return
    latest = target.points[-1]
    target.meets = _meets(spec, latest)
    if target.meets:
        target.status, target.rule = "achieved", "the latest value meets the target"
        return
    if target.due is not None and target.due <= now and target.meets is False:
        target.status, target.rule = (
            "not-achieved",
            "the due date passed and the latest value misses the target",
        )
        return
    if len(target.points) < 2:
        target.status, target.rule = "in-progress", "one value so far: nothing to compare it with"
        return
    previous = target.points[-2]
    latest_number = _number(latest.value_key, latest.value)
    previous_number = _number(previous.value_key, previous.value)
    now_distance = _distance(spec, latest_number) if latest_number is not None else None
    before = _distance(spec, previous_number) if previous_number is not None else None
    if now_distance is None or before is None:
        target.status, target.rule = "in-progress", "the values cannot be compared with the target"
    elif now_distance < before:
        target.status, target.rule = "improving", "the latest value is nearer the target than the one before"
    elif now_distance > before:
        target.status, target.rule = (
            "worsening",
            "the latest value is farther from the target than the one before",
        )
    else:
        target.status, target.rule = (
            "no-change",
            "the latest value is as far from the target as the one before",
        )


def combine(statuses: list[str]) -> tuple[str, str]:
    """The status of several targets (or Goals) and the rule that chose it."""
    if not statuses:
        return "in-progress", "no target with a measure"
    if "not-achieved" in statuses:
        return "not-achieved", "a target is not achieved"
    if "worsening" in statuses:
        return "worsening", "a target is worsening"
    if all(s == "achieved" for s in statuses):
        return "achieved", "every target is achieved"
    if "improving" in statuses:
        return "improving", "a target is improving and none is worsening"
    if all(s == "no-change" for s in statuses):
        return "no-change", "no target changed"
    return "in-progress", "targets are in progress"


# -- reading ------------------------------------------------------------------------------------


def _effective(observation: dict[str, Any]) -> str | None:
    for key in ("effectiveDateTime", "effectiveInstant"):
        if isinstance(observation.get(key), str):
            return str(observation[key])
    period = observation.get("effectivePeriod")
    if isinstance(period, dict) and isinstance(period.get("start"), str):
        return str(period["start"])
    issued = observation.get("issued")
    return issued if isinstance(issued, str) else None


def _token(coding: dict[str, Any]) -> str | None:
    code = coding.get("code")
    if not isinstance(code, str) or not code:
        return None
    escaped = code.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|")
    system = coding.get("system")
    return f"{system}|{escaped}" if isinstance(system, str) else escaped


async def series(repo: FhirRepository, subject: str, measure: dict[str, Any]) -> tuple[list[Point], bool]:
    """The Observations of ``measure`` about ``subject`` the repository's access may search,
    oldest first; and whether older ones were left out (more than MAX_OBSERVATIONS)."""
    tokens = [t for t in (_token(c) for c in measure.get("coding") or [] if isinstance(c, dict)) if t]
    if not tokens:
        return [], False
    pairs = [
        ("subject", subject),
        ("code", ",".join(tokens)),
        ("status", "final,amended,corrected,preliminary"),
        ("_sort", "-date"),
        ("_count", str(MAX_COUNT)),
    ]
    request = parse_search(
        ("Observation",),
        pairs,
        registry=registry(),
        fhir_base=repo.fhir_base,
        strict=True,
        access=repo.access,
        limits=repo.search_limits,
    )
    points: list[Point] = []
    after = None
    truncated = False
    while True:
        page = await repo.search(request, after, False)
        for found in page.matches:
            observation = jsonio.loads(found.body)
            key, value = _observation_value(observation)
            points.append(Point(f"Observation/{found.fhir_id}", _effective(observation), key, value))
        if page.next_keys is None:
            break
        if len(points) >= MAX_OBSERVATIONS:
            truncated = True
            break
        after = page.next_keys
    points.reverse()
    return points, truncated


async def goal_progress(
    repo: FhirRepository, goal_id: str, goal: dict[str, Any], now: datetime
) -> GoalProgress:
    subject = (goal.get("subject") or {}).get("reference")
    targets = []
    for spec in goal.get("target") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("measure"), dict):
            continue
        target = TargetProgress(spec)
        if isinstance(subject, str):
            target.points, target.truncated = await series(repo, subject, spec["measure"])
        judge(goal, target, now)
        targets.append(target)
    status, rule = combine([t.status for t in targets])
    return GoalProgress(goal_id, goal, targets, status, rule)


# -- Parameters ---------------------------------------------------------------------------------


def status_concept(code: str) -> dict[str, Any]:
    return {"coding": [{"system": GOAL_ACHIEVEMENT, "code": code, "display": DISPLAYS[code]}]}


def _value_part(name: str, key: str, value: Any) -> dict[str, Any]:
    """A Parameters part carrying an Observation value or a target detail."""
    suffix = key.removeprefix("detail").removeprefix("value")
    return {"name": name, f"value{suffix}": value}


def _target_parameter(target: TargetProgress) -> dict[str, Any]:
    spec = target.target
    parts: list[dict[str, Any]] = [{"name": "measure", "valueCodeableConcept": spec["measure"]}]
    for key in spec:
        if key.startswith("detail"):
            parts.append(_value_part("detail", key, spec[key]))
    if isinstance(spec.get("dueDate"), str):
        parts.append({"name": "due", "valueDate": spec["dueDate"]})
    elif isinstance(spec.get("dueDuration"), dict):
        parts.append({"name": "due", "valueDuration": spec["dueDuration"]})
    for point in target.points:
        observation: list[dict[str, Any]] = [
            {"name": "reference", "valueReference": {"reference": point.reference}}
        ]
        if point.effective:
            observation.append({"name": "effective", "valueDateTime": point.effective})
        if point.value_key:
            observation.append(_value_part("value", point.value_key, point.value))
        parts.append({"name": "observation", "part": observation})
    if target.truncated:
        parts.append({"name": "truncated", "valueBoolean": True})
    if target.points:
        latest = target.points[-1]
        if latest.value_key:
            parts.append(_value_part("latest", latest.value_key, latest.value))
        parts.append({"name": "latestObservation", "valueReference": {"reference": latest.reference}})
    if target.meets is not None:
        parts.append({"name": "meetsTarget", "valueBoolean": target.meets})
    parts.append({"name": "achievementStatus", "valueCodeableConcept": status_concept(target.status)})
    parts.append({"name": "rule", "valueString": target.rule})
    return {"name": "target", "part": parts}


def goal_parameters(progress: GoalProgress) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = [
        {"name": "goal", "valueReference": {"reference": f"Goal/{progress.goal_id}"}}
    ]
    current = progress.goal.get("achievementStatus")
    if isinstance(current, dict):
        found.append({"name": "currentAchievementStatus", "valueCodeableConcept": current})
    found.extend(_target_parameter(t) for t in progress.targets)
    found.append({"name": "achievementStatus", "valueCodeableConcept": status_concept(progress.status)})
    found.append({"name": "rule", "valueString": progress.rule})
    return found


# -- operations ---------------------------------------------------------------------------------


async def _read(repo: FhirRepository, resource_type: str, fhir_id: str) -> dict[str, Any]:
    version = await repo.read(resource_type, fhir_id)
    assert version.body is not None
    found: dict[str, Any] = jsonio.loads(version.body)
    return found


async def progress(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    """``Goal/[id]/$progress`` and ``CarePlan/[id]/$progress`` (see the module docstring)."""
    assert resource_type is not None and fhir_id is not None  # instance level only
    now = datetime.now(UTC)
    resource = await _read(ctx.repo, resource_type, fhir_id)
    if resource_type == "Goal":
        result = await goal_progress(ctx.repo, fhir_id, resource, now)
        body = {"resourceType": "Parameters", "parameter": goal_parameters(result)}
        return json_response(body, ctx.fmt)
    out: list[dict[str, Any]] = [{"name": "carePlan", "valueReference": {"reference": f"CarePlan/{fhir_id}"}}]
    statuses: list[str] = []
    for reference in resource.get("goal") or []:
        target = (reference or {}).get("reference") if isinstance(reference, dict) else None
        if not isinstance(target, str) or not target.startswith("Goal/") or target.count("/") != 1:
            continue
        goal_id = target.split("/", 1)[1]
        try:
            goal = await _read(ctx.repo, "Goal", goal_id)
        except (NotFound, Gone, Forbidden) as exc:
            # A Goal the token may not read, or one since deleted, is named but not looked into.
            out.append(
                {
                    "name": "unavailableGoal",
                    "part": [
                        {"name": "goal", "valueReference": {"reference": target}},
                        {"name": "reason", "valueString": _reason(exc)},
                    ],
                }
            )
            continue
        result = await goal_progress(ctx.repo, goal_id, goal, now)
        statuses.append(result.status)
        out.append({"name": "goalProgress", "part": goal_parameters(result)})
    status, rule = combine(statuses)
    counts = [{"name": code, "valueInteger": statuses.count(code)} for code in DISPLAYS]
    out.append({"name": "summary", "part": [{"name": "goals", "valueInteger": len(statuses)}, *counts]})
    out.append({"name": "achievementStatus", "valueCodeableConcept": status_concept(status)})
    out.append({"name": "rule", "valueString": rule if statuses else "no readable Goal"})
    return json_response({"resourceType": "Parameters", "parameter": out}, ctx.fmt)


def _reason(exc: FHIRError) -> str:
    return {404: "not found", 410: "deleted", 403: "not readable with this access token"}.get(
        exc.status, "error"
    )


_TARGET = OperationParameter(
    "target",
    "out",
    "",
    max="*",
    documentation="One per Goal.target with a measure",
    parts=(
        OperationParameter("measure", "out", "CodeableConcept", min=1),
        OperationParameter(
            "detail", "out", "Element", documentation="Goal.target.detail[x] (value[x] of the same type)"
        ),
        OperationParameter("due", "out", "date", documentation="dueDate (or valueDuration: dueDuration)"),
        OperationParameter(
            "observation",
            "out",
            "",
            max="*",
            documentation="The Observations of the measure, oldest first",
            parts=(
                OperationParameter("reference", "out", "Reference", min=1),
                OperationParameter("effective", "out", "dateTime"),
                OperationParameter("value", "out", "Element", documentation="Observation.value[x]"),
            ),
        ),
        OperationParameter("truncated", "out", "boolean", documentation="true: older Observations left out"),
        OperationParameter("latest", "out", "Element", documentation="The latest Observation's value[x]"),
        OperationParameter("latestObservation", "out", "Reference"),
        OperationParameter("meetsTarget", "out", "boolean"),
        OperationParameter("achievementStatus", "out", "CodeableConcept", min=1),
        OperationParameter("rule", "out", "string", min=1),
    ),
)

PROGRESS = Operation(
    name="progress",
    title="Progress of a Goal, or of a CarePlan's Goals",
    description=(
        "For each Goal.target with a measure: the target (measure, detail, due), the Observations of"
        " the measure about the Goal's subject that the access token may read (oldest first), the"
        " latest value, whether it meets the target, and a suggested achievementStatus (in-progress,"
        " improving, worsening, no-change, achieved, not-achieved) with the rule that produced it; the"
        " Goal's suggestion combines its targets. On a CarePlan: the same for every Goal of"
        " CarePlan.goal, a count per status and a rolled-up suggestion. Nothing is changed"
        " (CARECOORD_GOAL_AUTO_STATUS sets Goal.achievementStatus automatically)."
    ),
    levels=("instance",),
    resource_types=("Goal", "CarePlan"),
    handler=progress,
    ok_schema="Parameters",
    errors=(400, 403, 404, 405, 410),
    parameters=(
        OperationParameter("goal", "out", "Reference", documentation="The Goal (Goal level)"),
        OperationParameter("carePlan", "out", "Reference", documentation="The CarePlan (CarePlan level)"),
        OperationParameter(
            "currentAchievementStatus", "out", "CodeableConcept", documentation="Goal.achievementStatus now"
        ),
        _TARGET,
        OperationParameter(
            "goalProgress",
            "out",
            "",
            max="*",
            documentation="CarePlan level: per Goal of CarePlan.goal, the Goal level answer",
            parts=(
                OperationParameter("goal", "out", "Reference", min=1),
                _TARGET,
                OperationParameter("achievementStatus", "out", "CodeableConcept", min=1),
                OperationParameter("rule", "out", "string", min=1),
            ),
        ),
        OperationParameter(
            "unavailableGoal",
            "out",
            "",
            max="*",
            documentation="CarePlan level: a Goal the token may not read, or deleted",
            parts=(
                OperationParameter("goal", "out", "Reference", min=1),
                OperationParameter("reason", "out", "string", min=1),
            ),
        ),
        OperationParameter(
            "summary",
            "out",
            "",
            documentation="CarePlan level: how many Goals, and how many per suggested status",
            parts=(
                OperationParameter("goals", "out", "integer", min=1),
                *(OperationParameter(code, "out", "integer", min=1) for code in DISPLAYS),
            ),
        ),
        OperationParameter(
            "achievementStatus",
            "out",
            "CodeableConcept",
            min=1,
            documentation="The suggested achievementStatus (goal-achievement): of the Goal, or rolled up",
        ),
        OperationParameter("rule", "out", "string", min=1, documentation="The rule that produced it"),
    ),
)
