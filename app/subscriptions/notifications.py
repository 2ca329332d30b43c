"""Notification bundles of the Subscriptions R5 Backport IG 1.1 for R4.

Every notification is a ``history`` Bundle whose first entry is the subscription status, a
``Parameters`` resource (profile ``backport-subscription-status-r4``): ``subscription``,
``topic``, ``status``, ``type`` (handshake, heartbeat, event-notification, query-status,
query-event), ``events-since-subscription-start`` and one ``notification-event`` per event
(``event-number``, ``timestamp``, ``focus``). With ``id-only`` content each event's focus is
also an entry with its ``fullUrl`` and request; with ``full-resource`` the entry carries the
resource. ``empty`` carries neither.

What goes into a bundle is read with the subscription owner's access at the time of sending
(app/subscriptions/owner.py): an event whose resource the owner may no longer read keeps its
number (numbers never skip) but names no focus and carries no resource.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asyncpg import Connection, Record

from app.fhir import jsonio
from app.fhir.errors import FHIRError
from app.fhir.repository import FhirRepository, fhir_instant

STATUS_PROFILE = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
)
NOTIFICATION_PROFILE = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification-r4"
)
CONTENT_CODES = ("empty", "id-only", "full-resource")
_METHODS = {"create": ("POST", "201"), "update": ("PUT", "200"), "delete": ("DELETE", "204")}


@dataclass(frozen=True)
class Event:
    number: int
    resource_type: str
    fhir_id: str
    version_id: int
    action: str
    occurred_at: datetime

    @classmethod
    def from_row(cls, row: Record) -> Event:
        return cls(
            row["event_number"],
            row["resource_type"],
            row["fhir_id"],
            row["version_id"],
            row["action"],
            row["occurred_at"],
        )


def status_parameters(
    subscription: Record,
    fhir_base: str,
    kind: str,
    events: Sequence[tuple[Event, bool]] = (),
    error: str | None = None,
) -> dict[str, Any]:
    """The subscription-status Parameters; ``events`` are (event, focus shown)."""
    parameters: list[dict[str, Any]] = [
        {
            "name": "subscription",
            "valueReference": {"reference": f"{fhir_base}/Subscription/{subscription['fhir_id']}"},
        },
        {"name": "topic", "valueCanonical": subscription["topic"]},
        {"name": "status", "valueCode": subscription["status"]},
        {"name": "type", "valueCode": kind},
        # R4 has no integer64: the backport carries the counter as a string.
        {"name": "events-since-subscription-start", "valueString": str(subscription["events_count"])},
    ]
    for event, shown in events:
        part: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(event.number)},
            {"name": "timestamp", "valueInstant": fhir_instant(event.occurred_at)},
        ]
        if shown:
            part.append(
                {
                    "name": "focus",
                    "valueReference": {"reference": f"{fhir_base}/{event.resource_type}/{event.fhir_id}"},
                }
            )
        parameters.append({"name": "notification-event", "part": part})
    if error:
        parameters.append({"name": "error", "valueCodeableConcept": {"text": error}})
    return {"resourceType": "Parameters", "meta": {"profile": [STATUS_PROFILE]}, "parameter": parameters}


async def notification_bundle(
    repo: FhirRepository | None,
    subscription: Record,
    fhir_base: str,
    kind: str,
    events: Sequence[Event] = (),
    *,
    content: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The Bundle for ``kind`` (``event-notification``, ``handshake``, ``heartbeat``,
    ``query-event``...). ``repo`` reads as the owner (None: nothing is read, no focus shown)."""
    content = content or subscription["content"]
    shown: list[tuple[Event, bool]] = []
    entries: list[dict[str, Any]] = []
    for event in events:
        visible, body = await _focus(repo, event, full=content == "full-resource")
        shown.append((event, visible and content != "empty"))
        if not visible or content == "empty":
            continue
        method, answered = _METHODS.get(event.action, ("PUT", "200"))
        entry: dict[str, Any] = {"fullUrl": f"{fhir_base}/{event.resource_type}/{event.fhir_id}"}
        if body is not None:
            entry["resource"] = body
        url = event.resource_type if method == "POST" else f"{event.resource_type}/{event.fhir_id}"
        entry["request"] = {"method": method, "url": url}
        entry["response"] = {"status": answered, "etag": f'W/"{event.version_id}"'}
        entries.append(entry)
    status = status_parameters(subscription, fhir_base, kind, shown, error)
    first = {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": status,
        "request": {"method": "GET", "url": f"{fhir_base}/Subscription/{subscription['fhir_id']}/$status"},
        "response": {"status": "200"},
    }
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": fhir_instant(datetime.now(UTC)),
        "entry": [first, *entries],
    }


async def _focus(
    repo: FhirRepository | None, event: Event, *, full: bool
) -> tuple[bool, dict[str, Any] | None]:
    """Whether the owner may read the event's resource now, and (``full``) the version it wrote.

    A deletion is judged by the version before it (what the owner could read); its entry has
    no resource. Any refusal hides the event's focus, never the fact that a number passed.
    """
    if repo is None:
        return False, None
    version = event.version_id - 1 if event.action == "delete" else event.version_id
    if version < 1:
        return False, None
    try:
        stored = await repo.vread(event.resource_type, event.fhir_id, version)
    except FHIRError:
        return False, None
    if not full or event.action == "delete" or stored.body is None:
        return True, None
    return True, jsonio.loads(stored.body)


def bundle_bytes(bundle: dict[str, Any]) -> bytes:
    return jsonio.dumps(bundle)


async def load_events(
    conn: Connection, subscription_id: str, after: int, until: int | None, limit: int
) -> list[Event]:
    """Stored events ``after < number <= until`` in order (at most ``limit``)."""
    rows = await conn.fetch(
        "SELECT event_number, resource_type, fhir_id, version_id, action, occurred_at"
        " FROM subscription_event WHERE subscription_id = $1 AND event_number > $2"
        " AND ($3::bigint IS NULL OR event_number <= $3) ORDER BY event_number LIMIT $4",
        subscription_id,
        after,
        until,
        limit,
    )
    return [Event.from_row(r) for r in rows]
