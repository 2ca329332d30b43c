"""Regression tests for the closed-loop referral workflow (issue 6), from a review.

Each test reproduces a defect a review found (now fixed) and asserts the correct behaviour.
The partners are scripted FHIR servers behind one real HTTP server on loopback (uvicorn in a
thread; each partner under its own path), so the worker talks real HTTP; jobs are run with
``Worker.run_once`` so that every interleaving is deterministic.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.referrals.worker import Worker
from tests.conftest import bearer
from tests.partner_support import free_port
from tests.test_referrals import FULFILL, add_partner, delivery_state, make_referral
from tests.test_search_support import JSON, put

Handler = Callable[[httpx.Request], httpx.Response]


class _Loopback:
    """One real HTTP server on 127.0.0.1 (uvicorn in a thread) playing every FakePartner: a
    request to ``/{name}/fhir/...`` goes to the partner registered as ``name``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.partners: dict[str, FakePartner] = {}
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off", interface="asgi3"
        )
        self.server = uvicorn.Server(config)
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the loopback partner server did not start"
            time.sleep(0.02)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"].decode()
        url = f"http://127.0.0.1:{self.port}{scope['path']}" + (f"?{query}" if query else "")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        request = httpx.Request(scope["method"], url, headers=headers, content=body)
        partner = self.partners.get(scope["path"].split("/")[1])
        response = await partner.respond(request) if partner else httpx.Response(404)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in response.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding")
                ],
            }
        )
        await send({"type": "http.response.body", "body": response.content})


_loopback: list[_Loopback] = []


def loopback() -> _Loopback:
    if not _loopback:
        _loopback.append(_Loopback())
    return _loopback[0]


class FakePartner:
    """A partner FHIR server named after ``hint``'s host, served over real HTTP on loopback:
    accepts the delivery transaction (its Task is ``Task/{task_id}``), answers reads from
    ``resources`` and records every request. ``handler`` replaces its behaviour (slow or
    failing partners)."""

    def __init__(self, hint: str, task_id: str = "remote-1") -> None:
        server = loopback()
        name = httpx.URL(hint).host
        server.partners[name] = self
        self.base = f"http://127.0.0.1:{server.port}/{name}/fhir"
        self.handler: Callable[[httpx.Request], Awaitable[httpx.Response]] | None = None
        self.task_id = task_id
        self.resources: dict[str, dict[str, Any]] = {
            f"Task/{task_id}": {
                "resourceType": "Task",
                "id": task_id,
                "status": "requested",
                "intent": "order",
            }
        }
        self.requests: list[tuple[str, str]] = []
        self.override: dict[tuple[str, str], Handler] = {}

    async def respond(self, request: httpx.Request) -> httpx.Response:
        if self.handler is not None:
            return await self.handler(request)
        return self.handle(request) or httpx.Response(404)

    def handle(self, request: httpx.Request) -> httpx.Response | None:
        url = str(request.url)
        if not url.startswith(self.base):
            return None
        path = url[len(self.base) :].lstrip("/").split("?", 1)[0]
        self.requests.append((request.method, path))
        special = self.override.get((request.method, path))
        if special is not None:
            return special(request)
        if request.method == "POST" and path == "":
            bundle = json.loads(request.content)
            entries = [
                {
                    "response": {
                        "status": "201 Created",
                        "location": f"Task/{self.task_id}/_history/1"
                        if e["resource"]["resourceType"] == "Task"
                        else f"{e['resource']['resourceType']}/x{i}/_history/1",
                    }
                }
                for i, e in enumerate(bundle["entry"])
            ]
            return httpx.Response(
                200, json={"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
            )
        if request.method == "GET" and path in self.resources:
            return httpx.Response(200, json=self.resources[path])
        if request.method == "PUT" and path in self.resources:
            self.resources[path] = json.loads(request.content)
            return httpx.Response(200, json=self.resources[path])
        return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})


def partner_http(*partners: FakePartner) -> httpx.AsyncClient:
    """The worker's HTTP client: a real one (the partners are real servers on loopback)."""
    return httpx.AsyncClient(timeout=httpx.Timeout(10.0))


def make_worker(app: FastAPI, http: httpx.AsyncClient, name: str = "probe", **settings: Any) -> Worker:
    return Worker(app.state.pool, http, app.state.settings.model_copy(update=settings), name=name)


