"""AuditEvents for every FHIR interaction (issue 4; FHIR R4 auditevent.html, IHE BALP).

Each interaction that reads or changes data becomes one R4 AuditEvent: ``type`` rest,
``subtype`` the restful-interaction code, ``action`` C/R/U/D/E, ``outcome`` 0/4/8,
``agent`` the OAuth client (and its partner organisation), ``source`` this server,
``entity`` the resources touched (or, for a search, the query, base64 as R4 requires).

A successful write's AuditEvent is stored in the request's own transaction, so a change
is never committed without its record. Reads and failed interactions are recorded through
:class:`AuditTrail`'s buffer, written in batches by one background task (at most
``FLUSH_INTERVAL`` later, and on shutdown): a read must not pay for a commit of its own.
AuditEvents hold what was accessed (ids, the query), never resource content, and are
stored as ordinary AuditEvent resources, searchable with AuditEvent scopes only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from asyncpg import Connection, Pool

from app.fhir.access import AccessContext
from app.fhir.fhirdate import date_range
from app.fhir.indexing import MAX_STRING, IndexRows, normalize, split_reference
from app.fhir.repository import RepositoryFactory, fhir_instant

logger = logging.getLogger("carecoord.audit")

FLUSH_INTERVAL = 0.25
"""Seconds a buffered AuditEvent may wait before it is written."""
BATCH_SIZE = 200
MAX_ENTITIES = 100
"""Entities listed per event (a 1,000-entry transaction lists its first 100)."""

EVENT_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "RESTful Operation",
}
INTERACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
CLIENT_SYSTEM = "urn:carecoord:oauth-client"
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


_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"


def event_index_rows(event: dict[str, Any], fhir_base: str) -> IndexRows:
    """The search-index rows of an AuditEvent built by :func:`build_event`, without walking the
    generic extractor: a read pays for its AuditEvent, so the hot path builds exactly the rows
    ``indexing.extract`` would (a test holds the two equal for every shape build_event makes)."""
    rows = IndexRows()
    rows.token.append(("action", None, event["action"], None, None, None))
    rows.token.append(("outcome", None, event["outcome"], None, None, None))
    rows.token.append(
        ("type", EVENT_TYPE["system"], EVENT_TYPE["code"], normalize(EVENT_TYPE["display"]), None, None)
    )
    for subtype in event["subtype"]:
        rows.token.append(("subtype", subtype["system"], subtype["code"], None, None, None))
    recorded = date_range(event["recorded"])
    if recorded is not None:
        rows.date.append(("date", *recorded))
    for agent in event["agent"]:
        who = agent.get("who") or {}
        identifier = who.get("identifier")
        if identifier:
            rows.reference.append(("agent", None, None, None, identifier["system"], identifier["value"]))
        if "reference" in who:
            target_type, target_id, url = split_reference(who["reference"], fhir_base)
            rows.reference.append(("agent", target_type, target_id, url, None, None))
        address = (agent.get("network") or {}).get("address")
        if address:
            rows.string.append(("address", normalize(address), address[:MAX_STRING]))
    for entity in event.get("entity", []):
        entity_type = entity.get("type")
        if entity_type:
            rows.token.append(("entity-type", entity_type["system"], entity_type["code"], None, None, None))
        role = entity.get("role")
        if role:
            rows.token.append(
                ("entity-role", role["system"], role["code"], normalize(role["display"]), None, None)
            )
        what = (entity.get("what") or {}).get("reference")
        if isinstance(what, str):
            target_type, target_id, url = split_reference(what, fhir_base)
            rows.reference.append(("entity", target_type, target_id, url, None, None))
            if target_type == "Patient":
                rows.reference.append(("patient", target_type, target_id, url, None, None))
    return rows


class AuditTrail:
    """Writes AuditEvents: in the caller's transaction (``write``) or batched (``record``)."""

    def __init__(self, pool: Pool, repositories: RepositoryFactory, *, enabled: bool) -> None:
        self._pool = pool
        self._repositories = repositories
        self._fhir_base = repositories.fhir_base
        self.enabled = enabled
        self._buffer: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-flush")

    async def write(self, connection: Connection, event: dict[str, Any]) -> None:
        """Store an event in ``connection``'s current transaction (a write's own record)."""
        if self.enabled:
            # The audit trail is bookkeeping: in the change feed, never an event for subscribers.
            await self._repositories.for_bookkeeping(connection).create("AuditEvent", event)

    def record(self, event: dict[str, Any]) -> None:
        """Queue an event for the next batch (reads, failures)."""
        if not self.enabled:
            return
        self._buffer.append(event)
        if len(self._buffer) >= BATCH_SIZE:
            self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # keep the events and retry: an audit record is never dropped
                logger.error("audit flush failed: %s", type(exc).__name__)
                await asyncio.sleep(FLUSH_INTERVAL)

    async def flush(self) -> None:
        """Write every buffered event in one transaction; on failure they stay buffered."""
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        try:
            async with self._pool.acquire() as connection:
                repo = self._repositories.for_bookkeeping(connection)
                rows = [event_index_rows(event, self._fhir_base) for event in batch]
                await repo.create_records("AuditEvent", batch, rows)  # one statement, one commit
        except BaseException:
            self._buffer[:0] = batch
            raise

    async def close(self) -> None:
        """Stop the background task and write what is left (application shutdown)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.enabled:
            await self.flush()
