"""The job queue's repository: every statement on the ``job`` table (app/jobs/table.py).

A job is a row with a ``kind``, an optional ``key`` (at most one active job per kind and key)
and a JSON ``payload``. Its life: ``pending`` (due at ``not_before``) -> ``leased`` (claimed
with ``FOR UPDATE SKIP LOCKED`` by one runner until ``lease_until``, renewed while it runs) ->
``done`` | ``failed`` | ``pending`` again (a retry) | ``paused`` (until :func:`resume`). A
lease that runs out (its runner died) makes the job claimable again, with one more attempt.

The fence: the holder of a lease is identified by (``leased_by``, ``attempts``); only that
holder may renew the lease or record the outcome (:func:`renew`, :func:`finish`), so a runner
that lost its lease (it stalled, another took the job over) cannot overwrite a newer attempt.

Every function takes the caller's connection and runs in the caller's transaction: a job
enqueued with a change commits (and wakes the runners, ``NOTIFY``) with it, and an outcome
recorded with a handler's writes is fenced in the same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asyncpg import Connection, Record

from app.jobs.table import ACTIVE_STATES

NOTIFY_CHANNEL = "jobs"
"""``NOTIFY`` channel of the runners; the payload is the job's kind."""

_COLUMNS = (
    "id, kind, key, payload, state, attempts, not_before, lease_until, leased_by, deadline,"
    " last_status, last_error, created_at, finished_at"
)
_DUE = "((state = 'pending' AND not_before <= now()) OR (state = 'leased' AND lease_until < now()))"

_ENQUEUE = """
INSERT INTO job (kind, key, payload, not_before, deadline)
VALUES ($1, $2, $3::jsonb, COALESCE($4, now()), $5)
ON CONFLICT (kind, key) WHERE state IN ('pending', 'leased', 'paused') DO NOTHING
RETURNING id
"""

_CLAIM = f"""
WITH wanted AS (
    SELECT kind, n FROM unnest($3::text[], $4::int[]) AS w(kind, n)
), picked AS (
    SELECT j.id, j.not_before FROM wanted w, LATERAL (
        SELECT id, not_before FROM job
        WHERE kind = w.kind AND {_DUE}
        ORDER BY not_before
        LIMIT w.n
        FOR UPDATE SKIP LOCKED
    ) j
    ORDER BY j.not_before
    LIMIT $5
)
UPDATE job SET state = 'leased', leased_by = $1, attempts = attempts + 1,
    lease_until = now() + make_interval(secs => $2)
FROM picked WHERE job.id = picked.id
RETURNING {", ".join(f"job.{c.strip()}" for c in _COLUMNS.split(","))}
"""

_FENCE = "id = $1 AND leased_by = $2 AND attempts = $3 AND state = 'leased'"

_RENEW = f"UPDATE job SET lease_until = now() + make_interval(secs => $4) WHERE {_FENCE} RETURNING id"

_FINISH = f"""
UPDATE job SET state = $4,
    not_before = COALESCE($5, now() + make_interval(secs => $6), not_before),
    lease_until = NULL, leased_by = NULL, last_status = $7, last_error = $8,
    payload = payload || COALESCE($9::jsonb, '{{}}'::jsonb),
    finished_at = CASE WHEN $4 IN ('done', 'failed') THEN now() ELSE NULL END
WHERE {_FENCE}
RETURNING id
"""


@dataclass(frozen=True)
class Job:
    """One row of the ``job`` table. A claimed job's (``leased_by``, ``attempts``) is its fence."""

    id: int
    kind: str
    key: str | None
    payload: dict[str, Any]
    state: str
    attempts: int
    not_before: datetime
    lease_until: datetime | None
    leased_by: str | None
    deadline: datetime | None
    last_status: int | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None


def _job(row: Record) -> Job:
    payload = row["payload"]
    return Job(
        id=row["id"],
        kind=row["kind"],
        key=row["key"],
        payload=json.loads(payload) if isinstance(payload, str) else dict(payload or {}),
        state=row["state"],
        attempts=row["attempts"],
        not_before=row["not_before"],
        lease_until=row["lease_until"],
        leased_by=row["leased_by"],
        deadline=row["deadline"],
        last_status=row["last_status"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
    )


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(dict(value), separators=(",", ":"))


# -- producers ----------------------------------------------------------------------------


async def enqueue(
    conn: Connection,
    kind: str,
    payload: Mapping[str, Any],
    *,
    key: str | None = None,
    not_before: datetime | None = None,
    deadline: datetime | None = None,
) -> int | None:
    """Add a job in the caller's transaction; its id, or None when an active job of this kind
    and key exists already (at most one per kind and key; a None key never conflicts). The
    runners are woken (``NOTIFY``) when the transaction commits."""
    job_id: int | None = await conn.fetchval(_ENQUEUE, kind, key, _json(payload), not_before, deadline)
    if job_id is not None:
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, kind)
    return job_id


