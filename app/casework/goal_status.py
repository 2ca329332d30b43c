"""Automatic ``Goal.achievementStatus`` (CARECOORD_GOAL_AUTO_STATUS).

When it is on, every Observation write enqueues a ``goal.status`` job (in the write's own
transaction: a transactional outbox, app/jobs) naming the Observation's subject and codes. The
job, run by the job runner of any carecoord process, recomputes the progress
(app/casework/progress.py) of that subject's open Goals whose ``target.measure`` shares a code
with the Observation, with carecoord's own (system) access, and where the suggested status
differs from ``achievementStatus`` updates the Goal and records a Provenance in the same
transaction: target the new Goal version, activity UPDATE, reason the rule that decided, agent
carecoord (assembler), entity the Observations the rule read. Done as a job, not in the
write hook itself, so that an Observation write neither waits for nor fails with the Goals'
recomputation, and a client that may write Observations but not Goals still gets them updated.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from asyncpg import Pool

from app.casework.progress import goal_progress, status_concept
from app.fhir import jsonio
from app.fhir.errors import PreconditionFailed
from app.fhir.repository import FhirRepository, RepositoryFactory, StoredVersion, fhir_instant
from app.fhir.search import MAX_COUNT, parse_search
from app.fhir.search_params import registry
from app.jobs import Done, Job, Outcome, Retry, Runner, queue
from app.referrals.state_machine import local_reference
from app.settings import Settings

logger = logging.getLogger("carecoord.goals")

GOAL_STATUS = "goal.status"
OPEN_LIFECYCLE = "proposed,planned,accepted,active,on-hold"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
AGENT = "carecoord goal progress (CARECOORD_GOAL_AUTO_STATUS)"


def _codes(concept: Any) -> list[list[str]]:
    if not isinstance(concept, dict):
        return []
    return [
        [str(c.get("system") or ""), str(c["code"])]
        for c in concept.get("coding") or []
        if isinstance(c, dict) and isinstance(c.get("code"), str)
    ]


class GoalStatusHooks:
    """Enqueue the recomputation of a subject's Goals when one of its Observations is written."""

    types = frozenset({"Observation"})

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.goal_auto_status

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
        if not self.enabled or data is None:
            return
        subject = local_reference((data.get("subject") or {}).get("reference"), repo.fhir_base)
        codes = _codes(data.get("code"))
        if not subject or "/" not in subject or not codes:
            return
        payload = {"subject": subject, "codes": codes, "observation": f"Observation/{version.fhir_id}"}
        await queue.enqueue(await repo.db(), GOAL_STATUS, payload)


async def update_goals(repo: FhirRepository, subject: str, codes: list[list[str]]) -> list[str]:
    """Set the suggested achievementStatus on ``subject``'s open Goals measured by one of
    ``codes`` where it differs, each with a Provenance; the ids of the Goals changed."""
    wanted = {(system, code) for system, code in codes}
    request = parse_search(
        ("Goal",),
        [("subject", subject), ("lifecycle-status", OPEN_LIFECYCLE), ("_count", str(MAX_COUNT))],
        registry=registry(),
        fhir_base=repo.fhir_base,
        strict=True,
        access=repo.access,
        limits=repo.search_limits,
    )
    changed = []
    after = None
    now = datetime.now(UTC)
    while True:
        page = await repo.search(request, after, False)
        for found in page.matches:
            goal: dict[str, Any] = jsonio.loads(found.body)
            measures = {
                (s, c)
                for target in goal.get("target") or []
                for s, c in _codes((target or {}).get("measure"))
            }
            if not measures & wanted:
                continue
            progress = await goal_progress(repo, found.fhir_id, goal, now)
            current = {c for _, c in _codes(goal.get("achievementStatus"))}
            if progress.status in current:
                continue
            version_id = int((goal.get("meta") or {}).get("versionId", "0"))
            goal["achievementStatus"] = status_concept(progress.status)
            stored, _ = await repo.update("Goal", found.fhir_id, goal, if_match=version_id)
            sources = [p.reference for t in progress.targets for p in t.points[-2:]]
            rule = "; ".join([progress.rule, *(t.rule for t in progress.targets)])
            await repo.create("Provenance", _provenance(stored, rule, sources, now))
            changed.append(found.fhir_id)
        if page.next_keys is None:
            return changed
        after = page.next_keys


def _provenance(goal: StoredVersion, rule: str, sources: list[str], now: datetime) -> dict[str, Any]:
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "target": [{"reference": f"Goal/{goal.fhir_id}/_history/{goal.version_id}"}],
        "recorded": fhir_instant(now),
        "reason": [{"text": f"Goal.achievementStatus suggested by $progress: {rule}"}],
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "UPDATE", "display": "revise"}]},
        "agent": [
            {
                "type": {
                    "coding": [{"system": PARTICIPANT_TYPE, "code": "assembler", "display": "Assembler"}]
                },
                "who": {"display": AGENT},
            }
        ],
    }
    if sources:
        provenance["entity"] = [{"role": "source", "what": {"reference": r}} for r in dict.fromkeys(sources)]
    return provenance


class GoalStatus:
    """The ``goal.status`` job handler."""

    def __init__(self, pool: Pool, repositories: RepositoryFactory) -> None:
        self.pool = pool
        self.repositories = repositories

    def register(self, runner: Runner) -> None:
        runner.register(GOAL_STATUS, self.handle, concurrency=2, backoff=2.0, max_backoff=300.0)

    async def handle(self, job: Job) -> Outcome:
        subject = job.payload.get("subject")
        codes = job.payload.get("codes")
        if not isinstance(subject, str) or not isinstance(codes, list):
            return Done(error="malformed payload")
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                changed = await update_goals(self.repositories.for_system(connection), subject, codes)
        except PreconditionFailed:
            # A Goal changed while it was recomputed: do it again on the new version.
            return Retry(delay=0.5, error="a Goal changed meanwhile")
        if changed:
            logger.info("goal status: %d Goal(s) updated (job %d)", len(changed), job.id)
        return Done()
