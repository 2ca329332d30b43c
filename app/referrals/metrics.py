"""Prometheus metrics of referral delivery (issue 6): attempts, successes and failures per
partner, the delivery latency (from the Task's commit to the partner's acknowledgement), and
at scrape time the queue depth and the age of the oldest pending delivery."""

from __future__ import annotations

from asyncpg import Pool
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from app.jobs import queue
from app.referrals.jobs import DELIVER, KINDS, short_kind

REGISTRY = CollectorRegistry()

DELIVERIES_ATTEMPTED = Counter(
    "carecoord_referral_deliveries_attempted", "Delivery attempts", ["partner"], registry=REGISTRY
)
DELIVERIES_SUCCEEDED = Counter(
    "carecoord_referral_deliveries_succeeded", "Referrals delivered", ["partner"], registry=REGISTRY
)
DELIVERIES_FAILED = Counter(
    "carecoord_referral_deliveries_failed", "Referrals given up on", ["partner"], registry=REGISTRY
)
DELIVERY_LATENCY = Histogram(
    "carecoord_referral_delivery_seconds",
    "From the referral Task's commit to the partner's acknowledgement",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "carecoord_referral_queue_depth", "Referral jobs pending or leased", ["kind"], registry=REGISTRY
)
OLDEST_PENDING = Gauge(
    "carecoord_referral_oldest_pending_seconds",
    "Age of the oldest delivery not yet done",
    registry=REGISTRY,
)


async def render(pool: Pool) -> tuple[bytes, str]:
    """The exposition text, with the queue gauges read from the database now."""
    async with pool.acquire() as conn:
        depths = await queue.depth(conn)
        oldest = await queue.oldest_age(conn, DELIVER)
    for kind in KINDS:
        QUEUE_DEPTH.labels(kind=short_kind(kind)).set(depths.get(kind, 0))
    OLDEST_PENDING.set(oldest)
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
