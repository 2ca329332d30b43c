"""create_app(): lifespan, routers, error handlers. Nothing else."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import db
from app.audit.store import ensure_partitions
from app.auth.audit import AuditTrail
from app.auth.authorize import AuthorizationEndpoint
from app.auth.server import AuthorizationServer
from app.auth.tokens import build_token_service
from app.auth.upstream import UpstreamProvider
from app.background import background_tasks
from app.cancellation import CancelOnDisconnect
from app.casework.loader import load_questionnaires
from app.exports import router as export_router
from app.fhir.capability import SOFTWARE_VERSION
from app.fhir.cursors import load_cursor_codec
from app.fhir.errors import Issue, install_error_handlers, outcome_response
from app.fhir.repository import RepositoryFactory
from app.hooks import write_hooks
from app.logs import RequestIdMiddleware, configure_logging
from app.metrics import RequestMetricsMiddleware
from app.openapi import install_openapi
from app.outbound import outbound_client
from app.routers import auth, fhir, health, metadata
from app.settings import Settings, get_settings
from app.subscriptions import websocket as subscription_websocket
from app.subscriptions.websocket import SocketHub

logger = logging.getLogger("carecoord")

EXPOSED_HEADERS = [
    "Location",
    "Content-Location",
    "ETag",
    "Last-Modified",
    "X-Request-ID",
    "X-Progress",
    "Retry-After",
]
"""Response headers a browser app may read (FHIR http.html: Location, ETag, Last-Modified...)."""

GC_THRESHOLDS = (20_000, 20, 100)
"""The cyclic garbage collector's thresholds while serving (Python's default: 700, 10, 10)."""

DOCS_STATIC_URL = "/docs/static"
"""Where the Swagger UI and ReDoc assets (from the fastapi-offline package) are served."""


class UnexpectedErrorMiddleware:
    """Turn any exception that escaped the handlers into a 500 OperationOutcome.

    Only the exception type is logged: messages and tracebacks can carry resource
    content (PHI), and the response says nothing about internals.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.error("unexpected %s on %s %s", type(exc).__name__, scope.get("method"), scope.get("path"))
            if not started:
                response = outcome_response(
                    500, [Issue("exception", "internal server error", severity="fatal")]
                )
                await response(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Each process builds its app here (uvicorn --workers calls this factory in every worker):
    # one log format everywhere, uvicorn's loggers included (app/logs.py).
    configure_logging(settings.log_format, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await db.create_pool(settings)
        app.state.cursors = await load_cursor_codec(app.state.pool)
        # One outgoing HTTP client per process (JWKS fetches, partner calls), under the outbound
        # address policy: those URLs come from clients and partners (SSRF, app/outbound.py).
        app.state.http = outbound_client(settings)
        try:
            app.state.tokens = await build_token_service(settings, app.state.pool, app.state.http)
            app.state.repositories = RepositoryFactory.from_settings(settings, write_hooks(settings))
            # The screening Questionnaires carecoord ships (AHC HRSN), created once (conditional).
            await load_questionnaires(app.state.pool, app.state.repositories)
            app.state.audit = AuditTrail(
                app.state.pool,
                app.state.repositories,
                enabled=settings.audit_enabled,
                buffer_size=settings.audit_buffer_size,
                flush_interval=settings.audit_flush_interval,
            )
            # This month's audit partition and the next ones exist before the first write
            # (the maintenance job keeps creating them ahead, app/audit/jobs.py).
            async with app.state.pool.acquire() as connection:
                await ensure_partitions(connection)
            app.state.oauth = AuthorizationServer(
                settings=settings, pool=app.state.pool, tokens=app.state.tokens, audit=app.state.audit
            )
            # SMART App Launch: the authorization endpoint and its sign-in pages.
            app.state.authorize = AuthorizationEndpoint(
                settings=settings,
                pool=app.state.pool,
                audit=app.state.audit,
                # Optional: people sign in at a trusted OpenID Connect provider (CARECOORD_OIDC_*).
                upstream=UpstreamProvider.from_settings(settings, app.state.http, app.state.tokens.jwks),
            )
            # The websocket channel's LISTEN connection, opened at the first binding.
            app.state.ws_hub = SocketHub(app.state.pool, settings, app.state.repositories)
            app.state.audit.start()
            # Garbage collection was ~0.25 ms of CPU per request, and each full collection a
            # ~200 ms stall of every request in flight: it walked the ~230,000 objects start-up
            # built (modules, FHIR models, routes), which live as long as the process, and ran
            # every 700 allocations while a request makes hundreds that die young. Frozen, they
            # are no longer walked; with the larger first threshold most of a request's objects
            # are freed by reference counting before any collection looks at them (issue 14).
            gc.collect()
            gc.freeze()
            thresholds = gc.get_threshold()
            gc.set_threshold(*GC_THRESHOLDS)
            try:
                async with contextlib.AsyncExitStack() as background:
                    if settings.run_worker:
                        await background.enter_async_context(
                            background_tasks(app.state.pool, app.state.http, settings, app.state.repositories)
                        )
                    yield
            finally:
                # An app torn down in a longer-lived process (tests) leaves it as it found it.
                gc.set_threshold(*thresholds)
                gc.unfreeze()
                await app.state.ws_hub.close()
                await app.state.audit.close()
        finally:
            await app.state.http.aclose()
            await app.state.pool.close()

    # Swagger UI (/docs) and ReDoc (/redoc) with their assets served from the installed
    # fastapi-offline package under /docs/static: the docs work on a network without CDN access.
    app = FastAPIOffline(
        title="carecoord",
        version=SOFTWARE_VERSION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url="/redoc",
        static_url=DOCS_STATIC_URL,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(CancelOnDisconnect)
    # Outside the 500s of UnexpectedErrorMiddleware: every answered status is counted.
    app.add_middleware(RequestMetricsMiddleware)
    # Added last, so outermost: the request id is set before anything logs and is returned on
    # every response, the 500s of UnexpectedErrorMiddleware included.
    app.add_middleware(RequestIdMiddleware)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        # CapabilityStatement.rest.security.cors: browser apps (SMART apps, apps built from the
        # OpenAPI document) call /fhir and /auth/token from their own origin. Outermost, so that
        # error answers carry the headers too and the app can read their OperationOutcome.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    # First: the everyday FHIR interactions, for paths no other route serves (app/routers/fhir.py).
    app.include_router(fhir.hot_router)
    app.include_router(health.router)
    app.include_router(metadata.router)
    # Before the FHIR routes: their /fhir/{type}/{id} would take /fhir/.well-known/smart-configuration.
    app.include_router(auth.router)
    # Before the FHIR routes (which take only HTTP requests): the websocket channel's endpoint.
    app.include_router(subscription_websocket.router)
    app.include_router(export_router.router)
    app.include_router(fhir.router)
    app.include_router(fhir.unsupported_routes())
    install_openapi(app)
    return app
