"""Conditional interactions, PATCH and concurrency (R4 http.html#ccreate, #cond-update, #cdelete, #patch)."""

from __future__ import annotations

import asyncio
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import bearer, count_rows
from tests.test_authorization import _observation
from tests.test_search_support import put

JSON = {"content-type": "application/fhir+json"}
JSON_PATCH = {"content-type": "application/json-patch+json"}
MRN = "http://hospital.example.org/mrn"


def patient(mrn: str, family: str = "Rivera") -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": family}],
    }


async def test_conditional_create_zero_one_many(client: httpx.AsyncClient) -> None:
    condition = {"If-None-Exist": f"identifier={MRN}|100"}
    first = await client.post("/fhir/Patient", json=patient("100"), headers={**JSON, **condition})
    assert first.status_code == 201
    again = await client.post("/fhir/Patient", json=patient("100", "Other"), headers={**JSON, **condition})
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["name"][0]["family"] == "Rivera"
    await client.post("/fhir/Patient", json=patient("200"), headers=JSON)
    await client.post("/fhir/Patient", json=patient("200"), headers=JSON)
    many = await client.post(
        "/fhir/Patient", json=patient("200"), headers={**JSON, "If-None-Exist": f"identifier={MRN}|200"}
    )
    assert many.status_code == 412
    unknown = await client.post(
        "/fhir/Patient", json=patient("300"), headers={**JSON, "If-None-Exist": "bogus=1"}
    )
    assert unknown.status_code == 400