async def reschedule(
    conn: Connection, kind: str, key: str, delay: float, *, sooner_only: bool = False
) -> int:
    """Make the pending job of ``kind`` and ``key`` due in ``delay`` seconds (with
    ``sooner_only``, never later than it already was); how many jobs changed. Wakes the
    runners on commit when that is now."""
    changed = await conn.fetchval(
        "WITH changed AS (UPDATE job SET not_before = CASE WHEN $4"
        "   THEN LEAST(not_before, now() + make_interval(secs => $3))"
        "   ELSE now() + make_interval(secs => $3) END"
        " WHERE kind = $1 AND key = $2 AND state = 'pending' RETURNING id)"
        " SELECT count(*) FROM changed",
        kind,
        key,
        float(delay),
        sooner_only,
    )
    if changed and delay <= 0:
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, kind)
    return int(changed or 0)


async def close(
    conn: Connection, kind: str, key: str, *, error: str, states: Sequence[str] = ("pending", "paused")
) -> int:
    """End the jobs of ``kind`` and ``key`` that no runner holds (``states``: never ``leased``)
    as ``done``, saying why in ``last_error``; how many."""
    unleased = [state for state in states if state != "leased"]
    closed = await conn.fetchval(
        "WITH closed AS (UPDATE job SET state = 'done', finished_at = now(), last_error = $3"
        " WHERE kind = $1 AND key = $2 AND state = ANY($4::text[]) RETURNING id)"
        " SELECT count(*) FROM closed",
        kind,
        key,
        error,
        unleased,
    )
    return int(closed or 0)


async def pause(conn: Connection, field: str, value: str, *, kinds: Sequence[str] | None = None) -> int:
    """Pending jobs whose payload ``field`` is ``value`` wait (``paused``) until :func:`resume`."""
    paused = await conn.fetchval(
        "WITH paused AS (UPDATE job SET state = 'paused' WHERE state = 'pending'"
        " AND payload ->> $1 = $2 AND ($3::text[] IS NULL OR kind = ANY($3::text[])) RETURNING id)"
        " SELECT count(*) FROM paused",
        field,
        value,
        list(kinds) if kinds is not None else None,
    )
    return int(paused or 0)


async def resume(conn: Connection, field: str, value: str, *, kinds: Sequence[str] | None = None) -> int:
    """Paused jobs whose payload ``field`` is ``value`` become due now (the runners are woken on
    commit); how many."""
    rows = await conn.fetch(
        "UPDATE job SET state = 'pending', not_before = now() WHERE state = 'paused'"
        " AND payload ->> $1 = $2 AND ($3::text[] IS NULL OR kind = ANY($3::text[])) RETURNING kind",
        field,
        value,
        list(kinds) if kinds is not None else None,
    )
    for kind in sorted({row["kind"] for row in rows}):
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, kind)
    return len(rows)


# -- runners ------------------------------------------------------------------------------


async def claim(
    conn: Connection,
    worker: str,
    lease_seconds: float,
    kinds: Mapping[str, int] | Sequence[str],
    limit: int,
) -> list[Job]:
    """Lease at most ``limit`` due jobs to ``worker`` for ``lease_seconds``: pending ones whose
    time has come and leased ones whose lease ran out (their runner died), oldest due first,
    skipping rows another runner is claiming. ``kinds``: the kinds to claim, or a mapping from
    kind to the most jobs of that kind to claim now (per-kind concurrency)."""
    wanted = dict(kinds) if isinstance(kinds, Mapping) else dict.fromkeys(kinds, limit)
    wanted = {kind: min(n, limit) for kind, n in wanted.items() if n > 0}
    if limit <= 0 or not wanted:
        return []
    rows = await conn.fetch(_CLAIM, worker, float(lease_seconds), list(wanted), list(wanted.values()), limit)
    return sorted((_job(row) for row in rows), key=lambda job: (job.not_before, job.id))