async def jobs(app: FastAPI, task_id: str) -> dict[str, dict[str, Any]]:
    async with app.state.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT * FROM job WHERE key = $1 AND kind LIKE 'referral.%' ORDER BY id", task_id
        )
    # The job's columns and its payload's fields (task_id, partner_task, copies, ...) by kind.
    return {
        row["kind"].removeprefix("referral."): {**dict(row), **json.loads(row["payload"])} for row in rows
    }


async def run_due(worker: Worker) -> None:
    """Make every pending job due, then run one batch."""
    async with worker.pool.acquire() as conn:
        await conn.execute("UPDATE job SET not_before = now() WHERE state = 'pending'")
    await worker.run_once()


async def deliver(app: FastAPI, client: httpx.AsyncClient, worker: Worker, org: str, suffix: str) -> str:
    task_id = await make_referral(client, org, suffix=suffix)
    await run_due(worker)
    task = (await client.get(f"/fhir/Task/{task_id}")).json()
    assert delivery_state(task) == "delivered", task
    return task_id


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


async def lease_until(app: FastAPI, task_id: str, worker: str) -> datetime | None:
    """When the lease ``worker`` holds on the delivery of ``task_id`` runs out (None: not leased by it)."""
    async with app.state.pool.acquire() as conn:
        until: datetime | None = await conn.fetchval(
            "SELECT lease_until FROM job WHERE key = $1 AND kind = 'referral.deliver'"
            " AND state = 'leased' AND leased_by = $2",
            task_id,
            worker,
        )
    return until


async def has_passed(app: FastAPI, moment: datetime) -> bool:
    """Whether the database's clock (the one leases are judged by) has passed ``moment``."""
    async with app.state.pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT $1::timestamptz < now()", moment))


def _complete(partner: FakePartner, output: str) -> None:
    task = partner.resources[f"Task/{partner.task_id}"]
    task["status"] = "completed"
    task["output"] = [{"type": {"text": "resulting-activity"}, "valueReference": {"reference": output}}]


