"""``carecoord subscriptions list``: where every subscription's delivery stands.

One row per subscription: its topic, channel and status, the host of its endpoint (never the
full URL, whose query may carry a secret, and never its headers), how many events it has and
how far delivery got, the lag (events not yet delivered and the age of the oldest of them),
and its consecutive failures and last error (a status or transport fault, no PHI: delivery.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from asyncpg import Connection

_LIST = """
SELECT s.fhir_id, s.topic, s.channel_type, s.status, s.endpoint, s.events_count,
    s.delivered_through, s.failures, s.last_error, s.last_sent_at,
    EXTRACT(EPOCH FROM now() - e.occurred_at)::float8 AS oldest_undelivered_seconds
FROM subscription s
LEFT JOIN subscription_event e
    ON e.subscription_id = s.fhir_id AND e.event_number = s.delivered_through + 1
WHERE $1::text IS NULL OR s.fhir_id = $1
ORDER BY s.fhir_id
"""


def endpoint_host(endpoint: str | None) -> str | None:
    """``host`` or ``host:port`` of an endpoint URL: no scheme, user, path or query."""
    if not endpoint:
        return None
    try:
        parts = urlsplit(endpoint)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


async def subscription_list(conn: Connection, subscription_id: str | None = None) -> list[dict[str, Any]]:
    """Every subscription (or the one named), in id order."""
    rows = await conn.fetch(_LIST, subscription_id)
    listed = []
    for row in rows:
        lag = max(int(row["events_count"]) - int(row["delivered_through"]), 0)
        oldest = row["oldest_undelivered_seconds"]
        listed.append(
            {
                "id": row["fhir_id"],
                "topic": row["topic"],
                "channel_type": row["channel_type"],
                "status": row["status"],
                "endpoint_host": endpoint_host(row["endpoint"]),
                "events_count": int(row["events_count"]),
                "delivered_through": int(row["delivered_through"]),
                "lag_events": lag,
                # None when nothing waits (or the waiting events are past their retention).
                "lag_seconds": round(max(float(oldest), 0.0), 3) if lag and oldest is not None else None,
                "failures": int(row["failures"]),
                "last_error": row["last_error"],
                "last_sent": row["last_sent_at"].isoformat() if row["last_sent_at"] else None,
            }
        )
    return listed
