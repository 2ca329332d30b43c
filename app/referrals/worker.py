"""Referral workers: delivery, status tracking and cancellation (issue 6; FHIR Workflow
option G, SDOHCC Direct referrals, standards.md 1.1-1.2).

They are the handlers of the job kinds ``referral.deliver``, ``referral.track`` and
``referral.cancel`` (jobs.py) on the job runner (app/jobs, issue 10): any number of runners, in
any number of processes and machines, claim due jobs with ``FOR UPDATE SKIP LOCKED`` and lease
them for ``CARECOORD_WORKER_LEASE`` seconds, renewed while a handler runs; a job whose lease
runs out (its runner was killed) is claimed again by another. Each job's result is recorded
with a fence on (runner, attempt), in the transaction of the handler's own writes, so a runner
that lost its lease cannot overwrite a newer attempt. Partner calls never happen inside a
database transaction.

Exactly once at the partner: the delivery Bundle creates every resource conditionally on an
identifier carecoord assigns (bundle.py), so a retry after a lost response, or a second
worker re-running a job whose first worker died after posting, finds what the first attempt
created instead of creating it again.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from asyncpg import Connection, Pool

from app import db
from app.audit.store import insert_event
from app.auth.audit import build_event
from app.auth.scopes import Permission
from app.fhir import jsonio
from app.fhir.access import AccessContext
from app.fhir.conditional import conditional_create, find_ids
from app.fhir.errors import FHIRError, PreconditionFailed
from app.fhir.indexing import split_reference
from app.fhir.patch import json_size
from app.fhir.repository import FhirRepository, RepositoryFactory
from app.fhir.validation import validate_resource
from app.hooks import write_hooks
from app.jobs import Done, Failed, Job, LeaseLost, Outcome, Paused, Retry, Runner, backoff, queue, record
from app.referrals import metrics
from app.referrals.bundle import (
    escape_search_value,
    identifier_condition,
    identifier_for,
    referral_bundle,
    set_identifier,
)
from app.referrals.directory import Partner, find_partner
from app.referrals.hooks import PARTNER_POLL_FLOOR
from app.referrals.jobs import CANCEL, DELIVER, KINDS, TRACK, schedule, short_kind
from app.referrals.partner import AddressUnconfirmed, DeliveryError, PartnerClient
from app.referrals.state_machine import TERMINAL, local_reference, owner_can_reach, reference_of
from app.settings import Settings

logger = logging.getLogger("carecoord.referrals")

MAX_BACKOFF = 3600.0
MAX_ERROR_CHARS = 4000
"""The most of a partner's error answer kept in a job's ``last_error``."""
DELIVERY_EXTENSION = "referral-delivery"
MIRRORED = ("status", "statusReason", "businessStatus", "output")


class Worker:
    """The referral handlers, registered on a job runner: ``runner`` (as in ``serve`` and
    ``carecoord worker``, app/background.py), or, without one, a runner of its own that runs
    only referral jobs (``run``, ``run_once``)."""

    def __init__(
        self,
        pool: Pool,
        http: httpx.AsyncClient,
        settings: Settings,
        *,
        name: str | None = None,
        repositories: RepositoryFactory | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.repositories = repositories or RepositoryFactory.from_settings(settings, write_hooks(settings))
        self.partners = PartnerClient(http, pool, settings)
        self.fhir_base = settings.fhir_base
        if runner is None:
            runner = Runner(
                pool,
                name=name,
                lease=settings.worker_lease,
                concurrency=settings.worker_concurrency,
                dsn=db.asyncpg_dsn(settings.database_url) if settings.database_url else None,
            )
        self.runner = runner
        self.name = runner.name
        self.register(runner)
        self._access = AccessContext(client_id=f"carecoord-worker {self.name}", unrestricted=False)

    # -- running ---------------------------------------------------------------------------

    def register(self, runner: Runner) -> None:
        """Register the referral handlers on ``runner``. No referral kind takes every slot of a
        runner with more than one: the others' jobs (other kinds, later subscription
        deliveries) always find one free."""
        share = max(1, runner.concurrency - 1)
        for kind, work in ((DELIVER, self.deliver), (TRACK, self.track), (CANCEL, self.cancel)):
            runner.register(
                kind,
                self._handler(work),
                concurrency=share,
                backoff=self.settings.delivery_backoff,
                max_backoff=MAX_BACKOFF,
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Run this worker's runner until ``stop`` is set."""
        await self.runner.run(stop)

    async def run_once(self) -> int:
        """Claim the due jobs (at most ``worker_concurrency``) and run them; returns how many."""
        return await self.runner.run_once()

    def _handler(self, work: Callable[[Job], Awaitable[None]]) -> Callable[[Job], Awaitable[Outcome | None]]:
        """A referral job's handler: ``work`` records its outcome itself (with its writes); a
        partner's refusal or fault is a failed attempt (retried or given up), a changed partner
        address a pause."""

        async def handle(job: Job) -> None:
            try:
                await work(job)
            except LeaseLost:
                raise
            except AddressUnconfirmed as exc:
                await self._paused(job, exc)
            except DeliveryError as exc:
                await self._failed_attempt(job, exc)
            except Exception as exc:  # an unexpected error retries like a transport fault
                logger.error("referral job %s (%s): %s", job.id, job.kind, type(exc).__name__)
                await self._failed_attempt(
                    job, DeliveryError(f"internal error {type(exc).__name__}", retryable=True)
                )

        return handle

    # -- jobs ------------------------------------------------------------------------------

    async def deliver(self, job: Job) -> None:
        """Send the referral as one transaction Bundle of conditional creates."""
        partner_org = job.payload["partner_org"]
        async with self.pool.acquire() as conn:
            repo = self.repositories.for_system(conn)
            task = await _read(repo, "Task", job.payload["task_id"])
            owner = local_reference(reference_of(task or {}, "owner"), self.fhir_base)
            if (
                task is not None
                and task.get("status") == "requested"
                and owner != f"Organization/{partner_org}"
            ):
                # Handed to another organisation before it went out: the new owner's job delivers it.
                await self._finish(job, Done(error="not delivered: the Task's owner changed"), conn=conn)
                return
            if task is None or task.get("status") != "requested":
                # Cancelled (or deleted) before it went out: nothing to deliver.
                await self._finish(
                    job, Done(error="not delivered: the Task is no longer requested"), conn=conn
                )
                return
            as_partner = self.repositories.for_system(conn, partner_access(partner_org))
            contents = await _referral_contents(as_partner, task)
            partner = await self._partner(conn, job)
            owner_organization = await _read(as_partner, "Organization", partner_org)
        if contents is None:
            raise DeliveryError("the Task's ServiceRequest or Patient is missing", retryable=False)
        service_request, patient, supporting = contents
        try:
            bundle = referral_bundle(
                task=self._without_delivery_state(task),
                service_request=service_request,
                patient=patient,
                supporting=supporting,
                source_base=self.fhir_base,
                directory={f"Organization/{partner_org}": owner_organization} if owner_organization else None,
            )
        except ValueError as exc:  # the referral cannot be expressed: retrying will not help
            raise DeliveryError(f"the referral cannot be sent: {exc}"[:300], retryable=False) from exc
        started = time.monotonic()
        metrics.DELIVERIES_ATTEMPTED.labels(partner=partner_org).inc()
        response = await self.partners.transaction(partner, bundle)
        partner_task = _partner_task_url(partner, bundle, response) or await self._find_partner_task(
            partner, job.payload["task_id"]
        )
        if partner_task is None:
            raise DeliveryError("the partner's answer does not say where the Task is", retryable=True)
        async with self.pool.acquire() as conn, conn.transaction():
            await self._finish(job, Done(status=200, payload={"partner_task": partner_task}), conn=conn)
            await self._mark_task(
                conn, job.payload["task_id"], "delivered", attempts=job.attempts, partner_task=partner_task
            )
            await schedule(
                conn,
                TRACK,
                job.payload["task_id"],
                partner_org,
                job.payload["partner_endpoint"],
                datetime.now(UTC) + timedelta(seconds=self.settings.delivery_deadline),
                partner_task,
            )
            await queue.reschedule(conn, TRACK, job.payload["task_id"], self.settings.referral_poll_interval)
            await self._audit(conn, job, 200, "transaction")
        metrics.DELIVERIES_SUCCEEDED.labels(partner=partner_org).inc()
        metrics.DELIVERY_LATENCY.observe((datetime.now(UTC) - job.created_at).total_seconds())
        logger.info(
            "referral Task/%s delivered to Organization/%s in %.0f ms (attempt %s)",
            job.payload["task_id"],
            partner_org,
            (time.monotonic() - started) * 1000,
            job.attempts,
        )

    async def track(self, job: Job) -> None:
        """Mirror the partner's Task into the local one; stop at a terminal status, or when the
        Task was handed to another owner (the former one's answers are no longer the Task's)."""
        async with self.pool.acquire() as conn:
            task = await _read(self.repositories.for_system(conn), "Task", job.payload["task_id"])
            owner = local_reference(reference_of(task or {}, "owner"), self.fhir_base)
            if owner != f"Organization/{job.payload['partner_org']}":
                await self._finish(job, Done(error="tracking ended: the Task has another owner"), conn=conn)
                return
            partner = await self._partner(conn, job)
        remote = await self.partners.read(partner, job.payload["partner_task"])
        async with self.pool.acquire() as conn:
            as_partner = self.repositories.for_system(conn, partner_access(partner.organization_id))
            known, wanted = await self._outputs_to_copy(as_partner, partner, remote, job.payload["copies"])
        outputs = await self._fetch_outputs(partner, wanted)
        async with self.pool.acquire() as conn, conn.transaction():
            local_status, copied = await self._mirror(
                conn, partner, job.payload["task_id"], remote, outputs, known
            )
            # Fenced with the outcome: a runner that lost the job counts nothing.
            counted = {"copies": job.payload["copies"] + copied} if copied else None
            if remote.get("status") in TERMINAL or local_status == "entered-in-error":
                await self._finish(job, Done(status=200, payload=counted), conn=conn)
            else:
                due = datetime.now(UTC) + timedelta(seconds=self.settings.referral_poll_interval)
                await self._finish(job, Retry(at=due, status=200, payload=counted), conn=conn)

    async def cancel(self, job: Job) -> None:
        """Propagate a cancellation by the referral's source to the partner's Task."""
        async with self.pool.acquire() as conn:
            # A delivery paused for an address confirmation never went out: it never will.
            await queue.close(
                conn,
                DELIVER,
                job.payload["task_id"],
                error="not delivered: the referral was cancelled",
                states=("paused",),
            )
            # One statement, one snapshot: a delivery finishing between two reads must not
            # look like a referral that was never delivered.
            referral = await queue.find(conn, key=job.payload["task_id"], kinds=KINDS)
            partner = await self._partner(conn, job)
        deliveries = [other for other in referral if other.kind == DELIVER]
        partner_task = next(
            (
                other.payload["partner_task"]
                for other in reversed(referral)
                if other.payload.get("partner_task")
            ),
            None,
        )
        if partner_task is None:
            if any(other.state in ("pending", "leased") for other in deliveries):
                raise DeliveryError("the referral is still being delivered", retryable=True)
            if any(other.attempts for other in deliveries):
                # An attempt may have reached the partner though its answer was lost.
                partner_task = await self._find_partner_task(partner, job.payload["task_id"])
            if partner_task is None:
                await self._finish(job, Done(error="never delivered: nothing to cancel at the partner"))
                return
        for _ in range(3):
            remote = await self.partners.read(partner, partner_task)
            if remote.get("status") in TERMINAL:
                break
            cancelled = {
                **remote,
                "status": "cancelled",
                "statusReason": {"text": "Cancelled by the referral's source"},
            }
            version = (remote.get("meta") or {}).get("versionId")
            path = f"Task/{remote.get('id')}"
            try:
                await self.partners.update(
                    partner, path, cancelled, if_match=f'W/"{version}"' if version else None
                )
                break
            except DeliveryError as exc:
                if exc.status != 412:
                    raise  # 412: the partner changed its Task meanwhile; read it again
        else:
            raise DeliveryError("the partner's Task keeps changing under the cancellation", retryable=True)
        async with self.pool.acquire() as conn, conn.transaction():
            await self._finish(job, Done(status=200), conn=conn)
            await queue.reschedule(conn, TRACK, job.payload["task_id"], 0)
            await self._audit(conn, job, 200, "update")

    # -- helpers ---------------------------------------------------------------------------

    async def _find_partner_task(self, partner: Partner, task_id: str) -> str | None:
        """The partner's copy of a Task, found by the identifier carecoord gave it."""
        condition = identifier_condition(identifier_for("Task", task_id, self.fhir_base))
        found = await self.partners.read(partner, f"Task?{condition}")
        for entry in found.get("entry") or []:
            resource = entry.get("resource") or {}
            if resource.get("resourceType") == "Task" and resource.get("id"):
                return f"{partner.base_url}/Task/{resource['id']}"
        return None

    def _without_delivery_state(self, task: dict[str, Any]) -> dict[str, Any]:
        """The Task as the partner should see it: carecoord's own delivery bookkeeping (the
        delivery extension and businessStatus) stays local, so every attempt sends the same."""
        ours = f"{self.fhir_base}/StructureDefinition/{DELIVERY_EXTENSION}"
        sent = dict(task)
        extensions = [e for e in task.get("extension") or [] if e.get("url") != ours]
        if extensions:
            sent["extension"] = extensions
        else:
            sent.pop("extension", None)
        codings = (task.get("businessStatus") or {}).get("coding") or []
        if any(c.get("system") == f"{self.fhir_base}/CodeSystem/{DELIVERY_EXTENSION}" for c in codings):
            sent.pop("businessStatus", None)
        return sent

    async def _partner(self, conn: Connection, job: Job) -> Partner:
        found = await find_partner(conn, job.payload["partner_org"])
        if found is None or found.endpoint_id != job.payload["partner_endpoint"]:
            raise DeliveryError("the partner no longer has this active FHIR endpoint", retryable=False)
        return found

    async def _outputs_to_copy(
        self, repo: FhirRepository, partner: Partner, remote: dict[str, Any], copies_so_far: int
    ) -> tuple[dict[str, str], list[str]]:
        """Of the partner Task's outputs of COPIED_TYPES: those already copied here (partner
        reference -> local ``Type/id``, found by carecoord's identifier among this partner's
        copies) and those to fetch now. A partner is not a free storage service: at most
        MAX_OUTPUTS_PER_POLL new ones per poll and MAX_COPIES per referral; the others keep
        pointing at the partner."""
        known: dict[str, str] = {}
        wanted: list[str] = []
        system = f"{self.fhir_base}/{PARTNER_RESOURCE}"
        room = max(0, MAX_COPIES - copies_so_far)
        for output in (remote.get("output") or [])[:MAX_MIRRORED_OUTPUTS]:
            value = output.get("valueReference") if isinstance(output, dict) else None
            reference = value.get("reference") if isinstance(value, dict) else None
            at_partner = _at_partner(partner, reference)
            if not isinstance(reference, str) or at_partner is None or reference in known:
                continue
            resource_type = at_partner.rsplit("/", 2)[-2]
            if resource_type not in COPIED_TYPES:
                continue  # not kept here: stays a reference to the partner (_rewrite_outputs)
            condition = [("identifier", f"{escape_search_value(system)}|{escape_search_value(at_partner)}")]
            found = await find_ids(repo, resource_type, condition, 1, "s")
            if found:
                known[reference] = f"{resource_type}/{found[0]}"
            elif len(wanted) < min(room, MAX_OUTPUTS_PER_POLL) and reference not in wanted:
                wanted.append(reference)
        return known, wanted

    async def _fetch_outputs(self, partner: Partner, references: list[str]) -> dict[str, dict[str, Any]]:
        """The partner's resources behind ``references``, each at most MAX_COPY_BYTES. One the
        partner will not show (403/404) or that is too large is left out: the status is still
        mirrored, and the output keeps pointing at the partner."""
        fetched: dict[str, dict[str, Any]] = {}
        for reference in references:
            try:
                fetched[reference] = await self.partners.read(partner, reference, max_bytes=MAX_COPY_BYTES)
            except DeliveryError as exc:
                if exc.retryable:
                    raise
                logger.info(
                    "referral output at Organization/%s not kept (%s)",
                    partner.organization_id,
                    exc.status or exc.message[:80],
                )
        return fetched

    async def _mirror(
        self,
        conn: Connection,
        partner: Partner,
        task_id: str,
        remote: dict[str, Any],
        outputs: dict[str, dict[str, Any]],
        known: dict[str, str],
    ) -> tuple[str | None, int]:
        """Copy the partner's status, statusReason, businessStatus and output into the local
        Task; returns the local status and how many new copies were stored.

        The partner's data is written with the partner organisation's access (partner_access),
        never with open access: what it names must be what the partner itself may read. A
        status is copied only if the referral's owner could have reached it from the local one
        (state_machine.owner_can_reach: never ``received``/``ready``, never back, never
        ``entered-in-error``, which is the requester's); once the source has ended the referral
        (cancelled, entered-in-error), its status and reason stay."""
        repo = self.repositories.for_system(conn, partner_access(partner.organization_id))
        current = await repo.read_for_update("Task", task_id)
        local = jsonio.loads(current.body or "{}")
        local_ids = dict(known)
        translations: dict[str, str] = {}
        for element in ("for", "focus"):
            theirs = _at_partner(partner, (remote.get(element) or {}).get("reference"))
            ours = (local.get(element) or {}).get("reference")
            if theirs is not None and isinstance(ours, str):
                translations[theirs] = ours
        copied = 0
        for reference, resource in outputs.items():
            kept = await self._keep_copy(repo, partner, reference, resource, translations)
            if kept is not None:
                local_ids[reference] = kept
                copied += 1
        mirrored = dict(local)
        ended_here = local.get("status") in ("cancelled", "entered-in-error")
        for element in MIRRORED:
            value = remote.get(element)
            if element in ("status", "statusReason") and ended_here:
                continue  # the source ended it; the cancellation is on its way to the partner
            if element == "status" and not (
                isinstance(value, str) and owner_can_reach(local.get("status"), value)
            ):
                continue
            if element == "output" and value is not None:
                value = _rewrite_outputs(value[:MAX_MIRRORED_OUTPUTS], local_ids, partner, self.fhir_base)
            if value is None:
                mirrored.pop(element, None)
            else:
                mirrored[element] = value
        if element_changes(local, mirrored):
            if not await _valid_task(mirrored, repo.max_resource_bytes):
                # The partner's statusReason, businessStatus or outputs are not valid FHIR (or too
                # large): only its status, which owner_can_reach vetted, is taken.
                mirrored = {**local, "status": mirrored.get("status", local.get("status"))}
                if not await _valid_task(mirrored, repo.max_resource_bytes):
                    raise DeliveryError("the partner's Task cannot be mirrored", retryable=False)
            await repo.update("Task", task_id, mirrored, if_match=current.version_id)
        status = mirrored.get("status")
        return (status if isinstance(status, str) else None), copied

    async def _keep_copy(
        self,
        repo: FhirRepository,
        partner: Partner,
        reference: str,
        resource: dict[str, Any],
        translations: dict[str, str],
    ) -> str | None:
        """A local copy of a partner's resource, identified by its absolute URL at the partner
        (two partners' ``Procedure/1`` are different resources); None when it is not kept.

        Kept only if it is a type the referral workflow returns (COPIED_TYPES), valid FHIR, and
        names nothing on this server except the referral's own Patient and ServiceRequest: its
        references are made absolute to the partner, those to the partner's copies of the
        referral's Patient and ServiceRequest point back at the local ones (a partner's relative
        ``Patient/9`` must never be read as this server's Patient/9), and one that points at
        this server by itself (another patient's record, say) refuses the copy. It is matched
        only by carecoord's own partner-resource identifier, among the copies this partner's
        access reaches, so a partner cannot claim a local resource by copying its identifier."""
        resource_type = resource.get("resourceType")
        try:
            if resource_type not in COPIED_TYPES:
                raise _NotKept(f"type {resource_type!s:.40} is not copied")
            assert isinstance(resource_type, str)
            system = f"{self.fhir_base}/{PARTNER_RESOURCE}"
            value = _at_partner(partner, f"{resource_type}/{resource.get('id')}") or reference
            duplicate = {k: v for k, v in resource.items() if k not in ("id", "meta")}
            _localize_references(duplicate, partner, translations, self.fhir_base)
            identifier = {"system": system, "value": value}
            set_identifier(duplicate, identifier)
            # In a thread: a partner's resource is up to MAX_COPY_BYTES, and the API shares this loop.
            data = await asyncio.to_thread(validate_resource, duplicate, resource_type)
            condition = identifier_condition(identifier)
            version, _ = await conditional_create(repo, resource_type, data, condition)
        except (_NotKept, FHIRError) as exc:
            # A validation error's diagnostics (and element paths) can quote the partner's data:
            # the log gets the status and the issue codes, never their text (no PHI in logs).
            reason = (
                f"{exc.status} {' '.join(sorted({issue.code for issue in exc.all_issues()}))}"
                if isinstance(exc, FHIRError)
                else str(exc)
            )
            logger.info(
                "referral output at Organization/%s not kept: %s", partner.organization_id, reason[:200]
            )
            return None
        return f"{resource_type}/{version.fhir_id}"

    async def _mark_task(
        self,
        conn: Connection,
        task_id: str,
        state: str,
        *,
        attempts: int,
        error: str | None = None,
        partner_task: str | None = None,
    ) -> None:
        """Show the delivery state on the local Task: businessStatus and an extension."""
        repo = self.repositories.for_bookkeeping(conn)
        for _ in range(3):
            try:
                current = await repo.read_for_update("Task", task_id)
            except FHIRError:
                return  # deleted meanwhile: nothing to show it on
            task = jsonio.loads(current.body or "{}")
            url = f"{self.fhir_base}/StructureDefinition/{DELIVERY_EXTENSION}"
            parts: list[dict[str, Any]] = [
                {"url": "state", "valueCode": state},
                {"url": "attempts", "valueInteger": attempts},
            ]
            if error:
                parts.append({"url": "lastError", "valueString": error[:1000]})
            if partner_task:
                parts.append({"url": "partnerTask", "valueUrl": partner_task})
            extensions = [e for e in task.get("extension") or [] if e.get("url") != url]
            task["extension"] = [*extensions, {"url": url, "extension": parts}]
            task["businessStatus"] = {
                "coding": [{"system": f"{self.fhir_base}/CodeSystem/{DELIVERY_EXTENSION}", "code": state}],
                "text": {
                    "delivered": "Delivered to the partner",
                    "failed": "Delivery failed",
                    "retrying": "Delivery being retried",
                    "paused": "Delivery waiting for an operator to confirm the partner's address",
                }.get(state, state),
            }
            try:
                await repo.update("Task", task_id, task, if_match=current.version_id)
                return
            except PreconditionFailed:
                continue

    async def _paused(self, job: Job, error: AddressUnconfirmed) -> None:
        """The partner's address changed under its credentials: nothing was sent; the job waits
        (not due, not failed) until an operator confirms the address (credentials.confirm_address)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._finish(job, Paused(error=error.message), conn=conn)
            if job.kind == DELIVER:
                await self._mark_task(conn, job.payload["task_id"], "paused", attempts=job.attempts)
        logger.warning(
            "referral job %s (%s, Task/%s): paused until the address of Endpoint/%s is confirmed",
            job.id,
            job.kind,
            job.payload["task_id"],
            job.payload["partner_endpoint"],
        )

    async def _failed_attempt(self, job: Job, error: DeliveryError) -> None:
        partner_org = job.payload["partner_org"]
        now = datetime.now(UTC)
        tracking = job.kind == TRACK
        # Referral jobs are enqueued with a deadline (jobs.schedule); none would mean no limit.
        deadline = job.deadline or datetime.max.replace(tzinfo=UTC)
        # Tracking follows a referral for as long as the partner works on it: no deadline.
        retry = error.retryable and (tracking or now < deadline)
        detail = error.message
        if error.outcome is not None:
            detail = f"{detail}: {jsonio.dumps(error.outcome).decode('utf-8')}"[:MAX_ERROR_CHARS]
        async with self.pool.acquire() as conn, conn.transaction():
            if retry:
                delay = backoff(self.settings.delivery_backoff, job.attempts, MAX_BACKOFF)
                if error.retry_after is not None:
                    # The partner's Retry-After is honoured, but a partner cannot make carecoord
                    # call it more often than its own backoff would (issue 15).
                    delay = max(error.retry_after, self.settings.delivery_backoff)
                if tracking:
                    delay = max(
                        min(delay, max(self.settings.referral_poll_interval, 60.0)), PARTNER_POLL_FLOOR
                    )
                    due = now + timedelta(seconds=delay)
                else:
                    due = min(now + timedelta(seconds=delay), deadline)
                await self._finish(job, Retry(at=due, status=error.status, error=detail), conn=conn)
                if job.kind == DELIVER and job.attempts == 1:
                    await self._mark_task(
                        conn, job.payload["task_id"], "retrying", attempts=job.attempts, error=_shown(error)
                    )
            else:
                await self._finish(job, Failed(status=error.status, error=detail), conn=conn)
                if job.kind == DELIVER:
                    await self._mark_task(
                        conn, job.payload["task_id"], "failed", attempts=job.attempts, error=_shown(error)
                    )
            await self._audit(conn, job, error.status or 0, "transaction" if job.kind == DELIVER else "read")
        if job.kind == DELIVER and not retry:
            metrics.DELIVERIES_FAILED.labels(partner=partner_org).inc()
        logger.info(
            "referral job %s (%s, Task/%s): attempt %s failed (%s)%s",
            job.id,
            job.kind,
            job.payload["task_id"],
            job.attempts,
            error.status or "transport",
            "; will retry" if retry else "; given up",
        )

    async def _finish(self, job: Job, outcome: Outcome, *, conn: Connection | None = None) -> None:
        """Record a job's outcome, only if this runner still holds its lease (the fence: raises
        LeaseLost, rolling back the writes of ``conn``'s transaction)."""
        if conn is None:
            async with self.pool.acquire() as own:
                await record(own, job, outcome)
        else:
            await record(conn, job, outcome)

    async def _audit(self, conn: Connection, job: Job, status: int, interaction: str) -> None:
        """Each attempt at a partner is an AuditEvent (issue 6)."""
        event = build_event(
            interaction=interaction,
            status=status if status else 503,
            access=self._access,
            touched=[("Task", job.payload["task_id"], 0)],
            query=None,
            address=None,
            fhir_base=self.fhir_base,
        )
        event["entity"][0]["what"] = {"reference": f"Task/{job.payload['task_id']}"}
        event["entity"][0]["description"] = (
            f"referral {short_kind(job.kind)} to Organization/{job.payload['partner_org']}"
        )
        await insert_event(conn, event, self.fhir_base)  # the audit store, in the job's transaction


