"""The Subscription write hook: every write of a Subscription resource keeps its working state
(app/subscriptions/storage.py) in the same transaction.

A client's write is checked against the Backport profile (spec.py) and the outbound address
policy (a refused endpoint is a 422), and its status is the server's to set: a new or changed
subscription, or one its owner reactivates, is ``requested`` until its handshake succeeds
(delivery.py), and only ``off`` may be asked for directly. carecoord's own status changes are
bookkeeping writes (RepositoryFactory.for_bookkeeping) and pass unchanged.

A ``websocket`` subscription has no endpoint to verify (Backport IG 1.1, "Channels: Websockets":
the server "creates the subscription" and its workflow diagram answers ``status: active``): it is
``active`` as soon as it is written, unless ``off`` is asked for, and has no rest-hook jobs.
Every write of one (deletion included) is announced with ``NOTIFY subscription_events`` so that
the sockets bound to it, in whichever API process, see the change (app/subscriptions/websocket.py).
"""

from __future__ import annotations

from typing import Any

from app.auth.scopes import scope_text
from app.fhir import jsonio
from app.fhir.errors import BadRequest, BusinessRule
from app.fhir.repository import FhirRepository, StoredVersion
from app.outbound import OutboundRefused, check_url, parse_allowlist
from app.settings import Settings
from app.subscriptions import jobs
from app.subscriptions.spec import WEBSOCKET, read_spec

_UPSERT = """
INSERT INTO subscription (fhir_id, topic, filters, channel_type, endpoint, headers, content,
    heartbeat_seconds, timeout_seconds, max_count, end_at, status, owner_client, owner_scope,
    owner_organization, owner_patient, owner_unrestricted, owner_user)
VALUES ($1, $2, $3::jsonb, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
ON CONFLICT (fhir_id) DO UPDATE SET topic = EXCLUDED.topic, filters = EXCLUDED.filters,
    channel_type = EXCLUDED.channel_type, endpoint = EXCLUDED.endpoint, headers = EXCLUDED.headers,
    content = EXCLUDED.content, heartbeat_seconds = EXCLUDED.heartbeat_seconds,
    timeout_seconds = EXCLUDED.timeout_seconds, max_count = EXCLUDED.max_count,
    end_at = EXCLUDED.end_at, status = EXCLUDED.status,
    failures = CASE WHEN EXCLUDED.status = 'requested' THEN 0 ELSE subscription.failures END,
    -- Only the owner's client writes its Subscription (app/fhir/access.py OWNED_TYPES): its
    -- latest token is what its notifications are judged with from now on.
    owner_scope = EXCLUDED.owner_scope, owner_organization = EXCLUDED.owner_organization,
    owner_patient = EXCLUDED.owner_patient, owner_unrestricted = EXCLUDED.owner_unrestricted,
    owner_user = EXCLUDED.owner_user
"""

_DELIVERY_FIELDS = ("criteria", "_criteria", "channel", "end", "extension")
"""What a handshake is about: a change to any of them needs a new one (``extension`` holds the
topic in the older backport form)."""


