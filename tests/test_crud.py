"""The REST instance interactions for every served type (FHIR R4 http.html)."""

from __future__ import annotations

import copy
import email.utils

import httpx
import pytest
from fastapi import FastAPI

from app.fhir.types import SERVED_TYPES
from tests.conftest import FHIR, bearer
from tests.samples import SAMPLES

JSON = {"content-type": "application/fhir+json"}


def test_every_served_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(SERVED_TYPES)


@pytest.mark.parametrize("resource_type", [t for t in SERVED_TYPES if t != "AuditEvent"])
async def test_lifecycle_of_every_type(client: httpx.AsyncClient, resource_type: str) -> None:
    sample = copy.deepcopy(SAMPLES[resource_type])
    created = await client.post(f"/fhir/{resource_type}", json=sample, headers=JSON)
    assert created.status_code == 201, created.text
    body = created.json()
    rid = body["id"]
    assert body["meta"]["versionId"] == "1"
    assert created.headers["etag"] == 'W/"1"'
    assert created.headers["location"] == f"{FHIR}/{resource_type}/{rid}/_history/1"
    assert email.utils.parsedate_to_datetime(created.headers["last-modified"]) is not None
    assert created.headers["content-type"].startswith("application/fhir+json")

    read = await client.get(f"/fhir/{resource_type}/{rid}")
    assert read.status_code == 200
    assert read.json() == body
    assert read.headers["etag"] == 'W/"1"'

    body["meta"] = {"tag": [{"system": "http://example.org/tags", "code": "reviewed"}]}
    updated = await client.put(f"/fhir/{resource_type}/{rid}", json=body, headers=JSON)
    assert updated.status_code == 200, updated.text
    assert updated.json()["meta"]["versionId"] == "2"
    assert updated.json()["meta"]["tag"][0]["code"] == "reviewed"
    assert updated.headers["etag"] == 'W/"2"'

    v1 = await client.get(f"/fhir/{resource_type}/{rid}/_history/1")
    assert v1.status_code == 200
    assert v1.json()["meta"]["versionId"] == "1"
    assert "tag" not in v1.json()["meta"]

    deleted = await client.delete(f"/fhir/{resource_type}/{rid}")
    assert deleted.status_code == 200
    assert deleted.json()["resourceType"] == "OperationOutcome"
    gone = await client.get(f"/fhir/{resource_type}/{rid}")
    assert gone.status_code == 410
    assert gone.json()["issue"][0]["code"] == "deleted"

    history = await client.get(f"/fhir/{resource_type}/{rid}/_history")
    assert history.status_code == 200
    entries = history.json()["entry"]
    assert [e["request"]["method"] for e in entries] == ["DELETE", "PUT", "POST"]
    assert "resource" not in entries[0]
    assert entries[0]["response"]["etag"] == 'W/"3"'
    assert entries[2]["resource"]["meta"]["versionId"] == "1"


async def test_clients_cannot_write_audit_events(app: FastAPI, client: httpx.AsyncClient) -> None:
    """AuditEvents are the server's records: a client may not create, change or delete one."""
    await client.get("/fhir/Patient")
    await app.state.audit.flush()
    auditor = await bearer(app, "system/AuditEvent.cruds")
    event = (await client.get("/fhir/AuditEvent", headers=auditor)).json()["entry"][0]["resource"]
    forged = {**event, "outcome": "8"}
    forged.pop("id")
    for response in (
        await client.post("/fhir/AuditEvent", json=forged, headers={**JSON, **auditor}),
        await client.put(
            f"/fhir/AuditEvent/{event['id']}", json={**event, "outcome": "8"}, headers={**JSON, **auditor}
        ),
        await client.patch(
            f"/fhir/AuditEvent/{event['id']}",
            json=[{"op": "replace", "path": "/outcome", "value": "8"}],
            headers={"content-type": "application/json-patch+json", **auditor},
        ),
        await client.delete(f"/fhir/AuditEvent/{event['id']}", headers=auditor),
    ):
        assert response.status_code == 405, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(f"/fhir/AuditEvent/{event['id']}", headers=auditor)).json() == event


async def test_create_ignores_client_id_and_meta(client: httpx.AsyncClient) -> None:
    sample = {
        **SAMPLES["Patient"],
        "id": "client-chosen",
        "meta": {"versionId": "99", "lastUpdated": "2001-01-01T00:00:00Z"},
    }
    created = await client.post("/fhir/Patient", json=sample, headers=JSON)
    assert created.status_code == 201
    body = created.json()
    assert body["id"] != "client-chosen"
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] != "2001-01-01T00:00:00Z"


async def test_update_as_create_with_client_id(client: httpx.AsyncClient) -> None:
    sample = {**SAMPLES["Goal"], "id": "goal-housing-1"}
    created = await client.put("/fhir/Goal/goal-housing-1", json=sample, headers=JSON)
    assert created.status_code == 201
    assert created.headers["location"] == f"{FHIR}/Goal/goal-housing-1/_history/1"
    again = await client.put("/fhir/Goal/goal-housing-1", json=sample, headers=JSON)
    assert again.status_code == 200
    assert again.json()["meta"]["versionId"] == "2"