async def _valid_task(task: dict[str, Any], max_bytes: int) -> bool:
    """Whether a Task built from a partner's data may be stored: valid R4 and within the size a
    client's write could have (validated off the event loop)."""
    if json_size(task, max_bytes) > max_bytes:
        return False
    try:
        await asyncio.to_thread(validate_resource, task, "Task")
    except FHIRError:
        return False
    return True


def _shown(error: DeliveryError) -> str:
    """What the referral's Task (readable by API clients) says about a failed attempt: the
    partner's answer when there was one (its status and OperationOutcome explain a refusal),
    never transport details (which address was refused, reset or timed out: a port scanner's
    readout); those are in the job's ``last_error`` (``carecoord referrals status``) and the logs."""
    if error.status is None:
        return "the partner could not be reached"
    shown = f"the partner answered {error.status}"
    if error.outcome is not None:
        shown = f"{shown}: {jsonio.dumps(error.outcome).decode('utf-8')}"
    return shown


def element_changes(before: dict[str, Any], after: dict[str, Any]) -> bool:
    return any(before.get(element) != after.get(element) for element in MIRRORED)


PARTNER_RESOURCE = "partner-resource"
"""Identifier system (under the FHIR base) of local copies of partner resources."""
MAX_MIRRORED_OUTPUTS = 50
"""A partner Task's outputs looked at (and mirrored) per poll."""
MAX_OUTPUTS_PER_POLL = 10
"""New partner resources fetched and copied per poll."""
MAX_COPIES = 20
"""Partner resources copied per referral, in all."""
MAX_COPY_BYTES = 1024 * 1024
"""The largest partner resource copied (a Procedure, an Observation, a filled form)."""
COPIED_TYPES = frozenset({"Procedure", "Observation", "QuestionnaireResponse"})
"""The partner resources a referral's ``Task.output`` names that carecoord keeps a copy of
(SDOHCC TaskForReferralManagement outputs): the closed-loop result (resulting-activity
Procedure), an enrollment-status Observation, an assessment's QuestionnaireResponse. Any other
output stays a reference to the partner's server."""


