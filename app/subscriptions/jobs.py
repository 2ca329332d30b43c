"""The subscription jobs on the job runner (app/jobs): what is scheduled, under which kind.

One job of each kind per subscription at a time (the job key is the Subscription id), so a
subscription's notifications go out one at a time, in event order.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from asyncpg import Connection

from app.jobs import queue

EVENTS_CHANNEL = "subscription_events"
"""PostgreSQL NOTIFY channel: the payload is a Subscription id whose events or state changed
(websocket subscriptions only; app/subscriptions/websocket.py listens)."""

HANDSHAKE = "subscription.handshake"
NOTIFY = "subscription.notify"
HEARTBEAT = "subscription.heartbeat"
KINDS = (HANDSHAKE, NOTIFY, HEARTBEAT)


async def request_handshake(conn: Connection, subscription_id: str) -> None:
    """Handshake now (a new, changed or reactivated subscription); its earlier jobs end."""
    await cancel_deliveries(conn, subscription_id)
    await queue.enqueue(conn, HANDSHAKE, {"subscription": subscription_id}, key=subscription_id)


async def request_delivery(conn: Connection, subscription_id: str) -> None:
    """Deliver the subscription's undelivered events. A job already waiting keeps its time (a
    subscription in backoff stays in backoff); one that is running sees the new events before
    it ends (delivery.py, under the subscription's row lock)."""
    await queue.enqueue(conn, NOTIFY, {"subscription": subscription_id}, key=subscription_id)


async def schedule_heartbeat(conn: Connection, subscription_id: str, period: float) -> None:
    """Start the subscription's heartbeats: the job runs every ``period`` seconds (it reschedules
    itself, delivery.py) and sends one when nothing else was sent for that long."""
    due = datetime.now(UTC) + timedelta(seconds=period)
    await queue.enqueue(
        conn, HEARTBEAT, {"subscription": subscription_id}, key=subscription_id, not_before=due
    )


async def cancel_deliveries(conn: Connection, subscription_id: str) -> None:
    """End the subscription's waiting jobs (a running one finds the subscription changed)."""
    for kind in KINDS:
        await queue.close(conn, kind, subscription_id, error="subscription changed or removed")


async def announce(conn: Connection, subscription_id: str) -> None:
    """Tell every API process (``NOTIFY subscription_events``, delivered when the transaction
    commits) that the subscription has new events or changed: its bound websockets look again."""
    await conn.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, subscription_id)
