"""Prometheus metrics of Bulk Data exports (issue 12): at scrape time, from the database (the
exports run in any process), the exports per state and the resources written so far by the
running ones; counted in the process that did the work, resources exported and exports
completed. They share the registry /metrics exposes (app/referrals/metrics.py); the gauges,
read at scrape time, are ``mostrecent`` for the reason given there."""

from __future__ import annotations

from asyncpg import Connection
from prometheus_client import Counter, Gauge

from app.referrals.metrics import REGISTRY

STATES = ("queued", "running", "completed", "failed")

RESOURCES_EXPORTED = Counter(
    "carecoord_export_resources_written",
    "Resources written to export files",
    registry=REGISTRY,
)
EXPORTS_COMPLETED = Counter("carecoord_export_completed", "Exports completed", registry=REGISTRY)
EXPORTS = Gauge(
    "carecoord_exports",
    "Bulk Data exports kept, per state",
    ["state"],
    registry=REGISTRY,
    multiprocess_mode="mostrecent",
)
RUNNING_PROGRESS = Gauge(
    "carecoord_export_running_resources",
    "Resources written so far by the exports that are running",
    registry=REGISTRY,
    multiprocess_mode="mostrecent",
)


async def refresh(conn: Connection) -> None:
    """Read the gauges from the database now (at scrape time)."""
    if await conn.fetchval("SELECT to_regclass('bulk_export')") is None:
        return
    rows = await conn.fetch("SELECT state, count(*) AS n FROM bulk_export GROUP BY state")
    counts = {row["state"]: int(row["n"]) for row in rows}
    for state in STATES:
        EXPORTS.labels(state).set(counts.get(state, 0))
    running = await conn.fetchval(
        "SELECT COALESCE(sum(resources_total), 0) FROM bulk_export WHERE state = 'running'"
    )
    RUNNING_PROGRESS.set(float(running))