class _NotKept(Exception):
    """A partner resource that is not copied here (the message says why; no PHI)."""


def partner_access(organization_id: str) -> AccessContext:
    """The access the partner's own client would have. What the worker sends a partner is read
    with it (a delivery carries what the referral grants its partner, nothing else), and what it
    writes from a partner's data (its Task's status and outputs) is judged as if the partner
    wrote it (issue 15)."""
    return AccessContext(
        client_id="carecoord-worker",
        organization=f"Organization/{organization_id}",
        permissions=(Permission("system", "*", frozenset("cruds")),),
        unrestricted=False,
    )


def _at_partner(partner: Partner, reference: object) -> str | None:
    """A partner's reference as an absolute URL under its base; None when it is not a
    ``Type/id`` one or points anywhere but the partner (contained, urn:, another server)."""
    if not isinstance(reference, str) or reference.startswith(("#", "urn:")):
        return None
    if reference.startswith(("http://", "https://")):
        return reference if reference.startswith(partner.base_url + "/") else None
    return f"{partner.base_url}/{reference.lstrip('/')}"


def _localize_references(node: Any, partner: Partner, translations: dict[str, str], fhir_base: str) -> None:
    """Make a partner resource's references safe to store here (see _keep_copy), contained
    resources included."""
    for holder, value in _references(node):
        at_partner = _at_partner(partner, value)
        if at_partner is not None:
            holder["reference"] = translations.get(at_partner, at_partner)
        elif value.startswith(fhir_base + "/"):
            local = value.removeprefix(fhir_base + "/")
            if local not in translations.values():
                raise _NotKept("it points at a resource of this server")
            holder["reference"] = local


