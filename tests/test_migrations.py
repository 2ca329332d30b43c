"""The Alembic migrations create exactly the schema the SQLModel tables describe."""

from __future__ import annotations

from alembic.config import Config

from alembic import command
from app.db import REPO_ROOT


def test_models_and_migrations_agree(database_url: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "alembic"))
    config.attributes["database_url"] = database_url
    command.check(config)  # raises when an autogenerate diff exists


def test_backfill_indexes_the_grants_of_referrals_stored_before_0006(database_url: str) -> None:
    """Revisions 0010 and 0011 give Tasks and ServiceRequests written before their references
    were indexed the ``_grant`` rows a partner's read access depends on, and only those."""
    import asyncio
    import json
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    parts = urlsplit(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    name = f"carecoord_backfill_{uuid.uuid4().hex[:8]}"
    admin = urlunsplit(parts)
    target = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    task = {
        "resourceType": "Task",
        "id": "t-old",
        "status": "requested",
        "intent": "order",
        "for": {"reference": "Patient/p-old"},
        "focus": {"reference": "ServiceRequest/sr-old"},
        "input": [{"type": {"text": "consent"}, "valueReference": {"reference": "Consent/c-old"}}],
        "owner": {"reference": "https://elsewhere.example/Organization/x"},
    }

    async def admin_sql(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def store_old_task() -> None:
        conn = await asyncpg.connect(target)
        try:
            await conn.execute(
                "INSERT INTO resource (resource_type, fhir_id, version_id, last_updated, deleted, body)"
                " VALUES ('Task', 't-old', 1, now(), false, $1)",
                json.dumps(task),
            )
        finally:
            await conn.close()

    async def indexed() -> set[tuple[str, str]]:
        conn = await asyncpg.connect(target)
        try:
            rows = await conn.fetch(
                "SELECT target_type, target_id FROM search_reference WHERE param = '_grant'"
            )
            return {(row["target_type"], row["target_id"]) for row in rows}
        finally:
            await conn.close()

    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        config = Config()
        config.set_main_option("script_location", str(REPO_ROOT / "alembic"))
        config.attributes["database_url"] = target.replace("postgresql://", "postgresql+asyncpg://", 1)
        command.upgrade(config, "0009")
        asyncio.run(store_old_task())
        command.upgrade(config, "head")
        # The elements a referral grants through (Task.for, Task.focus), not Task.input (issue 15).
        assert asyncio.run(indexed()) == {("Patient", "p-old"), ("ServiceRequest", "sr-old")}
    finally:
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
