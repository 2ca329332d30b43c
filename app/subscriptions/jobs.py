"""The subscription jobs on the job runner (app/jobs): one kind, ``subscription``, whose
payload says what to do (``handshake``, ``notify`` or ``heartbeat``) for which Subscription.

One kind, so that the runner's per-kind limit bounds all subscription work together: endpoints
that are slow or hang never hold every slot (referral work keeps at least one, and so does
this). The job key is ``action:subscription id``: at most one job of each action per
subscription at a time, so a subscription's notifications go out one at a time, in order.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from asyncpg import Connection

from app.jobs import queue

EVENTS_CHANNEL = "subscription_events"
"""PostgreSQL NOTIFY channel: the payload is a Subscription id whose events or state changed
(websocket subscriptions only; app/subscriptions/websocket.py listens)."""

KIND = "subscription"
HANDSHAKE = "handshake"
NOTIFY = "notify"
HEARTBEAT = "heartbeat"
ACTIONS = (HANDSHAKE, NOTIFY, HEARTBEAT)


def _key(action: str, subscription_id: str) -> str:
    return f"{action}:{subscription_id}"


async def _enqueue(conn: Connection, action: str, subscription_id: str, due: datetime | None = None) -> None:
    payload = {"action": action, "subscription": subscription_id}
    await queue.enqueue(conn, KIND, payload, key=_key(action, subscription_id), not_before=due)


async def request_handshake(conn: Connection, subscription_id: str) -> None:
    """Handshake now (a new, changed or reactivated subscription); its waiting jobs end (a
    handshake already running compares versions when it ends, delivery.py)."""
    await cancel_deliveries(conn, subscription_id)
    await _enqueue(conn, HANDSHAKE, subscription_id)


async def request_delivery(conn: Connection, subscription_id: str) -> None:
    """Deliver the subscription's undelivered events. A job already waiting keeps its time (a
    subscription in backoff stays in backoff); one that is running sees the new events before
    it ends (delivery.py, under the subscription's row lock)."""
    await _enqueue(conn, NOTIFY, subscription_id)


async def schedule_heartbeat(conn: Connection, subscription_id: str, period: float) -> None:
    """Start the subscription's heartbeats: the job runs every ``period`` seconds (it reschedules
    itself, delivery.py) and sends one when nothing else was sent for that long."""
    await _enqueue(conn, HEARTBEAT, subscription_id, datetime.now(UTC) + timedelta(seconds=period))


async def cancel_deliveries(conn: Connection, subscription_id: str) -> None:
    """End the subscription's waiting jobs (a running one finds the subscription changed)."""
    for action in ACTIONS:
        await queue.close(conn, KIND, _key(action, subscription_id), error="subscription changed or removed")


async def announce(conn: Connection, subscription_id: str) -> None:
    """Tell every API process (``NOTIFY subscription_events``, delivered when the transaction
    commits) that the subscription has new events or changed: its bound websockets look again."""
    await conn.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, subscription_id)