def _references(node: Any) -> list[tuple[dict[str, Any], str]]:
    """Every (object, its ``reference`` string) anywhere in ``node``."""
    found: list[tuple[dict[str, Any], str]] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            reference = item.get("reference")
            if isinstance(reference, str):
                found.append((item, reference))
            stack.extend(v for k, v in item.items() if k != "reference" and isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _rewrite_outputs(
    outputs: list[dict[str, Any]], local_ids: dict[str, str], partner: Partner, fhir_base: str
) -> list[dict[str, Any]]:
    """Outputs that were kept point at the local copies; every other reference in an output
    (its value, an annotation's author, an extension) points at the partner, absolutely. One
    that names this server is the partner's claim on a local resource: it loses its reference
    (a Reference with only a display is valid FHIR)."""
    rewritten = []
    for output in outputs:
        output = copy.deepcopy(output)
        for holder, reference in _references(output):
            if holder is (output.get("valueReference") or None) and reference in local_ids:
                holder["reference"] = local_ids[reference]
            elif (absolute := _at_partner(partner, reference)) is not None:
                holder["reference"] = absolute
            elif not reference.startswith(("urn:", "#")):
                del holder["reference"]
                holder.setdefault("display", "a resource the partner named on another server")
        rewritten.append(output)
    return rewritten


async def _read(repo: FhirRepository, resource_type: str, fhir_id: str) -> dict[str, Any] | None:
    try:
        version = await repo.read(resource_type, fhir_id)
    except FHIRError:
        return None
    loaded: dict[str, Any] = jsonio.loads(version.body or "{}")
    return loaded


def _local_reference(reference: object, fhir_base: str) -> tuple[str, str] | None:
    """(type, id) of a reference to a resource on this server, or None."""
    if not isinstance(reference, str):
        return None
    target_type, target_id, _ = split_reference(reference, fhir_base)
    return (target_type, target_id) if target_type and target_id else None


async def _referral_contents(
    repo: FhirRepository, task: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None:
    """The ServiceRequest, the Patient and what the ServiceRequest points to (Consent,
    Conditions, Observations, the requester) that this server holds."""
    focus = _local_reference((task.get("focus") or {}).get("reference"), repo.fhir_base)
    subject = _local_reference((task.get("for") or {}).get("reference"), repo.fhir_base)
    if focus is None or subject is None:
        return None
    service_request = await _read(repo, *focus)
    patient = await _read(repo, *subject)
    if service_request is None or patient is None:
        return None
    wanted: list[tuple[str, str]] = []
    references = [
        *(service_request.get("supportingInfo") or []),
        *(service_request.get("reasonReference") or []),
        service_request.get("requester") or {},
        task.get("requester") or {},
    ]
    for reference in references:
        target = _local_reference(reference.get("reference"), repo.fhir_base)
        if target is not None and target not in wanted and target not in (focus, subject):
            wanted.append(target)
    supporting = [resource for target in wanted if (resource := await _read(repo, *target)) is not None]
    return service_request, patient, supporting


def _partner_task_url(partner: Partner, bundle: dict[str, Any], response: dict[str, Any]) -> str | None:
    """The absolute URL of the partner's copy of the Task, from the transaction-response."""
    entries = bundle.get("entry") or []
    answers = response.get("entry") or []
    for sent, answer in zip(entries, answers, strict=False):
        if (sent.get("resource") or {}).get("resourceType") == "Task":
            location = (answer.get("response") or {}).get("location") or ""
            location = location.split("/_history", 1)[0]
            if location.startswith(("http://", "https://")):
                return location
            if location:
                return f"{partner.base_url}/{location.lstrip('/')}"
    return None
