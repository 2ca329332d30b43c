"""No request can exhaust the database (issue 15, findings 2, 9 and 14).

* A complexity budget per search (parameters, OR values, chain depth, ``_has``, includes, bind
  values): over it is a 400 ``too-costly`` naming the limit and its setting; searches within it
  are answered with one backend's memory bounded (measured from /proc: the database runs on
  this machine in CI and in the embedded mode).
* ``statement_timeout`` on the pool: a statement that waits or runs too long is cancelled and
  answered 503 ``timeout``.
* A client that disconnects has its search cancelled in the database at once.
* A batch returns at most ``CARECOORD_MAX_BUNDLE_RESOURCES`` resources.
* ``_total=estimate`` gives a limited token its own accurate count, never planner statistics.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app import db
from app.main import create_app
from app.settings import Settings
from tests import test_authorization as authorization
from tests.conftest import BASE_URL, bearer
from tests.partner_support import free_port
from tests.test_search_support import JSON, put

world = authorization.world
patient_p1 = authorization.patient_p1
partner_a = authorization.partner_a


def _too_costly(response: httpx.Response, setting: str) -> None:
    assert response.status_code == 400, response.text[:300]
    issue = response.json()["issue"][0]
    assert issue["code"] == "too-costly" and setting in issue["diagnostics"], issue


@pytest.mark.parametrize(
    ("query", "setting"),
    [
        ("&".join(f"name=x{i}" for i in range(31)), "CARECOORD_SEARCH_MAX_PARAMETERS"),
        ("&".join(f"name=x{i}" for i in range(150)), "CARECOORD_SEARCH_MAX_PARAMETERS"),
        ("name=x&_sort=" + ",".join(["name", "-birthdate"] * 15), "CARECOORD_SEARCH_MAX_PARAMETERS"),
        ("name=" + ",".join(f"x{i}" for i in range(1001)), "CARECOORD_SEARCH_MAX_VALUES"),
        ("_id=" + ",".join(f"x{i}" for i in range(5000)), "CARECOORD_SEARCH_MAX_VALUES"),
        (
            "organization.partof.partof.partof.name=x",
            "CARECOORD_SEARCH_MAX_CHAIN_DEPTH",
        ),
        ("&".join(f"_has:Observation:subject:code=c{i}" for i in range(4)), "CARECOORD_SEARCH_MAX_HAS"),
        (
            "_revinclude=" + ",".join(["Observation:subject", "Condition:subject"] * 6),
            "CARECOORD_SEARCH_MAX_INCLUDES",
        ),
    ],
)
async def test_a_search_over_budget_is_refused_naming_the_limit(
    client: httpx.AsyncClient, query: str, setting: str
) -> None:
    _too_costly(await client.get(f"/fhir/Patient?{query}"), setting)
    form = await client.post(
        "/fhir/Patient/_search", content=query, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    _too_costly(form, setting)


async def test_the_budget_applies_to_conditions_and_batch_searches_too(client: httpx.AsyncClient) -> None:
    condition = "&".join(f"name=x{i}" for i in range(40))
    body = {"resourceType": "Patient", "gender": "other"}
    _too_costly(
        await client.post("/fhir/Patient", json=body, headers={**JSON, "if-none-exist": condition}),
        "CARECOORD_SEARCH_MAX_PARAMETERS",
    )
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": f"Patient?{condition}"}}],
    }
    result = (await client.post("/fhir", json=batch, headers=JSON)).json()
    assert result["entry"][0]["response"]["status"].startswith("400")


@pytest.fixture
async def one_backend(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, int]]:
    """The app with a pool of one connection, and that connection's backend process id."""
    application = create_app(settings.model_copy(update={"db_pool_size": 1}))
    async with application.router.lifespan_context(application):
        pid = await application.state.pool.fetchval("SELECT pg_backend_pid()")
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            client.headers.update(await bearer(application))
            yield application, client, pid


def _peak_memory_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status")
    assert status.exists(), "the memory check needs the test database on this machine"
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


