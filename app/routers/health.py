"""Liveness and readiness probes, and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app import metrics
from app.exports import metrics as export_metrics
from app.referrals import metrics as referral_metrics
from app.subscriptions import metrics as subscription_metrics

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="The database answers",
    responses={503: {"description": "database unavailable"}},
)
async def readyz(request: Request) -> JSONResponse:
    try:
        await request.app.state.pool.fetchval("SELECT 1")
    except Exception:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics (HTTP requests, referral delivery, subscription notifications, Bulk Data"
    " exports, audit buffer), aggregated over the server's processes",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format"}},
)
async def prometheus_metrics(request: Request) -> Response:
    async with request.app.state.pool.acquire() as conn:
        await referral_metrics.refresh(conn)
        await subscription_metrics.refresh(conn)
        await export_metrics.refresh(conn)
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
