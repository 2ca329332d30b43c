"""Referral work as jobs of the job runner (app/jobs, issue 10): the kinds and their payload.

Delivery, tracking and cancellation of a referral Task are jobs of the kinds ``DELIVER``,
``TRACK`` and ``CANCEL``, keyed by the Task id (at most one active job per kind and Task), with
the payload ``{task_id, partner_org, partner_endpoint, partner_task, copies}``. A job is
enqueued in the same transaction as the Task change that calls for it (a transactional
outbox), so a referral is never stored without its delivery job, nor delivered without being
stored. The handlers are in worker.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from asyncpg import Connection

from app.jobs import queue

DELIVER = "referral.deliver"
TRACK = "referral.track"
CANCEL = "referral.cancel"
KINDS = (DELIVER, TRACK, CANCEL)


def short_kind(kind: str) -> str:
    """``deliver``, ``track`` or ``cancel``: how ``referrals status`` and the metrics name a kind."""
    return kind.removeprefix("referral.")


def payload(
    task_id: str, partner_org: str, partner_endpoint: str, partner_task: str | None = None
) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "partner_org": partner_org,
        "partner_endpoint": partner_endpoint,
        "partner_task": partner_task,
        "copies": 0,
    }


async def schedule(
    conn: Connection,
    kind: str,
    task_id: str,
    partner_org: str,
    partner_endpoint: str,
    deadline: datetime,
    partner_task: str | None = None,
) -> None:
    """Add a referral job (once per kind and Task while one is active), in the caller's
    transaction; the runners wake when it commits."""
    await queue.enqueue(
        conn,
        kind,
        payload(task_id, partner_org, partner_endpoint, partner_task),
        key=task_id,
        deadline=deadline,
    )
