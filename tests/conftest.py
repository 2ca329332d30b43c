"""Test fixtures: a real PostgreSQL, migrations applied, the app over ASGI.

With ``DATABASE_URL`` set (CI: PostgreSQL 15 on 127.0.0.1) the tests create a fresh
database on that server for the session; without it they start the embedded
PostgreSQL in a temporary directory, as ``carecoord serve`` would.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app import db
from app.main import create_app
from app.settings import Settings

BASE_URL = "http://cc.test"
TEST_SECRET_KEY = "carecoord-tests-partner-secrets"
FHIR = f"{BASE_URL}/fhir"
LOOPBACK_ALLOWLIST = "127.0.0.0/8,::1/128,localhost"
"""CARECOORD_OUTBOUND_ALLOWLIST of the tests' servers (and of the partner subprocesses)."""


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated database used by this test session, dropped at the end."""
    server_url = Settings().database_url
    if server_url is None:
        # The embedded PostgreSQL (about 120 MB of cluster): stopped and removed at the end.
        tmp = Path(tempfile.mkdtemp(prefix="carecoord-test-"))
        try:
            url = db.embedded_database_url(tmp)
            db.run_migrations(url)
            yield url
        finally:
            db.stop_embedded()
            shutil.rmtree(tmp, ignore_errors=True)
        return
    name = f"carecoord_test_{uuid.uuid4().hex[:8]}"
    admin = _plain(server_url)

    import asyncio

    async def admin_sql(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    base, _, _ = server_url.rpartition("/")
    url = f"{base}/{name}"
    db.run_migrations(url)
    yield url
    asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        base_url=BASE_URL,
        max_body_bytes=64 * 1024,
        attachment_max_bytes=16 * 1024,  # below the body limit, so the attachment limit is what refuses
        # Referral tests run their workers themselves (tests/test_referrals.py), with short delays.
        run_worker=False,
        referral_poll_interval=0.5,
        delivery_backoff=0.2,
        delivery_timeout=3,
        worker_lease=3,
        secret_key=TEST_SECRET_KEY,
        # The partner, JWKS and misbehaving servers of the tests listen on loopback, which the
        # production default refuses (app/outbound.py); tests of that default build their own.
        outbound_allowlist=LOOPBACK_ALLOWLIST,
        # The failed /auth request counts live in the database, shared by every app of the session,
        # and many tests fail on purpose from the same test address: the tests of those limits
        # build their own app with a small limit (and forget_auth_failures first).
        auth_failure_limit=10_000,
    )


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url, pool_size=20, max_overflow=40)
    yield engine
    await engine.dispose()


@pytest.fixture
async def clean_db(engine: AsyncEngine) -> None:
    """Start a test from empty resource tables (history and system-wide views need it)."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "TRUNCATE resource, resource_history, search_token, search_string, search_date,"
                " search_reference, search_quantity, search_uri, search_position, search_worklist, job,"
                " resource_change, change_cursor, subscription, audit_event, referral_version"
                " RESTART IDENTITY CASCADE"
            )
        )
        # The dispatcher keeps the subscriptions in memory until this number moves.
        await conn.execute(text("UPDATE subscription_generation SET generation = generation + 1"))


@pytest.fixture(scope="session")
async def app(settings: Settings, engine: AsyncEngine) -> AsyncIterator[FastAPI]:
    """The application with its lifespan running (pool, signing keys, audit trail)."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


async def forget_auth_failures(app: FastAPI) -> None:
    """Start a test of the failed-request limits (app/auth/ratelimit.py) from no failures: the
    counts are in the database, and other tests' failures from the same address would count."""
    await app.state.pool.execute("DELETE FROM auth_request_failure")


FULL_ACCESS = "system/*.cruds"


async def register_test_client(
    app: FastAPI,
    client_id: str,
    scope: str = FULL_ACCESS,
    *,
    organization: str | None = None,
    patient: str | None = None,
) -> None:
    """Make ``client_id`` a registered client (idempotent: an existing row is kept), so that the
    tokens tests issue it directly verify (our tokens verify only while their client is
    registered). No secret and no keys: it cannot authenticate at /auth/token."""
    await app.state.pool.execute(
        "INSERT INTO oauth_client (client_id, name, scopes, organization, patient)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (client_id) DO NOTHING",
        client_id,
        f"test client {client_id}",
        scope,
        organization,
        patient,
    )


async def bearer(app: FastAPI, scope: str = FULL_ACCESS, **context: str | None) -> dict[str, str]:
    """An Authorization header with a token the server issued (as its token endpoint would)
    to ``client_id`` (default "test-client"), registered first."""
    client_id = context.pop("client_id", None) or "test-client"
    await register_test_client(
        app, client_id, scope, organization=context.get("organization"), patient=context.get("patient")
    )
    token, _ = await app.state.tokens.issue(client_id=client_id, scope=scope, **context)
    return {"authorization": f"Bearer {token}"}


HOME_ORGANIZATION = "Organization/cm"


@pytest.fixture
async def home_client(app: FastAPI, settings: Settings, clean_db: None) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the case-management organisation's own carecoord: a second app on the test
    database with CARECOORD_ORGANIZATION=Organization/cm, so its system-level clients act for cm
    (the Task state machine's requester, the organisation partners refer clients back to).
    Requests without other headers carry a system/*.cruds token."""
    home = create_app(settings.model_copy(update={"organization": HOME_ORGANIZATION}))
    transport = httpx.ASGITransport(app=home)
    async with (
        home.router.lifespan_context(home),
        httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http,
    ):
        http.headers["accept"] = "application/fhir+json"
        http.headers.update(await bearer(app))
        yield http


@pytest.fixture(scope="session")
async def app_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        client.headers["accept"] = "application/fhir+json"
        yield client


@pytest.fixture
async def client(app: FastAPI, app_client: httpx.AsyncClient, clean_db: None) -> httpx.AsyncClient:
    """A client of a system/*.cruds backend service (a fresh token per test: tokens expire)."""
    app_client.headers.update(await bearer(app))
    return app_client


async def count_rows(engine: AsyncEngine, table: str = "resource_history") -> int:
    """Rows of clinical data in ``table``: AuditEvents, written for every interaction
    (failed ones included, asynchronously), are not what these counts are about."""
    async with engine.connect() as conn:
        sql = f"SELECT count(*) FROM {table} WHERE resource_type <> 'AuditEvent'"
        return int((await conn.execute(text(sql))).scalar_one())


async def wait_until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``check`` (a function, or one returning an awaitable) until it returns something
    truthy, and return that; fail the test when it never does. Races are waited for with this,
    never with a fixed sleep: a slow machine makes a sleep too short, a fast one wastes it."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


os.environ.setdefault("CARECOORD_LOG_LEVEL", "warning")