async def test_searches_within_the_budget_keep_the_backend_small(
    one_backend: tuple[FastAPI, httpx.AsyncClient, int], clean_db: None
) -> None:
    """The review's 150 repeated parameters grew one backend past 2.5 GB; what the budget lets
    through (30 parameters, 1,000 OR values, and 60 repeated parameters refused) stays small."""
    _, client, pid = one_backend
    for number in range(200):
        await put(client, "Patient", f"mem{number}", {"name": [{"family": f"x{number}"}], "gender": "other"})
    largest = [
        "&".join(f"name=x{i}" for i in range(30)),
        "name=" + ",".join(f"x{i}" for i in range(1000)),
        "&".join(f"name=x{i},y{i}" for i in range(28)) + "&_sort=name,-birthdate",
        "_has:Observation:subject:code=a&_has:Condition:subject:code=b&_has:Task:patient:status=c",
    ]
    for query in largest:
        response = await client.get(f"/fhir/Patient?{query}")
        assert response.status_code == 200, response.text[:300]
    _too_costly(
        await client.get("/fhir/Patient?" + "&".join(f"name=x{i}" for i in range(60))),
        "CARECOORD_SEARCH_MAX_PARAMETERS",
    )
    _too_costly(
        await client.get("/fhir/Patient?name=" + ",".join(f"x{i}" for i in range(2000))),
        "CARECOORD_SEARCH_MAX_VALUES",
    )
    assert _peak_memory_mb(pid) < 150


@pytest.fixture
async def impatient(settings: Settings) -> AsyncIterator[FastAPI]:
    """The app with a short statement timeout, served over real HTTP on loopback."""
    application = create_app(settings.model_copy(update={"db_statement_timeout": 1.0}))
    async with application.router.lifespan_context(application):
        yield application


async def _lock_search_index(database_url: str) -> asyncpg.Connection:
    """A connection holding a lock that makes every token search wait."""
    locker = await asyncpg.connect(db.asyncpg_dsn(database_url))
    await locker.execute("BEGIN; LOCK TABLE search_token IN ACCESS EXCLUSIVE MODE")
    return locker


async def _waiting_searches(database_url: str) -> list[int]:
    """carecoord backends whose search waits for that lock."""
    watcher = await asyncpg.connect(db.asyncpg_dsn(database_url))
    try:
        rows = await watcher.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'carecoord'"
            " AND wait_event_type = 'Lock' AND datname = current_database()"
            # A search's statement (the audit trail's own writes wait for the lock too).
            " AND query LIKE 'SELECT r.rid, r.resource_type, r.fhir_id, r.body%'"
        )
    finally:
        await watcher.close()
    return [row["pid"] for row in rows]


async def test_a_statement_over_the_timeout_is_cancelled_and_answered_503(
    impatient: FastAPI, database_url: str, clean_db: None
) -> None:
    transport = httpx.ASGITransport(app=impatient)
    locker = await _lock_search_index(database_url)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            client.headers.update(await bearer(impatient))
            response = await asyncio.wait_for(client.get("/fhir/Patient?gender=female"), 20)
    finally:
        await locker.close()
    assert response.status_code == 503, response.text
    assert response.json()["issue"][0]["code"] == "timeout"
    assert await _waiting_searches(database_url) == []


