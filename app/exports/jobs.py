"""The export job: writes an export's NDJSON files in checkpointed steps (issue 12).

An export is one job (kind ``bulk-export``, key = export id) that runs steps until its plan is
done: the plan is the (kind, type) pairs of the export (``output`` per type, then ``deleted``
per type with ``_since``). One step reads the next keyset batch of one type (app/exports/
query.py), writes it as one chunk of the current file and records the checkpoint (plan position,
last ``rid``, file part, chunk, resources in the part) in the same transaction, holding the
export row's lock. A worker killed at any point loses at most the step it had not committed:
the job's lease runs out, another runner claims it and continues from the checkpoint, and the
chunk it writes again replaces nothing that committed (same position, same rows), so every
resource is written exactly once. A file is split when it holds
``CARECOORD_EXPORT_FILE_MAX_RESOURCES``.

The job hands its slot back every few seconds (a ``Retry`` due at once) so that a stopping
process is not held by a long export. An export waits (``queued``) while its client already has
``CARECOORD_EXPORT_CONCURRENCY`` exports running. A second job per export (kind
``bulk-export-expire``, due at ``expires_at``) deletes it and its files when its retention ends.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from asyncpg import Pool

from app.auth.scopes import parse_scopes, scope_text
from app.exports import metrics, store
from app.exports.query import BatchQuery, batch_query, was_in_compartment
from app.fhir.access import AccessContext
from app.fhir.search import SearchLimits
from app.fhir.search_service import subset
from app.jobs import Runner
from app.jobs.queue import Job
from app.jobs.runner import Done, Failed, Outcome, Retry
from app.settings import Settings

logger = logging.getLogger("carecoord.exports")

EXPORT_KIND = "bulk-export"
EXPIRE_KIND = "bulk-export-expire"
SLICE_SECONDS = 5.0
"""How long one run of the job goes on before it hands its slot back (and continues at once)."""
QUERY_CACHE_SIZE = 256
"""Compiled batch statements kept per process (one per export and plan position)."""
MAX_FAILURES = 5
"""Consecutive failed runs after which an export is given up on (state ``failed``)."""
QUEUED_RECHECK = 1.0
"""Seconds between looks at whether a queued export may start."""


def access_record(access: AccessContext) -> dict[str, Any]:
    """What is stored of the caller's access context with its export (the job exports what that
    token allowed at kick-off)."""
    return {
        "client_id": access.client_id,
        "organization": access.organization,
        "patient": access.patient,
        "user": access.user,
        "scope": scope_text(access.permissions),
        "unrestricted": access.unrestricted,
        "external": access.external,
    }


def access_from_record(data: dict[str, Any]) -> AccessContext:
    return AccessContext(
        client_id=data.get("client_id"),
        organization=data.get("organization"),
        patient=data.get("patient"),
        user=data.get("user"),
        permissions=parse_scopes(data.get("scope") or ""),
        unrestricted=bool(data.get("unrestricted")),
        external=bool(data.get("external")),
    )


def plan(parameters: dict[str, Any]) -> list[tuple[str, str]]:
    types: list[str] = parameters["types"]
    steps = [("output", t) for t in types]
    if parameters.get("since"):
        steps.extend(("deleted", t) for t in types)
    return steps


def _elements_for(elements: list[str], resource_type: str) -> tuple[str, ...]:
    """export.html#_elements: ``element`` applies to every type, ``Type.element`` to its type."""
    chosen = [e for e in elements if "." not in e]
    chosen += [e.split(".", 1)[1] for e in elements if e.startswith(resource_type + ".")]
    return tuple(chosen)


def _deleted_line(resource_type: str, fhir_id: str) -> str:
    entry = {"request": {"method": "DELETE", "url": f"{resource_type}/{fhir_id}"}}
    return json.dumps(
        {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}, separators=(",", ":")
    )


