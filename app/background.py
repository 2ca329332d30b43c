"""The background work of a carecoord process: one job runner (app/jobs) with every handler
registered, and the subscription dispatcher reading the change feed. ``carecoord serve`` runs
them in each API process (unless ``--no-worker``), ``carecoord worker`` on their own; several
processes share the work through PostgreSQL (leases, the dispatcher's cursor lock)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from asyncpg import Pool

from app import db
from app.audit import jobs as audit_jobs
from app.casework.goal_status import GoalStatus
from app.exports.jobs import ExportJobs
from app.fhir.repository import RepositoryFactory
from app.hooks import write_hooks
from app.jobs import Runner
from app.referrals.worker import Worker
from app.reindex import Reindexer
from app.settings import Settings
from app.subscriptions.delivery import Delivery
from app.subscriptions.dispatcher import Dispatcher


def job_runner(
    pool: Pool,
    http: httpx.AsyncClient,
    settings: Settings,
    *,
    repositories: RepositoryFactory | None = None,
    name: str | None = None,
) -> Runner:
    """A runner sized by ``CARECOORD_WORKER_CONCURRENCY`` and ``CARECOORD_WORKER_LEASE``,
    woken by ``NOTIFY`` on its own connection, with the referral handlers (delivery, tracking,
    cancellation), the subscription handlers (handshake, notification, heartbeat), the audit
    store's partition maintenance and the Bulk Data export handlers (export, expiry)."""
    repositories = repositories or RepositoryFactory.from_settings(settings, write_hooks(settings))
    runner = Runner(
        pool,
        name=name,
        lease=settings.worker_lease,
        concurrency=settings.worker_concurrency,
        dsn=db.asyncpg_dsn(settings.database_url) if settings.database_url else None,
    )
    Worker(pool, http, settings, repositories=repositories, runner=runner)
    Delivery(pool, http, settings, repositories).register(runner)
    audit_jobs.register(runner, pool, settings)
    ExportJobs(pool, settings).register(runner)
    Reindexer(pool, settings.fhir_base, batch=settings.reindex_batch).register(runner)
    GoalStatus(pool, repositories).register(runner)
    return runner


@asynccontextmanager
async def background_tasks(
    pool: Pool,
    http: httpx.AsyncClient,
    settings: Settings,
    repositories: RepositoryFactory | None = None,
    *,
    name: str | None = None,
) -> AsyncIterator[Runner]:
    """Run the job runner and the subscription dispatcher until the block ends; then let the
    running jobs finish (what they record commits) and stop."""
    repositories = repositories or RepositoryFactory.from_settings(settings, write_hooks(settings))
    runner = job_runner(pool, http, settings, repositories=repositories, name=name)
    async with pool.acquire() as conn:
        await audit_jobs.schedule(conn)  # the audit store's partition maintenance (periodic)
    dispatcher = Dispatcher(pool, settings, repositories)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(runner.run(stop), name="job-runner"),
        asyncio.create_task(dispatcher.run(stop), name="subscription-dispatcher"),
    ]
    try:
        yield runner
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