BATCH_OF_SEARCHES = {
    "resourceType": "Bundle",
    "type": "batch",
    "entry": [{"request": {"method": "GET", "url": "Patient?gender=female"}}] * 20,
}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/fhir/Patient?gender=female", None), ("POST", "/fhir", BATCH_OF_SEARCHES)],
)
async def test_a_disconnected_clients_search_is_cancelled_in_the_database(
    app: FastAPI, database_url: str, clean_db: None, method: str, path: str, body: dict[str, Any] | None
) -> None:
    """The session app's statement timeout is 30 s: only the disconnect can end the wait."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="error")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    locker = await _lock_search_index(database_url)
    try:
        headers = await bearer(app)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            request = asyncio.create_task(client.request(method, path, json=body, headers=headers))
            deadline = time.monotonic() + 20
            while not await _waiting_searches(database_url):
                assert time.monotonic() < deadline, "the search never reached the database"
                await asyncio.sleep(0.05)
            request.cancel()  # the client gives up: httpx closes the connection
            with pytest.raises(asyncio.CancelledError):
                await request
        deadline = time.monotonic() + 10
        while await _waiting_searches(database_url):
            assert time.monotonic() < deadline, "the abandoned search kept waiting in the database"
            await asyncio.sleep(0.05)
    finally:
        await locker.close()
        server.should_exit = True
        await serving
    # The pool's connection is healthy again afterwards.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as client:
        assert (await client.get("/fhir/Patient?gender=female", headers=headers)).status_code == 200


async def test_a_batch_returns_at_most_the_configured_number_of_resources(
    settings: Settings, clean_db: None
) -> None:
    application = create_app(settings.model_copy(update={"max_bundle_resources": 50}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            client.headers.update(await bearer(application))
            for number in range(30):
                await put(client, "Patient", f"b{number}", {"gender": "other"})
            search = {"request": {"method": "GET", "url": "Patient?_count=1000"}}
            batch: dict[str, Any] = {"resourceType": "Bundle", "type": "batch", "entry": [search] * 250}
            result = (await client.post("/fhir", json=batch, headers=JSON)).json()
            statuses = [entry["response"]["status"][:3] for entry in result["entry"]]
            assert statuses[0] == "200" and len(result["entry"][0]["resource"]["entry"]) == 30
            assert set(statuses[1:]) == {"400"}
            outcome = result["entry"][1]["response"]["outcome"]["issue"][0]
            assert (
                outcome["code"] == "too-costly" and "CARECOORD_MAX_BUNDLE_RESOURCES" in outcome["diagnostics"]
            )
            transaction = {**batch, "type": "transaction", "entry": [search] * 3}
            refused = await client.post("/fhir", json=transaction, headers=JSON)
            assert refused.status_code == 400 and refused.json()["issue"][0]["code"] == "too-costly"


async def test_estimated_totals_are_never_database_statistics_for_limited_tokens(
    client: httpx.AsyncClient, world: None, patient_p1: dict[str, str], partner_a: dict[str, str]
) -> None:
    for number in range(60):
        await put(client, "Observation", f"noise{number}", authorization._observation(f"n{number}"))
    mine = (await client.get("/fhir/Observation", params={"_total": "estimate"}, headers=patient_p1)).json()
    assert mine["total"] == 1  # obs-p1, counted; not the planner's idea of the whole table
    partner = (await client.get("/fhir/Condition", params={"_total": "estimate"}, headers=partner_a)).json()
    assert partner["total"] == 1  # cond-p1 only


async def test_a_json_patch_cannot_build_a_huge_resource(client: httpx.AsyncClient) -> None:
    """22 ``copy`` operations in a 1 KB patch doubled a note until the process held 1.4 GB and
    the event loop stalled for 36 s. The patch is applied under the body limit."""
    stored = await put(
        client,
        "Observation",
        "doubling",
        {"status": "final", "code": {"text": "x"}, "note": [{"text": "n" * 200}]},
    )
    patch = [{"op": "copy", "from": "/note", "path": "/note/-"}] * 40
    response = await client.patch(
        "/fhir/Observation/doubling", json=patch, headers={"content-type": "application/json-patch+json"}
    )
    assert response.status_code == 413, response.text[:300]
    assert response.json()["issue"][0]["code"] == "too-costly"
    assert (await client.get("/fhir/Observation/doubling")).json()["meta"]["versionId"] == stored["meta"][
        "versionId"
    ]
    # A batch does not get around it: the same patch inside a transaction.
    binary = {
        "resourceType": "Binary",
        "contentType": "application/json-patch+json",
        "data": base64.b64encode(json.dumps(patch).encode()).decode(),
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": binary, "request": {"method": "PATCH", "url": "Observation/doubling"}}],
    }
    assert (await client.post("/fhir", json=bundle, headers=JSON)).status_code == 413


async def test_a_bundle_resolves_a_bounded_number_of_conditional_references(
    client: httpx.AsyncClient,
) -> None:
    await put(client, "Patient", "cond-ref", {"identifier": [{"system": "urn:mrn", "value": "1"}]})
    # The same conditional reference in many entries is searched once.
    same = [
        {
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": "Patient?identifier=urn:mrn|1"},
            },
            "request": {"method": "POST", "url": "Observation"},
        }
        for _ in range(50)
    ]
    response = await client.post(
        "/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": same}, headers=JSON
    )
    assert response.status_code == 200, response.text[:300]
    many = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "x"},
                    "focus": [{"reference": f"Patient?identifier=urn:mrn|{n}"} for n in range(1001)],
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
    }
    refused = await client.post("/fhir", json=many, headers=JSON)
    assert refused.status_code == 400 and refused.json()["issue"][0]["code"] == "too-costly", refused.text[
        :300
    ]


async def test_a_json_patch_counts_digits_and_a_bundle_of_patches_shares_one_budget(
    client: httpx.AsyncClient,
) -> None:
    await put(client, "Observation", "digits", {"status": "final", "code": {"text": "x"}})
    # (the tests' body limit is 64 KiB: a 20,000-digit number, copied, outgrows it at once)
    digits = "1." + "9" * 20000
    copies = ',{"op":"copy","from":"/extension/0","path":"/extension/-"}' * 200
    patch = (
        '[{"op":"add","path":"/extension","value":[{"url":"urn:x","valueDecimal":'
        + digits
        + "}]}"
        + copies
        + "]"
    )
    response = await client.patch(
        "/fhir/Observation/digits", content=patch, headers={"content-type": "application/json-patch+json"}
    )
    assert response.status_code == 413, response.text[:300]
    # Each entry of a Bundle may grow its resource a little; together no more than one body.
    for number in range(4):
        await put(client, "Observation", f"grow{number}", {"status": "final", "code": {"text": "x"}})
    chunk = [{"op": "add", "path": "/note", "value": [{"text": "n" * 6000}]}] + [
        {"op": "copy", "from": "/note/0", "path": "/note/-"}
    ] * 5
    binary = {
        "resourceType": "Binary",
        "contentType": "application/json-patch+json",
        "data": base64.b64encode(json.dumps(chunk).encode()).decode(),
    }
    entries = [
        {"resource": binary, "request": {"method": "PATCH", "url": f"Observation/grow{number}"}}
        for number in range(4)
    ]
    result = await client.post(
        "/fhir", json={"resourceType": "Bundle", "type": "batch", "entry": entries}, headers=JSON
    )
    statuses = [e["response"]["status"][:3] for e in result.json()["entry"]]
    assert "413" in statuses and statuses[0] == "200", statuses


async def test_replacing_a_large_element_is_not_growth(client: httpx.AsyncClient) -> None:
    big = "b" * 40_000
    await put(
        client, "Observation", "large", {"status": "final", "code": {"text": "x"}, "note": [{"text": big}]}
    )
    patch = [{"op": "replace", "path": "/note/0/text", "value": "c" * 40_000}]
    response = await client.patch(
        "/fhir/Observation/large", json=patch, headers={"content-type": "application/json-patch+json"}
    )
    assert response.status_code == 200, response.text[:300]


async def test_clients_trickling_their_bodies_do_not_hold_the_databases_connections(
    settings: Settings, clean_db: None
) -> None:
    """Ten clients sending 1 byte of a 100 KB body held every pooled connection (the request took
    one before reading its body): the whole API hung."""
    application = create_app(settings.model_copy(update={"db_pool_size": 2}))
    port = free_port()
    async with application.router.lifespan_context(application):
        server = uvicorn.Server(
            uvicorn.Config(application, host="127.0.0.1", port=port, lifespan="off", log_level="error")
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        headers = await bearer(application)
        slow: list[asyncio.StreamWriter] = []
        try:
            for _ in range(5):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    (
                        "POST /fhir/Observation HTTP/1.1\r\nhost: cc.test\r\n"
                        "content-type: application/fhir+json\r\n"
                        f"authorization: {headers['authorization']}\r\ncontent-length: 60000\r\n\r\n{{"
                    ).encode()
                )
                await writer.drain()
                slow.append(writer)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
                for _ in range(3):
                    response = await http.get("/fhir/Patient", headers=headers)
                    assert response.status_code == 200, response.text[:300]
        finally:
            for writer in slow:
                writer.close()
            server.should_exit = True
            await serving


async def test_bodies_are_parsed_and_validated_before_a_connection_is_taken(
    one_backend: tuple[FastAPI, httpx.AsyncClient, int], clean_db: None
) -> None:
    """Issue 14: a request reads, parses and validates its body before it takes a pool connection
    or opens a transaction. With the pool's only connection held elsewhere, bad bodies are still
    answered with 400 (they would wait for the connection if the repository took it up front),
    and a valid write goes through as soon as the connection is free."""
    application, client, _ = one_backend
    await client.get("/fhir/Patient?_count=1")  # the token's client is known: no lookup pending
    bad_requests = [
        ("POST", "/fhir/Patient", b'{"resourceType": "Patient", "gender": 7}'),
        ("POST", "/fhir/Patient", b'{"resourceType": "Observation", "status": "final"}'),
        ("POST", "/fhir/Patient", b'{"resourceType": "Patient",'),
        ("PUT", "/fhir/Patient/a", b'{"resourceType": "Patient", "id": "b"}'),
        ("PATCH", "/fhir/Patient/a", b"[{"),
        ("POST", "/fhir", b'{"resourceType": "Bundle", "type": "transaction", "entry": 3}'),
    ]
    held = await application.state.pool.acquire()
    try:
        for method, path, body in bad_requests:
            response = await asyncio.wait_for(
                client.request(method, path, content=body, headers=JSON), timeout=30
            )
            assert response.status_code == 400, (method, path, response.text[:300])
            assert response.json()["resourceType"] == "OperationOutcome"
        valid = asyncio.create_task(
            client.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "other"}, headers=JSON)
        )
    finally:
        await application.state.pool.release(held)
    created = await asyncio.wait_for(valid, timeout=30)
    assert created.status_code == 201, created.text[:300]
    assert await count_rows_of(application, "Patient") == 1


async def count_rows_of(application: FastAPI, resource_type: str) -> int:
    count: int = await application.state.pool.fetchval(
        "SELECT count(*) FROM resource WHERE resource_type = $1", resource_type
    )
    return count
