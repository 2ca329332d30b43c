"""``carecoord referrals status``: where every referral's delivery and tracking stands."""

from __future__ import annotations

from typing import Any

from asyncpg import Connection

from app.jobs import queue
from app.referrals.jobs import KINDS, short_kind


async def referral_status(conn: Connection, task_id: str | None = None) -> list[dict[str, Any]]:
    """One row per job (deliver, track, cancel) with its state and last error."""
    return [
        {
            "task": f"Task/{job.key}",
            "kind": short_kind(job.kind),
            "state": job.state,
            "attempts": job.attempts,
            "partner": f"Organization/{job.payload.get('partner_org')}",
            "partner_task": job.payload.get("partner_task"),
            "last_status": job.last_status,
            "last_error": job.last_error,
            "created": job.created_at.isoformat(),
            "next_attempt": job.not_before.isoformat() if job.state == "pending" else None,
            "finished": job.finished_at.isoformat() if job.finished_at else None,
        }
        for job in await queue.find(conn, key=task_id, kinds=KINDS)
    ]