class SubscriptionHooks:
    types = frozenset({"Subscription"})

    def __init__(self, settings: Settings) -> None:
        self._allowlist = parse_allowlist(settings.outbound_allowlist)
        self._max_per_client = settings.subscription_max_per_client

    async def before_write(
        self,
        repo: FhirRepository,
        resource_type: str,
        previous: dict[str, Any] | None,
        data: dict[str, Any] | None,
    ) -> None:
        if data is None or repo.bookkeeping:
            return
        spec = read_spec(data)
        if repo.access.external:
            raise BusinessRule(
                "a Subscription belongs to a client registered on this server (carecoord clients add);"
                " tokens of an external issuer cannot own one"
            )
        if previous is None and not repo.access.unrestricted:
            # One count at a time per client: concurrent creations must not all see room.
            connection = await repo.db()
            await connection.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 11))",
                f"subscriptions:{repo.access.client_id}",
            )
            owned = await connection.fetchval(
                "SELECT count(*) FROM subscription s JOIN resource r ON r.resource_type = 'Subscription'"
                " AND r.fhir_id = s.fhir_id AND NOT r.deleted WHERE s.owner_client = $1",
                repo.access.client_id,
            )
            if owned >= self._max_per_client:
                raise BusinessRule(
                    f"this client has {owned} subscriptions, the most one may have"
                    " (CARECOORD_SUBSCRIPTION_MAX_PER_CLIENT); delete one first"
                )
        if spec.endpoint is not None and (previous is None or _endpoint(previous) != spec.endpoint):
            try:
                await check_url(self._allowlist, spec.endpoint)
            except OutboundRefused as exc:
                # One answer for every refusal (a name that does not resolve, or resolves to a
                # private address), so that the answer does not map internal names.
                raise BusinessRule(
                    "the channel endpoint is refused by the outbound address policy"
                    " (CARECOORD_OUTBOUND_ALLOWLIST)",
                    expression=("Subscription.channel.endpoint",),
                ) from exc
        asked = data.get("status")
        if asked == "error":
            raise BadRequest(
                "status error is set by the server, not by clients", expression=("Subscription.status",)
            )
        if asked == "off":
            return
        if spec.channel_type == WEBSOCKET:
            data["status"] = "active"  # nothing to verify: the client connects to the server
            return
        was = (previous or {}).get("status")
        unchanged = previous is not None and all(previous.get(k) == data.get(k) for k in _DELIVERY_FIELDS)
        # Active stays active when nothing about delivery changed; anything else (new, changed,
        # reactivated after an error or off) needs a handshake first.
        data["status"] = "active" if (unchanged and was == "active") else "requested"

    async def after_write(
        self,
        repo: FhirRepository,
        version: StoredVersion,
        previous: dict[str, Any] | None,
        data: dict[str, Any] | None,
    ) -> None:
        conn = await repo.db()
        # Whatever changed, the dispatcher's copy of the subscriptions is out of date.
        await conn.execute("UPDATE subscription_generation SET generation = generation + 1 WHERE id = 1")
        if data is None:
            # Deleting a Subscription stops it: its events and pending deliveries go; its state
            # stays, off, because it says whose the (deleted) resource is (OWNED_TYPES: its owner
            # still reads its history and gets 410, others 404).
            await conn.execute("UPDATE subscription SET status = 'off' WHERE fhir_id = $1", version.fhir_id)
            await conn.execute("DELETE FROM subscription_event WHERE subscription_id = $1", version.fhir_id)
            await jobs.cancel_deliveries(conn, version.fhir_id)
            await jobs.announce(conn, version.fhir_id)  # its sockets, if any, are unbound
            return
        status = str(data.get("status") or "requested")
        if repo.bookkeeping:
            await conn.execute(
                "UPDATE subscription SET status = $2 WHERE fhir_id = $1", version.fhir_id, status
            )
            return
        spec = read_spec(data)
        access = repo.access
        await conn.execute(
            _UPSERT,
            version.fhir_id,
            spec.topic.url,
            jsonio.dumps_plain(spec.filter.to_json()),
            spec.channel_type,
            spec.endpoint,
            jsonio.dumps_plain(list(spec.headers)),
            spec.content,
            spec.heartbeat_seconds,
            spec.timeout_seconds,
            spec.max_count,
            spec.end_at,
            status,
            access.client_id,
            scope_text(access.permissions),
            access.organization,
            access.patient,
            access.unrestricted,
            access.user,
        )
        if spec.channel_type == WEBSOCKET:
            # No rest-hook jobs (a rest-hook subscription changed to websocket loses its own);
            # bound sockets look again (status, max-count, content).
            await jobs.cancel_deliveries(conn, version.fhir_id)
            await jobs.announce(conn, version.fhir_id)
        elif status == "requested":
            await jobs.request_handshake(conn, version.fhir_id)
        elif status == "off":
            await jobs.cancel_deliveries(conn, version.fhir_id)


def _endpoint(resource: dict[str, Any]) -> object:
    channel = resource.get("channel")
    return channel.get("endpoint") if isinstance(channel, dict) else None
