"""Partition maintenance of the audit store as a periodic job on the job runner (issue 14).

One job of kind ``audit.partitions`` (key ``audit``: at most one exists, whichever processes
enqueue it) creates this month's partition and the next ones and drops those the retention
(``CARECOORD_AUDIT_RETENTION`` days) no longer keeps, then reschedules itself ``INTERVAL``
seconds later. Any ``carecoord serve`` or ``carecoord worker`` process may run it; start-up also
creates the partitions ahead (app/main.py), so a write never waits for the job.
"""

from __future__ import annotations

from asyncpg import Connection, Pool

from app.audit import store
from app.jobs import Runner, queue
from app.jobs.queue import Job
from app.jobs.runner import Outcome, Retry
from app.settings import Settings

MAINTAIN = "audit.partitions"
INTERVAL = 6 * 3600.0
"""Seconds between maintenance runs (a month's partition is created three months ahead)."""


def register(runner: Runner, pool: Pool, settings: Settings) -> None:
    async def maintain(job: Job) -> Outcome:
        async with pool.acquire() as conn:
            await store.maintain(conn, settings.audit_retention)
        return Retry(delay=INTERVAL)  # the same job, due again: periodic

    runner.register(MAINTAIN, maintain, concurrency=1, backoff=60.0, max_backoff=INTERVAL)


async def schedule(conn: Connection) -> None:
    """Make sure the maintenance job exists (a no-op when it does)."""
    await queue.enqueue(conn, MAINTAIN, {}, key="audit")