class ExportJobs:
    """The export and expiry job handlers, registered on a runner by :meth:`register`."""

    def __init__(self, pool: Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.export_dir: Path | None = settings.export_dir
        self.limits = SearchLimits.from_settings(settings)
        self._queries: dict[tuple[str, int], BatchQuery] = {}

    def register(self, runner: Runner) -> None:
        runner.register(EXPORT_KIND, self.run, backoff=1.0, max_backoff=60.0)
        runner.register(EXPIRE_KIND, self.expire, backoff=5.0, max_backoff=300.0)

    async def run(self, job: Job) -> Outcome:
        export_id = str(job.payload["export"])
        async with self.pool.acquire() as conn, conn.transaction():
            export = await store.get(conn, export_id, lock=True)
            if export is None or export.state not in store.ACTIVE:
                return Done()
            if export.state == "queued" and not await store.start_if_room(
                conn, export, self.settings.export_concurrency
            ):
                return Retry(delay=QUEUED_RECHECK, error="queued behind the client's running exports")
        ends = time.monotonic() + SLICE_SECONDS
        try:
            while time.monotonic() < ends:
                if await self.step(export_id):
                    self._forget(export_id)
                    return Done()
        except Exception as exc:
            # By type only (the statement may hold a client's filter values). A step that keeps
            # failing ends the export as failed: its status then answers 500 with the reason.
            failures = int(job.payload.get("failures", 0)) + 1
            error = f"internal error {type(exc).__name__}"
            logger.error("export %s: step failed (%s), failure %s", export_id, type(exc).__name__, failures)
            if failures >= MAX_FAILURES:
                async with self.pool.acquire() as conn:
                    await store.finish(conn, export_id, "failed", error)
                self._forget(export_id)
                return Failed(error=error)
            return Retry(error=error, payload={"failures": failures})
        return Retry(delay=0, payload={"failures": 0})

    def _forget(self, export_id: str) -> None:
        for key in [k for k in self._queries if k[0] == export_id]:
            del self._queries[key]

    def _query(self, export: store.Export, position: int, kind: str, resource_type: str) -> BatchQuery:
        key = (export.id, position)
        query = self._queries.get(key)
        if query is None:
            parameters = export.parameters
            since = parameters.get("since")
            query = batch_query(
                resource_type,
                kind=kind,
                access=access_from_record(export.access),
                fhir_base=self.settings.fhir_base,
                limits=self.limits,
                type_filters=[
                    [(str(k), str(v)) for k, v in pairs]
                    for pairs in parameters.get("type_filters", {}).get(resource_type, [])
                ],
                since=datetime.fromisoformat(since) if since else None,
                patients=parameters.get("patients"),
                compartment=bool(parameters.get("compartment")),
                strict=False,
            )
            if len(self._queries) >= QUERY_CACHE_SIZE:
                self._queries.clear()  # exports finished by other processes leave theirs here
            self._queries[key] = query
        return query

    async def step(self, export_id: str) -> bool:
        """Write the next chunk and its checkpoint (one transaction); True when the export ended."""
        settings = self.settings
        async with self.pool.acquire() as conn, conn.transaction():
            export = await store.get(conn, export_id, lock=True)
            if export is None or export.state != "running":
                return True
            parameters = export.parameters
            progress = dict(export.progress)
            issues = parameters.get("issues") or []
            if issues and not progress.get("errors_written"):
                outcome = {"resourceType": "OperationOutcome", "issue": issues}
                await store.write_chunk(
                    conn,
                    self.export_dir,
                    export_id,
                    kind="error",
                    resource_type="OperationOutcome",
                    part=1,
                    chunk=0,
                    count=1,
                    body=json.dumps(outcome, separators=(",", ":")) + "\n",
                )
                progress["errors_written"] = True
                await store.checkpoint(conn, export_id, progress, 0)
                return False
            steps = plan(parameters)
            position = int(progress.get("step", 0))
            if position >= len(steps):
                await store.finish(conn, export_id, "completed")
                metrics.EXPORTS_COMPLETED.inc()
                logger.info("export %s completed (%s resources)", export_id, export.resources_total)
                return True
            kind, resource_type = steps[position]
            query = self._query(export, position, kind, resource_type)
            part = int(progress.get("part", 1))
            chunk = int(progress.get("chunk", 0))
            in_part = int(progress.get("in_part", 0))
            after = int(progress.get("after", 0))
            limit = max(1, min(settings.export_chunk_resources, settings.export_file_max_resources - in_part))
            xmin = int(export.snapshot.split(":", 1)[0])
            values = query.values(export.snapshot, xmin, after, limit)
            elements = _elements_for(parameters.get("elements") or [], resource_type)
            if kind == "output" and not elements and self.export_dir is None:
                # The common case: the chunk is assembled from the stored bodies and written
                # inside PostgreSQL; the bytes never travel to this process.
                count, last = await store.write_chunk_in_database(
                    conn, query.sql, values, export_id, resource_type=resource_type, part=part, chunk=chunk
                )
                self._advance(progress, position, count, last, limit, part, chunk, in_part)
                await store.checkpoint(conn, export_id, progress, count)
                metrics.RESOURCES_EXPORTED.inc(count)
                return False
            rows = await conn.fetch(query.sql, *values)
            listed = rows
            if query.judged_compartment:
                listed = [
                    row
                    for row in rows
                    if was_in_compartment(resource_type, row["last_body"], query.patients, settings.fhir_base)
                ]
            if listed:
                if kind == "deleted":
                    lines = [_deleted_line(resource_type, row["fhir_id"]) for row in listed]
                else:
                    lines = (
                        [subset(row["body"], resource_type, summary=None, elements=elements) for row in rows]
                        if elements
                        else [row["body"] for row in rows]
                    )
                lines.append("")
                await store.write_chunk(
                    conn,
                    self.export_dir,
                    export_id,
                    kind=kind,
                    resource_type=resource_type,
                    part=part,
                    chunk=chunk,
                    count=len(listed),
                    body="\n".join(lines),
                )
            last = rows[-1]["rid"] if rows else None
            self._advance(progress, position, len(rows), last, limit, part, chunk, in_part)
            await store.checkpoint(conn, export_id, progress, len(listed))
        metrics.RESOURCES_EXPORTED.inc(len(listed))
        return False

    def _advance(
        self,
        progress: dict[str, Any],
        position: int,
        count: int,
        last: int | None,
        limit: int,
        part: int,
        chunk: int,
        in_part: int,
    ) -> None:
        """The checkpoint after a batch of ``count`` rows up to ``rid`` ``last``: the next type
        when the batch was short, the next file when this one is full, else the next chunk."""
        if count < limit:
            progress.update(step=position + 1, after=0, part=1, chunk=0, in_part=0)
        elif in_part + count >= self.settings.export_file_max_resources:
            progress.update(after=last, part=part + 1, chunk=0, in_part=0)
        else:
            progress.update(after=last, chunk=chunk + 1, in_part=in_part + count)

    async def expire(self, job: Job) -> Outcome:
        """Delete an export and its files once its retention ended (``CARECOORD_EXPORT_RETENTION``)."""
        export_id = str(job.payload["export"])
        async with self.pool.acquire() as conn, conn.transaction():
            export = await store.get(conn, export_id, lock=True)
            if export is None:
                return Done()
            if export.expires_at.timestamp() > time.time():
                return Retry(at=export.expires_at)
            await store.remove(conn, export_id, self.export_dir)
        logger.info("export %s expired and was removed", export_id)
        return Done()
