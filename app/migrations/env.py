"""Alembic environment: async, URL from carecoord's Settings (or the caller).

Package data of carecoord (app/migrations): ``carecoord migrate`` and ``serve`` run it from the
installed package (app/db.py, run_migrations); ``alembic`` in the repository finds it through
alembic.ini.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from alembic import context
from app.auth import storage as auth_storage  # noqa: F401  (registers the auth tables)
from app.casework import storage as casework_storage  # noqa: F401  (registers referral_version)
from app.events import storage as event_storage  # noqa: F401  (registers the change feed)
from app.exports import table as export_table  # noqa: F401  (registers the Bulk Data export tables)
from app.fhir import storage  # noqa: F401  (registers the resource store and search index)
from app.jobs import table as job_table  # noqa: F401  (registers the job table)
from app.referrals import storage as referral_storage  # noqa: F401  (registers partner_credentials)
from app.settings import get_settings
from app.subscriptions import storage as subscription_storage  # noqa: F401  (registers subscriptions)

target_metadata = SQLModel.metadata


def _url() -> str:
    url = context.config.attributes.get("database_url")
    if url:
        return str(url)
    from app.db import database_url

    return database_url(get_settings())


def _include(obj: object, name: str | None, kind: str, reflected: bool, compare_to: object) -> bool:
    # The trigram index exists only where pg_trgm could be installed (migration 0002).
    if kind == "index" and name == "ix_search_string_trgm":
        return False
    # The audit store is a partitioned table (migration 0019) whose monthly partitions the server
    # creates and drops at run time (app/audit/store.py): not described by a model.
    table = getattr(obj, "table", obj) if kind == "index" else obj
    table_name = getattr(table, "name", name) or ""
    return not (kind in ("table", "index") and table_name.startswith("audit_event"))


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection, target_metadata=target_metadata, compare_type=True, include_object=_include
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url())
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
