"""The audit store (issue 14): AuditEvents in their own partitioned table, written in the
write's transaction or buffered and COPYed, read and searched through the read-only adapter."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from fastapi import FastAPI

from alembic import command
from app.audit import store
from app.auth.audit import AuditTrail, build_event
from app.db import alembic_config
from app.fhir.access import AccessContext
from tests.conftest import bearer, wait_until
from tests.server_support import running_server

JSON = {"content-type": "application/fhir+json"}
AUDITOR = "system/AuditEvent.rs"


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


async def _search(client: httpx.AsyncClient, headers: dict[str, str], **params: str) -> list[dict[str, Any]]:
    response = await client.get("/fhir/AuditEvent", params={"_count": "1000", **params}, headers=headers)
    assert response.status_code == 200, response.text[:300]
    return _entries(response.json())


async def test_every_interaction_is_one_event_in_the_audit_store(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    created = await client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=JSON)
    patient = created.json()["id"]
    # dr1's caseload: a practitioner's token sees the Patients of its active CareTeams (issue 11).
    team = {
        "resourceType": "CareTeam",
        "status": "active",
        "subject": {"reference": f"Patient/{patient}"},
        "participant": [{"member": {"reference": "Practitioner/dr1"}}],
    }
    assert (await client.post("/fhir/CareTeam", json=team, headers=JSON)).status_code == 201
    reader = await bearer(app, "user/Patient.rs", client_id="store-reader", fhir_user="Practitioner/dr1")
    assert (await client.get(f"/fhir/Patient/{patient}", headers=reader)).status_code == 200
    assert (await client.get("/fhir/Patient", params={"_id": patient}, headers=reader)).status_code == 200
    assert (await client.get("/fhir/Observation/x", headers=reader)).status_code == 403
    assert (await client.get("/fhir/Patient/none", headers=reader)).status_code == 404
    await app.state.audit.flush()
    auditor = await bearer(app, AUDITOR, client_id="store-auditor")

    # Exactly one event per interaction, none of them in the clinical tables.
    by_reader = await _search(
        client, auditor, **{"agent:identifier": "urn:carecoord:oauth-client|store-reader"}
    )
    assert sorted((e["subtype"][0]["code"], e["outcome"]) for e in by_reader) == [
        ("read", "0"),
        ("read", "4"),
        ("read", "4"),
        ("search-type", "0"),
    ]
    assert (
        await app.state.pool.fetchval("SELECT count(*) FROM resource WHERE resource_type = 'AuditEvent'") == 0
    )
    assert (
        await app.state.pool.fetchval("SELECT count(*) FROM search_token WHERE resource_type = 'AuditEvent'")
        == 0
    )

    # Searchable by each R4 parameter.
    write = await _search(client, auditor, entity=f"Patient/{patient}", action="C")
    assert [e["subtype"][0]["code"] for e in write] == ["create"]
    assert len(await _search(client, auditor, patient=patient)) == 2  # the create and the read
    assert len(await _search(client, auditor, patient=f"Patient/{patient}", subtype="read")) == 1
    assert len(await _search(client, auditor, agent="Practitioner/dr1")) == 4
    assert len(await _search(client, auditor, agent="dr1", outcome="4")) == 2
    assert await _search(client, auditor, agent="Practitioner/dr1", outcome="8") == []
    # (The auditor's own searches are audited too: each check is limited to the reader's events.)
    reader_events = {"agent": "Practitioner/dr1"}
    search_type = "http://hl7.org/fhir/restful-interaction|search-type"
    assert len(await _search(client, auditor, subtype=search_type, **reader_events)) == 1
    assert len(await _search(client, auditor, subtype="http://hl7.org/fhir/restful-interaction|")) >= 5
    rest = "http://terminology.hl7.org/CodeSystem/audit-event-type|rest"
    everything = await _search(client, auditor, type=rest, **reader_events)
    assert len(everything) == 4, [(e["subtype"], e["outcome"], e["agent"]) for e in everything]
    assert await _search(client, auditor, type="other-code", **reader_events) == []
    assert len(await _search(client, auditor, site=urlsplit("http://cc.test").netloc, **reader_events)) == 4
    assert len(await _search(client, auditor, action="R,E", **reader_events)) == 4
    assert await _search(client, auditor, action="C", **reader_events) == []
    today = datetime.now(UTC).date()
    assert len(await _search(client, auditor, date=f"ge{today - timedelta(days=1)}", **reader_events)) == 4
    assert await _search(client, auditor, date=f"lt{today - timedelta(days=1)}", **reader_events) == []
    newest_first = [(e["recorded"], e["id"]) for e in everything]
    assert newest_first == sorted(newest_first, reverse=True)
    oldest_first = [
        (e["recorded"], e["id"]) for e in await _search(client, auditor, _sort="date", **reader_events)
    ]
    assert oldest_first == sorted(newest_first)

    # Read, vread and _id answer the event as recorded; there is one version and no history.
    event = write[0]
    assert (await client.get(f"/fhir/AuditEvent/{event['id']}", headers=auditor)).json() == event
    assert (await client.get(f"/fhir/AuditEvent/{event['id']}/_history/1", headers=auditor)).json() == event
    assert (
        await client.get(f"/fhir/AuditEvent/{event['id']}/_history/2", headers=auditor)
    ).status_code == 404
    assert [e["id"] for e in await _search(client, auditor, _id=event["id"])] == [event["id"]]
    history = await client.get(f"/fhir/AuditEvent/{event['id']}/_history", headers=auditor)
    assert history.status_code == 405 and history.json()["resourceType"] == "OperationOutcome"

    # Paging: keyset links, forwards and back, neither skipping nor repeating.
    seen: list[str] = []
    url: str | None = "/fhir/AuditEvent?_count=1&agent=Practitioner/dr1"
    pages = []
    while url:
        page = (await client.get(url.replace("http://cc.test", ""), headers=auditor)).json()
        pages.append(page)
        seen += [e["id"] for e in _entries(page)]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert seen == [e["id"] for e in everything] and len(pages) == 4
    previous = next(link["url"] for link in pages[2]["link"] if link["relation"] == "previous")
    back = (await client.get(previous.replace("http://cc.test", ""), headers=auditor)).json()
    assert [e["id"] for e in _entries(back)] == [e["id"] for e in _entries(pages[1])]
    counted = (await client.get("/fhir/AuditEvent?_summary=count&agent=dr1", headers=auditor)).json()
    assert counted["total"] == 4 and "entry" not in counted


async def test_clients_cannot_write_audit_events_and_unknown_parameters_are_reported(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    auditor = await bearer(app, "system/AuditEvent.cruds")
    forged = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "recorded": "2024-01-01T00:00:00Z",
        "agent": [{"requestor": True}],
        "source": {"observer": {"display": "x"}},
    }
    for response in (
        await client.post("/fhir/AuditEvent", json=forged, headers={**JSON, **auditor}),
        await client.put("/fhir/AuditEvent/x", json={**forged, "id": "x"}, headers={**JSON, **auditor}),
        await client.delete("/fhir/AuditEvent/x", headers=auditor),
    ):
        assert response.status_code == 405 and response.json()["resourceType"] == "OperationOutcome"
    lenient = (await client.get("/fhir/AuditEvent?agent-name=x", headers=auditor)).json()
    assert lenient["entry"][-1]["search"]["mode"] == "outcome"
    strict = await client.get(
        "/fhir/AuditEvent?agent-name=x", headers={**auditor, "prefer": "handling=strict"}
    )
    assert strict.status_code == 400
    bad_date = await client.get("/fhir/AuditEvent?date=yesterday", headers=auditor)
    assert bad_date.status_code == 400 and bad_date.json()["resourceType"] == "OperationOutcome"
    mixed = await client.get(
        "/fhir?_type=AuditEvent,Patient", headers=await bearer(app, "system/*.rs system/AuditEvent.rs")
    )
    assert mixed.status_code in (400, 403)


async def test_access_to_the_audit_trail_is_rendered_in_sql(app: FastAPI, client: httpx.AsyncClient) -> None:
    for pid in ("a1", "a2"):
        assert (
            await client.put(
                f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid}, headers=JSON
            )
        ).status_code == 201
    reader = await bearer(app, "system/Patient.r", client_id="access-reader")
    for pid in ("a1", "a2", "missing"):
        await client.get(f"/fhir/Patient/{pid}", headers=reader)
    await app.state.audit.flush()
    auditor = await bearer(app, AUDITOR)
    everything = await _search(client, auditor)
    # A patient's token sees only the events naming its patient, by search and by read.
    patient_a1 = await bearer(app, "patient/AuditEvent.rs", patient="a1", client_id="a1-app")
    own = await _search(client, patient_a1)
    assert own and all("a1" in e_patients(e) for e in own)
    assert {e["id"] for e in own} == {e["id"] for e in everything if "a1" in e_patients(e)}
    other = next(e for e in everything if "a2" in e_patients(e))
    assert (await client.get(f"/fhir/AuditEvent/{other['id']}", headers=patient_a1)).status_code == 404
    assert await _search(client, patient_a1, patient="a2") == []
    # A scope restriction is a condition like any other.
    failures = await bearer(app, "system/AuditEvent.rs?outcome=4")
    assert {e["outcome"] for e in await _search(client, failures)} == {"4"}
    # A wildcard does not reach the audit trail; a partner organisation sees none of it.
    assert (await client.get("/fhir/AuditEvent", headers=await bearer(app, "system/*.rs"))).status_code == 403
    partner = await bearer(app, AUDITOR, client_id="audit-partner", organization="Organization/o-p")
    assert await _search(client, partner) == []
    assert (await client.get(f"/fhir/AuditEvent/{other['id']}", headers=partner)).status_code == 404


def e_patients(event: dict[str, Any]) -> set[str]:
    refs = [e.get("what", {}).get("reference", "") for e in event.get("entity", [])]
    refs += [a.get("who", {}).get("reference", "") for a in event.get("agent", [])]
    return {r.split("/")[1] for r in refs if r.startswith("Patient/")}


async def test_a_full_buffer_holds_requests_back_until_the_database_catches_up(
    app: FastAPI, client: httpx.AsyncClient, database_url: str
) -> None:
    """With the audit table locked (a slow or stuck database), the buffer fills to its bound
    and the requests wait; released, every request completes and every event is written."""
    trail: AuditTrail = app.state.audit
    await client.put("/fhir/Patient/bp", json={"resourceType": "Patient", "id": "bp"}, headers=JSON)
    await trail.flush()
    bound, workers, per_worker = 20, 4, 25
    trail.buffer_size = bound
    locker = await asyncpg.connect(_plain(database_url))
    done = 0

    async def worker() -> None:
        nonlocal done
        for _ in range(per_worker):
            assert (await client.get("/fhir/Patient/bp")).status_code == 200
            done += 1

    try:
        transaction = locker.transaction()
        await transaction.start()
        # SHARE mode: COPY (ROW EXCLUSIVE) waits; reading the table still works.
        await locker.execute("LOCK TABLE audit_event IN SHARE MODE")
        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        await wait_until(lambda: trail.pending >= bound, "the buffer to reach its bound")
        held = await wait_until(
            lambda: _gauge(app, "carecoord_audit_requests_waiting") == workers, "every client to be held back"
        )
        assert held
        assert trail.pending <= bound + workers  # the bound, and one event per request already admitted
        assert done < workers * per_worker
        assert await locker.fetchval("SELECT count(*) FROM audit_event WHERE 'Patient/bp' = ANY(entity)") == 1
        await transaction.rollback()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        trail.buffer_size = app.state.settings.audit_buffer_size
        await locker.close()
    await trail.flush()
    reads = await app.state.pool.fetchval(
        "SELECT count(*) FROM audit_event WHERE 'Patient/bp' = ANY(entity) AND 'read' = ANY(subtype)"
    )
    assert reads == workers * per_worker


def _gauge(app: FastAPI, name: str) -> float:
    from app.referrals.metrics import REGISTRY

    value = REGISTRY.get_sample_value(name)
    return float(value or 0)


async def test_nothing_is_lost_when_the_server_is_stopped(
    app: FastAPI, client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    """A real server, SIGTERMed right after its requests were answered, with a flush interval
    longer than the test: the events still buffered are written at shutdown."""
    env = {"CARECOORD_AUTH_ENABLED": "false", "CARECOORD_AUDIT_FLUSH_INTERVAL": "60"}
    reads = 150
    with running_server(database_url, tmp_path, env=env) as server:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as http:
            created = await http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=JSON)
            patient = created.json()["id"]
            for _ in range(reads):
                assert (await http.get(f"/fhir/Patient/{patient}")).status_code == 200
            metrics = (await http.get("/metrics")).text
        buffered = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("carecoord_audit_buffered ")
        )
        assert buffered >= reads  # still in memory when the signal arrives
        server.process.send_signal(signal.SIGTERM)
        # uvicorn stops gracefully, then hands the signal back: 128 + SIGTERM (app/cli.py).
        assert await asyncio.to_thread(server.process.wait, 60) == 128 + signal.SIGTERM, server.log()[-2000:]
    count = await app.state.pool.fetchval(
        "SELECT count(*) FROM audit_event WHERE $1 = ANY(entity)", f"Patient/{patient}"
    )
    assert count == reads + 1


async def test_partitions_are_made_ahead_and_dropped_after_the_retention(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    pool = app.state.pool
    now = datetime.now(UTC)
    old = build_event(
        interaction="read",
        status=200,
        access=AccessContext(client_id="retention", unrestricted=False),
        touched=[("Patient", "old", 1)],
        query=None,
        address=None,
        fhir_base="http://cc.test/fhir",
    )
    old["recorded"] = "2019-03-15T10:00:00.000Z"
    async with pool.acquire() as conn:
        # A month without a partition gets one when an event for it arrives (COPY retried).
        await store.copy_rows(conn, [store.event_row(old, "http://cc.test/fhir")])
        names = {
            r["relname"]
            for r in await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'audit_event'::regclass"
            )
        }
        assert "audit_event_p201903" in names
        ahead = store.partition_name(date(now.year + (now.month + 2) // 12, (now.month + 2) % 12 + 1, 1))
        assert ahead in names  # created at start-up, three months ahead
        await store.maintain(conn, retention_days=365, now=now)
        names_after = {
            r["relname"]
            for r in await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'audit_event'::regclass"
            )
        }
        assert "audit_event_p201903" not in names_after
        assert store.partition_name(date(now.year, now.month, 1)) in names_after
        assert await conn.fetchval("SELECT count(*) FROM audit_event WHERE agent_client = 'retention'") == 0


def test_migration_moves_existing_audit_events_out_of_the_clinical_tables(database_url: str) -> None:
    """A database at revision 0014 with AuditEvents stored as resources: after the upgrade they
    are in audit_event with the same id and body, and nothing of them is left in the clinical tables."""
    parts = urlsplit(_plain(database_url))
    name = f"carecoord_audit_{uuid.uuid4().hex[:8]}"
    admin = urlunsplit(parts)
    target = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    event = build_event(
        interaction="read",
        status=200,
        access=AccessContext(client_id="old-client", user="Practitioner/pr", unrestricted=False),
        touched=[("Patient", "p-old", 2)],
        query=None,
        address="10.1.1.1",
        fhir_base="http://cc.test/fhir",
    )
    event["recorded"] = "2025-06-30T23:59:59.500Z"
    body = json.dumps({"resourceType": "AuditEvent", "id": "ae-old", "meta": {"versionId": "1"}, **event})

    async def admin_sql(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def store_old_event() -> None:
        conn = await asyncpg.connect(target)
        try:
            rid = await conn.fetchval(
                "INSERT INTO resource (resource_type, fhir_id, version_id, last_updated, deleted, body)"
                " VALUES ('AuditEvent', 'ae-old', 1, now(), false, $1) RETURNING rid",
                body,
            )
            await conn.execute(
                "INSERT INTO resource_history"
                " (rid, resource_type, fhir_id, version_id, last_updated, method, body)"
                " VALUES ($1, 'AuditEvent', 'ae-old', 1, now(), 'POST', $2)",
                rid,
                body,
            )
            await conn.execute(
                "INSERT INTO search_token (rid, resource_type, param, code)"
                " VALUES ($1, 'AuditEvent', 'action', 'R')",
                rid,
            )
            await conn.execute(
                "INSERT INTO search_reference (rid, resource_type, param, target_type, target_id)"
                " VALUES ($1, 'AuditEvent', 'entity', 'Patient', 'p-old')",
                rid,
            )
            await conn.execute(
                "INSERT INTO resource (resource_type, fhir_id, version_id, last_updated, deleted, body)"
                " VALUES ('Patient', 'p-old', 2, now(), false, $1)",
                json.dumps({"resourceType": "Patient", "id": "p-old"}),
            )
        finally:
            await conn.close()

    async def moved() -> tuple[Any, int]:
        conn = await asyncpg.connect(target)
        try:
            row = await conn.fetchrow("SELECT * FROM audit_event WHERE id = 'ae-old'")
            left = await conn.fetchval(
                "SELECT (SELECT count(*) FROM resource WHERE resource_type = 'AuditEvent')"
                " + (SELECT count(*) FROM resource_history WHERE resource_type = 'AuditEvent')"
                " + (SELECT count(*) FROM search_token WHERE resource_type = 'AuditEvent')"
                " + (SELECT count(*) FROM search_reference WHERE resource_type = 'AuditEvent')"
                " + (SELECT count(*) FROM resource WHERE resource_type = 'Patient') - 1"
            )
            return row, int(left)
        finally:
            await conn.close()

    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        config = alembic_config(target.replace("postgresql://", "postgresql+asyncpg://", 1))
        command.upgrade(config, "0014")
        asyncio.run(store_old_event())
        command.upgrade(config, "head")
        row, left = asyncio.run(moved())
        assert left == 0
        assert row["body"] == body
        assert row["recorded"] == datetime(2025, 6, 30, 23, 59, 59, 500000, tzinfo=UTC)
        assert (row["agent_client"], row["agent_user"], row["action"], row["outcome"]) == (
            "old-client",
            "Practitioner/pr",
            "R",
            "0",
        )
        assert (row["entity"], row["patient"], row["subtype"], row["address"]) == (
            ["Patient/p-old"],
            ["p-old"],
            ["read"],
            "10.1.1.1",
        )
        # The same typed columns as the server derives for a new event.
        fresh = dict(
            zip(
                store.COLUMNS, store.event_row(json.loads(body), "http://cc.test/fhir", "ae-old"), strict=True
            )
        )
        assert {k: row[k] for k in store.COLUMNS if k != "body"} == {
            k: fresh[k] for k in store.COLUMNS if k != "body"
        }
    finally:
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
