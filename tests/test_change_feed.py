"""The change feed (app/events/changes.py): every committed write recorded once, read in commit
order without losing a change whose transaction committed late."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.events.changes import Change, ChangeFeed
from tests.conftest import FHIR

JSON_PATCH = {"content-type": "application/json-patch+json"}


def _patient(family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}]}


async def _drain(app: FastAPI, feed: ChangeFeed) -> list[Change]:
    """Every change the feed gives the consumer now, consumed (cursor moved)."""
    seen: list[Change] = []
    while True:
        async with app.state.pool.acquire() as conn, conn.transaction():
            changes, position = await feed.claim(conn, 50)
            await feed.advance(conn, position)
        if not changes:
            return seen
        seen.extend(changes)


async def _drain_through(app: FastAPI, feed: ChangeFeed, count: int) -> list[Change]:
    """Drain until ``count`` clinical changes came: a transaction open anywhere on the server
    (another test's, another database's) holds the next window back until it ends."""
    seen: list[Change] = []
    deadline = asyncio.get_running_loop().time() + 10
    while len(_clinical(seen)) < count:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"only {len(_clinical(seen))} of {count} changes came through the feed")
        seen.extend(await _drain(app, feed))
        await asyncio.sleep(0.02)
    return seen


def _clinical(changes: list[Change]) -> list[tuple[str, str, int, str]]:
    return [(c.resource_type, c.fhir_id, c.version_id, c.action) for c in changes if not c.bookkeeping]


async def test_every_kind_of_write_records_one_change(app: FastAPI, client: httpx.AsyncClient) -> None:
    feed = ChangeFeed("test-every-write")
    await _drain(app, feed)
    created = await client.post(f"{FHIR}/Patient", json=_patient("One"))
    pid = created.json()["id"]
    await client.put(f"{FHIR}/Patient/{pid}", json={**_patient("Two"), "id": pid})
    patch = [{"op": "add", "path": "/active", "value": True}]
    assert (await client.patch(f"{FHIR}/Patient/{pid}", json=patch, headers=JSON_PATCH)).status_code == 200
    put_new = await client.put(f"{FHIR}/Patient/chosen", json={**_patient("Chosen"), "id": "chosen"})
    assert put_new.status_code == 201
    conditional = {"if-none-exist": "identifier=urn:x|1"}
    body = {**_patient("Cond"), "identifier": [{"system": "urn:x", "value": "1"}]}
    first = await client.post(f"{FHIR}/Patient", json=body, headers=conditional)
    again = await client.post(f"{FHIR}/Patient", json=body, headers=conditional)
    assert (first.status_code, again.status_code) == (201, 200)  # the second one writes nothing
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": _patient("InTx"), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "DELETE", "url": "Patient/chosen"}},
        ],
    }
    assert (await client.post(FHIR, json=transaction)).status_code == 200
    failed = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": _patient("Lost"), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "DELETE", "url": "Patient/nobody"}},
        ],
    }
    assert (await client.post(FHIR, json=failed)).status_code == 404
    assert (await client.delete(f"{FHIR}/Patient/chosen")).status_code in (200, 204)  # already deleted

    changes = _clinical(await _drain_through(app, feed, 7))
    patients = [c for c in changes if c[0] == "Patient"]
    in_tx = [c for c in patients if c[1] not in (pid, "chosen", first.json()["id"])]
    assert patients == [
        ("Patient", pid, 1, "create"),
        ("Patient", pid, 2, "update"),
        ("Patient", pid, 3, "update"),
        ("Patient", "chosen", 1, "create"),
        ("Patient", first.json()["id"], 1, "create"),
        ("Patient", "chosen", 2, "delete"),  # a transaction runs its DELETEs first (http.html#trules)
        in_tx[0],
    ]
    assert in_tx == [("Patient", in_tx[0][1], 1, "create")]
    assert await _drain(app, feed) == []  # consumed once


async def test_the_audit_trail_is_not_in_the_feed(app: FastAPI, client: httpx.AsyncClient) -> None:
    """A write's AuditEvent is in the audit store (app/audit), not in the change feed."""
    feed = ChangeFeed("test-bookkeeping")
    await _drain(app, feed)
    await client.post(f"{FHIR}/Patient", json=_patient("Audited"))
    changes = await _drain_through(app, feed, 1)
    assert [c.resource_type for c in changes] == ["Patient"]


async def test_a_change_committed_late_is_not_skipped(app: FastAPI, client: httpx.AsyncClient) -> None:
    """A transaction that took its sequence number first but commits last is still read, and
    before anything of a later window: the feed waits for it instead of passing it by."""
    feed = ChangeFeed("test-late-commit")
    await _drain(app, feed)
    pool: asyncpg.Pool = app.state.pool
    factory = app.state.repositories
    async with pool.acquire() as slow:
        transaction = slow.transaction()
        await transaction.start()
        try:
            await factory.for_system(slow).create("Patient", _patient("Slow"), fhir_id="slow")
            # A later write commits while the first is still open.
            await client.post(f"{FHIR}/Patient", json={**_patient("Fast")})
            assert _clinical(await _drain(app, feed)) == []  # held back, not passed by
        finally:
            await transaction.commit()
    changes = _clinical(await _drain_through(app, feed, 2))
    assert changes[0][1] == "slow"
    assert len(changes) == 2


async def test_a_consumer_that_rolls_back_gets_the_same_changes_again(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    feed = ChangeFeed("test-rollback")
    await _drain(app, feed)
    await client.post(f"{FHIR}/Patient", json=_patient("Again"))
    first: list[Change] = []
    deadline = asyncio.get_running_loop().time() + 10
    while not _clinical(first):  # until the write's window can open (see _drain_through)
        assert asyncio.get_running_loop().time() < deadline, "the write never came through the feed"
        async with app.state.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            first, position = await feed.claim(conn, 10)
            await feed.advance(conn, position)
            await transaction.rollback()
        await asyncio.sleep(0.02)
    assert _clinical(await _drain_through(app, feed, 1)) == _clinical(first)


async def test_an_idle_consumer_writes_nothing_and_still_sees_the_next_change(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """The subscription dispatcher looks at the feed twenty times a second when it is idle: a
    look that finds nothing commits no write (its cursor row keeps its row version), and the
    next write is still found, however many empty windows the idle looks passed."""
    feed = ChangeFeed("test-idle-consumer")
    await _drain(app, feed)
    async with app.state.pool.acquire() as conn:
        before = await conn.fetchrow(
            "SELECT xmin::text AS row_version, lower, upper, after_seq FROM change_cursor"
            " WHERE consumer = $1",
            feed.consumer,
        )
        for _ in range(5):
            # Other transactions take ids meanwhile (here: one each), so each look could open
            # a new, empty window.
            await conn.execute("SELECT pg_current_xact_id()")
            assert await _drain(app, feed) == []
        after = await conn.fetchrow(
            "SELECT xmin::text AS row_version, lower, upper, after_seq FROM change_cursor"
            " WHERE consumer = $1",
            feed.consumer,
        )
    assert after == before
    created = await client.post(f"{FHIR}/Patient", json=_patient("After the idle looks"))
    seen = await _drain_through(app, feed, 1)
    assert ("Patient", created.json()["id"], 1, "create") in _clinical(seen)
