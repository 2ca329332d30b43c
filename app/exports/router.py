"""Status polling, cancellation and file download of Bulk Data exports (Bulk Data Access IG
v2.0.0 export.html#bulk-data-status-request, #bulk-data-delete-request,
#bulk-data-output-file-request).

``/bulkstatus/{id}`` and ``/bulkfiles/{id}/{file}`` sit under the server's base URL and take the
same bearer token as the FHIR API. Only the client that started an export sees it: to any
other client (and after cancellation or expiry) it does not exist (404). The answers:

- in progress: 202 with ``X-Progress`` and ``Retry-After``; a client polling faster than half
  of ``CARECOORD_EXPORT_POLL_INTERVAL`` gets 429 with ``Retry-After``;
- failed: 500 with an OperationOutcome;
- complete: 200 with the manifest (``transactionTime``, ``request``, ``requiresAccessToken``,
  ``output``, ``deleted``, ``error``) and ``Expires``;
- ``DELETE``: 202, the export and its files are removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from app.deps import AccessDep
from app.exports import store
from app.exports.jobs import plan
from app.fhir.access import AccessContext
from app.fhir.errors import FHIRError, NotFound
from app.fhir.repository import fhir_instant

router = APIRouter(tags=["Bulk Data"])

NDJSON = "application/fhir+ndjson"
_FILE_NAME = "{kind}-{type}-{part}.ndjson"
_STATUS_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No or invalid bearer token"},
    404: {"description": "No such export for this client (or cancelled, or expired)"},
    429: {"description": "Polled faster than the server allows; see Retry-After"},
}


@dataclass
class TooManyRequests(FHIRError):
    status: int = 429
    code: str = "throttled"


async def _owned(request: Request, access: AccessContext, export_id: str) -> store.Export:
    """The export, when the caller is who started it and it has not expired; else 404.

    "Who" is the whole access context stored at kick-off, not only the client id: two people
    signed in to one app share its client id, and a trusted external issuer's token may name a
    client id that is also registered here (Bulk Data IG: only the requester reads the files)."""
    async with request.app.state.pool.acquire() as conn:
        export = await store.get(conn, export_id[:64])
    if export is None or export.expires_at <= datetime.now(UTC) or not _same_caller(export, access):
        raise NotFound(f"no export {export_id[:64]}")
    return export


def _same_caller(export: store.Export, access: AccessContext) -> bool:
    if access.unrestricted:
        return True
    started = export.access
    return (
        not access.external
        and not started.get("external")
        and export.client_id == access.client_id
        and started.get("user") == access.user
        and started.get("patient") == access.patient
        and started.get("organization") == access.organization
    )


def _progress(export: store.Export) -> str:
    if export.state == "queued":
        return "queued: waiting for the client's other exports to finish"
    steps = plan(export.parameters)
    position = min(int(export.progress.get("step", 0)), len(steps))
    current = f", now {steps[position][0]} {steps[position][1]}" if position < len(steps) else ""
    return (
        f"running: step {position + 1} of {len(steps)}, {export.resources_total} resources written{current}"
    )


@router.get(
    "/bulkstatus/{export_id}",
    operation_id="bulk_export_status",
    summary="Bulk Data export status: 202 while running, 200 with the manifest when complete",
    response_class=Response,
    responses=_STATUS_ERRORS,
)
async def export_status(request: Request, export_id: str, access: AccessDep) -> Response:
    export = await _owned(request, access, export_id)
    settings = request.app.state.settings
    interval = settings.export_poll_interval
    retry_after = str(max(1, round(interval)))
    if export.state in store.ACTIVE:
        async with request.app.state.pool.acquire() as conn:
            previous = await store.polled(conn, export.id)
        if previous is not None and (datetime.now(UTC) - previous).total_seconds() < interval / 2:
            raise TooManyRequests(
                f"polled too often: wait {retry_after} s between status requests",
                headers={"Retry-After": retry_after},
            )
        return Response(
            status_code=202, headers={"X-Progress": _progress(export), "Retry-After": retry_after}
        )
    if export.state != "completed":
        raise FHIRError(
            f"the export {export.state}: {export.error or 'see the server log'}", status=500, code="exception"
        )
    async with request.app.state.pool.acquire() as conn:
        entries = await store.files(conn, export.id)

    def listed(kind: str) -> list[dict[str, Any]]:
        out = []
        for entry in entries:
            if entry.kind != kind:
                continue
            name = _FILE_NAME.format(kind=entry.kind, type=entry.resource_type, part=entry.part)
            shown = "Bundle" if kind == "deleted" else entry.resource_type
            out.append(
                {
                    "type": shown,
                    "url": f"{settings.base_url}/bulkfiles/{export.id}/{name}",
                    "count": entry.count,
                }
            )
        return out

    manifest = {
        "transactionTime": fhir_instant(export.transaction_time),
        "request": export.request_url,
        "requiresAccessToken": True,
        "output": listed("output"),
        "deleted": listed("deleted"),
        "error": listed("error"),
    }
    return Response(
        json.dumps(manifest),
        media_type="application/json",
        headers={"Expires": format_datetime(export.expires_at.astimezone(UTC), usegmt=True)},
    )


@router.delete(
    "/bulkstatus/{export_id}",
    operation_id="bulk_export_cancel",
    summary="Cancel a Bulk Data export and delete its files",
    status_code=202,
    response_class=Response,
    responses=_STATUS_ERRORS,
)
async def export_cancel(request: Request, export_id: str, access: AccessDep) -> Response:
    export = await _owned(request, access, export_id)
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        await store.remove(conn, export.id, request.app.state.settings.export_dir)
    return Response(status_code=202)


@router.get(
    "/bulkfiles/{export_id}/{file_name}",
    operation_id="bulk_export_file",
    summary="One NDJSON file of a completed Bulk Data export",
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON: {}}, "description": "NDJSON"}, **_STATUS_ERRORS},
)
async def export_file(request: Request, export_id: str, file_name: str, access: AccessDep) -> Response:
    export = await _owned(request, access, export_id)
    if export.state != "completed":
        raise NotFound(f"no file {file_name[:80]}")
    async with request.app.state.pool.acquire() as conn:
        entries = await store.files(conn, export.id)
    entry = next(
        (
            e
            for e in entries
            if _FILE_NAME.format(kind=e.kind, type=e.resource_type, part=e.part) == file_name
        ),
        None,
    )
    if entry is None:
        raise NotFound(f"no file {file_name[:80]}")
    settings = request.app.state.settings
    body = store.read_file(request.app.state.pool, settings.export_dir, export.id, entry)
    return StreamingResponse(body, media_type=NDJSON)
