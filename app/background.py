"""The background work of a carecoord process: one job runner (app/jobs) with every handler
registered. ``carecoord serve`` runs it in each API process (unless ``--no-worker``),
``carecoord worker`` on its own."""

from __future__ import annotations

import httpx
from asyncpg import Pool

from app import db
from app.fhir.repository import RepositoryFactory
from app.jobs import Runner
from app.referrals.worker import Worker
from app.settings import Settings


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
    cancellation) registered."""
    runner = Runner(
        pool,
        name=name,
        lease=settings.worker_lease,
        concurrency=settings.worker_concurrency,
        dsn=db.asyncpg_dsn(settings.database_url) if settings.database_url else None,
    )
    Worker(pool, http, settings, repositories=repositories, runner=runner)
    return runner
