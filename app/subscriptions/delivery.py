"""rest-hook deliveries: handshakes, event notifications and heartbeats, as job-runner handlers.

Backport IG 1.1 (R4), channel ``rest-hook``: each notification is a POST of the notification
Bundle (notifications.py) to ``channel.endpoint`` with ``Content-Type: application/fhir+json``
and the ``channel.header`` lines as headers, answered within ``backport-timeout`` seconds. Any
2xx is success.

* **Handshake** (a new, changed or reactivated subscription): success makes it ``active``; an
  answer other than 2xx puts it in ``error`` at once, without retries. An endpoint that cannot be
  reached (connection refused, no answer in time) is tried again with the notification backoff,
  up to ``CARECOORD_SUBSCRIPTION_MAX_FAILURES`` attempts, then it is ``error`` too.
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

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from asyncpg import Connection, Pool, Record

from app.audit.store import insert_event
from app.auth.audit import build_event
from app.fhir import jsonio
from app.fhir.access import AccessContext
from app.fhir.errors import FHIRError, PreconditionFailed
from app.fhir.repository import FhirRepository, RepositoryFactory
from app.jobs.queue import Job
from app.jobs.runner import Done, Failed, Outcome, Retry, Runner, record
from app.outbound import OutboundRefused
from app.settings import Settings
from app.subscriptions import jobs, metrics
from app.subscriptions.notifications import bundle_bytes, load_events, notification_bundle
from app.subscriptions.owner import owner_access
from app.subscriptions.spec import REST_HOOK

logger = logging.getLogger("carecoord.subscriptions")

MAX_BACKOFF = 600.0
"""Longest wait between two attempts at a failing endpoint (10 minutes)."""
OWNER_SHARE = 2
"""Subscription jobs of one owner client that one runner runs at once."""
OWNER_WAIT = 0.5
"""Seconds a job over its owner's share waits before it is claimed again."""
ANSWERED = "the endpoint answered"
"""How an error that is the endpoint's own answer (not a transport fault) begins."""


