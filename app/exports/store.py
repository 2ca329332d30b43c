"""Every statement on the export tables (app/exports/table.py), and where file bytes live.

File chunks are stored in PostgreSQL (``bulk_export_file.body``) by default, so that every
carecoord process can serve what any worker wrote; with ``CARECOORD_EXPORT_DIR`` (a directory
all processes share) the bytes go to ``{dir}/{export id}/{kind}-{type}-{part}-{chunk}.ndjson``
and the row records only their size. A chunk's name is fixed by its checkpoint position, so a
worker killed after writing a chunk file but before its checkpoint committed rewrites the same
file when the export resumes: never a duplicate.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from asyncpg import Connection, Pool, Record

ACTIVE = ("queued", "running")
"""States of an export that has not ended."""

_COLUMNS = (
    "id, client_id, access, level, request_url, parameters, transaction_time, snapshot, state,"
    " progress, resources_total, error, created_at, completed_at, expires_at, polled_at"
)


_TRANSACTION_TIME = (
    "LEAST(statement_timestamp(), (SELECT min(xact_start) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL))"
)
"""``transactionTime``: now, or the start of the oldest transaction still open, if earlier. A
write still open at kick-off is not in the snapshot, and its ``lastUpdated`` is not before its
transaction began: so a later export with ``_since`` = this ``transactionTime`` includes it
(Bulk Data export.html: everything modified up to ``transactionTime`` is in, later changes may
be)."""


@dataclass(frozen=True)
class Export:
    id: str
    client_id: str | None
    access: dict[str, Any]
    level: str
    request_url: str
    parameters: dict[str, Any]
    transaction_time: datetime
    snapshot: str
    state: str
    progress: dict[str, Any]
    resources_total: int
    error: str | None
    created_at: datetime
    completed_at: datetime | None
    expires_at: datetime
    polled_at: datetime | None


def _loads(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def _export(row: Record) -> Export:
    data = dict(row)
    for key in ("access", "parameters", "progress"):
        data[key] = _loads(data[key])
    return Export(**data)


async def create(
    conn: Connection,
    *,
    client_id: str | None,
    access: dict[str, Any],
    level: str,
    request_url: str,
    parameters: dict[str, Any],
    retention: float,
) -> Export:
    """A queued export reading the snapshot of this statement (``transactionTime`` is its now)."""
    row = await conn.fetchrow(
        "INSERT INTO bulk_export (id, client_id, access, level, request_url, parameters,"  # noqa: S608  (fixed column list; values are bind parameters)
        " transaction_time, snapshot, state, progress, expires_at)"
        f" VALUES ($1, $2, $3::jsonb, $4, $5, $6::jsonb, {_TRANSACTION_TIME}, pg_current_snapshot()::text,"
        " 'queued', '{}'::jsonb, now() + make_interval(secs => $7))"
        f" RETURNING {_COLUMNS}",
        uuid.uuid4().hex,
        client_id,
        json.dumps(access),
        level,
        request_url,
        json.dumps(parameters),
        float(retention),
    )
    return _export(row)


async def get(conn: Connection, export_id: str, *, lock: bool = False) -> Export | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM bulk_export WHERE id = $1" + (" FOR UPDATE" if lock else ""), export_id  # noqa: S608  (fixed column list; values are bind parameters)
    )
    return None if row is None else _export(row)


async def listing(conn: Connection, *, client_id: str | None = None) -> list[Export]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM bulk_export WHERE ($1::text IS NULL OR client_id = $1) ORDER BY created_at",  # noqa: S608  (fixed column list; values are bind parameters)
        client_id,
    )
    return [_export(row) for row in rows]


async def start_if_room(conn: Connection, export: Export, concurrency: int) -> bool:
    """Move a queued export to ``running`` when its client runs fewer than ``concurrency``
    exports (the check and the change are serialised per client by an advisory lock)."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('bulk_export:' || COALESCE($1, '')))", export.client_id
    )
    running = await conn.fetchval(
        "SELECT count(*) FROM bulk_export WHERE client_id IS NOT DISTINCT FROM $1 AND state = 'running'"
        " AND id <> $2",
        export.client_id,
        export.id,
    )
    if running >= concurrency:
        return False
    await conn.execute(
        "UPDATE bulk_export SET state = 'running' WHERE id = $1 AND state = 'queued'", export.id
    )
    return True


async def checkpoint(conn: Connection, export_id: str, progress: dict[str, Any], added: int) -> None:
    await conn.execute(
        "UPDATE bulk_export SET progress = $2::jsonb, resources_total = resources_total + $3 WHERE id = $1",
        export_id,
        json.dumps(progress),
        added,
    )


async def finish(conn: Connection, export_id: str, state: str, error: str | None = None) -> None:
    await conn.execute(
        "UPDATE bulk_export SET state = $2, error = $3, completed_at = now() WHERE id = $1",
        export_id,
        state,
        error,
    )


async def polled(conn: Connection, export_id: str) -> datetime | None:
    """Record a status poll; the previous poll's time."""
    previous: datetime | None = await conn.fetchval(
        "UPDATE bulk_export e SET polled_at = now() FROM bulk_export old"
        " WHERE e.id = $1 AND old.id = e.id RETURNING old.polled_at",
        export_id,
    )
    return previous


