"""Closed-loop referrals end to end (issue 6): carecoord A (the app under test) refers a client
to partner B, a second real carecoord on a loopback port; B accepts and completes the
referral with a Procedure; A's Task follows. A misbehaving partner (a loopback server of the
tests) gets every referral exactly once in the end.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.referrals.bundle import identifier_system
from app.referrals.credentials import set_credentials
from app.referrals.worker import Worker
from tests.partner_support import (  # noqa: F401  (fixtures)
    Close,
    Hang,
    MisbehavingServer,
    PartnerServer,
    Reply,
    Reset,
    misbehaving_server_fixture,
    operation_outcome,
    partner_server_fixture,
)
from tests.referral_support import FakePartner, deliver, jobs, make_worker, partner_http, run_due
from tests.test_search_support import JSON, put

FULFILL = {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]}
DELIVERY_EXTENSION = "http://cc.test/fhir/StructureDefinition/referral-delivery"


@pytest.fixture
async def worker(app: FastAPI) -> AsyncIterator[Worker]:
    """One referral worker of A, running in the test's event loop."""
    running = Worker(app.state.pool, app.state.http, app.state.settings, name="test-worker")
    stop = asyncio.Event()
    task = asyncio.create_task(running.run(stop))
    yield running
    stop.set()
    await task


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 30, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def add_partner(client: httpx.AsyncClient, org: str, address: str) -> None:
    await put(
        client,
        "Endpoint",
        f"ep-{org}",
        {
            "status": "active",
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "hl7-fhir-rest",
            },
            "payloadType": [{"text": "FHIR R4"}],
            "address": address,
        },
    )
    await put(client, "Organization", org, {"name": org, "endpoint": [{"reference": f"Endpoint/ep-{org}"}]})


async def make_referral(client: httpx.AsyncClient, owner: str, suffix: str = "") -> str:
    """Patient, Consent, Condition, ServiceRequest and a requested Task owned by ``owner``."""
    await put(client, "Organization", "cm", {"name": "Case management"})
    patient = f"pat{suffix}"
    await put(
        client, "Patient", patient, {"name": [{"family": "Okafor", "given": ["Ada"]}], "gender": "female"}
    )
    await put(
        client,
        "Consent",
        f"consent{suffix}",
        {
            "status": "active",
            "scope": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                        "code": "patient-privacy",
                    }
                ]
            },
            "category": [
                {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IDSCL"}]}
            ],
            "patient": {"reference": f"Patient/{patient}"},
        },
    )
    await put(
        client,
        "Condition",
        f"cond{suffix}",
        {
            "code": {"text": "Housing instability"},
            "subject": {"reference": f"Patient/{patient}"},
        },
    )
    await put(
        client,
        "ServiceRequest",
        f"sr{suffix}",
        {
            "status": "active",
            "intent": "order",
            "code": {"text": "Housing navigation"},
            "subject": {"reference": f"Patient/{patient}"},
            "requester": {"reference": "Organization/cm"},
            "performer": [{"reference": f"Organization/{owner}"}],
            "supportingInfo": [{"reference": f"Consent/consent{suffix}"}],
            "reasonReference": [{"reference": f"Condition/cond{suffix}"}],
        },
    )
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": FULFILL,
        "authoredOn": "2026-11-25",
        "focus": {"reference": f"ServiceRequest/sr{suffix}"},
        "for": {"reference": f"Patient/{patient}"},
        "requester": {"reference": "Organization/cm"},
        "owner": {"reference": f"Organization/{owner}"},
    }
    created = await client.post("/fhir/Task", json=task, headers=JSON)
    assert created.status_code == 201, created.text
    task_id: str = created.json()["id"]
    return task_id


def delivery_state(task: dict[str, Any]) -> str | None:
    for extension in task.get("extension", []):
        if extension["url"] == DELIVERY_EXTENSION:
            return next(e["valueCode"] for e in extension["extension"] if e["url"] == "state")
    return None


async def partner_token(partner: PartnerServer) -> dict[str, str]:
    client_id, secret = partner.secret_client
    async with httpx.AsyncClient() as http:
        response = await http.post(
            partner.token_url, data={"grant_type": "client_credentials"}, auth=(client_id, secret)
        )
    assert response.status_code == 200, response.text
    return {"authorization": f"Bearer {response.json()['access_token']}"}