async def test_if_match_on_update_and_delete(client: httpx.AsyncClient) -> None:
    created = (await client.post("/fhir/Task", json=SAMPLES["Task"], headers=JSON)).json()
    url = f"/fhir/Task/{created['id']}"
    ok = await client.put(url, json=created, headers={**JSON, "If-Match": 'W/"1"'})
    assert ok.status_code == 200
    stale = await client.put(url, json=created, headers={**JSON, "If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(url)).json()["meta"]["versionId"] == "2"
    stale_delete = await client.delete(url, headers={"If-Match": 'W/"1"'})
    assert stale_delete.status_code == 412
    assert (await client.get(url)).status_code == 200
    assert (await client.delete(url, headers={"If-Match": 'W/"2"'})).status_code == 200
    malformed = await client.put(url, json=created, headers={**JSON, "If-Match": "yesterday"})
    assert malformed.status_code == 400


async def test_delete_twice_and_revive(client: httpx.AsyncClient) -> None:
    created = (await client.post("/fhir/CarePlan", json=SAMPLES["CarePlan"], headers=JSON)).json()
    url = f"/fhir/CarePlan/{created['id']}"
    first = await client.delete(url)
    second = await client.delete(url, headers={"Prefer": "return=minimal"})
    assert first.status_code == 200
    assert second.status_code == 204
    assert first.headers["etag"] == second.headers["etag"] == 'W/"2"'
    revived = await client.put(url, json=created, headers=JSON)
    assert revived.status_code == 200
    assert revived.json()["meta"]["versionId"] == "3"
    assert (await client.get(url)).status_code == 200
    deleted_version = await client.get(f"{url}/_history/2")
    assert deleted_version.status_code == 410


async def test_unknown_ids_and_versions(client: httpx.AsyncClient) -> None:
    assert (await client.get("/fhir/Patient/does-not-exist")).status_code == 404
    assert (await client.delete("/fhir/Patient/does-not-exist")).status_code == 404
    assert (await client.get("/fhir/Patient/does-not-exist/_history")).status_code == 404
    created = (await client.post("/fhir/Patient", json=SAMPLES["Patient"], headers=JSON)).json()
    assert (await client.get(f"/fhir/Patient/{created['id']}/_history/7")).status_code == 404
    assert (await client.get(f"/fhir/Patient/{created['id']}/_history/x1")).status_code == 400
    assert (await client.get("/fhir/Patient/bad$id")).status_code == 400


async def test_prefer_return(client: httpx.AsyncClient) -> None:
    minimal = await client.post(
        "/fhir/Patient", json=SAMPLES["Patient"], headers={**JSON, "Prefer": "return=minimal"}
    )
    assert minimal.status_code == 201
    assert minimal.content == b""
    assert minimal.headers["location"].startswith(f"{FHIR}/Patient/")
    outcome = await client.post(
        "/fhir/Patient", json=SAMPLES["Patient"], headers={**JSON, "Prefer": "return=OperationOutcome"}
    )
    assert outcome.status_code == 201
    assert outcome.json()["resourceType"] == "OperationOutcome"
    representation = await client.post(
        "/fhir/Patient", json=SAMPLES["Patient"], headers={**JSON, "Prefer": "return=representation"}
    )
    assert representation.json()["resourceType"] == "Patient"


async def test_unsupported_type_is_404_not_supported(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/fhir/Medication/1"),
        ("POST", "/fhir/Medication"),
        ("GET", "/fhir/Foo"),
        ("PUT", "/fhir/Encounter/1"),
        ("GET", "/fhir/Encounter/1/_history/1"),
    ]:
        response = await client.request(method, path, json={"resourceType": "Medication"})
        assert response.status_code == 404, (method, path)
        assert response.json()["issue"][0]["code"] == "not-supported"


async def test_method_not_allowed_on_served_type(client: httpx.AsyncClient) -> None:
    response = await client.request("PATCH", "/fhir/Patient")
    assert response.status_code == 405
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_read_with_summary_and_elements(client: httpx.AsyncClient) -> None:
    body = {
        **SAMPLES["Patient"],
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Ana</div>'},
        "birthDate": "1980-01-01",
        "maritalStatus": {"text": "single"},
    }
    created = (await client.post("/fhir/Patient", json=body, headers=JSON)).json()
    url = f"/fhir/Patient/{created['id']}"
    summary = (await client.get(url, params={"_summary": "true"})).json()
    assert summary["birthDate"] == "1980-01-01"
    assert "maritalStatus" not in summary and "text" not in summary
    assert {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "SUBSETTED",
    } in summary["meta"]["tag"]
    elements = (await client.get(url, params={"_elements": "gender"})).json()
    assert set(elements) == {"resourceType", "id", "meta", "gender"}
    version = (await client.get(f"{url}/_history/1", params={"_summary": "data"})).json()
    assert "text" not in version and version["maritalStatus"] == {"text": "single"}
    full = (await client.get(url)).json()
    assert full["text"]["status"] == "generated"


async def test_head_answers_like_get_without_a_body(client: httpx.AsyncClient) -> None:
    created = (await client.post("/fhir/Patient", json=SAMPLES["Patient"], headers=JSON)).json()
    head = await client.head(f"/fhir/Patient/{created['id']}")
    assert head.status_code == 200
    assert head.headers["etag"] == 'W/"1"'
    assert head.content == b""
    assert (await client.head("/fhir/Patient?name=rivera")).status_code == 200
    assert (await client.head("/fhir/Patient/unknown")).status_code == 404