async def test_concurrent_identical_conditional_creates_make_one_resource(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    headers = {**JSON, "If-None-Exist": f"identifier={MRN}|race"}
    responses = await asyncio.gather(
        *(client.post("/fhir/Patient", json=patient("race"), headers=headers) for _ in range(50))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 1
    assert statuses.count(200) == 49
    assert len({r.json()["id"] for r in responses}) == 1
    assert await count_rows(engine, "resource") == 1


async def test_concurrent_if_match_updates_one_winner_per_version(client: httpx.AsyncClient) -> None:
    created = (
        await client.post(
            "/fhir/Task",
            json={"resourceType": "Task", "status": "requested", "intent": "order"},
            headers=JSON,
        )
    ).json()
    url = f"/fhir/Task/{created['id']}"

    async def put(note: int) -> httpx.Response:
        body = {**created, "note": [{"text": f"writer {note}"}]}
        return await client.put(url, json=body, headers={**JSON, "If-Match": 'W/"1"'})

    responses = await asyncio.gather(*(put(n) for n in range(50)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 1
    assert statuses.count(412) == 49
    assert (await client.get(url)).json()["meta"]["versionId"] == "2"


async def test_no_lost_update_under_concurrent_patches(client: httpx.AsyncClient) -> None:
    created = (
        await client.post(
            "/fhir/CarePlan",
            json={
                "resourceType": "CarePlan",
                "status": "active",
                "intent": "plan",
                "subject": {"reference": "Patient/p"},
            },
            headers=JSON,
        )
    ).json()
    url = f"/fhir/CarePlan/{created['id']}"

    async def add_note(n: int) -> httpx.Response:
        operations = (
            [{"op": "add", "path": "/note/-", "value": {"text": f"note {n}"}}]
            if n
            else [{"op": "add", "path": "/note", "value": [{"text": "note 0"}]}]
        )
        return await client.patch(
            url, json=operations, headers={"content-type": "application/json-patch+json"}
        )

    first = await add_note(0)
    assert first.status_code == 200
    responses = await asyncio.gather(*(add_note(n) for n in range(1, 50)))
    assert all(r.status_code == 200 for r in responses)
    final = (await client.get(url)).json()
    assert sorted(note["text"] for note in final["note"]) == sorted(f"note {n}" for n in range(50))
    assert final["meta"]["versionId"] == "51"


async def test_conditional_update(client: httpx.AsyncClient) -> None:
    created = await client.put(f"/fhir/Patient?identifier={MRN}|500", json=patient("500"), headers=JSON)
    assert created.status_code == 201
    rid = created.json()["id"]
    updated = await client.put(
        f"/fhir/Patient?identifier={MRN}|500", json=patient("500", "Changed"), headers=JSON
    )
    assert updated.status_code == 200
    assert updated.json()["id"] == rid
    assert updated.json()["name"][0]["family"] == "Changed"
    wrong_id = await client.put(
        f"/fhir/Patient?identifier={MRN}|500", json={**patient("500"), "id": "other"}, headers=JSON
    )
    assert wrong_id.status_code == 400
    await client.post("/fhir/Patient", json=patient("600"), headers=JSON)
    await client.post("/fhir/Patient", json=patient("600"), headers=JSON)
    many = await client.put(f"/fhir/Patient?identifier={MRN}|600", json=patient("600"), headers=JSON)
    assert many.status_code == 412
    no_criteria = await client.put("/fhir/Patient", json=patient("700"), headers=JSON)
    assert no_criteria.status_code == 400


async def test_conditional_delete(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    one = (await client.post("/fhir/Patient", json=patient("800"), headers=JSON)).json()
    deleted = await client.delete(f"/fhir/Patient?identifier={MRN}|800")
    assert deleted.status_code == 200
    assert (await client.get(f"/fhir/Patient/{one['id']}")).status_code == 410
    none = await client.delete(f"/fhir/Patient?identifier={MRN}|nobody")
    assert none.status_code == 204
    for _ in range(11):
        await client.post("/fhir/Patient", json=patient("900"), headers=JSON)
    too_many = await client.delete(f"/fhir/Patient?identifier={MRN}|900")
    assert too_many.status_code == 412
    found = (
        await client.get("/fhir/Patient", params={"identifier": f"{MRN}|900", "_total": "accurate"})
    ).json()
    assert found["total"] == 11


async def test_conditional_read(client: httpx.AsyncClient) -> None:
    created = await client.post("/fhir/Patient", json=patient("1000"), headers=JSON)
    url = f"/fhir/Patient/{created.json()['id']}"
    not_modified = await client.get(url, headers={"If-None-Match": 'W/"1"'})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert (await client.get(url, headers={"If-None-Match": 'W/"7"'})).status_code == 200
    last_modified = created.headers["last-modified"]
    assert (await client.get(url, headers={"If-Modified-Since": last_modified})).status_code == 304
    earlier = format_datetime(parsedate_to_datetime(last_modified).replace(year=2000), usegmt=True)
    assert (await client.get(url, headers={"If-Modified-Since": earlier})).status_code == 200


async def test_json_patch(client: httpx.AsyncClient) -> None:
    created = (await client.post("/fhir/Patient", json=patient("1100"), headers=JSON)).json()
    url = f"/fhir/Patient/{created['id']}"
    patch_json = {"content-type": "application/json-patch+json"}
    ok = await client.patch(
        url,
        json=[{"op": "add", "path": "/gender", "value": "female"}],
        headers={**patch_json, "If-Match": 'W/"1"'},
    )
    assert ok.status_code == 200
    assert ok.json()["gender"] == "female"
    assert ok.json()["meta"]["versionId"] == "2"
    stale = await client.patch(
        url, json=[{"op": "remove", "path": "/gender"}], headers={**patch_json, "If-Match": 'W/"1"'}
    )
    assert stale.status_code == 412
    bad_path = await client.patch(url, json=[{"op": "remove", "path": "/nothing/here"}], headers=patch_json)
    assert bad_path.status_code == 400
    invalid_result = await client.patch(
        url, json=[{"op": "replace", "path": "/gender", "value": "robot"}], headers=patch_json
    )
    assert invalid_result.status_code == 400
    failed_test = await client.patch(
        url,
        json=[{"op": "test", "path": "/gender", "value": "male"}, {"op": "remove", "path": "/gender"}],
        headers=patch_json,
    )
    assert failed_test.status_code == 422
    change_id = await client.patch(
        url, json=[{"op": "replace", "path": "/id", "value": "x"}], headers=patch_json
    )
    assert change_id.status_code == 422
    final = (await client.get(url)).json()
    assert final["gender"] == "female"
    assert final["meta"]["versionId"] == "2"


def operation(**parts: object) -> dict[str, object]:
    typed = {
        "type": "valueCode",
        "path": "valueString",
        "name": "valueString",
        "index": "valueInteger",
        "source": "valueInteger",
        "destination": "valueInteger",
    }
    out = []
    for name, value in parts.items():
        if name == "value":
            key, inner = value  # type: ignore[misc]
            out.append({"name": "value", key: inner})
        else:
            out.append({"name": name, typed[name]: value})
    return {"name": "operation", "part": out}


async def test_fhirpath_patch(client: httpx.AsyncClient) -> None:
    body = {
        **patient("1200"),
        "birthDate": "1970-01-01",
        "telecom": [{"system": "phone", "value": "555-0100"}, {"system": "email", "value": "a@example.org"}],
    }
    created = (await client.post("/fhir/Patient", json=body, headers=JSON)).json()
    url = f"/fhir/Patient/{created['id']}"
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            operation(type="replace", path="Patient.birthDate", value=("valueDate", "1971-02-03")),
            operation(type="add", path="Patient", name="gender", value=("valueCode", "female")),
            operation(type="add", path="Patient.name[0]", name="given", value=("valueString", "Ana")),
            operation(type="delete", path="Patient.telecom.where(system='email')"),
            operation(
                type="insert",
                path="Patient.identifier",
                index=0,
                value=("valueIdentifier", {"system": "urn:other", "value": "x"}),
            ),
        ],
    }
    patched = await client.patch(url, json=parameters, headers=JSON)
    assert patched.status_code == 200, patched.text
    result = patched.json()
    assert result["birthDate"] == "1971-02-03"
    assert result["gender"] == "female"
    assert result["name"][0]["given"] == ["Ana"]
    assert result["telecom"] == [{"system": "phone", "value": "555-0100"}]
    assert [i["system"] for i in result["identifier"]] == ["urn:other", MRN]
    bad = {
        "resourceType": "Parameters",
        "parameter": [operation(type="replace", path="Patient.gender", value=("valueCode", "robot"))],
    }
    assert (await client.patch(url, json=bad, headers=JSON)).status_code == 400
    ambiguous = {
        "resourceType": "Parameters",
        "parameter": [operation(type="replace", path="Patient.identifier", value=("valueString", "x"))],
    }
    assert (await client.patch(url, json=ambiguous, headers=JSON)).status_code == 422
    assert (await client.get(url)).json()["meta"]["versionId"] == "2"


# -- what a token that may not read learns from conditional writes and PATCH --------------------


def _bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


async def test_update_only_token_reads_nothing_through_patch(app: FastAPI, client: httpx.AsyncClient) -> None:
    await put(client, "Observation", "obs-x", _observation("p2", code="secret-code"))
    update_only = await bearer(app, "system/Observation.u")
    headers = {**update_only, **JSON_PATCH}
    assert (await client.get("/fhir/Observation/obs-x", headers=update_only)).status_code == 403
    # A failing JSON Patch "test" writes nothing but echoes the stored value.
    probe = [{"op": "test", "path": "/code/coding/0/code", "value": "guess"}]
    response = await client.patch("/fhir/Observation/obs-x", json=probe, headers=headers)
    assert "secret-code" not in response.text, response.text[:300]
    # An empty patch answers the whole current resource.
    response = await client.patch("/fhir/Observation/obs-x", json=[], headers=headers)
    assert "secret-code" not in response.text, response.text[:300]


async def test_conditional_update_if_match_does_not_reveal_the_matching_id(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await put(client, "Observation", "obs-hidden-id", _observation("p2", code="hiv"))
    update_only = await bearer(app, "system/Observation.u")
    body = {"resourceType": "Observation", **_observation("x")}
    response = await client.put(
        "/fhir/Observation?code=hiv", json=body, headers={**JSON, **update_only, "if-match": 'W/"999"'}
    )
    assert "obs-hidden-id" not in response.text, response.text[:300]


async def test_conditional_create_is_no_existence_oracle(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """A create-only token, and a token that may read only some Observations, learn nothing from
    If-None-Exist about Observations they cannot read."""
    await put(client, "Observation", "obs-p2-hiv", _observation("p2", code="hiv"))
    body = {"resourceType": "Observation", **_observation("x")}
    create_only = {**JSON, **await bearer(app, "system/Observation.c")}

    async def attempt(condition: str) -> int:
        # A transaction whose second entry always fails: nothing is ever written.
        transaction = _bundle(
            "transaction",
            {"resource": body, "request": {"method": "POST", "url": "Observation", "ifNoneExist": condition}},
            {
                "resource": {"resourceType": "Observation", "status": "bogus"},
                "request": {"method": "POST", "url": "Observation"},
            },
        )
        return (await client.post("/fhir", json=transaction, headers=create_only)).status_code

    assert await attempt("code=hiv&subject=Patient/p2") == await attempt("code=absent&subject=Patient/p2")
    partial_reader = await bearer(
        app, "system/Observation.c system/Observation.rs?code=http://loinc.org|none"
    )
    response = await client.post(
        "/fhir/Observation", json=body, headers={**JSON, **partial_reader, "if-none-exist": "code=hiv"}
    )
    assert "obs-p2-hiv" not in response.text, response.text[:300]
