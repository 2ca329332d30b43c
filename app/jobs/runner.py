"""The job runner: runs the handler registered for each job's kind (issue 10).

Any number of runners, in any number of processes and machines, share the ``job`` table
(queue.py). A runner claims due jobs of the kinds it has handlers for as its slots free up
(a slow job holds only its own slot; a kind may be given fewer slots than the runner, so one
kind's slow jobs never take every slot from the others), leases them, renews each lease while
its handler runs, and records the handler's outcome with the fence: a runner that lost a lease
(another took the job over after it stalled) records nothing. ``LISTEN`` on its own
connection wakes it when a job is enqueued; without notifications it polls.

A handler is ``async def handler(job: Job) -> Outcome | None``:

* it returns an outcome (:class:`Done`, :class:`Retry`, :class:`Failed`, :class:`Paused`),
  which the runner records; or
* it records the outcome itself, with :func:`record`, in the transaction of its own writes (the
  writes then commit only if the fence holds: :func:`record` raises :class:`LeaseLost`), and
  returns None.

Outcomes may carry payload changes (merged into the job's payload). An unexpected exception
is retried with exponential backoff (``first * 2**(attempt - 1)``, capped, with jitter; failed
once the job's deadline has passed) and logged by its type only: handlers work on health data,
and neither a resource nor a partner's answer belongs in a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from asyncpg import Connection, Pool

from app.jobs import queue
from app.jobs.queue import Job

logger = logging.getLogger("carecoord.jobs")

IDLE_POLL = 1.0
"""Seconds between looks at the job table when no notification arrives."""


@dataclass(frozen=True)
class Done:
    """The job is finished."""

    status: int | None = None
    error: str | None = None
    payload: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Retry:
    """Run the job again: at ``at``, in ``delay`` seconds, or (neither) after the kind's backoff."""

    delay: float | None = None
    at: datetime | None = None
    status: int | None = None
    error: str | None = None
    payload: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Failed:
    """The job is given up on."""

    status: int | None = None
    error: str | None = None
    payload: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Paused:
    """The job waits, not due, until :func:`app.jobs.queue.resume` makes it pending again."""

    error: str | None = None
    status: int | None = None
    payload: Mapping[str, Any] | None = None


Outcome = Done | Retry | Failed | Paused
Handler = Callable[[Job], Awaitable[Outcome | None]]


class LeaseLost(Exception):
    """The job's lease is no longer this runner's: another took the job over."""


def backoff(first: float, attempt: int, cap: float) -> float:
    """Exponential backoff with jitter: between half and all of ``first * 2**(attempt-1)``,
    at most ``cap``."""
    ceiling = min(first * 2 ** max(attempt - 1, 0), cap)
    return random.uniform(ceiling / 2, ceiling)


async def record(conn: Connection, job: Job, outcome: Outcome) -> None:
    """Record ``outcome`` of a claimed ``job`` in the caller's transaction, fenced: raises
    :class:`LeaseLost` (so that the caller's transaction rolls back) when the lease is no longer
    the one ``job`` was claimed with. A :class:`Retry` without ``delay`` or ``at`` is due at once
    here (returned to the runner, it waits the kind's backoff)."""
    state = {Done: "done", Retry: "pending", Failed: "failed", Paused: "paused"}[type(outcome)]
    not_before = outcome.at if isinstance(outcome, Retry) else None
    delay = outcome.delay if isinstance(outcome, Retry) else None
    if isinstance(outcome, Retry) and not_before is None and delay is None:
        delay = 0.0
    held = await queue.finish(
        conn,
        job,
        state,
        status=outcome.status,
        error=outcome.error,
        not_before=not_before,
        delay=delay,
        payload=outcome.payload,
    )
    if not held:
        raise LeaseLost()


@dataclass
class _Kind:
    handler: Handler
    concurrency: int | None
    backoff: float
    max_backoff: float
    running: int = 0


