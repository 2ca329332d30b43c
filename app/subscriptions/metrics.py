"""Prometheus metrics of subscription notifications (issue 10): notifications sent and failed,
events delivered, the delivery latency (from the write's commit to the endpoint's answer), and
at scrape time the subscriptions waiting to retry and the age of the oldest undelivered event.
They share the registry /metrics exposes (app/referrals/metrics.py); the gauges, read at scrape
time, are ``mostrecent`` for the reason given there."""

from __future__ import annotations

from asyncpg import Connection
from prometheus_client import Counter, Gauge, Histogram

from app.referrals.metrics import REGISTRY

NOTIFICATIONS_SENT = Counter(
    "carecoord_subscription_notifications_sent", "Event notifications delivered", registry=REGISTRY
)
NOTIFICATIONS_FAILED = Counter(
    "carecoord_subscription_notifications_failed",
    "Event notification attempts that failed",
    registry=REGISTRY,
)
EVENTS_DELIVERED = Counter(
    "carecoord_subscription_events_delivered", "Subscription events delivered", registry=REGISTRY
)
DELIVERY_LATENCY = Histogram(
    "carecoord_subscription_delivery_seconds",
    "From the oldest event's write to the endpoint's acknowledgement of its notification",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600),
    registry=REGISTRY,
)
RETRY_QUEUE = Gauge(
    "carecoord_subscription_retry_queue",
    "Active subscriptions whose last delivery failed (waiting to retry)",
    registry=REGISTRY,
    multiprocess_mode="mostrecent",
)
OLDEST_UNDELIVERED = Gauge(
    "carecoord_subscription_oldest_undelivered_seconds",
    "Age of the oldest event not yet delivered to an active subscription",
    registry=REGISTRY,
    multiprocess_mode="mostrecent",
)

_GAUGES = """
SELECT
    (SELECT count(*) FROM subscription WHERE status = 'active' AND failures > 0) AS retrying,
    (SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(e.occurred_at)), 0)
     FROM subscription s JOIN subscription_event e
       ON e.subscription_id = s.fhir_id AND e.event_number = s.delivered_through + 1
     WHERE s.status = 'active') AS oldest
"""


async def refresh(conn: Connection) -> None:
    """Read the gauges from the database now (at scrape time)."""
    row = await conn.fetchrow(_GAUGES)
    RETRY_QUEUE.set(row["retrying"])
    OLDEST_UNDELIVERED.set(float(row["oldest"]))
