"""Batch and transaction Bundles (R4 http.html#transaction, #batch)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import count_rows

JSON = {"content-type": "application/fhir+json"}
MRN = "http://hospital.example.org/mrn"
PATIENT = "urn:uuid:6b1b2c5e-1a2b-4c3d-8e9f-000000000001"
REQUEST = "urn:uuid:6b1b2c5e-1a2b-4c3d-8e9f-000000000002"
CONDITION_1 = "urn:uuid:6b1b2c5e-1a2b-4c3d-8e9f-000000000003"
CONDITION_2 = "urn:uuid:6b1b2c5e-1a2b-4c3d-8e9f-000000000004"


def post(full_url: str, resource: dict[str, Any], **request: str) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }


def referral(mrn: str = "r-1") -> list[dict[str, Any]]:
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": "Okafor"}],
    }
    conditions = [
        {"resourceType": "Condition", "subject": {"reference": PATIENT}, "code": {"text": text}}
        for text in ("Housing instability", "Food insecurity")
    ]
    service_request = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {"text": "Housing navigation"},
        "subject": {"reference": PATIENT},
        "reasonReference": [{"reference": CONDITION_1}, {"reference": CONDITION_2}],
        "extension": [
            {"url": "http://example.org/pertains-to", "valueReference": {"reference": CONDITION_1}}
        ],
    }
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "focus": {"reference": REQUEST},
        "for": {"reference": PATIENT},
        "contained": [
            {
                "resourceType": "Provenance",
                "id": "p1",
                "recorded": "2026-01-01T00:00:00Z",
                "target": [{"reference": REQUEST}],
                "agent": [{"who": {"display": "Case manager"}}],
            }
        ],
    }
    return [
        post(PATIENT, patient),
        post(REQUEST, service_request),
        post("urn:uuid:task", task),
        post(CONDITION_1, conditions[0]),
        post(CONDITION_2, conditions[1]),
    ]


def bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


async def test_transaction_rewrites_references_and_answers_in_entry_order(client: httpx.AsyncClient) -> None:
    response = await client.post("/fhir", json=bundle("transaction", referral()), headers=JSON)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    locations = [e["response"]["location"] for e in result["entry"]]
    assert [loc.split("/")[0] for loc in locations] == [
        "Patient",
        "ServiceRequest",
        "Task",
        "Condition",
        "Condition",
    ]
    assert all(e["response"]["status"] == "201 Created" for e in result["entry"])
    assert all(e["response"]["etag"] == 'W/"1"' for e in result["entry"])
    patient_ref, request_ref, task_ref, c1, c2 = ("/".join(loc.split("/")[:2]) for loc in locations)
    task = (await client.get(f"/fhir/{task_ref}")).json()
    assert task["for"]["reference"] == patient_ref
    assert task["focus"]["reference"] == request_ref
    assert task["contained"][0]["target"][0]["reference"] == request_ref
    service_request = (await client.get(f"/fhir/{request_ref}")).json()
    assert [r["reference"] for r in service_request["reasonReference"]] == [c1, c2]
    assert service_request["extension"][0]["valueReference"]["reference"] == c1
    assert "urn:uuid" not in json.dumps(service_request)
    found = (await client.get("/fhir/Task", params={"patient": patient_ref})).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [task_ref.split("/")[1]]


async def test_transaction_is_all_or_nothing(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    entries = referral()
    entries[4]["resource"]["clinicalStatus"] = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "bogus"}]
    }
    response = await client.post("/fhir", json=bundle("transaction", entries), headers=JSON)
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[4]" in outcome["issue"][0]["diagnostics"]
    assert await count_rows(engine, "resource") == 0
    assert await count_rows(engine, "search_token") == 0


async def test_transaction_order_and_conditional_references(client: httpx.AsyncClient) -> None:
    await client.put(
        "/fhir/Patient/existing",
        json={
            "resourceType": "Patient",
            "id": "existing",
            "identifier": [{"system": MRN, "value": "cond-1"}],
        },
        headers=JSON,
    )
    await client.put(
        "/fhir/Goal/old",
        json={
            "resourceType": "Goal",
            "id": "old",
            "lifecycleStatus": "active",
            "description": {"text": "x"},
            "subject": {"reference": "Patient/existing"},
        },
        headers=JSON,
    )
    entries = [
        {"request": {"method": "GET", "url": "Goal/new"}},
        {
            "resource": {
                "resourceType": "Goal",
                "id": "new",
                "lifecycleStatus": "proposed",
                "description": {"text": "Stable housing"},
                "subject": {"reference": f"Patient?identifier={MRN}|cond-1"},
            },
            "request": {"method": "PUT", "url": "Goal/new"},
        },
        {"request": {"method": "DELETE", "url": "Goal/old"}},
    ]
    response = await client.post("/fhir", json=bundle("transaction", entries), headers=JSON)
    assert response.status_code == 200, response.text
    result = response.json()["entry"]
    assert result[0]["resource"]["subject"]["reference"] == "Patient/existing"  # GET runs after the PUT
    assert result[1]["response"]["status"] == "201 Created"
    assert result[2]["response"]["status"] == "200 OK"
    assert (await client.get("/fhir/Goal/old")).status_code == 410
    missing = [
        {
            "resource": {
                "resourceType": "Goal",
                "lifecycleStatus": "active",
                "description": {"text": "x"},
                "subject": {"reference": f"Patient?identifier={MRN}|nobody"},
            },
            "request": {"method": "POST", "url": "Goal"},
        }
    ]
    failed = await client.post("/fhir", json=bundle("transaction", missing), headers=JSON)
    assert failed.status_code == 412
    assert "Bundle.entry[0]" in failed.json()["issue"][0]["diagnostics"]


async def test_transaction_if_none_exist_and_patch(client: httpx.AsyncClient) -> None:
    first = await client.post("/fhir", json=bundle("transaction", referral("same")), headers=JSON)
    patient_id = first.json()["entry"][0]["response"]["location"].split("/")[1]
    entries = referral("same")
    entries[0]["request"]["ifNoneExist"] = f"identifier={MRN}|same"
    second = await client.post("/fhir", json=bundle("transaction", entries), headers=JSON)
    assert second.status_code == 200
    result = second.json()["entry"]
    assert result[0]["response"]["status"] == "200 OK"
    assert result[0]["response"]["location"].split("/")[1] == patient_id
    task_ref = "/".join(result[2]["response"]["location"].split("/")[:2])
    task = (await client.get(f"/fhir/{task_ref}")).json()
    assert task["for"]["reference"] == f"Patient/{patient_id}"
    json_patch = [{"op": "replace", "path": "/status", "value": "accepted"}]
    patch_entry = {
        "resource": {
            "resourceType": "Binary",
            "contentType": "application/json-patch+json",
            "data": base64.b64encode(json.dumps(json_patch).encode()).decode(),
        },
        "request": {"method": "PATCH", "url": task_ref},
    }
    patched = await client.post("/fhir", json=bundle("transaction", [patch_entry]), headers=JSON)
    assert patched.status_code == 200, patched.text
    assert (await client.get(f"/fhir/{task_ref}")).json()["status"] == "accepted"


async def test_concurrent_transactions_with_the_same_conditional_create(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    def one() -> dict[str, Any]:
        entries = referral("racing")[:1]
        entries[0]["request"]["ifNoneExist"] = f"identifier={MRN}|racing"
        return bundle("transaction", entries)

    responses = await asyncio.gather(*(client.post("/fhir", json=one(), headers=JSON) for _ in range(50)))
    assert all(r.status_code == 200 for r in responses)
    statuses = [r.json()["entry"][0]["response"]["status"] for r in responses]
    assert statuses.count("201 Created") == 1
    assert statuses.count("200 OK") == 49
    assert await count_rows(engine, "resource") == 1


async def test_batch_entries_are_independent(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    entries = [
        {
            "resource": {"resourceType": "Patient", "name": [{"family": "One"}]},
            "request": {"method": "POST", "url": "Patient"},
        },
        {
            "resource": {"resourceType": "Patient", "gender": "robot"},
            "request": {"method": "POST", "url": "Patient"},
        },
        {"request": {"method": "GET", "url": "Patient/nobody"}},
        {
            "resource": {"resourceType": "Patient", "id": "two", "name": [{"family": "Two"}]},
            "request": {"method": "PUT", "url": "Patient/two"},
        },
        {"request": {"method": "GET", "url": "Patient?family=two"}},
    ]
    response = await client.post("/fhir", json=bundle("batch", entries), headers=JSON)
    assert response.status_code == 200
    result = response.json()
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["201 Created", "400 Bad Request", "404 Not Found", "201 Created", "200 OK"]
    assert result["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert result["entry"][4]["resource"]["type"] == "searchset"
    assert await count_rows(engine, "resource") == 2


async def test_bundle_limits_and_bad_bundles(client: httpx.AsyncClient) -> None:
    too_many = bundle("batch", [{"request": {"method": "GET", "url": "Patient/x"}}] * 1001)
    assert (await client.post("/fhir", json=too_many, headers=JSON)).status_code == 413
    assert (
        await client.post("/fhir", json={"resourceType": "Bundle", "type": "collection"}, headers=JSON)
    ).status_code == 400
    assert (await client.post("/fhir", json={"resourceType": "Patient"}, headers=JSON)).status_code == 400
    no_request = bundle("transaction", [{"resource": {"resourceType": "Patient"}}])
    bad = await client.post("/fhir", json=no_request, headers=JSON)
    assert bad.status_code == 400
    assert "Bundle.entry[0]" in bad.json()["issue"][0]["diagnostics"]
    same_twice = bundle(
        "transaction",
        [
            {
                "resource": {"resourceType": "Patient", "id": "dup"},
                "request": {"method": "PUT", "url": "Patient/dup"},
            },
            {
                "resource": {"resourceType": "Patient", "id": "dup"},
                "request": {"method": "PUT", "url": "Patient/dup"},
            },
        ],
    )
    assert (await client.post("/fhir", json=same_twice, headers=JSON)).status_code == 400
