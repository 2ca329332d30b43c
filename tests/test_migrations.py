"""The Alembic migrations create exactly the schema the SQLModel tables describe."""

from __future__ import annotations

from alembic import command
from app.db import MIGRATIONS_DIR, alembic_config


def test_models_and_migrations_agree(database_url: str) -> None:
    command.check(alembic_config(database_url))  # raises when an autogenerate diff exists


def test_migrations_ship_in_the_package() -> None:
    """The migrations are package data (app/migrations), found without the source tree."""
    assert MIGRATIONS_DIR.parent.name == "app"
    assert (MIGRATIONS_DIR / "env.py").is_file() and (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert len(list((MIGRATIONS_DIR / "versions").glob("0*.py"))) >= 12


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
        config = alembic_config(target.replace("postgresql://", "postgresql+asyncpg://", 1))
        command.upgrade(config, "0009")
        asyncio.run(store_old_task())
        command.upgrade(config, "head")
        # The elements a referral grants through (Task.for, Task.focus), not Task.input (issue 15).
        assert asyncio.run(indexed()) == {("Patient", "p-old"), ("ServiceRequest", "sr-old")}
    finally:
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_referral_jobs_move_to_the_job_table(database_url: str) -> None:
    """Revision 0013 moves every referral_job row (active or finished) into ``job`` with the
    kind ``referral.<kind>``, the Task id as key and the payload {task_id, partner_org,
    partner_endpoint, partner_task, copies}; leases, attempts and outcomes stay; new jobs get
    new ids; referral_job is gone."""
    import asyncio
    import json
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    parts = urlsplit(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    name = f"carecoord_jobs_{uuid.uuid4().hex[:8]}"
    admin = urlunsplit(parts)
    target = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))

    async def sql(statement: str, *args: object, database: str = target) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database)
        try:
            return list(await conn.fetch(statement, *args))
        finally:
            await conn.close()

    asyncio.run(sql(f'CREATE DATABASE "{name}"', database=admin))
    try:
        config = alembic_config(target.replace("postgresql://", "postgresql+asyncpg://", 1))
        command.upgrade(config, "0011")
        asyncio.run(
            sql(
                "INSERT INTO referral_job (kind, task_id, partner_org, partner_endpoint, state,"
                " attempts, lease_until, leased_by, deadline, partner_task, last_status, last_error,"
                " copies, finished_at)"
                " VALUES ('deliver', 't1', 'org1', 'ep1', 'done', 2, NULL, NULL, now(),"
                "         'https://p.example/fhir/Task/9', 200, NULL, 0, now()),"
                "        ('track', 't1', 'org1', 'ep1', 'leased', 3, now() + interval '1 minute', 'w1',"
                "         now() + interval '3 days', 'https://p.example/fhir/Task/9', 503, 'busy', 4, NULL),"
                "        ('deliver', 't2', 'org2', 'ep2', 'paused', 1, NULL, NULL, now(), NULL, NULL,"
                "         'address changed', 0, NULL)"
            )
        )
        command.upgrade(config, "head")
        rows = asyncio.run(sql("SELECT * FROM job ORDER BY id"))
        moved = [
            (r["id"], r["kind"], r["key"], r["state"], r["attempts"], r["leased_by"], r["last_status"])
            for r in rows
        ]
        assert moved == [
            (1, "referral.deliver", "t1", "done", 2, None, 200),
            (2, "referral.track", "t1", "leased", 3, "w1", 503),
            (3, "referral.deliver", "t2", "paused", 1, None, None),
        ]
        assert json.loads(rows[1]["payload"]) == {
            "task_id": "t1",
            "partner_org": "org1",
            "partner_endpoint": "ep1",
            "partner_task": "https://p.example/fhir/Task/9",
            "copies": 4,
        }
        assert rows[1]["lease_until"] is not None and rows[1]["last_error"] == "busy"
        assert asyncio.run(sql("SELECT to_regclass('referral_job') AS t"))[0]["t"] is None
        added = asyncio.run(sql("INSERT INTO job (kind, payload) VALUES ('x', '{}') RETURNING id"))
        assert added[0]["id"] == 4
        # The active ones still count as active: a second paused delivery of t2 is refused.
        duplicate = asyncio.run(
            sql(
                "INSERT INTO job (kind, key, payload) VALUES ('referral.deliver', 't2', '{}')"
                " ON CONFLICT (kind, key) WHERE state IN ('pending', 'leased', 'paused') DO NOTHING"
                " RETURNING id"
            )
        )
        assert duplicate == []
        command.downgrade(config, "0011")
        back = asyncio.run(sql("SELECT kind, task_id, state, copies FROM referral_job ORDER BY id"))
        assert [tuple(r) for r in back] == [
            ("deliver", "t1", "done", 0),
            ("track", "t1", "leased", 4),
            ("deliver", "t2", "paused", 0),
        ]
    finally:
        asyncio.run(sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', database=admin))


async def test_processes_starting_together_migrate_a_fresh_database_once(database_url: str) -> None:
    """Replicas starting together on one database: `carecoord migrate` (and `serve`) take a
    session-level advisory lock around the upgrade, so one migrates and the others wait, then
    find the schema at head. The test holds the lock until both processes wait for it, so they
    really are at the same point together when it is released."""
    import asyncio
    import os
    import subprocess
    import sys
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg
    from alembic.script import ScriptDirectory

    from app.db import MIGRATION_LOCK
    from tests import REPO_ROOT

    parts = urlsplit(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    name = f"carecoord_race_{uuid.uuid4().hex[:8]}"
    admin_dsn = urlunsplit(parts)
    target = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()

    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    processes: list[subprocess.Popen[str]] = []
    try:
        holder = await asyncpg.connect(target)
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        env = {k: v for k, v in os.environ.items() if k != "CARECOORD_DATABASE_URL"}
        env.update({"DATABASE_URL": target, "CARECOORD_LOG_LEVEL": "info", "CARECOORD_LOG_FORMAT": "text"})
        for _ in range(2):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "migrate"],
                    env=env,
                    cwd=REPO_ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        waiting_sql = (
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = $1"
        )
        deadline = asyncio.get_running_loop().time() + 90
        while await admin.fetchval(waiting_sql, name) < 2:
            assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
            assert asyncio.get_running_loop().time() < deadline, "the migrations did not wait for the lock"
            await asyncio.sleep(0.1)
        await holder.close()  # releases the lock: both race for it now
        outputs = [await asyncio.to_thread(p.communicate, timeout=120) for p in processes]
        for process, (stdout, stderr) in zip(processes, outputs, strict=True):
            assert process.returncode == 0, stderr
            assert stdout.strip() == "migrations applied"
            assert "Traceback" not in stderr and "ERROR" not in stderr
            assert "another process is migrating" in stderr
            # Alembic's INFO lines ("Context impl", "Running upgrade ...") are off on commands.
            assert "Running upgrade" not in stderr and "Context impl" not in stderr
        migrated = [stderr for _, stderr in outputs if f"database migrated from empty to {head}" in stderr]
        assert len(migrated) == 1, [stderr for _, stderr in outputs]
        conn = await asyncpg.connect(target)
        try:
            versions = await conn.fetch("SELECT version_num FROM alembic_version")
            assert [row["version_num"] for row in versions] == [head]
        finally:
            await conn.close()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
