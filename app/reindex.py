"""``carecoord reindex``: rebuild the search-index rows of stored resources (issue 13).

The index rows of a resource are written with each version (app/fhir/repository.py) from the
generated parameter table (app/fhir/search_params.py). When a release adds or changes a
parameter (an R4 one newly indexed, such as ``Location.near``, or an implementation guide's
SearchParameter shipped in tools/ig), the resources stored before it have no rows for it: this
job rewrites them, type by type, in keyset batches over ``rid`` (no OFFSET, so a batch costs the
same at the end of a table as at its start).

Each batch is one transaction that locks its resource rows (a concurrent write of one of them
waits, then writes its own rows), replaces their index rows with what
:func:`app.fhir.indexing.extract` makes of the stored body, and records the job's checkpoint
(the last ``rid``) with the job runner's fence (:func:`app.jobs.record`). A worker killed
mid-batch commits nothing; the job's lease runs out and another runner resumes from the last
committed checkpoint. Resources are not changed: no new version, no change-feed entry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from asyncpg import Connection, Pool

from app.fhir.errors import FHIRError
from app.fhir.indexing import IndexRows, extract
from app.fhir.repository import INDEX_TABLES
from app.fhir.types import SERVED_TYPES
from app.jobs import Done, Job, Retry, Runner, queue, record

logger = logging.getLogger("carecoord.reindex")

KIND = "reindex"


async def enqueue(conn: Connection, resource_types: Sequence[str] = SERVED_TYPES) -> dict[str, int | None]:
    """One reindex job per type (its key), from the first resource; per type the job's id, or
    None when that type's reindex is already queued or running."""
    jobs: dict[str, int | None] = {}
    for resource_type in resource_types:
        if resource_type not in SERVED_TYPES:
            raise ValueError(f"{resource_type} is not a resource type served here")
        jobs[resource_type] = await queue.enqueue(
            conn, KIND, {"resource_type": resource_type, "after": 0, "indexed": 0}, key=resource_type
        )
    return jobs


def _insert_sql(table: str) -> str:
    columns = INDEX_TABLES[table]
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(
        f"${n}::{kind}[]"
        for n, (_, kind) in enumerate((("rid", "bigint"), ("param", "text"), *columns), start=2)
    )
    # Table and column names come from INDEX_TABLES (code), every value is a bind parameter.
    return (
        f"INSERT INTO search_{table} (rid, resource_type, param, {names})"  # noqa: S608
        f" SELECT u.rid, $1, u.param, {', '.join(f'u.{name}' for name, _ in columns)}"
        f" FROM unnest({arrays}) AS u(rid, param, {names})"
    )


_INSERT = {table: _insert_sql(table) for table in INDEX_TABLES}
_DELETE = {table: f"DELETE FROM search_{table} WHERE rid = ANY($1::bigint[])" for table in INDEX_TABLES}  # noqa: S608


class Reindexer:
    """The ``reindex`` job handler: one batch of one type per run, its checkpoint in the payload."""

    def __init__(self, pool: Pool, fhir_base: str, *, batch: int = 500) -> None:
        self.pool = pool
        self.fhir_base = fhir_base
        self.batch = batch

    def register(self, runner: Runner) -> None:
        # One type at a time per runner: reindexing is bulk work beside the API's.
        runner.register(KIND, self.handle, concurrency=1)

    async def handle(self, job: Job) -> None:
        resource_type = str(job.payload["resource_type"])
        after = int(job.payload.get("after", 0))
        indexed = int(job.payload.get("indexed", 0))
        skipped = int(job.payload.get("skipped", 0))
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT rid, body FROM resource WHERE resource_type = $1 AND rid > $2 AND NOT deleted"
                " ORDER BY rid LIMIT $3 FOR UPDATE",
                resource_type,
                after,
                self.batch,
            )
            rids = [row["rid"] for row in rows]
            index: dict[str, list[list[Any]]] = {
                table: [[] for _ in range(len(columns) + 2)] for table, columns in INDEX_TABLES.items()
            }
            for row in rows:
                try:
                    found = extract(resource_type, json.loads(row["body"]), self.fhir_base)
                except (FHIRError, ValueError):
                    # Stored before a rule the index now enforces: left without rows, counted.
                    skipped += 1
                    found = IndexRows()
                for table, columns in INDEX_TABLES.items():
                    values = found.columns(table, len(columns) + 1)
                    index[table][0].extend([row["rid"]] * len(values[0]))
                    for position, column in enumerate(values, start=1):
                        index[table][position].extend(column)
            for table in INDEX_TABLES:
                await conn.execute(_DELETE[table], rids)
                if index[table][0]:
                    await conn.execute(_INSERT[table], resource_type, *index[table])
            progress = {
                "after": rids[-1] if rids else after,
                "indexed": indexed + len(rids),
                "skipped": skipped,
            }
            if len(rows) < self.batch:
                logger.info("reindex of %s done: %d resources", resource_type, progress["indexed"])
                await record(conn, job, Done(payload=progress))
            else:
                await record(conn, job, Retry(delay=0, payload=progress))