class Delivery:
    def __init__(
        self, pool: Pool, http: httpx.AsyncClient, settings: Settings, repositories: RepositoryFactory
    ) -> None:
        self.pool = pool
        self.http = http
        self.settings = settings
        self.repositories = repositories
        self.fhir_base = settings.fhir_base
        self._running: dict[str, int] = {}
        """Subscription jobs this runner is running, per owner client."""

    def register(self, runner: Runner) -> None:
        # One kind for all subscription work, at most all slots but one: slow or hanging
        # endpoints never take every slot from referral work (limited the same way).
        runner.register(
            jobs.KIND,
            self.run,
            concurrency=max(1, self.settings.worker_concurrency - 1),
            backoff=self.settings.delivery_backoff,
            max_backoff=MAX_BACKOFF,
        )

    async def run(self, job: Job) -> Outcome | None:
        action = job.payload.get("action")
        handler = {
            jobs.HANDSHAKE: self.handshake,
            jobs.NOTIFY: self.notify,
            jobs.HEARTBEAT: self.heartbeat,
        }.get(str(action))
        if handler is None:
            return Failed(error=f"unknown subscription action {str(action)[:40]!r}")
        # A fair share per owner: one client's slow or hanging endpoints hold at most
        # OWNER_SHARE of this runner's subscription slots; its other jobs wait a moment and
        # leave the slots to other clients' subscriptions.
        async with self.pool.acquire() as conn:
            owner = await conn.fetchval(
                "SELECT owner_client FROM subscription WHERE fhir_id = $1", str(job.payload["subscription"])
            )
        key = str(owner)
        if self._running.get(key, 0) >= OWNER_SHARE:
            return Retry(delay=OWNER_WAIT)
        self._running[key] = self._running.get(key, 0) + 1
        try:
            return await handler(job)
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]

    # -- handlers -------------------------------------------------------------------------

    async def handshake(self, job: Job) -> Outcome | None:
        subscription_id = str(job.payload["subscription"])
        async with self.pool.acquire() as conn:
            subscription = await _subscription(conn, subscription_id)
            if subscription is None or subscription["status"] != "requested" or _ended(subscription):
                return Done(error="subscription no longer waiting for a handshake")
            if await owner_access(conn, subscription) is None:
                return Done(error="the subscription's client is no longer registered")
            # The version whose endpoint this handshake is about: only it becomes active.
            version = await _resource_version(conn, subscription_id)
            bundle = await notification_bundle(None, subscription, self.fhir_base, "handshake")
        error = await self._post(subscription, bundle)
        unreachable = error is not None and not error.startswith(ANSWERED)
        async with self.pool.acquire() as conn, conn.transaction():
            await self._audit(conn, subscription_id, "handshake", error)
            # The resource row first, then the working state (the order of every write of a
            # Subscription: the write hook updates the state after the resource).
            current_version = await _resource_version(conn, subscription_id, lock=True)
            current = await _subscription(conn, subscription_id)
            if current is None or current["status"] != "requested":
                await record(conn, job, Done(error="subscription changed during its handshake"))
                return None
            if current_version != version:
                # Changed while this handshake was in flight (another endpoint, perhaps): the
                # answer was about the old one, so the new one gets its own handshake now.
                await record(conn, job, Retry(delay=0))
                return None
            if unreachable and job.attempts < self.settings.subscription_max_failures:
                # Not refused, not reached (a receiver still starting, a network fault): try
                # again, as a notification would be; an answer other than 2xx is final.
                delay = self._backoff(job.attempts)
                await conn.execute(
                    "UPDATE subscription SET last_error = $2 WHERE fhir_id = $1", subscription_id, error
                )
                await record(conn, job, Retry(delay=delay, error=error))
                return None
            if error is None:
                await self._set_status(conn, subscription_id, "active", expect="requested", version=version)
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
                # A refused handshake is final (Backport IG: the subscription goes to error), and
                # so is an endpoint still out of reach after CARECOORD_SUBSCRIPTION_MAX_FAILURES tries.
                await conn.execute(
                    "UPDATE subscription SET last_error = $2 WHERE fhir_id = $1", subscription_id, error
                )
                await self._set_status(conn, subscription_id, "error", expect="requested", version=version)
            await record(conn, job, Done(error=error))
        logger.info(
            "subscription %s: handshake %s", subscription_id, "accepted" if error is None else "refused"
        )
        return None

    async def notify(self, job: Job) -> Outcome | None:
        subscription_id = str(job.payload["subscription"])
        async with self.pool.acquire() as conn:
            subscription = await _subscription(conn, subscription_id)
            if subscription is None or subscription["status"] != "active" or _ended(subscription):
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
            await self._audit(conn, subscription_id, "event-notification", error, shown=disclosed(bundle))
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
            failures = await self._failed(conn, subscription_id, error)
            if failures is None:
                await record(conn, job, Done(error=error))
                return None
            delay = self._backoff(failures)
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
            owner = None if subscription is None else await owner_access(conn, subscription)
        if (
            subscription is None
            or owner is None
            or _ended(subscription)
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
                    "UPDATE subscription SET last_sent_at = now(), failures = 0 WHERE fhir_id = $1",
                    subscription_id,
                )
            # A failed heartbeat counts like a failed notification: an endpoint that stays down
            # puts the subscription in error and its heartbeats stop.
            elif await self._failed(conn, subscription_id, error) is None:
                await record(conn, job, Done(error=error))
                return None
            await record(conn, job, Retry(delay=period, error=error))
        return None

    # -- helpers --------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        """The wait before attempt ``attempt + 1``: CARECOORD_DELIVERY_BACKOFF, doubling, at
        most MAX_BACKOFF (no jitter: the Backport IG asks for nothing, the issue for doubling)."""
        return min(self.settings.delivery_backoff * 2.0 ** max(attempt - 1, 0), MAX_BACKOFF)

    async def _failed(self, conn: Connection, subscription_id: str, error: str) -> int | None:
        """Count a failed delivery (notification or heartbeat) in the caller's transaction; the
        consecutive failures so far, or None once they reach CARECOORD_SUBSCRIPTION_MAX_FAILURES
        and the subscription went to ``error``."""
        await _resource_version(conn, subscription_id, lock=True)  # resource row first
        failures: int | None = await conn.fetchval(
            "UPDATE subscription SET failures = failures + 1, last_error = $2 WHERE fhir_id = $1"
            " RETURNING failures",
            subscription_id,
            error,
        )
        if failures is not None and failures >= self.settings.subscription_max_failures:
            await self._set_status(conn, subscription_id, "error", expect="active")
            logger.warning("subscription %s: %s failed deliveries, now in error", subscription_id, failures)
            return None
        return failures or 1

    async def _post(self, subscription: Record, bundle: dict[str, Any]) -> str | None:
        """POST a notification; None on a 2xx answer, else what went wrong (no PHI: the status or
        the kind of transport fault, never the endpoint's answer).

        ``backport-timeout`` bounds the whole exchange, not each read (an endpoint trickling its
        answer a byte at a time must not hold a runner slot), and the answer's body is never
        read: only its status counts."""
        headers = {"content-type": "application/fhir+json"}
        for line in _json_list(subscription["headers"]):
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        timeout = float(subscription["timeout_seconds"])
        try:
            async with asyncio.timeout(timeout):
                request = self.http.build_request(
                    "POST",
                    subscription["endpoint"],
                    content=bundle_bytes(bundle),
                    headers=headers,
                    timeout=timeout,
                )
                response = await self.http.send(request, stream=True)
                await response.aclose()
        except TimeoutError:
            return "the endpoint did not answer in time"
        except OutboundRefused:
            return "the endpoint is refused by the outbound address policy"
        except httpx.TimeoutException:
            return "the endpoint did not answer in time"
        except httpx.HTTPError as exc:
            return f"transport error {type(exc).__name__}"
        if 200 <= response.status_code < 300:
            return None
        return f"{ANSWERED} {response.status_code}"

    async def _owner_repo(self, conn: Connection, subscription: Record) -> FhirRepository | None:
        access = await owner_access(conn, subscription)
        return None if access is None else self.repositories.for_client(conn, access)

    async def _set_status(
        self, conn: Connection, subscription_id: str, status: str, *, expect: str, version: int | None = None
    ) -> None:
        """Change the Subscription resource's status (a bookkeeping write: a new version, and the
        write hook updates the working state in the same transaction), only from ``expect`` and,
        when ``version`` is given, only if that is still the current version."""
        repo = self.repositories.for_bookkeeping(conn)
        for _ in range(3):
            try:
                current = await repo.read_for_update("Subscription", subscription_id)
            except FHIRError:
                return
            if version is not None and current.version_id != version:
                return
            data = jsonio.loads(current.body or "{}")
            if data.get("status") != expect:
                return
            data["status"] = status
            try:
                await repo.update("Subscription", subscription_id, data, if_match=current.version_id)
                return
            except PreconditionFailed:
                if version is not None:
                    return
                continue

    async def _audit(
        self,
        conn: Connection,
        subscription_id: str,
        kind: str,
        error: str | None,
        *,
        shown: Sequence[tuple[str, str, int]] = (),
    ) -> None:
        await audit_attempt(self.repositories, conn, subscription_id, kind, error, shown)


AUDIT_ACCESS = AccessContext(client_id="carecoord-subscriptions", unrestricted=False)
"""The agent of notification AuditEvents."""


async def audit_attempt(
    repositories: RepositoryFactory,
    conn: Connection,
    subscription_id: str,
    kind: str,
    error: str | None,
    shown: Sequence[tuple[str, str, int]] = (),
) -> None:
    """An AuditEvent for each attempt (transmit, outcome success or failure) on any channel,
    naming the Subscription and every resource the notification disclosed."""
    event = build_event(
        interaction="transaction",
        status=200 if error is None else 502,
        access=AUDIT_ACCESS,
        touched=[("Subscription", subscription_id, 0), *shown],
        query=None,
        address=None,
        fhir_base=repositories.fhir_base,
    )
    event["entity"][0]["what"] = {"reference": f"Subscription/{subscription_id}"}
    event["entity"][0]["description"] = f"subscription {kind}" + (f": {error}" if error else "")
    await insert_event(conn, event, repositories.fhir_base)  # the audit store (app/audit)


_CURRENT = "SELECT * FROM subscription WHERE fhir_id = $1"
_VERSION = "SELECT version_id FROM resource WHERE resource_type = 'Subscription' AND fhir_id = $1"
_VERSION_LOCKED = _VERSION + " FOR UPDATE"


async def _subscription(conn: Connection, subscription_id: str) -> Record | None:
    row: Record | None = await conn.fetchrow(_CURRENT, subscription_id)
    return row


async def _resource_version(conn: Connection, subscription_id: str, *, lock: bool = False) -> int | None:
    """The current version of the Subscription resource (what a handshake is about); ``lock``
    row-locks it until the transaction ends."""
    version: int | None = await conn.fetchval(_VERSION_LOCKED if lock else _VERSION, subscription_id)
    return version


def _ended(subscription: Record) -> bool:
    """Past its ``end`` (R4 Subscription.end): nothing more is sent."""
    end: datetime | None = subscription["end_at"]
    return end is not None and end <= datetime.now(UTC)


def disclosed(bundle: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(type, id, version) of what a notification Bundle names (its entries after the status)."""
    shown = []
    for entry in bundle.get("entry", [])[1:]:
        resource_type, _, fhir_id = str(entry.get("fullUrl", "")).rpartition("/")
        etag = str(entry.get("response", {}).get("etag", ""))
        version = int(etag[3:-1]) if etag.startswith('W/"') and etag[3:-1].isdigit() else 0
        shown.append((resource_type.rpartition("/")[2], fhir_id, version))
    return shown


def _json_list(value: Any) -> list[str]:
    return [str(v) for v in (jsonio.loads(value) if isinstance(value, str) else value or [])]
