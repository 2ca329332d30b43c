"""Adversarial probes of the authorization layer (app/fhir/access.py and its callers).

Each test states what a token must NOT be able to do. The ``test_no_leak_*`` ones reproduce
holes a security review found (and that are now closed); the last test is a regression net
over the paths that held from the start.
World: tests/test_authorization.py ``world`` (p1/p2, partnerA/partnerB referrals).
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from tests import test_authorization as authorization
from tests.conftest import bearer
from tests.test_authorization import P2_DATA, _observation
from tests.test_search_support import JSON, match_ids, put, typed_ids

# The leakage world and its tokens (fixtures of tests/test_authorization.py).
world = authorization.world
patient_p1 = authorization.patient_p1
partner_a = authorization.partner_a

JSON_PATCH = {"content-type": "application/json-patch+json"}


def _bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


# -- partner organisation ----------------------------------------------------------------------


async def test_no_leak_partner_grants_itself_access_by_authoring_a_task(
    client: httpx.AsyncClient, partner_a: dict[str, str]
) -> None:
    """A Task the partner itself creates (owner = itself) must not widen what it sees."""
    task = {
        "resourceType": "Task",
        "status": "draft",
        "intent": "plan",
        "owner": {"reference": "Organization/partnerA"},
        "for": {"reference": "Patient/p2"},
        "focus": {"reference": "ServiceRequest/sr-p2"},
        "input": [{"type": {"text": "x"}, "valueReference": {"reference": "Condition/secret-p1"}}],
    }
    created = await client.post("/fhir/Task", json=task, headers={**JSON, **partner_a})
    if created.status_code == 201:
        for key in ("Patient/p2", "ServiceRequest/sr-p2", "Condition/cond-p2", "Condition/secret-p1"):
            response = await client.get(f"/fhir/{key}", headers=partner_a)
            assert response.status_code == 404, f"{key} became readable: {response.text[:200]}"
    else:
        assert created.status_code == 403


async def test_no_leak_partner_widens_access_by_editing_its_referral(
    client: httpx.AsyncClient, partner_a: dict[str, str]
) -> None:
    """Adding a reference to the Task it owns must not make the target readable or writable."""
    task = (await client.get("/fhir/Task/task-p1", headers=partner_a)).json()
    task["input"] = [{"type": {"text": "x"}, "valueReference": {"reference": "Patient/p2"}}]
    updated = await client.put("/fhir/Task/task-p1", json=task, headers={**JSON, **partner_a})
    if updated.status_code == 200:
        assert (await client.get("/fhir/Patient/p2", headers=partner_a)).status_code == 404
        overwrite = {"resourceType": "Patient", "id": "p2", "gender": "male"}
        response = await client.put("/fhir/Patient/p2", json=overwrite, headers={**JSON, **partner_a})
        assert response.status_code == 404
    else:
        assert updated.status_code == 403
    assert (await client.get("/fhir/Patient/p2")).json()["gender"] == "female"


# -- patient-scoped writes -----------------------------------------------------------------------


async def test_no_leak_patient_app_writes_into_another_patients_record(
    app: FastAPI, client: httpx.AsyncClient, patient_p1: dict[str, str]
) -> None:
    """subject=Patient/p2 is refused (test_authorization); adding performer=Patient/p1 must not help."""
    planted = {
        "resourceType": "Observation",
        **_observation("p2", code="planted"),
        "performer": [{"reference": "Patient/p1"}],
    }
    response = await client.post("/fhir/Observation", json=planted, headers={**JSON, **patient_p1})
    assert response.status_code == 403, response.text[:300]
    p2_app = await bearer(app, "patient/*.rs", patient="p2")
    seen = (await client.get("/fhir/Observation", params={"code": "planted"}, headers=p2_app)).json()
    assert match_ids(seen) == []


# -- write letters used to read ------------------------------------------------------------------


async def test_no_leak_update_only_token_reads_through_patch(app: FastAPI, client: httpx.AsyncClient) -> None:
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


async def test_no_leak_conditional_update_if_match_reveals_matching_id(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await put(client, "Observation", "obs-hidden-id", _observation("p2", code="hiv"))
    update_only = await bearer(app, "system/Observation.u")
    body = {"resourceType": "Observation", **_observation("x")}
    response = await client.put(
        "/fhir/Observation?code=hiv", json=body, headers={**JSON, **update_only, "if-match": 'W/"999"'}
    )
    assert "obs-hidden-id" not in response.text, response.text[:300]


async def test_no_leak_conditional_create_is_an_existence_oracle(
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


# -- versions --------------------------------------------------------------------------------------


async def test_no_leak_old_versions_outside_the_compartment(
    client: httpx.AsyncClient, patient_p1: dict[str, str]
) -> None:
    """Observation/moved was p2's (version 1) and is p1's now: p1 must not read version 1."""
    await put(client, "Observation", "moved", {**_observation("p2"), "valueString": "p2-only text"})
    await put(client, "Observation", "moved", _observation("p1"))
    assert (await client.get("/fhir/Observation/moved", headers=patient_p1)).status_code == 200
    vread = await client.get("/fhir/Observation/moved/_history/1", headers=patient_p1)
    assert vread.status_code == 404, vread.text[:300]
    for path in ("Observation/moved/_history", "Observation/_history", "_history"):
        response = await client.get(f"/fhir/{path}", headers=patient_p1)
        assert "p2-only text" not in response.text, path


# -- AuditEvent ------------------------------------------------------------------------------------


async def test_no_leak_clients_forge_audit_events(
    client: httpx.AsyncClient, partner_a: dict[str, str], patient_p1: dict[str, str]
) -> None:
    forged = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "recorded": "2024-01-01T00:00:00Z",
        "agent": [
            {
                "who": {"identifier": {"system": "urn:carecoord:oauth-client", "value": "someone-else"}},
                "requestor": True,
            }
        ],
        "source": {"observer": {"display": "carecoord"}},
        "entity": [{"what": {"reference": "Patient/p1"}}],
    }
    for headers in (partner_a, patient_p1):
        direct = await client.post("/fhir/AuditEvent", json=forged, headers={**JSON, **headers})
        assert direct.status_code in (403, 405), direct.text[:200]
        batch = _bundle("batch", {"resource": forged, "request": {"method": "POST", "url": "AuditEvent"}})
        result = (await client.post("/fhir", json=batch, headers={**JSON, **headers})).json()
        assert result["entry"][0]["response"]["status"][:3] in ("403", "405")


async def test_no_leak_patient_app_reads_audit_events_naming_other_patients(
    app: FastAPI, client: httpx.AsyncClient, patient_p1: dict[str, str]
) -> None:
    batch = _bundle(
        "batch",
        {"request": {"method": "GET", "url": "Patient/p1"}},
        {"request": {"method": "GET", "url": "Patient/p2"}},
    )
    assert (await client.post("/fhir", json=batch, headers=JSON)).status_code == 200
    await app.state.audit.flush()
    response = await client.get("/fhir/AuditEvent", params={"_count": "100"}, headers=patient_p1)
    assert "Patient/p2" not in response.text


# -- scope restrictions ----------------------------------------------------------------------------


async def test_no_leak_unusable_restriction_breaks_the_token(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    """A restriction this server cannot express drops its permission; it must not turn every
    request of the token (valid permissions included) into a 500."""
    headers = await bearer(app, "patient/Observation.rs?foo=bar patient/Observation.rs", patient="p1")
    response = await client.get("/fhir/Observation", headers=headers)
    assert response.status_code == 200, response.text[:200]
    assert match_ids(response.json()) == ["obs-p1"]
    recursive = await bearer(app, "system/Patient.rs?link:Patient.name=x")
    assert (await client.get("/fhir/Patient", headers=recursive)).status_code < 500


# -- regression: what holds today ------------------------------------------------------------------


async def test_paths_that_hold(
    app: FastAPI, client: httpx.AsyncClient, patient_p1: dict[str, str], partner_a: dict[str, str]
) -> None:
    for headers in (patient_p1, partner_a):
        for params in (
            [("_include", "*")],
            [("_include", "Task:*")],
            [("_revinclude", "*")],
            [("_include:iterate", "*"), ("_revinclude:iterate", "*")],
        ):
            bundle = (await client.get("/fhir/Task", params=params, headers=headers)).json()
            assert not (set(typed_ids(bundle)) | set(typed_ids(bundle, "include"))) & P2_DATA, params
    compartment = await client.get("/fhir/Patient/p2/Observation", headers=patient_p1)
    assert compartment.status_code == 200 and match_ids(compartment.json()) == []
    observations_only = await bearer(app, "patient/Observation.rs", patient="p1")
    for params in ({"subject:Patient.family": "Beta"}, {"_has:Provenance:target:agent": "x"}):
        assert (
            await client.get("/fhir/Observation", params=params, headers=observations_only)
        ).status_code == 403
    included = (
        await client.get(
            "/fhir/Observation", params={"_include": "Observation:subject"}, headers=observations_only
        )
    ).json()
    assert typed_ids(included, "include") == []
    # A cursor from a full-access search replayed by p1 pages only what p1 may see.
    full = (await client.get("/fhir/Observation", params={"_count": "1", "_sort": "code"})).json()
    next_url = next(item["url"] for item in full["link"] if item["relation"] == "next")
    replay = await client.get(next_url.split("cc.test", 1)[1], headers=patient_p1)
    assert replay.status_code == 200 and not set(typed_ids(replay.json())) & P2_DATA
    # Conditional writes and transactions never act on, or resolve to, invisible rows.
    headers = {**JSON, **patient_p1}
    own = {"resourceType": "Observation", **_observation("p1")}
    update = await client.put("/fhir/Observation?code=code-p2", json={**own, "id": "obs-p2"}, headers=headers)
    assert update.status_code == 404
    assert (await client.delete("/fhir/Observation?code=code-p2", headers=patient_p1)).status_code == 204
    transaction = _bundle(
        "transaction",
        {
            "resource": {**own, "subject": {"reference": "Patient?family=Beta"}},
            "request": {"method": "POST", "url": "Observation"},
        },
    )
    assert (await client.post("/fhir", json=transaction, headers=headers)).status_code == 412
    moved = [{"op": "replace", "path": "/subject/reference", "value": "Patient/p2"}]
    patched = await client.patch("/fhir/Observation/obs-p1", json=moved, headers={**patient_p1, **JSON_PATCH})
    assert patched.status_code == 403
    current = (await client.get("/fhir/Observation/obs-p2")).json()
    assert current["meta"]["versionId"] == "1" and current["subject"]["reference"] == "Patient/p2"
