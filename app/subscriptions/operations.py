"""``Subscription/$status`` and ``Subscription/$events`` (Subscriptions R5 Backport IG 1.1, R4).

``$status`` (OperationDefinition backport-subscription-status), at instance level or at type
level with ``id`` and ``status`` filters: a ``searchset`` Bundle of subscription-status
Parameters (``type`` = ``query-status``), one per subscription the caller may read.

``$events`` (OperationDefinition backport-subscription-events), instance level:
``eventsSinceNumber`` and ``eventsUntilNumber`` (inclusive) select stored events, ``content``
(``empty``, ``id-only``, ``full-resource``; the subscription's own by default) how much each
carries. The answer is a notification Bundle whose status has ``type`` = ``query-event``: a
subscriber that was down recovers every event still kept (CARECOORD_SUBSCRIPTION_EVENT_RETENTION),
with the same numbers it would have been sent. What it carries is read with the subscription
owner's access, as a notification would be.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import Response

from app.fhir.context import FhirContext
from app.fhir.errors import BadRequest, Gone, NotFound
from app.fhir.operations import Operation, OperationParameter, OperationParameters
from app.fhir.repository import FhirRepository, fhir_instant
from app.fhir.responses import json_response
from app.subscriptions.notifications import CONTENT_CODES, load_events, notification_bundle, status_parameters
from app.subscriptions.owner import owner_access
from app.subscriptions.websocket import binding_token

MAX_EVENTS = 1000
"""The most events one ``$events`` answer carries (ask again from the last number for more)."""
MAX_FULL_EVENTS = 100
"""The most with ``full-resource`` content (each may be a large resource)."""
NO_STORE = {"cache-control": "no-store"}
"""Answers that carry a credential (a binding token) or what resources say."""
MAX_STATUS = 1000
"""The most subscriptions a type-level ``$status`` reports."""


async def status_bundle(
    repo: FhirRepository, fhir_base: str, ids: list[str], statuses: list[str]
) -> dict[str, Any]:
    """``$status``: the subscriptions named by ``ids`` (all the caller may read when empty),
    with one of ``statuses`` when given."""
    wanted: list[str] = list(dict.fromkeys(ids))
    if not wanted:
        # The caller's own (a Subscription is its owner's only, app/fhir/access.py OWNED_TYPES).
        access = repo.access
        connection = await repo.db()
        rows = await connection.fetch(
            "SELECT s.fhir_id FROM subscription s JOIN resource r ON r.resource_type = 'Subscription'"
            " AND r.fhir_id = s.fhir_id AND NOT r.deleted WHERE $1 OR s.owner_client = $2"
            " ORDER BY s.fhir_id LIMIT $3",
            access.unrestricted,
            access.client_id,
            MAX_STATUS,
        )
        wanted = [r["fhir_id"] for r in rows]
        explicit = False
    else:
        explicit = True
    entries = []
    for subscription_id in wanted:
        try:
            await repo.read("Subscription", subscription_id)  # 404 unless the caller may read it
        except (NotFound, Gone):
            if explicit:
                raise
            continue
        connection = await repo.db()
        row = await connection.fetchrow("SELECT * FROM subscription WHERE fhir_id = $1", subscription_id)
        if row is None or (statuses and row["status"] not in statuses):
            continue
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": status_parameters(row, fhir_base, "query-status"),
                "search": {"mode": "match"},
            }
        )
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "searchset",
        "timestamp": fhir_instant(datetime.now(UTC)),
        "total": len(entries),
        "entry": entries,
    }


async def events_bundle(
    repo: FhirRepository,
    fhir_base: str,
    subscription_id: str,
    since: str | None,
    until: str | None,
    content: str | None,
) -> dict[str, Any]:
    """``$events`` of one subscription the caller may read."""
    await repo.read("Subscription", subscription_id)
    conn = await repo.db()
    row = await conn.fetchrow("SELECT * FROM subscription WHERE fhir_id = $1", subscription_id)
    if row is None:
        raise NotFound(f"Subscription/{subscription_id} has no events")
    first = _number(since, "eventsSinceNumber", 1) or 1
    last = _number(until, "eventsUntilNumber", None)
    if content is not None and content not in CONTENT_CODES:
        raise BadRequest(f"content must be one of {', '.join(CONTENT_CODES)}", expression=("content",))
    full = (content or row["content"]) == "full-resource"
    events = await load_events(
        conn, subscription_id, first - 1, last, MAX_FULL_EVENTS if full else MAX_EVENTS
    )
    # Read with the caller's own token (its owner's client: only it reads the Subscription), so
    # that what the answer carries is what this token may read now, and is audited as its read.
    if await owner_access(conn, row) is None:
        raise NotFound(f"Subscription/{subscription_id} is not known")
    return await notification_bundle(repo, row, fhir_base, "query-event", events, content=content)


def _number(value: str | None, name: str, default: int | None) -> int | None:
    if value is None or value == "":
        return default
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise BadRequest(f"{name} must be a whole number", expression=(name,))
    return int(value)


# -- the operations as the registry routes them (app/fhir/operations.py) --------------------

BACKPORT_OPERATIONS = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition"


async def _status(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    ids = [fhir_id] if fhir_id is not None else [v.text() or "" for v in parameters.all("id")]
    statuses = [v.text() or "" for v in parameters.all("status")]
    bundle = await status_bundle(ctx.repo, ctx.settings.fhir_base, ids, statuses)
    return json_response(bundle, ctx.fmt)


async def _events(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    assert fhir_id is not None  # instance level only
    bundle = await events_bundle(
        ctx.repo,
        ctx.settings.fhir_base,
        fhir_id,
        parameters.text("eventsSinceNumber"),
        parameters.text("eventsUntilNumber"),
        parameters.text("content"),
    )
    return json_response(bundle, ctx.fmt, headers=NO_STORE)


SUBSCRIPTION_STATUS = Operation(
    name="status",
    definition_id="Subscription-status",
    base=f"{BACKPORT_OPERATIONS}/backport-subscription-status",
    title="Subscription status",
    description=(
        "The status of a subscription (instance level) or of the subscriptions the access token may"
        " read (type level, optionally only those with the given ids and statuses): a searchset"
        " Bundle of subscription-status Parameters (type query-status) with the number of events"
        " since the subscription started."
    ),
    levels=("type", "instance"),
    resource_types=("Subscription",),
    handler=_status,
    ok_schema="Bundle",
    errors=(400, 401, 403, 404, 405),
    parameters=(
        OperationParameter("id", "in", "id", max="*", documentation="Subscriptions to report (type level)"),
        OperationParameter(
            "status",
            "in",
            "code",
            max="*",
            documentation="Only subscriptions with one of these statuses",
            value_set="http://hl7.org/fhir/ValueSet/subscription-status|4.0.1",
            codes=("requested", "active", "error", "off"),
        ),
        OperationParameter("return", "out", "Bundle", min=1, documentation="The status Parameters"),
    ),
)

SUBSCRIPTION_EVENTS = Operation(
    name="events",
    definition_id="Subscription-events",
    base=f"{BACKPORT_OPERATIONS}/backport-subscription-events",
    title="Subscription events",
    description=(
        "Replays the stored events of a subscription (kept for CARECOORD_SUBSCRIPTION_EVENT_RETENTION"
        " seconds) as a notification Bundle of type query-event: eventsSinceNumber and"
        f" eventsUntilNumber (inclusive) select them, at most {MAX_EVENTS} per answer; content"
        " (empty, id-only, full-resource) overrides the subscription's own. What each event carries"
        " is read with the access of the subscription's owner, as a notification would be."
    ),
    levels=("instance",),
    resource_types=("Subscription",),
    handler=_events,
    ok_schema="Bundle",
    errors=(400, 401, 403, 404, 405),
    parameters=(
        OperationParameter("eventsSinceNumber", "in", "string", documentation="The first event number"),
        OperationParameter("eventsUntilNumber", "in", "string", documentation="The last event number"),
        OperationParameter(
            "content",
            "in",
            "code",
            documentation="How much each event carries",
            value_set="http://hl7.org/fhir/uv/subscriptions-backport/ValueSet/backport-content-value-set",
            codes=CONTENT_CODES,
        ),
        OperationParameter("return", "out", "Bundle", min=1, documentation="The events"),
    ),
)


async def _ws_binding_token(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    assert fhir_id is not None  # instance level only
    return json_response(await binding_token(ctx.repo, ctx.settings, fhir_id), ctx.fmt, headers=NO_STORE)


SUBSCRIPTION_WS_BINDING_TOKEN = Operation(
    name="get-ws-binding-token",
    definition_id="Subscription-get-ws-binding-token",
    base=f"{BACKPORT_OPERATIONS}/backport-subscription-get-ws-binding-token",
    title="Get a websocket binding token",
    description=(
        "A short-lived token (CARECOORD_SUBSCRIPTION_WS_TOKEN_LIFETIME) that binds a websocket"
        " connection to this websocket-channel subscription: the client connects to websocket-url"
        " and sends 'bind-with-token: <token>'. Only the subscription's owner may ask (404"
        " otherwise); 422 for a subscription of another channel type or that is off."
    ),
    levels=("instance",),
    resource_types=("Subscription",),
    handler=_ws_binding_token,
    ok_schema="Parameters",
    errors=(400, 401, 403, 404, 405, 410, 422),
    parameters=(
        OperationParameter("token", "out", "string", min=1, documentation="The binding token"),
        OperationParameter("expiration", "out", "dateTime", min=1, documentation="When the token expires"),
        OperationParameter("subscription", "out", "string", min=1, max="*", documentation="The subscription"),
        OperationParameter("websocket-url", "out", "url", min=1, documentation="Where to connect"),
    ),
)
