"""rest-hook deliveries: handshakes, event notifications and heartbeats, as job-runner handlers.

Backport IG 1.1 (R4), channel ``rest-hook``: each notification is a POST of the notification
Bundle (notifications.py) to ``channel.endpoint`` with ``Content-Type: application/fhir+json``
and the ``channel.header`` lines as headers, answered within ``backport-timeout`` seconds. Any
2xx is success.

* **Handshake** (a new, changed or reactivated subscription): success makes it ``active``; a
  refusal or no answer puts it in ``error`` at once, without retries.
* **Event notifications** go out in event-number order, at most ``backport-max-count`` events a
  Bundle, one job per subscription at a time. A failed attempt is retried with the same event
  numbers after ``CARECOORD_DELIVERY_BACKOFF`` seconds, doubling, at most 10 minutes; after
  ``CARECOORD_SUBSCRIPTION_MAX_FAILURES`` consecutive failures the subscription goes to
  ``error`` (it keeps counting events, which ``$events`` replays, and its owner reactivates it
  by updating it). Delivery is at least once: an event is resent only when the endpoint's
  answer was lost (or this process died before recording it), with the same number.
* **Heartbeats** (``backport-heartbeat-period``): sent when nothing else was for that long.

Every attempt leaves an AuditEvent (a bookkeeping write) naming the subscription and outcome.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import httpx
from asyncpg import Connection, Pool, Record

from app.auth.audit import build_event
from app.fhir import jsonio
from app.fhir.access import AccessContext
from app.fhir.errors import FHIRError, PreconditionFailed
from app.fhir.repository import FhirRepository, RepositoryFactory
from app.jobs.queue import Job
from app.jobs.runner import Done, Outcome, Retry, Runner, record
from app.outbound import OutboundRefused
from app.settings import Settings
from app.subscriptions import jobs, metrics
from app.subscriptions.notifications import bundle_bytes, load_events, notification_bundle
from app.subscriptions.owner import owner_access
from app.subscriptions.spec import REST_HOOK

logger = logging.getLogger("carecoord.subscriptions")

MAX_BACKOFF = 600.0
"""Longest wait between two attempts at a failing endpoint (10 minutes)."""
MAX_ERROR_CHARS = 500


class Delivery:
    def __init__(
        self, pool: Pool, http: httpx.AsyncClient, settings: Settings, repositories: RepositoryFactory
    ) -> None:
        self.pool = pool
        self.http = http
        self.settings = settings
        self.repositories = repositories
        self.fhir_base = settings.fhir_base
        self._audit_access = AccessContext(client_id="carecoord-subscriptions", unrestricted=False)

    def register(self, runner: Runner) -> None:
        runner.register(
            jobs.HANDSHAKE, self.handshake, backoff=self.settings.delivery_backoff, max_backoff=MAX_BACKOFF
        )
        runner.register(
            jobs.NOTIFY, self.notify, backoff=self.settings.delivery_backoff, max_backoff=MAX_BACKOFF
        )
        runner.register(
            jobs.HEARTBEAT, self.heartbeat, backoff=self.settings.delivery_backoff, max_backoff=MAX_BACKOFF
        )

    # -- handlers -------------------------------------------------------------------------

    async def handshake(self, job: Job) -> Outcome | None:
        subscription_id = str(job.payload["subscription"])
        async with self.pool.acquire() as conn:
            subscription = await _subscription(conn, subscription_id)
            if subscription is None or subscription["status"] != "requested":
                return Done(error="subscription no longer waiting for a handshake")
            bundle = await notification_bundle(None, subscription, self.fhir_base, "handshake")
        error = await self._post(subscription, bundle)
        async with self.pool.acquire() as conn, conn.transaction():
            await self._audit(conn, subscription_id, "handshake", error)
            if error is None:
                await self._set_status(conn, subscription_id, "active", expect="requested")
                if subscription["heartbeat_seconds"]:
                    await jobs.schedule_heartbeat(conn, subscription_id, subscription["heartbeat_seconds"])
                await conn.execute(
                    "UPDATE subscription SET last_sent_at = now(), failures = 0, last_error = NULL"
                    " WHERE fhir_id = $1",
                    subscription_id,
                )
                # Events counted while the handshake was pending go out now.
                await jobs.request_delivery(conn, subscription_id)
            else:
                # A refused handshake is final (Backport IG: the subscription goes to error).
                await conn.execute(
                    "UPDATE subscription SET last_error = $2 WHERE fhir_id = $1", subscription_id, error
                )
                await self._set_status(conn, subscription_id, "error", expect="requested")
            await record(conn, job, Done(error=error))
        logger.info(
            "subscription %s: handshake %s", subscription_id, "accepted" if error is None else "refused"
        )
        return None

    async def notify(self, job: Job) -> Outcome | None:
        subscription_id = str(job.payload["subscription"])
        async with self.pool.acquire() as conn:
            subscription = await _subscription(conn, subscription_id)
            if subscription is None or subscription["status"] != "active":
                return Done(error="subscription not active")
            if subscription["channel_type"] != REST_HOOK:
                return Done(error="not a rest-hook subscription")
            events = await load_events(
                conn, subscription_id, subscription["delivered_through"], None, subscription["max_count"]
            )
            if not events:
                return Done()
            repo = await self._owner_repo(conn, subscription)
            bundle = await notification_bundle(
                repo, subscription, self.fhir_base, "event-notification", events
            )
        started = datetime.now(UTC)
        error = await self._post(subscription, bundle)
        last = events[-1].number
        async with self.pool.acquire() as conn, conn.transaction():
            await self._audit(conn, subscription_id, "event-notification", error)
            # Under the subscription's row lock, which the dispatcher takes to add events: either
            # it added them before this looks, or it schedules a new job after this one ended.
            if error is None:
                row = await conn.fetchrow(
                    "UPDATE subscription SET delivered_through = GREATEST(delivered_through, $2),"
                    " failures = 0,"
                    " last_error = NULL, last_sent_at = now() WHERE fhir_id = $1"
                    " RETURNING events_count, delivered_through",
                    subscription_id,
                    last,
                )
                metrics.NOTIFICATIONS_SENT.inc()
                metrics.EVENTS_DELIVERED.inc(len(events))
                metrics.DELIVERY_LATENCY.observe(
                    max((started - min(e.occurred_at for e in events)).total_seconds(), 0.0)
                )
                more = row is not None and row["events_count"] > row["delivered_through"]
                await record(conn, job, Retry(delay=0) if more else Done())
                return None
            metrics.NOTIFICATIONS_FAILED.inc()
            failures = await conn.fetchval(
                "UPDATE subscription SET failures = failures + 1, last_error = $2 WHERE fhir_id = $1"
                " RETURNING failures",
                subscription_id,
                error,
            )
            if failures is not None and failures >= self.settings.subscription_max_failures:
                await self._set_status(conn, subscription_id, "error", expect="active")
                await record(conn, job, Done(error=error))
                logger.warning(
                    "subscription %s: %s failed deliveries, now in error", subscription_id, failures
                )
                return None
            delay = min(self.settings.delivery_backoff * 2 ** max((failures or 1) - 1, 0), MAX_BACKOFF)
            await record(conn, job, Retry(delay=delay, error=error))
        logger.info(
            "subscription %s: delivery failed (attempt %s), retrying in %.0f s",
            subscription_id,
            failures,
            delay,
        )
        return None

    async def heartbeat(self, job: Job) -> Outcome | None:
        subscription_id = str(job.payload["subscription"])
        async with self.pool.acquire() as conn:
            subscription = await _subscription(conn, subscription_id)
        if (
            subscription is None
            or not subscription["heartbeat_seconds"]
            or subscription["status"] in ("off", "requested")
        ):
            return Done()
        period = float(subscription["heartbeat_seconds"])
        if subscription["status"] != "active":
            return Retry(delay=period)
        quiet = (
            datetime.now(UTC) - (subscription["last_sent_at"] or subscription["created_at"])
        ).total_seconds()
        if quiet < period:
            return Retry(delay=period - quiet)
        bundle = await notification_bundle(None, subscription, self.fhir_base, "heartbeat")
        error = await self._post(subscription, bundle)
        async with self.pool.acquire() as conn, conn.transaction():
            await self._audit(conn, subscription_id, "heartbeat", error)
            if error is None:
                await conn.execute(
                    "UPDATE subscription SET last_sent_at = now() WHERE fhir_id = $1", subscription_id
                )
        return Retry(delay=period, error=error)

    # -- helpers --------------------------------------------------------------------------

    async def _post(self, subscription: Record, bundle: dict[str, Any]) -> str | None:
        """POST a notification; None on a 2xx answer, else what went wrong (no PHI: the status or
        the kind of transport fault, never the endpoint's answer)."""
        headers = {"content-type": "application/fhir+json"}
        for line in _json_list(subscription["headers"]):
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        try:
            response = await self.http.post(
                subscription["endpoint"],
                content=bundle_bytes(bundle),
                headers=headers,
                timeout=float(subscription["timeout_seconds"]),
            )
        except OutboundRefused:
            return "the endpoint is refused by the outbound address policy"
        except httpx.TimeoutException:
            return "the endpoint did not answer in time"
        except httpx.HTTPError as exc:
            return f"transport error {type(exc).__name__}"
        await response.aclose()
        if 200 <= response.status_code < 300:
            return None
        return f"the endpoint answered {response.status_code}"

    async def _owner_repo(self, conn: Connection, subscription: Record) -> FhirRepository | None:
        access = await owner_access(conn, subscription)
        return None if access is None else self.repositories.for_client(conn, access)

    async def _set_status(self, conn: Connection, subscription_id: str, status: str, *, expect: str) -> None:
        """Change the Subscription resource's status (a bookkeeping write: a new version, and the
        write hook updates the working state in the same transaction)."""
        repo = self.repositories.for_bookkeeping(conn)
        for _ in range(3):
            try:
                current = await repo.read_for_update("Subscription", subscription_id)
            except FHIRError:
                return
            data = jsonio.loads(current.body or "{}")
            if data.get("status") != expect:
                return
            data["status"] = status
            try:
                await repo.update("Subscription", subscription_id, data, if_match=current.version_id)
                return
            except PreconditionFailed:
                continue

    async def _audit(self, conn: Connection, subscription_id: str, kind: str, error: str | None) -> None:
        """An AuditEvent for each attempt (transmit, outcome success or failure)."""
        event = build_event(
            interaction="transaction",
            status=200 if error is None else 502,
            access=self._audit_access,
            touched=[("Subscription", subscription_id, 0)],
            query=None,
            address=None,
            fhir_base=self.fhir_base,
        )
        event["entity"][0]["what"] = {"reference": f"Subscription/{subscription_id}"}
        event["entity"][0]["description"] = f"subscription {kind}" + (f": {error}" if error else "")
        await self.repositories.for_bookkeeping(conn).create("AuditEvent", event)


async def _subscription(conn: Connection, subscription_id: str) -> Record | None:
    row: Record | None = await conn.fetchrow("SELECT * FROM subscription WHERE fhir_id = $1", subscription_id)
    return row


def _json_list(value: Any) -> list[str]:
    return [str(v) for v in (jsonio.loads(value) if isinstance(value, str) else value or [])]