async def at_partner(
    partner: PartnerServer, headers: dict[str, str], path: str, **params: str
) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{partner.fhir_base}/{path}", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return [
        e["resource"] for e in response.json().get("entry", []) if e.get("search", {}).get("mode") == "match"
    ]


@pytest.fixture
async def partner_b(app: FastAPI, client: httpx.AsyncClient, partner_server: PartnerServer) -> PartnerServer:
    await add_partner(client, "partnerB", partner_server.fhir_base)
    client_id, secret = partner_server.secret_client
    async with app.state.pool.acquire() as conn:
        await set_credentials(
            conn,
            app.state.settings,
            endpoint_id="ep-partnerB",
            token_url=partner_server.token_url,
            client_id=client_id,
            client_secret=secret,
        )
    return partner_server


async def test_referral_reaches_the_partner_once_and_the_loop_closes(
    client: httpx.AsyncClient, partner_b: PartnerServer, worker: Worker
) -> None:
    suffix = f"-{time.time_ns()}"
    task_id = await make_referral(client, "partnerB", suffix=suffix)

    async def delivered() -> dict[str, Any] | None:
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        return task if delivery_state(task) == "delivered" else None

    await eventually(delivered, what="delivery")
    b = await partner_token(partner_b)
    system = identifier_system("http://cc.test/fhir")
    copies = await at_partner(partner_b, b, "Task", identifier=f"{system}|Task/{task_id}")
    assert len(copies) == 1
    remote = copies[0]
    # What the Task points to arrived with it, once each, and references resolve at B.
    service_request_id = remote["focus"]["reference"].split("/")[-1]
    service_request = (await at_partner(partner_b, b, "ServiceRequest", _id=service_request_id))[0]
    consent_ref = service_request["supportingInfo"][0]["reference"]
    assert consent_ref.startswith("Consent/")
    assert len(await at_partner(partner_b, b, "Consent", _id=consent_ref.split("/")[1])) == 1
    patients = await at_partner(partner_b, b, "Patient", identifier=f"{system}|Patient/pat{suffix}")
    assert [f"Patient/{p['id']}" for p in patients] == [remote["for"]["reference"]]

    # B accepts, works and completes the referral with a Procedure.
    async with httpx.AsyncClient(base_url=partner_b.fhir_base, headers={**b, **JSON}) as http:
        procedure = await http.post(
            "/Procedure",
            json={
                "resourceType": "Procedure",
                "status": "completed",
                "code": {"text": "Housing navigation session"},
                "subject": remote["for"],
            },
        )
        assert procedure.status_code == 201, procedure.text
        for status in ("accepted", "in-progress", "completed"):
            current = (await http.get(f"/Task/{remote['id']}")).json()
            current["status"] = status
            if status == "completed":
                current["output"] = [
                    {
                        "type": {"text": "resulting-activity"},
                        "valueReference": {"reference": f"Procedure/{procedure.json()['id']}"},
                    }
                ]
            updated = await http.put(f"/Task/{remote['id']}", json=current)
            assert updated.status_code == 200, updated.text

    async def completed() -> dict[str, Any] | None:
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        return task if task["status"] == "completed" else None

    local = await eventually(completed, what="the partner's completion to reach A")
    output = local["output"][0]["valueReference"]["reference"]
    assert output.startswith("Procedure/")
    kept = (await client.get(f"/fhir/{output}")).json()
    assert kept["code"]["text"] == "Housing navigation session"


async def test_cancelling_a_delivered_referral_cancels_it_at_the_partner(
    client: httpx.AsyncClient, partner_b: PartnerServer, worker: Worker
) -> None:
    task_id = await make_referral(client, "partnerB", suffix=f"-c{time.time_ns()}")

    async def delivered() -> dict[str, Any] | None:
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        return task if delivery_state(task) == "delivered" else None

    task = await eventually(delivered, what="delivery")
    task["status"] = "cancelled"
    task["statusReason"] = {"text": "Client moved away"}
    assert (await client.put(f"/fhir/Task/{task_id}", json=task, headers=JSON)).status_code == 200
    b = await partner_token(partner_b)
    system = identifier_system("http://cc.test/fhir")

    async def cancelled_at_b() -> bool:
        copies = await at_partner(partner_b, b, "Task", identifier=f"{system}|Task/{task_id}")
        return bool(copies) and copies[0]["status"] == "cancelled"

    await eventually(cancelled_at_b, what="the cancellation to reach the partner")