async def test_outputs_of_two_partners_with_the_same_id_are_kept_apart(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """HIGH. The copy's identifier is ``Procedure/1@Procedure/1``, without the partner's base:
    partner B's Procedure/1 is taken for partner A's copy, so B's referral closes with A's
    Procedure (another patient's record)."""
    a, b = FakePartner("https://a.example/fhir"), FakePartner("https://b.example/fhir")
    for partner, text in ((a, "A: food pantry visit"), (b, "B: housing navigation")):
        partner.resources["Procedure/1"] = {
            "resourceType": "Procedure",
            "id": "1",
            "status": "completed",
            "code": {"text": text},
            "subject": {"reference": "Patient/9"},
        }
    await add_partner(client, "pa", a.base)
    await add_partner(client, "pb", b.base)
    async with partner_http(a, b) as http:
        worker = make_worker(app, http)
        task_a = await deliver(app, client, worker, "pa", "-a")
        task_b = await deliver(app, client, worker, "pb", "-b")
        _complete(a, "Procedure/1")
        _complete(b, "Procedure/1")
        await run_due(worker)
    kept = {}
    for task_id in (task_a, task_b):
        local = (await client.get(f"/fhir/Task/{task_id}")).json()
        assert local["status"] == "completed"
        reference = local["output"][0]["valueReference"]["reference"]
        kept[task_id] = (await client.get(f"/fhir/{reference}")).json()["code"]["text"]
    assert kept == {task_a: "A: food pantry visit", task_b: "B: housing navigation"}


async def test_a_kept_output_does_not_point_at_an_unrelated_local_patient(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """HIGH. _keep_copy stores the partner's resource with its references unchanged: the
    partner's relative ``Patient/9`` now names carecoord's own Patient/9, an unrelated person,
    whose record (Procedure?subject=Patient/9, $everything, patient-compartment tokens) gains
    the referred client's Procedure."""
    partner = FakePartner("https://rel.example/fhir")
    partner.resources["Procedure/77"] = {
        "resourceType": "Procedure",
        "id": "77",
        "status": "completed",
        "code": {"text": "Housing navigation"},
        "subject": {"reference": "Patient/9"},  # the referred client, as the partner knows them
    }
    await put(client, "Patient", "9", {"name": [{"family": "Unrelated"}]})
    await add_partner(client, "prel", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "prel", "-rel")
        _complete(partner, "Procedure/77")
        await run_due(worker)
    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    copy = (await client.get(f"/fhir/{local['output'][0]['valueReference']['reference']}")).json()
    assert copy["subject"]["reference"] != "Patient/9", copy["subject"]
    unrelated = (await client.get("/fhir/Procedure", params={"subject": "Patient/9"})).json()
    assert unrelated.get("total", len(unrelated.get("entry", []))) == 0


async def test_tracking_survives_a_transient_error_after_the_delivery_deadline(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """HIGH. The track job gets ``deadline = delivery time + CARECOORD_DELIVERY_DEADLINE`` (3
    days) and _failed_attempt gives up on any job past its deadline: the first 503/timeout
    while polling a referral that the partner works on for more than 3 days ends tracking for
    good ('failed'); the partner's completion never reaches carecoord."""
    partner = FakePartner("https://slow.example/fhir")
    await add_partner(client, "pslow", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "pslow", "-slow")
        async with app.state.pool.acquire() as conn:  # four days later
            await conn.execute("UPDATE job SET deadline = now() - interval '1 day' WHERE key = $1", task_id)
        path = f"Task/{partner.task_id}"
        partner.override[("GET", path)] = lambda _: httpx.Response(503)
        await run_due(worker)
        del partner.override[("GET", path)]
        partner.resources[path]["status"] = "completed"
        await run_due(worker)
    assert (await jobs(app, task_id))["track"]["state"] != "failed"
    assert (await client.get(f"/fhir/Task/{task_id}")).json()["status"] == "completed"


async def test_a_partner_status_outside_the_referral_value_set_does_not_block_cancelling(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """MEDIUM. _mirror copies any partner status. A partner on the base R4 graph that marks its
    Task ``received`` (or ``ready``) puts a status the SDOHCC value set forbids on the local
    referral, and then the requester can no longer cancel it: ('received', 'cancelled') is not
    in the SDOHCC table, so the PUT is a 422."""
    partner = FakePartner("https://recv.example/fhir")
    await add_partner(client, "precv", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "precv", "-recv")
        partner.resources[f"Task/{partner.task_id}"]["status"] = "received"
        await run_due(worker)
    task = (await client.get(f"/fhir/Task/{task_id}")).json()
    cancelled = await client.put(
        f"/fhir/Task/{task_id}",
        json={**task, "status": "cancelled", "statusReason": {"text": "Client moved"}},
        headers=JSON,
    )
    assert cancelled.status_code == 200, cancelled.text


async def test_mirroring_keeps_the_local_cancellation_reason(app: FastAPI, client: httpx.AsyncClient) -> None:
    """MEDIUM. _mirror protects a terminal local status from a non-terminal remote one, but still
    mirrors statusReason (and businessStatus): the requester's cancellation reason (SDOHCC:
    statusReason.text for cancelled) is erased by the next poll, before the cancel job has
    reached the partner."""
    partner = FakePartner("https://mirror.example/fhir")
    await add_partner(client, "pmir", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "pmir", "-m1")
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        reason = {"text": "Client moved away"}
        response = await client.put(
            f"/fhir/Task/{task_id}",
            json={**task, "status": "cancelled", "statusReason": reason},
            headers=JSON,
        )
        assert response.status_code == 200, response.text
        async with app.state.pool.acquire() as conn:  # the track poll runs before the cancel job
            await conn.execute(
                "UPDATE job SET not_before = now() + interval '1 hour' WHERE kind = 'referral.cancel'"
            )
            await conn.execute("UPDATE job SET not_before = now() WHERE kind = 'referral.track'")
        await worker.run_once()
    assert (await client.get(f"/fhir/Task/{task_id}")).json().get("statusReason") == reason


async def test_entered_in_error_is_not_overwritten_by_the_partner(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """MEDIUM. A local ``entered-in-error`` is never propagated (the hook only schedules a cancel
    job for ``cancelled``), tracking goes on, and _mirror overwrites it with the partner's
    terminal status (``completed``): the erroneous referral looks fulfilled."""
    partner = FakePartner("https://eie.example/fhir")
    await add_partner(client, "peie", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "peie", "-eie")
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        response = await client.put(
            f"/fhir/Task/{task_id}", json={**task, "status": "entered-in-error"}, headers=JSON
        )
        assert response.status_code == 200, response.text
        partner.resources[f"Task/{partner.task_id}"]["status"] = "completed"
        await run_due(worker)
    assert (await client.get(f"/fhir/Task/{task_id}")).json()["status"] == "entered-in-error"


async def test_a_partner_cannot_reach_records_by_naming_them_in_a_referral_task(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """HIGH (authorization, issue 6). A partner organisation's client may create a referral Task
    it is the requester of, and nothing checks that it may read the Task's ``for``/``focus``.
    The Task then makes them visible to it (access.py: rows a Task naming the organisation
    points to, and what its focus ServiceRequest points to), and the worker, reading with
    OPEN_ACCESS, ships them to whatever partner the Task names as owner. (Fails on HEAD; passes
    with the uncommitted FhirRepository._check_references change in the working tree.)"""
    await put(client, "Patient", "victim", {"name": [{"family": "Private"}]})
    await put(
        client,
        "Condition",
        "victim-dx",
        {"code": {"text": "HIV"}, "subject": {"reference": "Patient/victim"}},
    )
    await put(
        client,
        "ServiceRequest",
        "victim-sr",
        {
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/victim"},
            "reasonReference": [{"reference": "Condition/victim-dx"}],
        },
    )
    for org in ("cm", "snoop"):
        await put(client, "Organization", org, {"name": org})
    snoop = await bearer(app, "system/*.cruds", organization="Organization/snoop", client_id="snoop")
    assert (await client.get("/fhir/Condition/victim-dx", headers=snoop)).status_code == 404
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": FULFILL,
        "authoredOn": "2026-11-25",
        "focus": {"reference": "ServiceRequest/victim-sr"},
        "for": {"reference": "Patient/victim"},
        "requester": {"reference": "Organization/snoop"},
        "owner": {"reference": "Organization/cm"},
    }
    created = await client.post("/fhir/Task", json=task, headers={**JSON, **snoop})
    readable = (await client.get("/fhir/Condition/victim-dx", headers=snoop)).status_code
    assert created.status_code in (400, 403, 404, 422) or readable == 404, (created.status_code, readable)


async def test_the_owner_cannot_make_itself_requester(app: FastAPI, client: httpx.AsyncClient) -> None:
    """MEDIUM. check_transition returns at once when the status is unchanged, so who may change
    ``requester``/``owner``/``focus``/``for`` is never checked: the owner rewrites the requester
    to itself (200), and is then allowed what SDOHCC reserves to the requester
    (entered-in-error), or a partner hands the referral to another organisation."""
    for org in ("cm", "own"):
        await put(client, "Organization", org, {"name": org})
    await put(client, "Patient", "p-own", {"gender": "other"})
    await put(
        client,
        "ServiceRequest",
        "sr-own",
        {"status": "active", "intent": "order", "subject": {"reference": "Patient/p-own"}},
    )
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": FULFILL,
        "authoredOn": "2026-11-25",
        "focus": {"reference": "ServiceRequest/sr-own"},
        "for": {"reference": "Patient/p-own"},
        "requester": {"reference": "Organization/cm"},
        "owner": {"reference": "Organization/own"},
    }
    created = (await client.post("/fhir/Task", json=task, headers=JSON)).json()
    owner = await bearer(app, "system/*.cruds", organization="Organization/own", client_id="own")
    hijacked = await client.put(
        f"/fhir/Task/{created['id']}",
        json={**created, "requester": {"reference": "Organization/own"}},
        headers={**JSON, **owner},
    )
    if hijacked.status_code == 200:
        eie = await client.put(
            f"/fhir/Task/{created['id']}",
            json={**hijacked.json(), "status": "entered-in-error"},
            headers={**JSON, **owner},
        )
        assert eie.status_code == 422, "the owner marked the referral entered-in-error"
    assert hijacked.status_code == 422, hijacked.text


async def test_a_job_is_not_run_twice_while_its_worker_is_still_working(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """MEDIUM. Leases are never renewed and a job's duration is not bounded by the lease: with
    the defaults (lease 60 s, 30 s per partner request, up to four requests per delivery: token,
    POST, and again after a 401; one read per output when tracking) a slow partner makes the
    lease run out under a live worker, and a second worker sends the same Bundle concurrently
    (conditional creates racing at the partner are not guaranteed to be idempotent)."""
    partner = FakePartner("https://lease.example/fhir")
    await add_partner(client, "plse", partner.base)
    arrived, release = threading.Event(), threading.Event()
    released: list[bool] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and not arrived.is_set():
            # The partner (another thread, another event loop) holds its answer to the first
            # POST until the test has tried a second worker: longer than the lease, within
            # delivery_timeout (3 s).
            arrived.set()
            released.append(await asyncio.to_thread(release.wait, 2.5))
        response = partner.handle(request)
        assert response is not None
        return response

    partner.handler = slow
    async with partner_http(partner) as http:
        first = make_worker(app, http, name="w1", worker_lease=1)
        second = make_worker(app, http, name="w2", worker_lease=1)
        task_id = await make_referral(client, "plse", suffix="-lease")
        running = asyncio.create_task(first.run_once())
        try:
            claimed = await wait_until(lambda: lease_until(app, task_id, "w1"), "w1 to claim the delivery")
            await wait_until(arrived.is_set, "w1's Bundle to reach the partner")
            await wait_until(lambda: has_passed(app, claimed), "the lease w1 claimed to run out")
            assert not running.done(), "w1 is still waiting for the partner"
            await second.run_once()
        finally:
            release.set()
        await running
    assert released == [True], "the partner answered only after the second worker's attempt"
    posts = [r for r in partner.requests if r[0] == "POST"]
    assert (await jobs(app, task_id))["deliver"]["state"] == "done"
    assert len(posts) == 1, posts


class _RacingConnection:
    def __init__(self, conn: Any, after: Callable[[str], Any]) -> None:
        self._conn = conn
        self._after = after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        value = await self._conn.fetchval(sql, *args)
        await self._after(sql)
        return value


class _RacingPool:
    """The app's pool, whose connections call ``after(sql)`` after each fetchval: a
    deterministic way to commit something between two statements of a job."""

    def __init__(self, pool: Any, after: Callable[[str], Any]) -> None:
        self._pool = pool
        self._after = after

    def acquire(self) -> Any:
        pool, after = self._pool, self._after

        class _Ctx:
            async def __aenter__(self) -> _RacingConnection:
                self._cm = pool.acquire()
                return _RacingConnection(await self._cm.__aenter__(), after)

            async def __aexit__(self, *exc: object) -> None:
                await self._cm.__aexit__(*exc)

        return _Ctx()


async def test_a_cancellation_racing_the_end_of_the_delivery_is_not_lost(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """MEDIUM. Worker.cancel reads ``partner_task`` and then, in a second statement (another
    READ COMMITTED snapshot), whether a delivery is still active. A delivery that commits
    between the two looks 'never delivered': the cancel job ends 'done' without telling the
    partner, which goes on with a cancelled referral."""
    partner = FakePartner("https://race.example/fhir")
    await add_partner(client, "prace", partner.base)
    task_id = await make_referral(client, "prace", suffix="-race")
    async with app.state.pool.acquire() as conn:  # the delivery is in flight at another worker
        await conn.execute(
            "UPDATE job SET state = 'leased', leased_by = 'other', attempts = 1,"
            " lease_until = now() + interval '1 hour' WHERE key = $1",
            task_id,
        )
    task = (await client.get(f"/fhir/Task/{task_id}")).json()
    cancelled = {**task, "status": "cancelled", "statusReason": {"text": "Client moved"}}
    assert (await client.put(f"/fhir/Task/{task_id}", json=cancelled, headers=JSON)).status_code == 200

    async def delivery_commits(sql: str) -> None:
        if "partner_task IS NOT NULL" in sql:
            async with app.state.pool.acquire() as other:  # the other worker's _FINISH commits now
                await other.execute(
                    "UPDATE job SET state = 'done', finished_at = now(),"
                    " payload = payload || jsonb_build_object('partner_task', $2::text)"
                    " WHERE key = $1 AND kind = 'referral.deliver'",
                    task_id,
                    f"{partner.base}/Task/{partner.task_id}",
                )

    async with partner_http(partner) as http:
        worker = Worker(_RacingPool(app.state.pool, delivery_commits), http, app.state.settings, name="racer")
        await worker.run_once()
    cancel = (await jobs(app, task_id))["cancel"]
    assert "never delivered" not in (cancel["last_error"] or ""), cancel


async def test_cancelling_after_an_unanswered_delivery_still_reaches_the_partner(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """MEDIUM. The partner stores the referral but its answer is lost (timeout: retryable). The
    source then cancels. The retry finds the Task no longer requested and ends 'done' (not
    delivered); the cancel job finds no partner_task and ends 'done' (never delivered). The
    partner keeps an active referral nobody will ever cancel (nor track). The referral
    identifier would find it: ``Task?identifier={base}/referral-identifier|Task/{id}``."""
    partner = FakePartner("https://lost.example/fhir")
    await add_partner(client, "plost", partner.base)
    answered = False
    gave_up = threading.Event()

    async def lossy(request: httpx.Request) -> httpx.Response:
        nonlocal answered
        response = partner.handle(request)
        assert response is not None
        if request.method == "POST" and not answered:
            answered = True
            # Stored, but answered only once the worker has given up on it (its timeout, 3 s).
            await asyncio.to_thread(gave_up.wait, 30)
        return response

    partner.handler = lossy
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await make_referral(client, "plost", suffix="-lost")
        try:
            await run_due(worker)  # stored at the partner, answer lost: will retry
        finally:
            gave_up.set()
        delivery = (await jobs(app, task_id))["deliver"]
        assert delivery["state"] == "pending" and delivery["partner_task"] is None, delivery
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        cancelled = {**task, "status": "cancelled", "statusReason": {"text": "Client moved"}}
        assert (await client.put(f"/fhir/Task/{task_id}", json=cancelled, headers=JSON)).status_code == 200
        for _ in range(3):
            await run_due(worker)
    assert ("POST", "") in partner.requests
    assert any(method in ("PUT", "GET") for method, _ in partner.requests), (
        partner.requests,
        await jobs(app, task_id),
    )


async def test_the_worker_does_not_deadlock_on_a_small_pool(app: FastAPI, client: httpx.AsyncClient) -> None:
    """LOW-MEDIUM. The NOTIFY listener holds a pool connection for the worker's lifetime, and
    Worker.deliver calls _finish (which acquires a second connection) while holding one when
    the Task is no longer requested. With CARECOORD_DB_POOL_SIZE <= worker_concurrency + 1 the
    jobs wait for each other's connections forever (asyncpg's acquire has no timeout), and the
    API, sharing the pool in ``serve``, hangs with them."""
    from app import db

    settings = app.state.settings.model_copy(update={"db_pool_size": 2})
    pool = await db.create_pool(settings)
    partner = FakePartner("https://pool.example/fhir")
    await add_partner(client, "ppool", partner.base)
    task_id = await make_referral(client, "ppool", suffix="-pool")
    task = (await client.get(f"/fhir/Task/{task_id}")).json()
    cancelled = {**task, "status": "cancelled", "statusReason": {"text": "Client moved"}}
    assert (await client.put(f"/fhir/Task/{task_id}", json=cancelled, headers=JSON)).status_code == 200

    async def delivery_done() -> bool:
        return bool((await jobs(app, task_id))["deliver"]["state"] == "done")

    async with partner_http(partner) as http:
        worker = Worker(pool, http, settings, name="small-pool")
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            await wait_until(delivery_done, "the delivery to finish on a pool of two", timeout=8)
        finally:
            stop.set()
            done, _ = await asyncio.wait({running}, timeout=3)
            if not done:
                running.cancel()
            pool.terminate()
    assert await delivery_done()
    assert done, "the worker hung"


async def test_a_questionnaire_response_output_is_kept_once_and_valid(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """MEDIUM. SDOHCC lists QuestionnaireResponse among Task.output additional-content, and its
    ``identifier`` is 0..1 (an object). _keep_copy always does
    ``[*(copy.get('identifier') or []), ours]``: an existing identifier object is spread into
    its KEYS (``["system", "value", {...}]``), and without one the copy gets an array; either
    way the stored copy is not valid R4."""
    partner = FakePartner("https://qr.example/fhir")
    partner.resources["QuestionnaireResponse/5"] = {
        "resourceType": "QuestionnaireResponse",
        "id": "5",
        "status": "completed",
        "identifier": {"system": "https://qr.example/ids", "value": "qr-5"},
    }
    await add_partner(client, "pqr", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "pqr", "-qr")
        _complete(partner, "QuestionnaireResponse/5")
        for _ in range(2):
            await run_due(worker)
    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    assert local["status"] == "completed", await jobs(app, task_id)
    copies = (await client.get("/fhir/QuestionnaireResponse")).json().get("entry", [])
    assert len(copies) == 1
    assert isinstance(copies[0]["resource"]["identifier"], dict), copies[0]["resource"]["identifier"]


async def test_an_unreadable_output_does_not_end_tracking(app: FastAPI, client: httpx.AsyncClient) -> None:
    """MEDIUM. track() reads every Task.output reference before mirroring anything; one that the
    partner answers 404/403 for (deleted, or not readable by carecoord's client), or that is an
    absolute URL outside the partner's base (e.g. a Goal at the source), is a final
    DeliveryError: tracking ends 'failed' and the partner's status (completed) never reaches
    the local Task."""
    partner = FakePartner("https://out.example/fhir")
    await add_partner(client, "pout", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "pout", "-out")
        _complete(partner, "Procedure/deleted")
        await run_due(worker)
    assert (await client.get(f"/fhir/Task/{task_id}")).json()["status"] == "completed", await jobs(
        app, task_id
    )


async def test_a_cancellation_survives_a_concurrent_partner_update(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """LOW-MEDIUM. cancel() GETs the partner's Task and PUTs it back with If-Match; when the
    partner changed it in between (412), the cancel job fails for good instead of reading again."""
    partner = FakePartner("https://412.example/fhir")
    await add_partner(client, "p412", partner.base)
    path = f"Task/{partner.task_id}"
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "p412", "-412")
        partner.override[("PUT", path)] = lambda _: httpx.Response(
            412, json={"resourceType": "OperationOutcome", "issue": []}
        )
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        cancelled = {**task, "status": "cancelled", "statusReason": {"text": "Client moved"}}
        assert (await client.put(f"/fhir/Task/{task_id}", json=cancelled, headers=JSON)).status_code == 200
        await run_due(worker)
        del partner.override[("PUT", path)]
        await run_due(worker)
    assert partner.resources[path]["status"] == "cancelled", await jobs(app, task_id)


async def test_a_lost_lease_on_a_failed_attempt_does_not_escape_run_once(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """LOW. run_job catches LeaseLost from the handler, and from _failed_attempt after an
    unexpected error, but not from _failed_attempt after a DeliveryError: it escapes
    asyncio.gather, run() logs an error and goes on while the batch's other jobs still run
    (more than worker_concurrency jobs at once).

    The first worker's lease really runs out: its renewals stop (as when its event loop stalls
    or the database is out of reach), the test waits until the lease has expired, a second
    worker takes the job over, and only then does the partner answer the first one's attempt."""
    partner = FakePartner("https://ll.example/fhir")
    await add_partner(client, "pll", partner.base)
    release = threading.Event()
    released: list[bool] = []

    async def slow_500(request: httpx.Request) -> httpx.Response:
        partner.requests.append((request.method, str(request.url)))
        if len(partner.requests) == 1:  # the first worker's attempt: held until l2 has run
            released.append(await asyncio.to_thread(release.wait, 30))
        return httpx.Response(500)

    async def no_renewal(job: Any) -> None:
        await asyncio.Event().wait()  # until run_job cancels it

    partner.handler = slow_500
    async with partner_http(partner) as http:
        first = make_worker(app, http, name="l1", worker_lease=1)
        second = make_worker(app, http, name="l2", worker_lease=1)
        first.runner._keep_lease = no_renewal  # type: ignore[method-assign]
        task_id = await make_referral(client, "pll", suffix="-ll")
        running = asyncio.create_task(first.run_once())
        try:
            claimed = await wait_until(lambda: lease_until(app, task_id, "l1"), "l1 to claim the delivery")
            await wait_until(lambda: partner.requests, "l1's attempt to reach the partner")
            await wait_until(lambda: has_passed(app, claimed), "l1's lease to run out")
            assert await second.run_once() == 1, "l2 takes the expired job over"
        finally:
            release.set()
        await running  # l1's failed attempt finds its lease lost: LeaseLost must not escape
    assert released == [True]
    delivery = (await jobs(app, task_id))["deliver"]
    assert (delivery["attempts"], delivery["state"], delivery["leased_by"]) == (2, "pending", None), delivery
