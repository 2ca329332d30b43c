"""The job runner (app/jobs, issue 10) against the tests' PostgreSQL: slots, leases and their
renewal, the fence, retries with backoff, NOTIFY, two runners on one database, and a runner
lost without a word.

Every test registers kinds of its own (``test.<uuid>.<name>``), so the referral jobs other
tests leave in the table are never claimed here. Races are waited for with ``wait_until``,
never with a fixed sleep.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import pytest
from asyncpg import Pool
from fastapi import FastAPI

from app import db
from app.jobs import Done, Failed, Job, LeaseLost, Paused, Retry, Runner, backoff, queue, record
from tests.conftest import wait_until


@pytest.fixture
def pool(app: FastAPI) -> Pool:
    pool: Pool = app.state.pool
    return pool


@pytest.fixture
def kind() -> Callable[[str], str]:
    prefix = f"test.{uuid.uuid4().hex[:8]}"
    return lambda name: f"{prefix}.{name}"


class Runners:
    """Runners on the tests' pool; the ones started with :meth:`start` are stopped at the end."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.started: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def make(self, name: str, **options: Any) -> Runner:
        return Runner(self.pool, name=name, **{"lease": 5.0, "concurrency": 4, **options})

    def start(self, runner: Runner) -> asyncio.Task[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        self.started.append((stop, task))
        return task

    async def stop(self) -> None:
        for stop, _ in self.started:
            stop.set()
        for _, task in self.started:
            done, _ = await asyncio.wait({task}, timeout=10)
            if not done:
                task.cancel()


@pytest.fixture
async def runners(pool: Pool) -> AsyncIterator[Runners]:
    made = Runners(pool)
    yield made
    await made.stop()


async def enqueue(pool: Pool, kind: str, payload: dict[str, Any] | None = None, **options: Any) -> int:
    async with pool.acquire() as conn:
        job_id = await queue.enqueue(conn, kind, payload or {}, **options)
    assert job_id is not None
    return job_id


async def get(pool: Pool, job_id: int) -> Job:
    async with pool.acquire() as conn:
        job = await queue.get(conn, job_id)
    assert job is not None
    return job


async def db_now_after(pool: Pool, moment: datetime | None) -> bool:
    """Whether the database's clock (the one leases are judged by) has passed ``moment``."""
    async with pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT $1::timestamptz < now()", moment))


async def no_renewal(job: Job) -> None:
    await asyncio.Event().wait()  # a stalled runner: its lease is never renewed


async def test_a_slow_job_holds_its_own_slot_only(
    pool: Pool, kind: Callable[[str], str], runners: Runners
) -> None:
    slow, quick = kind("slow"), kind("quick")
    release = asyncio.Event()
    started: list[int] = []
    finished: list[int] = []

    async def hold(job: Job) -> Done:
        started.append(job.id)
        await release.wait()
        return Done()

    async def work(job: Job) -> Done:
        finished.append(job.id)
        return Done()

    runner = runners.make("slots", concurrency=2)
    runner.register(slow, hold)
    runner.register(quick, work)
    runners.start(runner)
    stuck = await enqueue(pool, slow)
    await wait_until(lambda: started, "the slow job to start")
    quick_ids = [await enqueue(pool, quick) for _ in range(5)]
    await wait_until(lambda: sorted(finished) == quick_ids, "the quick jobs to run beside the slow one")
    assert (await get(pool, stuck)).state == "leased"
    release.set()
    await wait_until(lambda: _state(pool, stuck, "done"), "the slow job to finish")


async def _state(pool: Pool, job_id: int, state: str) -> bool:
    return (await get(pool, job_id)).state == state


async def test_a_kind_never_takes_more_than_its_slots(
    pool: Pool, kind: Callable[[str], str], runners: Runners
) -> None:
    """Slow jobs of one kind (a slow partner) leave the others' kinds a slot."""
    slow, other = kind("slow"), kind("other")
    release = asyncio.Event()
    running: list[int] = []
    others: list[int] = []

    async def hold(job: Job) -> Done:
        running.append(job.id)
        await release.wait()
        return Done()

    async def work(job: Job) -> Done:
        others.append(job.id)
        return Done()

    runner = runners.make("per-kind", concurrency=3)
    runner.register(slow, hold, concurrency=2)
    runner.register(other, work)
    slow_ids = [await enqueue(pool, slow) for _ in range(4)]
    runners.start(runner)
    await wait_until(lambda: len(running) == 2, "two slow jobs to start")
    other_id = await enqueue(pool, other)
    await wait_until(lambda: others == [other_id], "the other kind's job to run")
    assert len(running) == 2, "a third slow job took a slot beyond its kind's two"
    release.set()

    async def all_done() -> bool:
        return all([await _state(pool, job_id, "done") for job_id in slow_ids])

    await wait_until(all_done, "every slow job to finish")


async def test_a_stale_holder_cannot_record_its_outcome(
    pool: Pool, kind: Callable[[str], str], runners: Runners
) -> None:
    """The first runner stalls (no renewal) past its lease; a second takes the job over and
    finishes it; the first one's outcome, and its writes in the same transaction, are refused."""
    work = kind("fenced")
    arrived, release = asyncio.Event(), asyncio.Event()
    lost: list[bool] = []

    async def first_handler(job: Job) -> None:
        arrived.set()
        await release.wait()
        async with pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await record(conn, job, Done(payload={"by": "first"}))
            except LeaseLost:
                lost.append(True)
                raise

    async def second_handler(job: Job) -> Done:
        return Done(status=200, payload={"by": "second"})

    first = runners.make("stale", lease=1.0)
    first._keep_lease = no_renewal  # type: ignore[method-assign]
    first.register(work, first_handler)
    second = runners.make("fresh", lease=1.0)
    second.register(work, second_handler)
    job_id = await enqueue(pool, work, {"n": 1})
    running = asyncio.create_task(first.run_once())
    await wait_until(arrived.is_set, "the first runner to start the job")
    claimed = (await get(pool, job_id)).lease_until
    await wait_until(lambda: db_now_after(pool, claimed), "the first runner's lease to run out")
    assert await second.run_once() == 1
    release.set()
    await running  # LeaseLost does not escape the runner
    assert lost == [True]
    job = await get(pool, job_id)
    assert (job.state, job.attempts, job.payload, job.last_status) == (
        "done",
        2,
        {"n": 1, "by": "second"},
        200,
    )
    # The queue's own answer to a stale holder: nothing written, False.
    stale = Job(**{**job.__dict__, "attempts": 1, "leased_by": "stale"})
    async with pool.acquire() as conn:
        assert await queue.finish(conn, stale, "failed", error="late") is False
        assert await queue.renew(conn, stale, 60) is False
    assert (await get(pool, job_id)).state == "done"


async def test_the_lease_is_renewed_while_a_handler_outlasts_it(
    pool: Pool, kind: Callable[[str], str], runners: Runners
) -> None:
    work = kind("long")
    arrived, release = asyncio.Event(), asyncio.Event()

    async def long(job: Job) -> Done:
        arrived.set()
        await release.wait()
        return Done()

    first = runners.make("renewing", lease=1.5)
    first.register(work, long)
    second = runners.make("waiting", lease=1.5)
    second.register(work, long)
    job_id = await enqueue(pool, work)
    running = asyncio.create_task(first.run_once())
    await wait_until(arrived.is_set, "the job to start")
    claimed = (await get(pool, job_id)).lease_until
    await wait_until(lambda: db_now_after(pool, claimed), "the first lease's end to pass")
    renewed = await get(pool, job_id)
    assert renewed.state == "leased" and renewed.lease_until is not None and claimed is not None
    assert renewed.lease_until > claimed, "the lease was not renewed"
    assert await second.run_once() == 0, "a live runner's job was taken over"
    release.set()
    await running
    job = await get(pool, job_id)
    assert (job.state, job.attempts, job.leased_by) == ("done", 1, None)


async def test_unexpected_errors_retry_with_backoff_and_are_logged_by_type_only(
    pool: Pool, kind: Callable[[str], str], runners: Runners, caplog: pytest.LogCaptureFixture
) -> None:
    work = kind("flaky")
    calls: list[int] = []

    async def flaky(job: Job) -> Done:
        calls.append(job.attempts)
        if len(calls) < 3:
            raise RuntimeError("Patient Ada Okafor, HIV")  # what a log line must never hold
        return Done(payload={"calls": len(calls)})

    runner = runners.make("retrying")
    runner.register(work, flaky, backoff=2.0, max_backoff=3.0)
    job_id = await enqueue(pool, work)
    waits = []
    with caplog.at_level(logging.INFO, logger="carecoord.jobs"):
        for attempt in (1, 2):
            assert await runner.run_once() == 1
            async with pool.acquire() as conn:
                wait = await conn.fetchval(
                    "SELECT EXTRACT(EPOCH FROM not_before - now()) FROM job WHERE id = $1", job_id
                )
            job = await get(pool, job_id)
            assert (job.state, job.attempts, job.last_error) == (
                "pending",
                attempt,
                "internal error RuntimeError",
            )
            waits.append(float(wait))
            assert await runner.run_once() == 0, "retried before its backoff"
            async with pool.acquire() as conn:
                await conn.execute("UPDATE job SET not_before = now() WHERE id = $1", job_id)
        assert await runner.run_once() == 1
    # first * 2**(attempt-1), with jitter between half and all of it, capped at max_backoff.
    assert 0.9 <= waits[0] <= 2.0 and 1.4 <= waits[1] <= 3.0, waits
    assert calls == [1, 2, 3]
    job = await get(pool, job_id)
    assert (job.state, job.attempts, job.payload) == ("done", 3, {"calls": 3})
    assert "RuntimeError" in caplog.text and "Okafor" not in caplog.text and "HIV" not in caplog.text
    assert backoff(5, 1, 3600) <= 5 and 40 <= backoff(5, 5, 3600) <= 80 and backoff(5, 30, 60) <= 60


async def test_outcomes_retry_fail_pause_and_resume(
    pool: Pool, kind: Callable[[str], str], runners: Runners
) -> None:
    work, expired = kind("outcomes"), kind("expired")
    answers: list[Any] = [
        Retry(delay=3600, status=503, error="busy"),
        Paused(error="wait"),
        Failed(400, "no"),
    ]

    async def answer(job: Job) -> Any:
        return answers.pop(0)

    async def crash(job: Job) -> None:
        raise ValueError("past its deadline")

    runner = runners.make("outcomes")
    runner.register(work, answer)
    runner.register(expired, crash)
    job_id = await enqueue(pool, work, {"endpoint": "ep-1"})
    assert await runner.run_once() == 1
    job = await get(pool, job_id)
    assert (job.state, job.last_status, job.last_error) == ("pending", 503, "busy")
    async with pool.acquire() as conn:
        assert await queue.reschedule(conn, work, "none", 0) == 0  # no such key
        await conn.execute("UPDATE job SET not_before = now() WHERE id = $1", job_id)
    assert await runner.run_once() == 1
    assert (await get(pool, job_id)).state == "paused"
    assert await runner.run_once() == 0, "a paused job is not due"
    async with pool.acquire() as conn:
        assert await queue.resume(conn, "endpoint", "ep-2") == 0
        assert await queue.resume(conn, "endpoint", "ep-1", kinds=[work]) == 1
    assert await runner.run_once() == 1
    job = await get(pool, job_id)
    assert (job.state, job.attempts, job.last_status, job.finished_at is not None) == ("failed", 3, 400, True)
    late = await enqueue(pool, expired, deadline=datetime.fromisoformat("2020-01-01T00:00:00+00:00"))
    assert await runner.run_once() == 1
    assert (await get(pool, late)).state == "failed", "an unexpected error past the deadline is not retried"


async def test_one_active_job_per_kind_and_key_and_the_queue_reports(
    pool: Pool, kind: Callable[[str], str], runners: Runners
) -> None:
    work = kind("keyed")
    async with pool.acquire() as conn:
        first = await queue.enqueue(conn, work, {"endpoint": "ep-1"}, key="k1")
        assert await queue.enqueue(conn, work, {"endpoint": "ep-1"}, key="k1") is None
        assert await queue.enqueue(conn, work, {"endpoint": "ep-2"}, key="k2") is not None
        assert (await queue.depth(conn))[work] == 2
        assert await queue.oldest_age(conn, work) >= 0
        assert await queue.counts(conn, work, "endpoint") == {"ep-1": {"pending": 1}, "ep-2": {"pending": 1}}
        assert await queue.close(conn, work, "k2", error="not needed") == 1
        latest = await queue.latest(conn, work, "k1")
        assert latest is not None and latest.id == first
        assert [job.key for job in await queue.find(conn, kinds=[work])] == ["k1", "k2"]
        assert await queue.pause(conn, "endpoint", "ep-1", kinds=[work]) == 1
        assert await queue.installed(conn)

    runner = runners.make("keyed")

    async def done(job: Job) -> Done:
        return Done()

    runner.register(work, done)
    async with pool.acquire() as conn:
        await queue.resume(conn, "endpoint", "ep-1", kinds=[work])
    assert await runner.run_once() == 1
    async with pool.acquire() as conn:
        # Finished jobs no longer count: a new one of the same key may start.
        assert await queue.enqueue(conn, work, {}, key="k1") is not None
        await conn.execute("UPDATE job SET finished_at = now() - interval '2 days' WHERE kind = $1", work)
        assert await queue.purge(conn, 86400, kinds=[work]) == 2  # the done k1 and the closed k2
        assert [job.state for job in await queue.find(conn, kinds=[work])] == ["pending"]


async def test_notify_wakes_an_idle_runner(
    app: FastAPI, pool: Pool, kind: Callable[[str], str], runners: Runners
) -> None:
    """The runner polls only every 60 s here: the job runs at once only if NOTIFY woke it."""
    work = kind("notified")
    ran = asyncio.Event()

    async def handler(job: Job) -> Done:
        ran.set()
        return Done()

    runner = runners.make("listener", idle_poll=60.0, dsn=db.asyncpg_dsn(app.state.settings.database_url))
    runner.register(work, handler)
    runners.start(runner)
    await wait_until(runner.idle.is_set, "the runner to wait for work")
    started = time.monotonic()
    async with pool.acquire() as conn, conn.transaction():
        await queue.enqueue(conn, work, {})
        # Not before the commit: the runner would not see the job yet.
    await wait_until(ran.is_set, "the notified runner to run the job", timeout=20)
    assert time.monotonic() - started < 20


async def test_two_runners_never_run_one_job_at_the_same_time(
    app: FastAPI, pool: Pool, kind: Callable[[str], str], runners: Runners
) -> None:
    work = kind("shared")
    running: set[int] = set()
    runs: dict[int, list[str]] = {}
    overlaps: list[int] = []

    def handler_for(name: str) -> Callable[[Job], Awaitable[Done]]:
        async def handler(job: Job) -> Done:
            if job.id in running:
                overlaps.append(job.id)
            running.add(job.id)
            runs.setdefault(job.id, []).append(name)
            await asyncio.sleep(0.01 * (job.id % 3))  # some work, of varying length
            running.discard(job.id)
            return Done()

        return handler

    dsn = db.asyncpg_dsn(app.state.settings.database_url)
    for name in ("r1", "r2"):
        runner = runners.make(name, concurrency=4, dsn=dsn)
        runner.register(work, handler_for(name))
        runners.start(runner)
    job_ids = [await enqueue(pool, work) for _ in range(60)]

    async def all_done() -> bool:
        async with pool.acquire() as conn:
            return all(job.state == "done" for job in await queue.find(conn, kinds=[work]))

    await wait_until(all_done, "every job to be done", timeout=60)
    assert overlaps == []
    assert {job_id: len(names) for job_id, names in runs.items()} == dict.fromkeys(job_ids, 1)
    assert {name for names in runs.values() for name in names} <= {"r1", "r2"}


async def test_a_runner_lost_mid_job_has_the_job_rerun_after_its_lease(
    pool: Pool, kind: Callable[[str], str], runners: Runners
) -> None:
    """SIGKILL, as far as one process can play it: the runner's task is cancelled in the middle
    of a job and records nothing; the job is run again once its lease has run out."""
    work = kind("lost")
    arrived = asyncio.Event()
    attempts: list[int] = []

    async def handler(job: Job) -> Done:
        attempts.append(job.attempts)
        if job.attempts == 1:
            arrived.set()
            await asyncio.Event().wait()  # until the runner dies
        return Done()

    lost = runners.make("lost", lease=3.0)
    lost.register(work, handler)
    heir = runners.make("heir", lease=1.0)
    heir.register(work, handler)
    job_id = await enqueue(pool, work)
    dying = runners.start(lost)
    await wait_until(arrived.is_set, "the first runner to start the job")
    dying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dying
    job = await get(pool, job_id)
    assert (job.state, job.leased_by) == ("leased", "lost")
    assert await heir.run_once() == 0, "taken over while the lease still ran"
    await wait_until(lambda: db_now_after(pool, job.lease_until), "the dead runner's lease to run out")
    assert await heir.run_once() == 1
    job = await get(pool, job_id)
    assert (job.state, job.attempts, attempts) == ("done", 2, [1, 2])
