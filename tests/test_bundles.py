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


# -- GET entries and overlapping entries (R4 http.html#trules) -----------------------------------


async def _patient(client: httpx.AsyncClient, fhir_id: str, mrn: str) -> None:
    body = {"resourceType": "Patient", "id": fhir_id, "identifier": [{"system": MRN, "value": mrn}]}
    assert (await client.put(f"/fhir/Patient/{fhir_id}", json=body, headers=JSON)).status_code == 201


async def test_a_search_after_a_delete_in_the_same_transaction_finds_nothing(
    client: httpx.AsyncClient,
) -> None:
    """GET entries run last (after DELETE, POST, PUT/PATCH), whatever their place in the Bundle:
    a search for what the transaction deletes is a 200 with an empty searchset."""
    await _patient(client, "x", "gone-1")
    entries = [
        {"request": {"method": "GET", "url": "Patient?_id=x"}},
        {"request": {"method": "DELETE", "url": "Patient/x"}},
        {"request": {"method": "GET", "url": f"Patient?identifier={MRN}|gone-1"}},
    ]
    response = await client.post("/fhir", json=bundle("transaction", entries), headers=JSON)
    assert response.status_code == 200, response.text
    first, deleted, second = response.json()["entry"]
    for search in (first, second):
        assert search["response"]["status"] == "200 OK"
        assert search["resource"]["type"] == "searchset"
        assert search["resource"].get("entry", []) == []
    assert deleted["response"]["status"] == "200 OK"
    assert (await client.get("/fhir/Patient/x")).status_code == 410