class Runner:
    """Claims and runs jobs of the registered kinds until ``stop`` is set (:meth:`run`), or
    once (:meth:`run_once`).

    ``concurrency``: jobs run at once, all kinds together; ``lease``: seconds a claimed job
    stays leased without renewal (renewed every third of it while its handler runs); ``dsn``:
    where to ``LISTEN`` (None: poll every ``idle_poll`` seconds only)."""

    def __init__(
        self,
        pool: Pool,
        *,
        name: str | None = None,
        lease: float = 60.0,
        concurrency: int = 8,
        dsn: str | None = None,
        idle_poll: float = IDLE_POLL,
    ) -> None:
        self.pool = pool
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease = lease
        self.concurrency = concurrency
        self.dsn = dsn
        self.idle_poll = idle_poll
        self.kinds: dict[str, _Kind] = {}
        self.idle = asyncio.Event()
        """Set while :meth:`run` waits for work (a notification, a free slot or the next poll)."""
        self._wake = asyncio.Event()

    def register(
        self,
        kind: str,
        handler: Handler,
        *,
        concurrency: int | None = None,
        backoff: float = 5.0,
        max_backoff: float = 3600.0,
    ) -> None:
        """Run jobs of ``kind`` with ``handler``: at most ``concurrency`` at once (None: as many
        as the runner's slots), unexpected errors retried after ``backoff`` seconds, doubling
        per attempt up to ``max_backoff``."""
        if kind in self.kinds:
            raise ValueError(f"a handler for {kind!r} is registered already")
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.kinds[kind] = _Kind(handler, concurrency, backoff, max_backoff)

    # -- loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Claim as slots free up and run, until ``stop`` is set; then wait for the running jobs.
        Cancelled (the process is going away), it cancels its jobs, which record nothing: their
        leases run out and other runners take them over."""
        listener: Connection | None = None
        if self.dsn is not None:
            try:
                # Its own connection, not one of the pool's: LISTEN holds it for the runner's
                # life, and the jobs (and, in `serve`, the API) need every pooled connection.
                listener = await asyncpg.connect(self.dsn)
                await listener.add_listener(queue.NOTIFY_CHANNEL, self._notified)
            except Exception as exc:  # the runner still polls without notifications
                logger.warning("job runner: no notifications (%s)", type(exc).__name__)
                listener = None
        running: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                # Cleared before claiming: a notification arriving while the claim runs is kept.
                self._wake.clear()
                jobs: list[Job] = []
                limit = 0
                try:
                    jobs, limit = await self._claim()
                except Exception as exc:
                    logger.error("job runner: claiming failed (%s)", type(exc).__name__)
                for job in jobs:
                    running.add(asyncio.create_task(self.execute(job), name=f"job-{job.id}-{job.kind}"))
                if jobs and len(jobs) == limit:
                    continue  # there may be more: look again at once
                stopping = asyncio.ensure_future(stop.wait())
                woken = asyncio.ensure_future(self._wake.wait())
                waiters: set[asyncio.Future[Any]] = {stopping, woken, *running}
                self.idle.set()
                try:
                    done, _ = await asyncio.wait(
                        waiters, timeout=self.idle_poll, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    self.idle.clear()
                stopping.cancel()
                woken.cancel()
                running -= done
        except asyncio.CancelledError:
            for task in running:
                task.cancel()
            raise
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close()

    def _notified(self, *_: object) -> None:
        self._wake.set()

    def _wanted(self) -> tuple[dict[str, int], int]:
        """How many jobs of each kind may be claimed now (the free slots, within each kind's own
        limit), and how many in all."""
        free = self.concurrency - sum(k.running for k in self.kinds.values())
        wanted = {}
        for kind, spec in self.kinds.items():
            room = free if spec.concurrency is None else min(free, spec.concurrency - spec.running)
            if room > 0:
                wanted[kind] = room
        return wanted, min(free, sum(wanted.values()))

    async def _claim(self) -> tuple[list[Job], int]:
        """Claim what the free slots allow: the jobs, and how many were asked for."""
        wanted, limit = self._wanted()
        if limit <= 0:
            return [], 0
        async with self.pool.acquire() as conn:
            jobs = await queue.claim(conn, self.name, self.lease, wanted, limit)
        for job in jobs:
            self.kinds[job.kind].running += 1
        return jobs, limit

    async def run_once(self) -> int:
        """Claim the due jobs (as many as the free slots allow) and run them; returns how many."""
        jobs, _ = await self._claim()
        await asyncio.gather(*(self.execute(job) for job in jobs))
        return len(jobs)

    # -- one job ---------------------------------------------------------------------------

    async def execute(self, job: Job) -> None:
        """Run a claimed job's handler with its lease renewed, and record the outcome (fenced)."""
        spec = self.kinds[job.kind]
        heartbeat = asyncio.create_task(self._keep_lease(job))
        try:
            outcome = await spec.handler(job)
            if isinstance(outcome, Retry) and outcome.delay is None and outcome.at is None:
                delay = backoff(spec.backoff, job.attempts, spec.max_backoff)
                outcome = Retry(
                    delay=delay, status=outcome.status, error=outcome.error, payload=outcome.payload
                )
            if outcome is not None:
                async with self.pool.acquire() as conn:
                    await record(conn, job, outcome)
        except LeaseLost:
            logger.info("job %s (%s): lease lost to another runner", job.id, job.kind)
        except Exception as exc:
            # By type only: an exception's text can hold what the handler was working on.
            logger.error("job %s (%s): unexpected %s", job.id, job.kind, type(exc).__name__)
            error = f"internal error {type(exc).__name__}"
            outcome = (
                Failed(error=error)
                if job.deadline is not None and datetime.now(UTC) >= job.deadline
                else Retry(delay=backoff(spec.backoff, job.attempts, spec.max_backoff), error=error)
            )
            try:
                async with self.pool.acquire() as conn:
                    await record(conn, job, outcome)
            except LeaseLost:
                logger.info("job %s (%s): lease lost to another runner", job.id, job.kind)
            except Exception as inner:
                logger.error("job %s (%s): outcome not recorded (%s)", job.id, job.kind, type(inner).__name__)
        finally:
            spec.running -= 1
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat
            self._wake.set()  # a slot is free

    async def _keep_lease(self, job: Job) -> None:
        """Renew the lease while the handler runs, so that a slow job is never taken over from a
        live runner (only a dead or stalled runner's lease runs out)."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                async with self.pool.acquire() as conn:
                    held = await queue.renew(conn, job, self.lease)
            except Exception as exc:  # the database is out of reach: try again at the next beat
                logger.warning("job %s (%s): lease not renewed (%s)", job.id, job.kind, type(exc).__name__)
                continue
            if not held:
                return
