"""Limited tokens at the edges of the one condition tree (issue 14 item 3): older versions of
another patient's or outside a restriction, every restriction kind judged on older versions,
limited search pages and totals, partners and person tokens, restricted writes, and a version
written between vread's visibility check and its fetch. Written by an adversarial review: each
test asserts the safe behaviour over HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import bearer
from tests.test_search_support import JSON, link, match_ids, put


def _obs(patient: str, code: str = "c1", category: str = "laboratory") -> dict[str, Any]:
    return {
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": category,
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


async def _patients(client: httpx.AsyncClient) -> None:
    for patient in ("pa", "pb"):
        await put(client, "Patient", patient, {"name": [{"family": patient}]})


def _seen(bundle: dict[str, Any]) -> list[str]:
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}/{e['resource']['meta']['versionId']}"
        for e in bundle.get("entry", [])
        if "resource" in e
    ]


async def test_patient_token_reads_no_older_version_of_another_patient(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await _patients(client)
    await put(client, "Observation", "moved", _obs("pb", code="secret-b"))
    await put(client, "Observation", "moved", _obs("pa", code="now-a"))
    pa = await bearer(app, "patient/*.rs", patient="pa")
    assert (await client.get("/fhir/Observation/moved", headers=pa)).status_code == 200
    assert (await client.get("/fhir/Observation/moved/_history/1", headers=pa)).status_code == 404
    for path in ("Observation/moved/_history", "Observation/_history", "_history"):
        response = await client.get(f"/fhir/{path}", headers=pa)
        assert response.status_code == 200, (path, response.text)
        assert "Observation/moved/1" not in _seen(response.json()), path


async def test_restricted_scope_reads_no_older_version_outside_the_restriction(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await _patients(client)
    await put(client, "Observation", "o", _obs("pa", category="social-history"))
    await put(client, "Observation", "o", _obs("pa", category="vital-signs"))
    for scope in (
        "patient/Observation.rs?category=vital-signs",
        "patient/Observation.rs?category=vital-signs,exam",
        "patient/Observation.rs?category:not=social-history",
        "system/Observation.rs?category=vital-signs",
    ):
        headers = await bearer(app, scope, patient="pa")
        assert (await client.get("/fhir/Observation/o", headers=headers)).status_code == 200, scope
        assert (await client.get("/fhir/Observation/o/_history/1", headers=headers)).status_code == 404, scope
        for path in ("Observation/o/_history", "Observation/_history", "_history"):
            response = await client.get(f"/fhir/{path}", headers=headers)
            if response.status_code == 403:
                continue
            assert response.status_code == 200, (scope, path, response.text)
            assert "Observation/o/1" not in _seen(response.json()), (scope, path)


async def test_limited_searches_page_and_count_only_their_rows(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await _patients(client)
    for n in range(4):
        await put(client, "Observation", f"a{n}", _obs("pa", code=f"k{n % 2}", category="vital-signs"))
        await put(client, "Observation", f"b{n}", _obs("pb", code=f"k{n % 2}", category="vital-signs"))
        await put(client, "Observation", f"s{n}", _obs("pa", code=f"k{n % 2}", category="social-history"))
    scopes = [
        ("patient/Observation.rs", {"a0", "a1", "a2", "a3", "s0", "s1", "s2", "s3"}),
        ("patient/Observation.rs?category=vital-signs", {"a0", "a1", "a2", "a3"}),
        (
            "patient/Observation.rs?category=vital-signs patient/Observation.rs?code=k1",
            {"a0", "a1", "a2", "a3", "s1", "s3"},
        ),
        ("patient/Observation.rs?category=vital-signs&code=k0,k9", {"a0", "a2"}),
        (
            "patient/Observation.rs?category=social-history,exam&_lastUpdated=gt2000-01-01",
            {"s0", "s1", "s2", "s3"},
        ),
    ]
    queries: list[list[tuple[str, str]]] = [
        [],
        [("code", "k0,k1")],
        [("subject", "Patient/pb")],
        [("_lastUpdated", "gt2000-01-01")],
        [("_id", "b0,a0,s0")],
        [("_sort", "_lastUpdated")],
        [("_sort", "-_id")],
        [("category:not", "exam")],
        [("code:missing", "false")],
    ]
    for scope, allowed in scopes:
        headers = await bearer(app, scope, patient="pa")
        for query in queries:
            seen: list[str] = []
            response = await client.get(
                "/fhir/Observation", params=[*query, ("_count", "1"), ("_total", "accurate")], headers=headers
            )
            assert response.status_code == 200, (scope, query, response.text[:300])
            total = response.json().get("total")
            pages = 0
            while True:
                bundle = response.json()
                seen.extend(match_ids(bundle))
                nxt = link(bundle, "next")
                pages += 1
                if nxt is None or pages > 20:
                    break
                response = await client.get(nxt, headers=headers)
                assert response.status_code == 200, (scope, query, response.text[:300])
            assert set(seen) <= allowed, (scope, query, set(seen) - allowed)
            assert total == len(seen), (scope, query, total, seen)
            counted = await client.get(
                "/fhir/Observation", params=[*query, ("_summary", "count")], headers=headers
            )
            assert counted.json().get("total") == len(seen), (scope, query)


async def test_odd_combinations_of_limits_and_searches_are_never_500(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await _patients(client)
    await put(client, "Organization", "org1", {"name": "org1"})
    await put(client, "Practitioner", "dr", {"name": [{"family": "dr"}]})
    await put(
        client,
        "CareTeam",
        "ct",
        {
            "status": "active",
            "subject": {"reference": "Patient/pa"},
            "participant": [{"member": {"reference": "Practitioner/dr"}}],
        },
    )
    await put(client, "Observation", "o1", _obs("pa", category="vital-signs"))
    await put(client, "Observation", "o1", _obs("pb", category="vital-signs"))
    await put(client, "Observation", "o2", _obs("pb", category="vital-signs"))
    await put(client, "Observation", "o2", _obs("pa", category="vital-signs"))
    task = {
        "status": "requested",
        "intent": "order",
        "priority": "urgent",
        "for": {"reference": "Patient/pa"},
        "owner": {"reference": "Organization/org1"},
    }
    await put(client, "Task", "t1", task)
    tokens = {
        "patient": await bearer(app, "patient/*.rs", patient="pa"),
        "restricted-all": await bearer(app, "patient/*.rs?_lastUpdated=gt2000-01-01", patient="pa"),
        "restricted-or": await bearer(
            app,
            "patient/Observation.rs?category=vital-signs,exam patient/Task.rs?status=requested",
            patient="pa",
        ),
        "partner": await bearer(app, "system/*.cruds", organization="Organization/org1", client_id="p-org1"),
        "person": await bearer(app, "user/*.rs", client_id="ehr", fhir_user="Practitioner/dr"),
        "patient-user": await bearer(
            app, "patient/*.rs", patient="pa", fhir_user="Patient/pa", client_id="portal"
        ),
    }
    paths: list[tuple[str, list[tuple[str, str]]]] = [
        ("/fhir/Observation", [("_has:Observation:subject:code", "c1"), ("_sort", "-_lastUpdated")]),
        ("/fhir/Patient", [("_has:Observation:subject:category", "vital-signs"), ("_total", "estimate")]),
        ("/fhir/Patient", [("_revinclude", "Observation:subject"), ("_revinclude:iterate", "Task:focus")]),
        (
            "/fhir/Task",
            [("owner", "Organization/org1"), ("status", "requested"), ("_sort", "-priority,authored-on")],
        ),
        (
            "/fhir/Task",
            [
                ("owner", "Organization/org1"),
                ("status", "requested"),
                ("_total", "accurate"),
                ("_count", "1"),
            ],
        ),
        ("/fhir/Observation", [("subject:Patient.name", "pb"), ("_summary", "count")]),
        ("/fhir/Observation", [("_id:not", "o1"), ("_count", "1")]),
        ("/fhir/Observation", [("_lastUpdated", "gt2000-01-01,lt1990-01-01"), ("_count", "1")]),
        ("/fhir", [("_type", "Observation,Task"), ("_count", "1"), ("_total", "accurate")]),
        ("/fhir/_history", [("_count", "2")]),
        ("/fhir/Observation/_history", [("_count", "1")]),
        ("/fhir/Observation/o1/_history", []),
        ("/fhir/Observation/o2/_history/1", []),
        ("/fhir/Observation/o1/_history/1", []),
        ("/fhir/Patient/pa/$everything", []),
        ("/fhir/Patient/pb/$everything", []),
        ("/fhir/Observation/$meta", []),
        ("/fhir/$meta", []),
    ]
    leaks = []
    for name, headers in tokens.items():
        for path, params in paths:
            response = await client.get(path, params=params, headers=headers)
            assert response.status_code < 500, (name, path, params, response.text[:400])
            if response.status_code == 200 and response.json().get("resourceType") == "Bundle":
                bundle = response.json()
                for entry in bundle.get("entry", []):
                    resource = entry.get("resource", {})
                    version = resource.get("meta", {}).get("versionId")
                    ref = f"{resource.get('resourceType')}/{resource.get('id')}/{version}"
                    if ref in ("Observation/o1/2", "Observation/o2/1", "Patient/pb/1") and name != "partner":
                        leaks.append((name, path, ref))
                    nxt = link(bundle, "next")
                    if nxt:
                        assert (await client.get(nxt, headers=headers)).status_code < 500, (name, nxt)
    assert not leaks, leaks


# -- partner organisation: what its own writes grant it ----------------------------------------


async def _partner_world(client: httpx.AsyncClient) -> None:
    for org in ("cm", "partnerA"):
        await put(client, "Organization", org, {"name": org})
    await put(client, "Patient", "p1", {"name": [{"family": "One"}]})
    await put(
        client,
        "Condition",
        "cond-p1",
        {"code": {"text": "housing"}, "subject": {"reference": "Patient/p1"}},
    )
    await put(
        client,
        "ServiceRequest",
        "sr-p1",
        {
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "Organization/partnerA"}],
            "reasonReference": [{"reference": "Condition/cond-p1"}],
        },
    )
    await put(
        client,
        "Task",
        "task-p1",
        {
            "status": "requested",
            "intent": "order",
            "focus": {"reference": "ServiceRequest/sr-p1"},
            "for": {"reference": "Patient/p1"},
            "requester": {"reference": "Organization/cm"},
            "owner": {"reference": "Organization/partnerA"},
        },
    )


async def _end_referral(client: httpx.AsyncClient) -> None:
    """The organisation running the server cancels the referral: its Task and its request."""
    task = (await client.get("/fhir/Task/task-p1")).json()
    await put(client, "Task", "task-p1", {**task, "status": "cancelled"})
    request = (await client.get("/fhir/ServiceRequest/sr-p1")).json()
    await put(client, "ServiceRequest", "sr-p1", {**request, "status": "revoked"})


async def test_partner_task_naming_the_home_organisation_as_requester_keeps_nothing_open(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """A Task the partner writes itself grants nothing (access.py, issue 15), whatever requester
    it names: here it names the home organisation, so it passes for an asked Task."""
    await _partner_world(client)
    partner = await bearer(app, "system/*.cruds", organization="Organization/partnerA", client_id="pa-x")
    forged = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "focus": {"reference": "ServiceRequest/sr-p1"},
        "for": {"reference": "Patient/p1"},
        "requester": {"reference": "Organization/cm"},
        "owner": {"reference": "Organization/partnerA"},
        "input": [{"type": {"text": "x"}, "valueReference": {"reference": "Condition/cond-p1"}}],
    }
    created = await client.post("/fhir/Task", json=forged, headers={**JSON, **partner})
    assert created.status_code in (201, 403), created.text[:300]
    await _end_referral(client)
    # (sr-p1 names partnerA as performer: a root it keeps seeing, but one that grants nothing.)
    for key in ("Patient/p1", "Condition/cond-p1"):
        response = await client.get(f"/fhir/{key}", headers=partner)
        assert response.status_code == 404, f"{key} still readable after the referral ended"


async def test_partner_cannot_reopen_a_cancelled_referral_by_editing_its_task(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await _partner_world(client)
    partner = await bearer(app, "system/*.cruds", organization="Organization/partnerA", client_id="pa-y")
    await _end_referral(client)
    assert (await client.get("/fhir/Patient/p1", headers=partner)).status_code == 404
    task = (await client.get("/fhir/Task/task-p1", headers=partner)).json()
    reopened = await client.put(
        "/fhir/Task/task-p1", json={**task, "status": "requested"}, headers={**JSON, **partner}
    )
    if reopened.status_code < 300:
        for key in ("Patient/p1", "Condition/cond-p1"):
            response = await client.get(f"/fhir/{key}", headers=partner)
            assert response.status_code == 404, f"{key} readable again after the partner reopened the Task"


async def test_every_kind_of_scope_restriction_judges_older_versions_without_500(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """Older versions are judged on their own index rows (conditions.py ``Older``): each index
    table and modifier a restriction can use must render there too."""
    await _patients(client)
    old = {
        **_obs("pa", code="c1", category="social-history"),
        "valueQuantity": {"value": 5, "system": "http://unitsofmeasure.org", "code": "mg"},
        "effectiveDateTime": "2020-01-01",
        "performer": [{"reference": "Patient/pa"}],
        "identifier": [{"system": "urn:x", "value": "i1"}],
    }
    await put(client, "Observation", "v", old)
    await put(client, "Observation", "v", _obs("pa", code="c2", category="vital-signs"))
    location = {"name": "Clinic", "position": {"latitude": 52.0, "longitude": 4.0}}
    await put(client, "Location", "loc", location)
    await put(client, "Location", "loc", {**location, "name": "Clinic two"})
    restrictions = [
        ("Observation", "code:text=xyz"),
        ("Observation", "code:of-type=urn:x|a|b"),
        ("Observation", "value-quantity=ap5|http://unitsofmeasure.org|mg"),
        ("Observation", "code-value-quantity=c1$5"),
        ("Observation", "date=ge2019-01-01"),
        ("Observation", "value-quantity:missing=true"),
        ("Observation", "performer:Patient=pa"),
        ("Observation", "subject:identifier=urn:x|i1"),
        ("Observation", "identifier=urn:x|i1"),
        ("Observation", "_lastUpdated=gt2000-01-01"),
        ("Observation", "_id:not=zzz"),
        ("Observation", "_profile:below=http://x"),
        ("Observation", "_tag:not=x"),
        ("Location", "near=52.0|4.0|10|km"),
        ("Location", "name:contains=clinic"),
        ("Location", "name:exact=Clinic"),
    ]
    for resource_type, restriction in restrictions:
        ident = "v" if resource_type == "Observation" else "loc"
        for context in ("patient", "system"):
            headers = await bearer(app, f"{context}/{resource_type}.rs?{restriction}", patient="pa")
            for path in (f"{resource_type}/{ident}/_history", f"{resource_type}/_history", "_history"):
                response = await client.get(f"/fhir/{path}", headers=headers)
                assert response.status_code < 500, (context, restriction, path, response.text[:300])
            response = await client.get(f"/fhir/{resource_type}/{ident}/_history/1", headers=headers)
            assert response.status_code < 500, (context, restriction, response.text[:300])


async def test_person_token_reads_no_older_version_outside_its_caseload_or_work(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    for patient in ("p1", "p9"):
        await put(client, "Patient", patient, {"name": [{"family": patient}]})
    for practitioner in ("dr", "dr2"):
        await put(client, "Practitioner", practitioner, {"name": [{"family": practitioner}]})
    care_team = {
        "status": "active",
        "subject": {"reference": "Patient/p1"},
        "participant": [{"member": {"reference": "Practitioner/dr"}}],
    }
    await put(client, "CareTeam", "ct", care_team)
    await put(client, "Observation", "moved", _obs("p9", code="secret-9"))
    await put(client, "Observation", "moved", _obs("p1"))
    task = {"status": "requested", "intent": "order", "for": {"reference": "Patient/p9"}}
    await put(
        client, "Task", "t", {**task, "owner": {"reference": "Practitioner/dr2"}, "note": [{"text": "x"}]}
    )
    await put(client, "Task", "t", {**task, "owner": {"reference": "Practitioner/dr"}})
    dr = await bearer(app, "user/*.rs", client_id="ehr", fhir_user="Practitioner/dr")
    assert (await client.get("/fhir/Observation/moved", headers=dr)).status_code == 200
    assert (await client.get("/fhir/Task/t", headers=dr)).status_code == 200
    for key in ("Observation/moved", "Task/t"):
        assert (await client.get(f"/fhir/{key}/_history/1", headers=dr)).status_code == 404, key
        kind = key.split("/")[0]
        for path in (f"{key}/_history", f"{kind}/_history", "_history"):
            response = await client.get(f"/fhir/{path}", headers=dr)
            assert response.status_code == 200, (path, response.text[:300])
            assert f"{key}/1" not in _seen(response.json()), path
    # Search paging stays inside the caseload and the own work.
    response = await client.get("/fhir/Observation", params={"_count": "1", "_total": "accurate"}, headers=dr)
    assert match_ids(response.json()) == ["moved"] and response.json()["total"] == 1
    patients = await client.get("/fhir/Patient", params={"_revinclude": "Task:owner"}, headers=dr)
    assert match_ids(patients.json()) == ["p1"]


async def test_restricted_write_scopes_cannot_write_outside_the_restriction(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await _patients(client)
    await put(client, "Observation", "vs", _obs("pa", category="vital-signs"))
    await put(client, "Observation", "lab", _obs("pa", category="laboratory"))
    headers = {
        **JSON,
        **await bearer(app, "patient/Observation.cruds?category=vital-signs,exam", patient="pa"),
    }
    moved = {"resourceType": "Observation", "id": "vs", **_obs("pa", category="laboratory")}
    assert (await client.put("/fhir/Observation/vs", json=moved, headers=headers)).status_code in (403, 404)
    patch = [
        {
            "op": "replace",
            "path": "/category/0/coding/0/code",
            "value": "laboratory",
        }
    ]
    response = await client.patch(
        "/fhir/Observation/vs", json=patch, headers={**headers, "content-type": "application/json-patch+json"}
    )
    assert response.status_code in (403, 404), response.text[:300]
    lab = {"resourceType": "Observation", "id": "lab", **_obs("pa", category="vital-signs")}
    assert (await client.put("/fhir/Observation/lab", json=lab, headers=headers)).status_code == 404
    assert (await client.delete("/fhir/Observation/lab", headers=headers)).status_code == 404
    conditional = await client.delete("/fhir/Observation", params={"category": "laboratory"}, headers=headers)
    assert conditional.status_code < 500
    created = await client.post(
        "/fhir/Observation",
        json={"resourceType": "Observation", **_obs("pa", category="laboratory")},
        headers=headers,
    )
    assert created.status_code in (403, 404), created.text[:300]
    # nothing changed
    stored = (await client.get("/fhir/Observation/vs")).json()
    assert stored["category"][0]["coding"][0]["code"] == "vital-signs"
    assert (await client.get("/fhir/Observation/lab")).status_code == 200
    listed = (await client.get("/fhir/Observation", params={"category": "laboratory"})).json()
    assert match_ids(listed) == ["lab"]


# -- token endpoint failure limits (app/auth/ratelimit.py) ---------------------------------------


# -- vread/history: the current version is taken as judged -----------------------------------


async def _waiting_on_history(app: FastAPI) -> bool:
    """Whether some statement waits for a lock on resource_history (the vread below)."""
    waiting = await app.state.pool.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
        " WHERE c.relname = 'resource_history' AND NOT l.granted"
    )
    return bool(waiting)


@pytest.mark.parametrize("path", ["Observation/race/_history/2", "Observation/race/_history"])
async def test_a_version_written_between_the_visibility_check_and_the_vread_is_judged(
    app: FastAPI, client: httpx.AsyncClient, path: str
) -> None:
    """vread judges the current row (read_any), then fetches the version, then lets through any
    version that is current by then (repository.py _allowed_versions ``r.version_id =
    v.version_id``) without judging it. A version written in between (the Observation moved to
    another patient) is shown to the first patient's token."""
    import asyncio

    from app.fhir.access import OPEN_ACCESS
    from tests.conftest import wait_until

    await _patients(client)
    await put(client, "Observation", "race", _obs("pa", code="a-only"))
    pa = await bearer(app, "patient/*.rs", patient="pa")
    async with app.state.pool.acquire() as writer:
        transaction = writer.transaction()
        await transaction.start()
        try:
            # Hold resource_history: the vread passes its check on the current row (v1, pa's),
            # then waits for this lock before it fetches version 2.
            await writer.execute("LOCK TABLE resource_history IN ACCESS EXCLUSIVE MODE")
            vread = asyncio.create_task(client.get(f"/fhir/{path}", headers=pa))
            await wait_until(lambda: _waiting_on_history(app), "the vread to wait for resource_history")
            repo = app.state.repositories.for_client(writer, OPEN_ACCESS)
            moved = {"resourceType": "Observation", "id": "race", **_obs("pb", code="b-secret")}
            await repo.update("Observation", "race", moved)
        except BaseException:
            await transaction.rollback()
            raise
        await transaction.commit()
    response = await vread
    assert response.status_code in (200, 404), response.text[:300]
    assert "b-secret" not in response.text, f"pb's version shown to pa's token: {response.text[:300]}"