async def renew(conn: Connection, job: Job, lease_seconds: float) -> bool:
    """Extend the lease of a claimed job; False when its holder lost it (the fence)."""
    renewed = await conn.fetchval(_RENEW, job.id, job.leased_by, job.attempts, float(lease_seconds))
    return renewed is not None


async def finish(
    conn: Connection,
    job: Job,
    state: str,
    *,
    status: int | None = None,
    error: str | None = None,
    not_before: datetime | None = None,
    delay: float | None = None,
    payload: Mapping[str, Any] | None = None,
) -> bool:
    """Record a claimed job's outcome: ``done``, ``failed``, ``pending`` (a retry, due at
    ``not_before`` or in ``delay`` seconds) or ``paused``; ``payload`` keys are merged into its
    payload. Only the current lease holder (``leased_by`` and ``attempts`` of ``job``) may:
    returns whether it still held the lease (False: nothing was written)."""
    if state not in ("done", "failed", "pending", "paused"):
        raise ValueError(f"not an outcome state: {state!r}")
    finished = await conn.fetchval(
        _FINISH,
        job.id,
        job.leased_by,
        job.attempts,
        state,
        not_before,
        None if delay is None else float(delay),
        status,
        error,
        _json(payload),
    )
    return finished is not None


# -- reading ------------------------------------------------------------------------------


async def get(conn: Connection, job_id: int) -> Job | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM job WHERE id = $1", job_id)
    return None if row is None else _job(row)


async def latest(conn: Connection, kind: str, key: str) -> Job | None:
    """The newest job of ``kind`` and ``key``, whatever its state."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM job WHERE kind = $1 AND key = $2 ORDER BY id DESC LIMIT 1",
        kind,
        key,
    )
    return None if row is None else _job(row)


async def find(conn: Connection, *, key: str | None = None, kinds: Sequence[str] | None = None) -> list[Job]:
    """Jobs (of ``kinds``; of ``key``), in one statement (one snapshot), by key and id."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM job WHERE ($1::text IS NULL OR key = $1)"
        " AND ($2::text[] IS NULL OR kind = ANY($2::text[])) ORDER BY key, id",
        key,
        list(kinds) if kinds is not None else None,
    )
    return [_job(row) for row in rows]


async def installed(conn: Connection) -> bool:
    """Whether the job table exists (admin commands may look at a database before migrating)."""
    return await conn.fetchval("SELECT to_regclass('job')") is not None


async def counts(conn: Connection, kind: str, field: str) -> dict[str, dict[str, int]]:
    """Jobs of ``kind`` per value of their payload ``field`` and per state."""
    rows = await conn.fetch(
        "SELECT payload ->> $2 AS value, state, count(*) AS n FROM job WHERE kind = $1 GROUP BY 1, 2",
        kind,
        field,
    )
    found: dict[str, dict[str, int]] = {}
    for row in rows:
        found.setdefault(str(row["value"]), {})[row["state"]] = int(row["n"])
    return found


async def depth(conn: Connection) -> dict[str, int]:
    """Jobs pending or leased, per kind."""
    rows = await conn.fetch(
        "SELECT kind, count(*) AS n FROM job WHERE state IN ('pending', 'leased') GROUP BY kind"
    )
    return {row["kind"]: int(row["n"]) for row in rows}


async def oldest_age(conn: Connection, kind: str) -> float:
    """Seconds since the oldest job of ``kind`` still pending or leased was created (0: none)."""
    age = await conn.fetchval(
        "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0) FROM job"
        " WHERE kind = $1 AND state IN ('pending', 'leased')",
        kind,
    )
    return float(age or 0)


async def purge(conn: Connection, older_than: float, *, kinds: Sequence[str] | None = None) -> int:
    """Delete jobs finished (``done``/``failed``) more than ``older_than`` seconds ago; how many."""
    purged = await conn.fetchval(
        "WITH purged AS (DELETE FROM job WHERE state IN ('done', 'failed')"
        " AND finished_at < now() - make_interval(secs => $1)"
        " AND ($2::text[] IS NULL OR kind = ANY($2::text[])) RETURNING id)"
        " SELECT count(*) FROM purged",
        float(older_than),
        list(kinds) if kinds is not None else None,
    )
    return int(purged or 0)


__all__ = [
    "ACTIVE_STATES",
    "NOTIFY_CHANNEL",
    "Job",
    "claim",
    "close",
    "counts",
    "depth",
    "enqueue",
    "find",
    "finish",
    "get",
    "installed",
    "latest",
    "oldest_age",
    "pause",
    "purge",
    "renew",
    "reschedule",
    "resume",
]
