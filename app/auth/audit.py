"""AuditEvents for every FHIR interaction (issue 4; FHIR R4 auditevent.html, IHE BALP).

Each interaction that reads or changes data becomes one R4 AuditEvent: ``type`` rest,
``subtype`` the restful-interaction code, ``action`` C/R/U/D/E, ``outcome`` 0/4/8,
``agent`` the OAuth client (and the user it acts for, and its partner organisation),
``source`` this server, ``entity`` the resources touched (or, for a search, the query,
base64 as R4 requires).

AuditEvents live in the audit store (app/audit, issue 14), not among the clinical resources.
A successful write's AuditEvent is stored in the request's own transaction, so a change
is never committed without its record. Reads and failed interactions are recorded through
:class:`AuditTrail`'s bounded buffer, written with COPY by one background task (at most
``FLUSH_INTERVAL`` later, and on shutdown): a read pays neither a commit nor an index write.
AuditEvents hold what was accessed (ids, the query), never resource content; they are read
and searched as AuditEvent resources with AuditEvent scopes only (app/audit/fhir.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from asyncpg import Connection, Pool

from app.audit import metrics, store
from app.audit.store import CLIENT_SYSTEM, Row
from app.fhir.access import AccessContext
from app.fhir.repository import RepositoryFactory, fhir_instant

logger = logging.getLogger("carecoord.audit")

FLUSH_INTERVAL = 0.25
"""Seconds a buffered AuditEvent may wait before it is written (CARECOORD_AUDIT_FLUSH_INTERVAL)."""
BATCH_SIZE = 500
"""Buffered events that wake the writer before its interval is over."""
MAX_COPY = 2000
"""Rows per COPY statement."""
RETRY_DELAY = 0.5
"""Seconds before a failed COPY is tried again (the events stay buffered)."""
MAX_ENTITIES = 100
"""Entities listed per event (a 1,000-entry transaction lists its first 100)."""

EVENT_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "RESTful Operation",
}
INTERACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
__all__ = ["CLIENT_SYSTEM", "AuditTrail", "build_event", "interaction_of", "outcome_code"]
ACTIONS = {
    "create": "C",
    "read": "R",
    "vread": "R",
    "history-instance": "R",
    "history-type": "R",
    "history-system": "R",
    "search-type": "E",
    "search-system": "E",
    "update": "U",
    "patch": "U",
    "delete": "D",
    "batch": "E",
    "transaction": "E",
}


def interaction_of(method: str, path: str) -> str:
    """The R4 restful-interaction code of a request to ``path`` (below /fhir)."""
    parts = [p for p in path.strip("/").split("/") if p]
    if parts and parts[-1].startswith("$"):
        return "operation"  # operations.html: [type]/[id]/$name, [type]/$name, $name
    if method == "POST" and not parts:
        return "batch"  # the bundle route replaces this with the Bundle's own type
    if method in ("GET", "HEAD"):
        if not parts:
            return "search-system"
        if parts[-1] == "_history":
            return {1: "history-system", 2: "history-type"}.get(len(parts), "history-instance")
        if len(parts) == 4 and parts[2] == "_history":
            return "vread"
        if len(parts) == 2:
            return "read"
        return "search-type"
    if method == "POST":
        return "search-type" if parts[-1] == "_search" else "create"
    return {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, "operation")


def outcome_code(status: int) -> str:
    """R4 audit-event-outcome: 0 success, 4 minor failure (client error), 8 serious failure."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


@functools.lru_cache(maxsize=8)
def _site(fhir_base: str) -> str:
    """AuditEvent.source.site (searchable as ``site``): the host serving the FHIR base."""
    return urlsplit(fhir_base).netloc or fhir_base


def build_event(
    *,
    interaction: str,
    status: int,
    access: AccessContext,
    touched: Sequence[tuple[str, str, int]],
    query: str | None,
    address: str | None,
    fhir_base: str,
) -> dict[str, Any]:
    """One AuditEvent (R4 auditevent.html) for one interaction."""
    client = access.client_id or ("anonymous" if not access.unrestricted else "unauthenticated-access")
    agents: list[dict[str, Any]] = [
        {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                        "code": "IRCP" if interaction.startswith(("read", "vread", "search")) else "AUT",
                    }
                ]
            },
            "who": {"identifier": {"system": CLIENT_SYSTEM, "value": client}},
            "requestor": True,
            **({"network": {"address": address, "type": "2"}} if address else {}),
        }
    ]
    if access.user:
        # The person the token acts for (SMART fhirUser): a Patient user puts the event in their
        # compartment (R4 AuditEvent ``patient`` covers agent.who).
        agents.append({"who": {"reference": access.user}, "requestor": True})
    if access.organization:
        agents.append({"who": {"reference": access.organization}, "requestor": False})
    entities: list[dict[str, Any]] = []
    for resource_type, fhir_id, version_id in list(dict.fromkeys(touched))[:MAX_ENTITIES]:
        reference = f"{resource_type}/{fhir_id}/_history/{version_id}"
        entities.append(
            {
                "what": {"reference": reference},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "1" if resource_type == "Patient" else "2",
                },
            }
        )
    if query is not None:
        entities.append(
            {
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "24",
                    "display": "Query",
                },
                "query": base64.b64encode(query.encode("utf-8")).decode("ascii"),
            }
        )
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": EVENT_TYPE,
        "subtype": [{"system": INTERACTION_SYSTEM, "code": interaction}],
        "action": ACTIONS.get(interaction, "E"),
        "recorded": fhir_instant(datetime.now(UTC)),
        "outcome": outcome_code(status),
        "agent": agents,
        "source": {
            "site": _site(fhir_base),
            "observer": {"display": f"carecoord {fhir_base}"},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server",
                }
            ],
        },
    }
    if status >= 400:
        event["outcomeDesc"] = f"HTTP {status}"
    if entities:
        event["entity"] = entities
    return event