def _transaction_response(task_location: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [{"response": {"status": "201 Created", "location": task_location}} for _ in range(6)],
    }


async def test_a_misbehaving_partner_gets_the_referral_in_the_end(
    app: FastAPI, client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, worker: Worker
) -> None:
    """500, 429 with Retry-After, a hang past the timeout, a closed connection, a reset one:
    retried, then delivered; the delivery state on the Task and the metrics say what happened."""
    await add_partner(client, "flaky", misbehaving_server.url("/fhir"))
    misbehaving_server.script(
        "/fhir",
        Reply(500, operation_outcome("exception", "boom")),
        Reply(429, operation_outcome("throttled", "slow down"), {"retry-after": "1"}),
        Hang(5),
        Close(),
        Reset(),  # as if the partner's server were down
        Reply(200, _transaction_response("Task/remote-1/_history/1")),
    )
    misbehaving_server.script(
        "/fhir/Task/remote-1",
        Reply(200, {"resourceType": "Task", "id": "remote-1", "status": "requested", "intent": "order"}),
    )
    task_id = await make_referral(client, "flaky", suffix=f"-f{time.time_ns()}")

    async def delivered() -> dict[str, Any] | None:
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        return task if delivery_state(task) == "delivered" else None

    await eventually(delivered, timeout=60, what="delivery through the failures")
    posts = [r for r in misbehaving_server.requests_to("/fhir") if r.method == "POST"]
    assert len(posts) == 6
    bodies = {p.body for p in posts}
    assert len(bodies) == 1  # every retry sends the same conditional-create Bundle
    metrics = (await client.get("/metrics")).text
    assert 'carecoord_referral_deliveries_succeeded_total{partner="flaky"} 1.0' in metrics
    assert 'carecoord_referral_deliveries_attempted_total{partner="flaky"} 6.0' in metrics
    async with app.state.pool.acquire() as conn:
        attempts = await conn.fetchval(
            "SELECT attempts FROM job WHERE key = $1 AND kind = 'referral.deliver'", task_id
        )
    assert attempts == 6


async def test_a_partner_rejecting_the_bundle_fails_the_delivery_at_once(
    client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, worker: Worker
) -> None:
    await add_partner(client, "strict", misbehaving_server.url("/fhir"))
    misbehaving_server.script(
        "/fhir", Reply(400, operation_outcome("invalid", "ServiceRequest.code is required"))
    )
    task_id = await make_referral(client, "strict", suffix=f"-s{time.time_ns()}")

    async def failed() -> dict[str, Any] | None:
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        return task if delivery_state(task) == "failed" else None

    task = await eventually(failed, what="the delivery to fail")
    details = next(e for e in task["extension"] if e["url"] == DELIVERY_EXTENSION)["extension"]
    error = next(e["valueString"] for e in details if e["url"] == "lastError")
    assert "ServiceRequest.code is required" in error  # the partner's OperationOutcome is kept
    assert len(misbehaving_server.requests_to("/fhir")) == 1
    assert task["businessStatus"]["coding"][0]["code"] == "failed"


async def test_referral_to_a_partner_without_endpoint_is_a_worklist_item(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """Light mode: nothing is delivered; the partner's client finds it in its worklist."""
    await put(client, "Organization", "light", {"name": "Light partner"})
    task_id = await make_referral(client, "light", suffix=f"-l{time.time_ns()}")
    async with app.state.pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT count(*) FROM job WHERE key = $1 AND kind LIKE 'referral.%'", task_id)
            == 0
        )
    from tests.conftest import bearer

    light = await bearer(
        app, "system/Task.rs system/Task.u", organization="Organization/light", client_id="l"
    )
    worklist = (
        await client.get(
            "/fhir/Task", params={"owner": "Organization/light", "status": "requested"}, headers=light
        )
    ).json()
    assert [e["resource"]["id"] for e in worklist["entry"]] == [task_id]