async def remove(conn: Connection, export_id: str, export_dir: Path | None) -> bool:
    """Delete an export, its file rows (cascade) and its files; whether it existed."""
    deleted = await conn.fetchval("DELETE FROM bulk_export WHERE id = $1 RETURNING id", export_id)
    if export_dir is not None:
        shutil.rmtree(export_dir / export_id, ignore_errors=True)
    return deleted is not None


async def expired(conn: Connection) -> list[str]:
    rows = await conn.fetch("SELECT id FROM bulk_export WHERE expires_at <= now()")
    return [row["id"] for row in rows]


# -- files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    kind: str
    resource_type: str
    part: int
    count: int
    chunks: int


async def files(conn: Connection, export_id: str) -> list[FileEntry]:
    rows = await conn.fetch(
        "SELECT kind, resource_type, part, sum(count)::bigint AS count, count(*) AS chunks"
        " FROM bulk_export_file WHERE export_id = $1 GROUP BY kind, resource_type, part"
        " ORDER BY kind DESC, min(chunk), resource_type, part",
        export_id,
    )
    return [
        FileEntry(r["kind"], r["resource_type"], r["part"], int(r["count"]), int(r["chunks"])) for r in rows
    ]


def chunk_path(
    export_dir: Path, export_id: str, kind: str, resource_type: str, part: int, chunk: int
) -> Path:
    return export_dir / export_id / f"{kind}-{resource_type}-{part}-{chunk}.ndjson"


async def write_chunk(
    conn: Connection,
    export_dir: Path | None,
    export_id: str,
    *,
    kind: str,
    resource_type: str,
    part: int,
    chunk: int,
    count: int,
    body: str,
) -> None:
    """Store one chunk in the caller's transaction (with a directory: the file first, written
    whole under a temporary name and renamed, then the row)."""
    data = body.encode("utf-8")
    stored: str | None = body
    if export_dir is not None:
        path = chunk_path(export_dir, export_id, kind, resource_type, part, chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
        stored = None
    await conn.execute(
        "INSERT INTO bulk_export_file (export_id, kind, resource_type, part, chunk, count, bytes, body)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (export_id, kind, resource_type, part, chunk) DO UPDATE"
        " SET count = EXCLUDED.count, bytes = EXCLUDED.bytes, body = EXCLUDED.body",
        export_id,
        kind,
        resource_type,
        part,
        chunk,
        count,
        len(data),
        stored,
    )


async def write_chunk_in_database(
    conn: Connection,
    batch_sql: str,
    values: list[Any],
    export_id: str,
    *,
    resource_type: str,
    part: int,
    chunk: int,
) -> tuple[int, int | None]:
    """Run a batch statement (app/exports/query.py) and store its bodies, in ``rid`` order and
    newline-terminated, as one ``output`` chunk, in one statement; (rows, last ``rid``)."""
    n = len(values)
    row = await conn.fetchrow(
        f"WITH batch AS ({batch_sql}),"  # noqa: S608  (compiled batch statement; values are bound)
        " agg AS (SELECT count(*) AS n, max(rid) AS last,"
        "   string_agg(body, E'\\n' ORDER BY rid) || E'\\n' AS body FROM batch),"
        " stored AS (INSERT INTO bulk_export_file"
        "   (export_id, kind, resource_type, part, chunk, count, bytes, body)"
        f"   SELECT ${n + 1}, 'output', ${n + 2}, ${n + 3}, ${n + 4}, agg.n, octet_length(agg.body), agg.body"
        "   FROM agg WHERE agg.n > 0"
        "   ON CONFLICT (export_id, kind, resource_type, part, chunk) DO UPDATE"
        "   SET count = EXCLUDED.count, bytes = EXCLUDED.bytes, body = EXCLUDED.body RETURNING 1)"
        " SELECT agg.n, agg.last, (SELECT count(*) FROM stored) AS stored FROM agg",
        *values,
        export_id,
        resource_type,
        part,
        chunk,
    )
    return int(row["n"]), row["last"]


async def read_file(
    pool: Pool, export_dir: Path | None, export_id: str, entry: FileEntry
) -> AsyncIterator[bytes]:
    """A file's bytes, chunk by chunk (one chunk in memory at a time)."""
    for chunk in range(entry.chunks):
        if export_dir is not None:
            path = chunk_path(export_dir, export_id, entry.kind, entry.resource_type, entry.part, chunk)
            with path.open("rb") as handle:
                while block := handle.read(1 << 20):
                    yield block
            continue
        async with pool.acquire() as conn:
            # As bytes (bytea): the chunk is sent as stored, without decoding and encoding it here.
            body = await conn.fetchval(
                "SELECT convert_to(body, 'UTF8') FROM bulk_export_file WHERE export_id = $1 AND kind = $2"
                " AND resource_type = $3 AND part = $4 AND chunk = $5",
                export_id,
                entry.kind,
                entry.resource_type,
                entry.part,
                chunk,
            )
        if body is None:
            return  # cancelled or expired meanwhile
        yield bytes(body)