class AuditTrail:
    """Writes AuditEvents into the audit store (app/audit/store.py): in the caller's transaction
    (``write``, a successful write's own record) or through a bounded buffer (``record``: reads,
    refusals, failures) that one background task writes with COPY, off the request path.

    Back-pressure: the buffer holds at most ``buffer_size`` events (written and being written
    together). A FHIR request first waits in :meth:`admit` while it is full, so when the database
    is slow, requests slow down instead of memory growing; events are never dropped for being
    slow. Events recorded without waiting (``record`` from outside a request) may overshoot the
    bound by the requests already admitted; past twice the bound such an event is dropped,
    counted (``carecoord_audit_events_dropped``) and logged (its type only). On shutdown
    :meth:`close` writes what is left.
    """

    def __init__(
        self,
        pool: Pool,
        repositories: RepositoryFactory,
        *,
        enabled: bool,
        buffer_size: int = 10_000,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self._pool = pool
        self._fhir_base = repositories.fhir_base
        self.enabled = enabled
        self.buffer_size = buffer_size
        self.flush_interval = flush_interval
        self._buffer: deque[Row] = deque()
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        """Events buffered or being written."""
        return len(self._buffer) + self._in_flight

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-flush")

    async def write(self, connection: Connection, event: dict[str, Any]) -> None:
        """Store an event in ``connection``'s current transaction (a write's own record)."""
        if self.enabled:
            await store.insert_event(connection, event, self._fhir_base)

    async def admit(self) -> None:
        """Wait while the buffer is full (back-pressure on the requests that will add to it)."""
        if not self.enabled or self.pending < self.buffer_size:
            return
        metrics.WAITING.inc()
        try:
            while self.pending >= self.buffer_size:
                self._wake.set()
                self._room.clear()
                await self._room.wait()
        finally:
            metrics.WAITING.dec()

    def record(self, event: dict[str, Any]) -> None:
        """Queue an event for the next COPY (reads, refusals, failures)."""
        if not self.enabled:
            return
        if self.pending >= 2 * self.buffer_size:
            metrics.DROPPED.inc()
            logger.error("audit buffer over twice its bound: an AuditEvent was dropped")
            return
        self._buffer.append(store.event_row(event, self._fhir_base))
        metrics.BUFFERED.set(self.pending)
        if len(self._buffer) >= BATCH_SIZE or self.pending >= self.buffer_size:
            self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            if len(self._buffer) < BATCH_SIZE:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            try:
                await self.flush(everything=False)
            except Exception as exc:  # keep the events and retry: an audit record is never dropped
                metrics.FLUSH_FAILURES.inc()
                logger.error("audit flush failed: %s", type(exc).__name__)
                await asyncio.sleep(RETRY_DELAY)

    async def flush(self, *, everything: bool = True) -> None:
        """Write the buffered events (COPY, ``MAX_COPY`` per statement); on failure the unwritten
        ones stay buffered, in order.

        ``everything=False`` (the background writer) writes only what was buffered when the flush
        began: events recorded while a COPY runs wait for the next interval. Chasing them made a
        steady stream of requests a stream of one-row COPYs, one per read at one connection,
        which cost the database and this process more than the reads did (issue 14)."""
        async with self._flush_lock:
            remaining = len(self._buffer)
            while self._buffer and (everything or remaining > 0):
                size = min(MAX_COPY, len(self._buffer)) if everything else min(MAX_COPY, remaining)
                remaining -= size
                batch = [self._buffer.popleft() for _ in range(size)]
                self._in_flight = len(batch)
                try:
                    async with self._pool.acquire() as connection:
                        await store.copy_rows(connection, batch)
                except BaseException:
                    self._buffer.extendleft(reversed(batch))
                    raise
                finally:
                    self._in_flight = 0
                    metrics.BUFFERED.set(self.pending)
                    if self.pending < self.buffer_size:
                        self._room.set()
                metrics.WRITTEN.inc(len(batch))

    async def close(self) -> None:
        """Stop the background task and write what is left (application shutdown)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not self.enabled:
            return
        for attempt in range(3):
            try:
                await self.flush()
                return
            except Exception as exc:
                logger.error("audit flush at shutdown failed (%d): %s", attempt + 1, type(exc).__name__)
                await asyncio.sleep(RETRY_DELAY)
        if self._buffer:
            metrics.DROPPED.inc(len(self._buffer))
            logger.error("audit: %d AuditEvents could not be written before shutdown", len(self._buffer))