async def test_inbound_referral_from_a_partner_lands_in_the_worklist(
    app: FastAPI, home_client: httpx.AsyncClient
) -> None:
    """A partner (an organisation's client) submits a referral to the case-management
    organisation as a transaction; the owner sees it in its worklist; the partner follows and
    updates only its own; another partner sees nothing."""
    from tests.conftest import bearer

    # Partners refer clients back to the server's own organisation (CARECOORD_ORGANIZATION).
    client = home_client
    for org in ("cm", "inA", "inB"):
        await put(client, "Organization", org, {"name": org})
    partner_a = await bearer(app, "system/*.cruds", organization="Organization/inA", client_id="in-a")
    partner_b = await bearer(app, "system/*.cruds", organization="Organization/inB", client_id="in-b")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:p",
                "resource": {"resourceType": "Patient", "name": [{"family": "Inbound"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:s",
                "resource": {
                    "resourceType": "ServiceRequest",
                    "status": "active",
                    "intent": "order",
                    "subject": {"reference": "urn:uuid:p"},
                    "performer": [{"reference": "Organization/cm"}],
                },
                "request": {"method": "POST", "url": "ServiceRequest"},
            },
            {
                "fullUrl": "urn:uuid:t",
                "resource": {
                    "resourceType": "Task",
                    "status": "requested",
                    "intent": "order",
                    "code": FULFILL,
                    "focus": {"reference": "urn:uuid:s"},
                    "for": {"reference": "urn:uuid:p"},
                    "requester": {"reference": "Organization/inA"},
                    "owner": {"reference": "Organization/cm"},
                },
                "request": {"method": "POST", "url": "Task"},
            },
        ],
    }
    response = await client.post("/fhir", json=bundle, headers={**JSON, **partner_a})
    assert response.status_code == 200, response.text
    task_id = response.json()["entry"][2]["response"]["location"].split("/")[1]
    worklist = (
        await client.get("/fhir/Task", params={"owner": "Organization/cm", "status": "requested"})
    ).json()
    assert task_id in [e["resource"]["id"] for e in worklist["entry"]]
    assert (await client.get(f"/fhir/Task/{task_id}", headers=partner_a)).status_code == 200
    assert (await client.get(f"/fhir/Task/{task_id}", headers=partner_b)).status_code == 404
    theirs = (await client.get("/fhir/Task", params={"status": "requested"}, headers=partner_b)).json()
    assert task_id not in [e["resource"]["id"] for e in theirs.get("entry", [])]
    # The submitting partner is the requester: it may not accept its own referral, but it may cancel it.
    task = (await client.get(f"/fhir/Task/{task_id}", headers=partner_a)).json()
    accepted = await client.put(
        f"/fhir/Task/{task_id}", json={**task, "status": "accepted"}, headers={**JSON, **partner_a}
    )
    assert accepted.status_code == 422, accepted.text
    cancelled = await client.put(
        f"/fhir/Task/{task_id}", json={**task, "status": "cancelled"}, headers={**JSON, **partner_a}
    )
    assert cancelled.status_code == 200, cancelled.text


async def test_a_referral_handed_to_another_partner_before_delivery_goes_to_the_new_one(
    client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, worker: Worker
) -> None:
    await add_partner(client, "down", misbehaving_server.url("/down/fhir"))
    await add_partner(client, "up", misbehaving_server.url("/up/fhir"))
    misbehaving_server.script("/down/fhir", Reply(503, operation_outcome("transient", "down")))
    misbehaving_server.script("/up/fhir", Reply(200, _transaction_response("Task/remote-up/_history/1")))
    misbehaving_server.script(
        "/up/fhir/Task/remote-up",
        Reply(200, {"resourceType": "Task", "id": "remote-up", "status": "requested", "intent": "order"}),
    )
    task_id = await make_referral(client, "down", suffix=f"-h{time.time_ns()}")

    async def retrying() -> bool:
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        return delivery_state(task) == "retrying"

    await eventually(retrying, what="the first partner to fail")
    task = (await client.get(f"/fhir/Task/{task_id}")).json()
    task["owner"] = {"reference": "Organization/up"}
    assert (await client.put(f"/fhir/Task/{task_id}", json=task, headers=JSON)).status_code == 200

    async def delivered() -> bool:
        task = (await client.get(f"/fhir/Task/{task_id}")).json()
        return delivery_state(task) == "delivered"

    await eventually(delivered, what="delivery to the new owner")
    assert len([r for r in misbehaving_server.requests_to("/up/fhir") if r.method == "POST"]) == 1


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
