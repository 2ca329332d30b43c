"""Prometheus metrics of referral delivery (issue 6): attempts, successes and failures per
partner, the delivery latency (from the Task's commit to the partner's acknowledgement), and
at scrape time the queue depth and the age of the oldest pending delivery.

``REGISTRY`` is the registry /metrics exposes (app/metrics.py); the other metrics modules add
theirs to it. Gauges read from the database at scrape time are ``multiprocess_mode="mostrecent"``:
with several processes (app/metrics.py) the value of the process that answered the scrape, set
from the database a moment before, is the truth; another process's older reading is not (so not
``max`` or ``sum``, which would report a stale or multiplied depth)."""

from __future__ import annotations

from asyncpg import Connection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
    "carecoord_referral_queue_depth",
    "Referral jobs pending or leased",
    ["kind"],
    registry=REGISTRY,
    multiprocess_mode="mostrecent",
)
OLDEST_PENDING = Gauge(
    "carecoord_referral_oldest_pending_seconds",
    "Age of the oldest delivery not yet done",
    registry=REGISTRY,
    multiprocess_mode="mostrecent",
)


async def refresh(conn: Connection) -> None:
    """Read the queue gauges from the database now (at scrape time)."""
    depths = await queue.depth(conn)
    oldest = await queue.oldest_age(conn, DELIVER)
    for kind in KINDS:
        QUEUE_DEPTH.labels(kind=short_kind(kind)).set(depths.get(kind, 0))
    OLDEST_PENDING.set(oldest)
