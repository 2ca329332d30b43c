"""``carecoord referrals status``: where every referral's delivery and tracking stands."""

from __future__ import annotations

from typing import Any

from asyncpg import Connection

_STATUS = """
SELECT j.task_id, j.kind, j.state, j.attempts, j.partner_org, j.partner_task, j.last_status,
       j.last_error, j.created_at, j.not_before, j.finished_at
FROM referral_job j
WHERE ($1::text IS NULL OR j.task_id = $1)
ORDER BY j.task_id, j.id
"""


async def referral_status(conn: Connection, task_id: str | None = None) -> list[dict[str, Any]]:
    """One row per job (deliver, track, cancel) with its state and last error."""
    rows = await conn.fetch(_STATUS, task_id)
    return [
        {
            "task": f"Task/{row['task_id']}",
            "kind": row["kind"],
            "state": row["state"],
            "attempts": row["attempts"],
            "partner": f"Organization/{row['partner_org']}",
            "partner_task": row["partner_task"],
            "last_status": row["last_status"],
            "last_error": row["last_error"],
            "created": row["created_at"].isoformat(),
            "next_attempt": row["not_before"].isoformat() if row["state"] == "pending" else None,
            "finished": row["finished_at"].isoformat() if row["finished_at"] else None,
        }
        for row in rows
    ]