async def test_a_read_of_what_the_transaction_deletes_is_410_in_its_own_entry(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """The read runs after the DELETE and answers what a read after the transaction would: 410,
    as that entry's outcome (HAPI does the same); the transaction itself succeeds."""
    await _patient(client, "x", "gone-2")
    await _patient(client, "y", "gone-3")
    read_x = {"request": {"method": "GET", "url": "Patient/x"}}
    read_y = {"request": {"method": "GET", "url": "Patient/y"}}
    delete_x = {"request": {"method": "DELETE", "url": "Patient/x"}}
    delete_y = {"request": {"method": "DELETE", "url": f"Patient?identifier={MRN}|gone-3"}}
    create = post(PATIENT, {"resourceType": "Patient", "name": [{"family": "Kept"}]})
    response = await client.post(
        "/fhir", json=bundle("transaction", [read_x, delete_x, create, delete_y, read_y]), headers=JSON
    )
    assert response.status_code == 200, response.text
    result = response.json()["entry"]
    assert [e["response"]["status"] for e in result] == [
        "410 Gone",
        "200 OK",
        "201 Created",
        "200 OK",
        "410 Gone",
    ]
    for entry in (result[0], result[4]):
        assert entry["response"]["outcome"]["resourceType"] == "OperationOutcome"
        assert entry["response"]["outcome"]["issue"][0]["code"] == "deleted"
        assert "resource" not in entry
    # the order of the entries in the Bundle does not matter
    await _patient(client, "z", "gone-4")
    reordered = [
        {"request": {"method": "DELETE", "url": "Patient/z"}},
        {"request": {"method": "GET", "url": "Patient/z"}},
    ]
    response = await client.post("/fhir", json=bundle("transaction", reordered), headers=JSON)
    assert [e["response"]["status"] for e in response.json()["entry"]] == ["200 OK", "410 Gone"]
    assert await count_rows(engine, "resource") == 4  # x, y, z (deleted) and the new Patient
    found = (await client.get("/fhir/Patient", params={"family": "Kept"})).json()
    assert len(found["entry"]) == 1


async def test_a_read_that_fails_for_another_reason_still_fails_the_transaction(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Only a read of what the transaction itself deleted is an entry outcome: a read of a
    resource that is not there (or that another request deleted) fails the transaction, which
    writes nothing."""
    await _patient(client, "old", "gone-5")
    assert (await client.delete("/fhir/Patient/old")).status_code == 200
    create = post(PATIENT, {"resourceType": "Patient", "name": [{"family": "Never"}]})
    for url, status in (("Patient/nobody", 404), ("Patient/old", 410)):
        entries = [create, {"request": {"method": "GET", "url": url}}]
        response = await client.post("/fhir", json=bundle("transaction", entries), headers=JSON)
        assert response.status_code == status, response.text
        assert "Bundle.entry[1]" in response.json()["issue"][0]["diagnostics"]
    assert (await client.get("/fhir/Patient", params={"family": "Never"})).json().get("entry", []) == []
    assert await count_rows(engine, "resource") == 1


async def test_the_resources_written_may_not_overlap_but_reads_do_not_count(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await _patient(client, "x", "ov-1")
    put_x = {
        "resource": {
            "resourceType": "Patient",
            "id": "x",
            "identifier": [{"system": MRN, "value": "ov-1"}],
            "active": True,
        },
        "request": {"method": "PUT", "url": "Patient/x"},
    }
    patch_x = {
        "resource": {
            "resourceType": "Binary",
            "contentType": "application/json-patch+json",
            "data": base64.b64encode(b'[{"op": "add", "path": "/active", "value": false}]').decode(),
        },
        "request": {"method": "PATCH", "url": "Patient/x"},
    }
    delete_x = {"request": {"method": "DELETE", "url": "Patient/x"}}
    delete_matching_x = {"request": {"method": "DELETE", "url": f"Patient?identifier={MRN}|ov-1"}}
    put_matching_x = {
        "resource": {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "ov-1"}]},
        "request": {"method": "PUT", "url": f"Patient?identifier={MRN}|ov-1"},
    }
    create_matching_x = post(
        "urn:uuid:6b1b2c5e-1a2b-4c3d-8e9f-0000000000aa",
        {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "ov-1"}]},
        ifNoneExist=f"identifier={MRN}|ov-1",
    )
    overlapping = [
        [delete_x, put_x],
        [put_x, patch_x],
        [delete_matching_x, put_x],  # the conditional DELETE resolves to Patient/x
        [put_matching_x, delete_x],  # so does the conditional PUT
        [create_matching_x, patch_x],  # and the conditional create
        [delete_matching_x, delete_x],
    ]
    for entries in overlapping:
        response = await client.post("/fhir", json=bundle("transaction", entries), headers=JSON)
        assert response.status_code == 400, (entries, response.text)
        outcome = response.json()
        assert "Patient/x is also written by entry 0" in outcome["issue"][0]["diagnostics"]
        assert outcome["issue"][0]["expression"] == ["Bundle.entry[1]"]
    assert await count_rows(engine) == 1  # nothing written: still version 1 of Patient/x

    # Reads name what they like: they run last and see the writes.
    read_x = {"request": {"method": "GET", "url": "Patient/x"}}
    search_x = {"request": {"method": "GET", "url": "Patient?_id=x"}}
    response = await client.post(
        "/fhir", json=bundle("transaction", [read_x, search_x, put_x, read_x]), headers=JSON
    )
    assert response.status_code == 200, response.text
    result = response.json()["entry"]
    assert result[0]["resource"]["active"] is True and result[0]["resource"]["meta"]["versionId"] == "2"
    assert result[1]["resource"]["entry"][0]["resource"]["active"] is True
    assert result[3] == result[0]
    # Two conditional creates that find the same resource write nothing: they may coincide.
    second_create = {**create_matching_x, "fullUrl": "urn:uuid:6b1b2c5e-1a2b-4c3d-8e9f-0000000000bb"}
    response = await client.post(
        "/fhir", json=bundle("transaction", [create_matching_x, second_create]), headers=JSON
    )
    assert response.status_code == 200, response.text
    assert {e["response"]["location"] for e in response.json()["entry"]} == {"Patient/x/_history/2"}
