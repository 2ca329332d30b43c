"""Authorization of the FHIR API (issue 4): 401 vs 403, the SMART scope matrix, and what a
patient-scoped client and a partner organisation's client can never see.

Tokens come from the server's own TokenService (what POST /auth/token hands out; the token
endpoint itself is tested in test_auth_server.py). Every leakage test asserts both sides:
what the caller may see is there, what it may not is absent, through every way in.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.auth.scopes import parse_scopes
from tests.conftest import bearer
from tests.test_search_support import JSON, entries, link, match_ids, put, typed_ids

NO_TOKEN = {"authorization": ""}
JSON_PATCH = {"content-type": "application/json-patch+json"}


def _bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _observation(patient: str, code: str = "1234-5") -> dict[str, Any]:
    return {
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


# -- 401: authentication ------------------------------------------------------------------


async def test_no_token_is_401_with_a_bare_bearer_challenge(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/Patient", headers=NO_TOKEN)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    assert "error=" not in challenge  # RFC 6750 3.1: no error code without credentials
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "header",
    [
        "Bearer not-a-jwt",
        "Bearer a.b.c",
        "Bearer " + "e30." * 2 + "sig",
    ],
)
async def test_malformed_tokens_are_401_invalid_token(client: httpx.AsyncClient, header: str) -> None:
    response = await client.get("/fhir/Patient", headers={"authorization": header})
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert response.json()["resourceType"] == "OperationOutcome"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_alg_none_and_tampered_tokens_are_refused(app: FastAPI, client: httpx.AsyncClient) -> None:
    good = (await bearer(app))["authorization"].split(" ", 1)[1]
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}."
    widened = f"{header}.{_b64({**claims, 'scope': 'system/*.cruds user/*.cruds'})}.{signature}"
    flipped = f"{header}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    for token in (unsigned, widened, flipped):
        response = await client.get("/fhir/Patient", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 401, token
        assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_metadata_and_discovery_need_no_token(client: httpx.AsyncClient) -> None:
    metadata = await client.get("/fhir/metadata", headers=NO_TOKEN)
    assert metadata.status_code == 200
    security = metadata.json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris["token"].endswith("/auth/token")


# -- 403: the scope matrix ------------------------------------------------------------------

INTERACTIONS = (
    # (name, SMART letter)
    ("create", "c"),
    ("read", "r"),
    ("vread", "r"),
    ("history-instance", "r"),
    ("update", "u"),
    ("update-as-create", "u"),
    ("patch", "ru"),  # a PATCH shows the resource it changes: read and update
    ("delete", "d"),
    ("search-type", "s"),
    ("search-post", "s"),
    ("history-type", "s"),
    ("search-system", "s"),
    ("history-system", "s"),
    ("batch-read", "r"),
    ("transaction-create", "c"),
)

SCOPES = {
    "system/*.cruds": "cruds",
    "system/*.*": "cruds",
    "system/*.read": "rs",
    "system/*.write": "cud",
    "system/*.rs": "rs",
    "system/*.c": "c",
    "system/*.r": "r",
    "system/*.u": "u",
    "system/*.d": "d",
    "system/*.s": "s",
    "system/Observation.cruds": "cruds",
    "system/Observation.cud system/Observation.rs": "cruds",
    "user/Observation.rs": "",  # user/ needs a person (fhirUser): a machine token gets nothing
    "system/Patient.cruds": "",  # another type only
    "system/*.dus": "",  # out of order: ignored (SMART allows ignoring it)
    "openid fhirUser launch": "",  # no resource scope at all
}


async def _attempt(
    client: httpx.AsyncClient, interaction: str, headers: dict[str, str], target: str
) -> httpx.Response:
    """Run one interaction on Observation/``target`` (made beforehand with full access)."""
    body = {"resourceType": "Observation", **_observation("matrix")}
    h = {**JSON, **headers}
    if interaction == "create":
        return await client.post("/fhir/Observation", json=body, headers=h)
    if interaction == "read":
        return await client.get(f"/fhir/Observation/{target}", headers=headers)
    if interaction == "vread":
        return await client.get(f"/fhir/Observation/{target}/_history/1", headers=headers)
    if interaction == "history-instance":
        return await client.get(f"/fhir/Observation/{target}/_history", headers=headers)
    if interaction == "update":
        return await client.put(f"/fhir/Observation/{target}", json={**body, "id": target}, headers=h)
    if interaction == "update-as-create":
        new_id = f"{target}-new"
        return await client.put(f"/fhir/Observation/{new_id}", json={**body, "id": new_id}, headers=h)
    if interaction == "patch":
        patch = [{"op": "replace", "path": "/status", "value": "amended"}]
        return await client.patch(
            f"/fhir/Observation/{target}",
            json=patch,
            headers={**headers, "content-type": "application/json-patch+json"},
        )
    if interaction == "delete":
        return await client.delete(f"/fhir/Observation/{target}", headers=headers)
    if interaction == "search-type":
        return await client.get("/fhir/Observation", params={"code": "1234-5"}, headers=headers)
    if interaction == "search-post":
        return await client.post(
            "/fhir/Observation/_search",
            data={"code": "1234-5"},
            headers={**headers, "content-type": "application/x-www-form-urlencoded"},
        )
    if interaction == "history-type":
        return await client.get("/fhir/Observation/_history", headers=headers)
    if interaction == "search-system":
        return await client.get("/fhir", params={"_type": "Observation"}, headers=headers)
    if interaction == "history-system":
        return await client.get("/fhir/_history", headers=headers)
    bundle_type, method = ("batch", "GET") if interaction == "batch-read" else ("transaction", "POST")
    entry: dict[str, Any] = {"request": {"method": method, "url": f"Observation/{target}"}}
    if method == "POST":
        entry = {"resource": body, "request": {"method": "POST", "url": "Observation"}}
    bundle = {"resourceType": "Bundle", "type": bundle_type, "entry": [entry]}
    return await client.post("/fhir", json=bundle, headers=h)


def _entry_status(response: httpx.Response) -> int:
    """A Bundle's (single) entry status, or the HTTP status when the Bundle itself failed."""
    if response.status_code != 200:
        return response.status_code
    return int(response.json()["entry"][0]["response"]["status"].split()[0])


@pytest.mark.parametrize("scope", list(SCOPES))
async def test_scope_matrix(app: FastAPI, client: httpx.AsyncClient, scope: str) -> None:
    """Every interaction under every scope shape: allowed ones succeed, the rest are 403."""
    headers = await bearer(app, scope)
    letters = SCOPES[scope]
    # (A user/ permission is usable only by a token acting for a person; these tokens act for none.)
    searches_some_type = any("s" in p.letters and p.context != "user" for p in parse_scopes(scope))
    failures = []
    for number, (interaction, letter) in enumerate(INTERACTIONS):
        target = f"m{number}"
        await put(client, "Observation", target, _observation("matrix"))
        response = await _attempt(client, interaction, headers, target)
        status = _entry_status(response) if interaction.startswith(("batch", "transaction")) else None
        status = status or response.status_code
        allowed = all(needed in letters for needed in letter)
        if interaction == "history-system" and not allowed and searches_some_type:
            # System history is the history of every type the token may search.
            assert status == 200, response.text
            assert not [e for e in response.json().get("entry", []) if "Observation" in e["fullUrl"]]
            continue
        if allowed and not 200 <= status < 300:
            failures.append(f"{interaction}: expected success, got {status} {response.text[:200]}")
        if not allowed:
            if status != 403:
                failures.append(f"{interaction}: expected 403, got {status}")
            elif response.status_code == 403:
                assert response.json()["resourceType"] == "OperationOutcome"
    assert not failures, f"{scope}: " + "; ".join(failures)


async def test_a_refused_write_changes_nothing(app: FastAPI, client: httpx.AsyncClient) -> None:
    await put(client, "Observation", "keep", _observation("p"))
    read_only = await bearer(app, "system/*.rs")
    body = {"resourceType": "Observation", "id": "keep", **_observation("p"), "status": "amended"}
    assert (
        await client.put("/fhir/Observation/keep", json=body, headers={**JSON, **read_only})
    ).status_code == 403
    assert (await client.delete("/fhir/Observation/keep", headers=read_only)).status_code == 403
    current = (await client.get("/fhir/Observation/keep")).json()
    assert current["status"] == "final" and current["meta"]["versionId"] == "1"


async def test_scope_restrictions_limit_what_is_seen(app: FastAPI, client: httpx.AsyncClient) -> None:
    """permission-v2: ``system/Observation.rs?code=...`` sees only the matching Observations."""
    await put(client, "Observation", "lab", _observation("p", code="lab-1"))
    await put(client, "Observation", "sdoh", _observation("p", code="sdoh-1"))
    headers = await bearer(app, "system/Observation.rs?code=http://loinc.org|sdoh-1")
    found = (await client.get("/fhir/Observation", headers=headers)).json()
    assert match_ids(found) == ["sdoh"]
    assert (await client.get("/fhir/Observation/sdoh", headers=headers)).status_code == 200
    assert (await client.get("/fhir/Observation/lab", headers=headers)).status_code == 404


async def test_an_unusable_scope_restriction_does_not_break_the_token(
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


# -- the world of the leakage tests -------------------------------------------------------------


@pytest.fixture
async def world(client: httpx.AsyncClient) -> None:
    """Two clients of two partner agencies, with everything a referral points to."""
    for org in ("cm", "partnerA", "partnerB"):
        await put(client, "Organization", org, {"name": org, "active": True})
    for patient, family in (("p1", "Alpha"), ("p2", "Beta")):
        await put(client, "Patient", patient, {"name": [{"family": family}], "gender": "female"})
        await put(client, "Observation", f"obs-{patient}", _observation(patient, code=f"code-{patient}"))
    await put(
        client,
        "Consent",
        "consent-p1",
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
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": "Patient/p1"},
        },
    )
    for condition, patient, code in (
        ("cond-p1", "p1", "housing"),
        ("secret-p1", "p1", "hiv"),  # p1's, but no referral points to it
        ("cond-p2", "p2", "housing"),
    ):
        await put(
            client,
            "Condition",
            condition,
            {
                "code": {"coding": [{"system": "http://example.org/cond", "code": code}]},
                "subject": {"reference": f"Patient/{patient}"},
            },
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
            "supportingInfo": [{"reference": "Consent/consent-p1"}],
            "reasonReference": [{"reference": "Condition/cond-p1"}],
        },
    )
    await put(
        client,
        "ServiceRequest",
        "sr-p2",
        {
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p2"},
            "performer": [{"reference": "Organization/partnerB"}],
            "reasonReference": [{"reference": "Condition/cond-p2"}],
        },
    )
    for task, sr, patient, owner in (
        ("task-p1", "sr-p1", "p1", "partnerA"),
        ("task-p2", "sr-p2", "p2", "partnerB"),
    ):
        await put(
            client,
            "Task",
            task,
            {
                "status": "requested",
                "intent": "order",
                "code": {
                    "coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]
                },
                "focus": {"reference": f"ServiceRequest/{sr}"},
                "for": {"reference": f"Patient/{patient}"},
                "requester": {"reference": "Organization/cm"},
                "owner": {"reference": f"Organization/{owner}"},
            },
        )


P2_DATA = {"Patient/p2", "Observation/obs-p2", "Condition/cond-p2", "ServiceRequest/sr-p2", "Task/task-p2"}


async def _everything_visible(client: httpx.AsyncClient, headers: dict[str, str]) -> set[str]:
    """Every Type/id a caller can reach by system search, walking all pages."""
    response = await client.get("/fhir", params={"_count": "3"}, headers=headers)
    assert response.status_code == 200, response.text
    pages = await walk_with(client, response.json(), headers)
    return {key for page in pages for key in typed_ids(page)}


async def walk_with(
    client: httpx.AsyncClient, first: dict[str, Any], headers: dict[str, str]
) -> list[dict[str, Any]]:
    pages = [first]
    url = link(first, "next")
    while url is not None:
        response = await client.get(url.split("cc.test", 1)[1], headers=headers)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        url = link(pages[-1], "next")
    return pages


# -- patient-scoped client -------------------------------------------------------------------


@pytest.fixture
async def patient_p1(app: FastAPI, world: None) -> dict[str, str]:
    return await bearer(app, "patient/*.cruds", patient="p1", client_id="p1-app")


async def test_patient_scope_reads_only_its_patient(
    client: httpx.AsyncClient, patient_p1: dict[str, str]
) -> None:
    assert (await client.get("/fhir/Patient/p1", headers=patient_p1)).status_code == 200
    assert (await client.get("/fhir/Observation/obs-p1", headers=patient_p1)).status_code == 200
    for path in (
        "Patient/p2",
        "Observation/obs-p2",
        "Observation/obs-p2/_history/1",
        "Observation/obs-p2/_history",
        "Task/task-p2",
        "Condition/cond-p2",
    ):
        response = await client.get(f"/fhir/{path}", headers=patient_p1)
        assert response.status_code == 404, path  # existence is not revealed
    # Directory data outside the Patient compartment stays readable.
    assert (await client.get("/fhir/Organization/partnerB", headers=patient_p1)).status_code == 200


async def test_patient_scope_search_paging_and_totals(
    client: httpx.AsyncClient, patient_p1: dict[str, str]
) -> None:
    response = await client.get(
        "/fhir/Observation", params={"_total": "accurate", "_count": "1"}, headers=patient_p1
    )
    bundle = response.json()
    assert bundle["total"] == 1
    assert match_ids(bundle) == ["obs-p1"]
    assert link(bundle, "next") is None
    assert (
        match_ids(
            (
                await client.get("/fhir/Observation", params={"subject": "Patient/p2"}, headers=patient_p1)
            ).json()
        )
        == []
    )
    assert match_ids((await client.get("/fhir/Patient", headers=patient_p1)).json()) == ["p1"]
    visible = await _everything_visible(client, patient_p1)
    assert "Patient/p1" in visible and "Observation/obs-p1" in visible
    assert not visible & P2_DATA


async def test_patient_scope_includes_chains_and_has(
    client: httpx.AsyncClient, patient_p1: dict[str, str]
) -> None:
    included = (
        await client.get(
            "/fhir/ServiceRequest", params={"_include": "ServiceRequest:performer"}, headers=patient_p1
        )
    ).json()
    assert match_ids(included) == ["sr-p1"]
    revinclude = (
        await client.get("/fhir/Patient", params={"_revinclude": "Observation:subject"}, headers=patient_p1)
    ).json()
    assert set(typed_ids(revinclude, "include")) == {"Observation/obs-p1"}
    # _include:iterate from p1's Task cannot step into p2's data.
    iterate = (
        await client.get(
            "/fhir/Task",
            params=[("_include", "Task:focus"), ("_include:iterate", "ServiceRequest:subject")],
            headers=patient_p1,
        )
    ).json()
    assert not set(typed_ids(iterate, "include")) & P2_DATA
    chained = (
        await client.get("/fhir/Observation", params={"subject:Patient.family": "Beta"}, headers=patient_p1)
    ).json()
    assert match_ids(chained) == []
    has = (
        await client.get(
            "/fhir/Patient", params={"_has:Observation:subject:code": "code-p2"}, headers=patient_p1
        )
    ).json()
    assert match_ids(has) == []


async def test_patient_scope_history(client: httpx.AsyncClient, patient_p1: dict[str, str]) -> None:
    for path in ("Observation/_history", "_history"):
        response = await client.get(f"/fhir/{path}", headers=patient_p1)
        assert response.status_code == 200, response.text
        seen = {
            f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in response.json().get("entry", [])
            if "resource" in e
        }
        assert "Observation/obs-p1" in seen
        assert not seen & P2_DATA, path


async def test_patient_scope_writes_stay_in_the_compartment(
    client: httpx.AsyncClient, patient_p1: dict[str, str]
) -> None:
    headers = {**JSON, **patient_p1}
    own = {"resourceType": "Observation", **_observation("p1")}
    other = {"resourceType": "Observation", **_observation("p2")}
    assert (await client.post("/fhir/Observation", json=own, headers=headers)).status_code == 201
    assert (await client.post("/fhir/Observation", json=other, headers=headers)).status_code == 403
    moved = {**own, "id": "obs-p1", "subject": {"reference": "Patient/p2"}}
    assert (await client.put("/fhir/Observation/obs-p1", json=moved, headers=headers)).status_code == 403
    taken = {**other, "id": "obs-p2", "status": "amended"}
    assert (await client.put("/fhir/Observation/obs-p2", json=taken, headers=headers)).status_code == 404
    assert (await client.delete("/fhir/Observation/obs-p2", headers=patient_p1)).status_code == 404
    assert (await client.get("/fhir/Observation/obs-p2")).json()["status"] == "final"
    assert (
        len(match_ids((await client.get("/fhir/Observation", params={"subject": "Patient/p2"})).json())) == 1
    )


async def test_patient_scope_transactions(client: httpx.AsyncClient, patient_p1: dict[str, str]) -> None:
    headers = {**JSON, **patient_p1}
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Observation/obs-p1"}},
            {"request": {"method": "GET", "url": "Observation/obs-p2"}},
            {"request": {"method": "GET", "url": "Observation?subject=Patient/p2"}},
        ],
    }
    result = (await client.post("/fhir", json=batch, headers=headers)).json()
    statuses = [e["response"]["status"].split()[0] for e in result["entry"]]
    assert statuses[:2] == ["200", "404"]
    assert result["entry"][2]["resource"].get("total", 0) == 0 or not entries(result["entry"][2]["resource"])
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Observation", **_observation("p1")},
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "resource": {"resourceType": "Observation", **_observation("p2")},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    response = await client.post("/fhir", json=transaction, headers=headers)
    assert response.status_code == 403
    everything = (await client.get("/fhir/Observation", params={"_total": "accurate"})).json()
    assert everything["total"] == 2  # obs-p1 and obs-p2 only: the transaction left nothing


async def test_patient_app_cannot_write_into_another_patients_record(
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


# -- partner organisation --------------------------------------------------------------------


@pytest.fixture
async def partner_a(app: FastAPI, world: None) -> dict[str, str]:
    return await bearer(app, "system/*.cruds", organization="Organization/partnerA", client_id="partner-a")


@pytest.fixture
async def partner_b(app: FastAPI, world: None) -> dict[str, str]:
    return await bearer(app, "system/*.cruds", organization="Organization/partnerB", client_id="partner-b")


A_SEES = {
    "Task/task-p1",
    "ServiceRequest/sr-p1",
    "Patient/p1",
    "Consent/consent-p1",
    "Condition/cond-p1",
    "Organization/partnerA",
    "Organization/cm",
}


async def test_partner_sees_its_referrals_and_what_they_point_to(
    client: httpx.AsyncClient, partner_a: dict[str, str]
) -> None:
    for key in sorted(A_SEES):
        assert (await client.get(f"/fhir/{key}", headers=partner_a)).status_code == 200, key
    for key in sorted(P2_DATA | {"Condition/secret-p1", "Observation/obs-p1"}):
        assert (await client.get(f"/fhir/{key}", headers=partner_a)).status_code == 404, key
    assert await _everything_visible(client, partner_a) == A_SEES


async def test_partner_worklist_totals_includes_has_and_chains(
    client: httpx.AsyncClient, partner_a: dict[str, str]
) -> None:
    worklist = (
        await client.get(
            "/fhir/Task",
            params={"status": "requested", "_total": "accurate", "_include": "Task:focus"},
            headers=partner_a,
        )
    ).json()
    assert worklist["total"] == 1 and match_ids(worklist) == ["task-p1"]
    assert typed_ids(worklist, "include") == ["ServiceRequest/sr-p1"]
    other = (
        await client.get("/fhir/Task", params={"owner": "Organization/partnerB"}, headers=partner_a)
    ).json()
    assert match_ids(other) == []
    revinclude = (
        await client.get("/fhir/Patient", params={"_revinclude": "Condition:subject"}, headers=partner_a)
    ).json()
    assert match_ids(revinclude) == ["p1"]
    assert typed_ids(revinclude, "include") == ["Condition/cond-p1"]  # not secret-p1
    has = (
        await client.get("/fhir/Patient", params={"_has:Condition:subject:code": "hiv"}, headers=partner_a)
    ).json()
    assert match_ids(has) == []  # p1 is visible, but the Condition that would match is not
    chained = (
        await client.get(
            "/fhir/Task",
            params={"focus:ServiceRequest.performer": "Organization/partnerB"},
            headers=partner_a,
        )
    ).json()
    assert match_ids(chained) == []
    history = (await client.get("/fhir/Task/_history", headers=partner_a)).json()
    assert {e["resource"]["id"] for e in history["entry"]} == {"task-p1"}


async def test_partner_writes_and_what_it_created(
    client: httpx.AsyncClient, partner_a: dict[str, str], partner_b: dict[str, str]
) -> None:
    task = (await client.get("/fhir/Task/task-p1", headers=partner_a)).json()
    accepted = {**task, "status": "accepted"}
    assert (
        await client.put("/fhir/Task/task-p1", json=accepted, headers={**JSON, **partner_a})
    ).status_code == 200
    other = (await client.get("/fhir/Task/task-p2")).json()
    response = await client.put(
        "/fhir/Task/task-p2", json={**other, "status": "accepted"}, headers={**JSON, **partner_a}
    )
    assert response.status_code == 404
    assert (await client.get("/fhir/Task/task-p2")).json()["status"] == "requested"
    procedure = {"resourceType": "Procedure", "status": "completed", "subject": {"reference": "Patient/p1"}}
    created = await client.post("/fhir/Procedure", json=procedure, headers={**JSON, **partner_a})
    assert created.status_code == 201
    location = created.headers["location"].split("/fhir/", 1)[1].rsplit("/_history", 1)[0]
    assert (await client.get(f"/fhir/{location}", headers=partner_a)).status_code == 200
    assert (await client.get(f"/fhir/{location}", headers=partner_b)).status_code == 404


async def test_partner_transaction_cannot_reach_other_referrals(
    client: httpx.AsyncClient, partner_a: dict[str, str]
) -> None:
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "GET", "url": "Task/task-p2"}},
        ],
    }
    response = await client.post("/fhir", json=transaction, headers={**JSON, **partner_a})
    assert response.status_code == 404
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "DELETE", "url": "Task/task-p2"}},
            {"request": {"method": "GET", "url": "Task?_id=task-p2"}},
        ],
    }
    result = (await client.post("/fhir", json=batch, headers={**JSON, **partner_a})).json()
    assert result["entry"][0]["response"]["status"].startswith("404")
    assert match_ids(result["entry"][1]["resource"]) == []
    assert (await client.get("/fhir/Task/task-p2")).status_code == 200


async def test_partner_authoring_a_task_grants_itself_nothing(
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


async def test_partner_editing_its_referral_widens_nothing(
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


# -- audit ------------------------------------------------------------------------------------


async def test_every_interaction_is_audited(app: FastAPI, client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/fhir/Patient", json={"resourceType": "Patient", "gender": "male"}, headers=JSON
    )
    patient_id = created.json()["id"]
    auditor = await bearer(app, "system/AuditEvent.rs", client_id="auditor")
    # A write's AuditEvent commits with the write: it is there as soon as the response is.
    writes = (
        await client.get("/fhir/AuditEvent", params={"entity": f"Patient/{patient_id}"}, headers=auditor)
    ).json()
    assert [e["resource"]["action"] for e in entries(writes)] == ["C"]
    event = entries(writes)[0]["resource"]
    assert event["outcome"] == "0"
    assert event["agent"][0]["who"]["identifier"]["value"] == "test-client"
    assert event["subtype"][0]["code"] == "create"
    reader = await bearer(app, "system/Patient.r", client_id="reader")
    assert (await client.get(f"/fhir/Patient/{patient_id}", headers=reader)).status_code == 200
    assert (await client.get("/fhir/Observation/none", headers=reader)).status_code == 403
    await app.state.audit.flush()
    events = (
        await client.get(
            "/fhir/AuditEvent",
            params={"agent:identifier": "urn:carecoord:oauth-client|reader"},
            headers=auditor,
        )
    ).json()
    by_client = [
        e["resource"]
        for e in entries(events)
        if e["resource"]["agent"][0]["who"]["identifier"]["value"] == "reader"
    ]
    outcomes = sorted((e["subtype"][0]["code"], e["outcome"]) for e in by_client)
    assert outcomes == [("read", "0"), ("read", "4")]


async def test_audit_events_are_readable_only_with_audit_scopes(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await client.get("/fhir/Patient")
    await app.state.audit.flush()
    auditor = await bearer(app, "system/AuditEvent.rs")
    event = entries((await client.get("/fhir/AuditEvent", headers=auditor)).json())[0]["resource"]
    # A wildcard does not reach the audit trail: neither a system one nor a patient one.
    for wildcard in (await bearer(app, "system/*.cruds"), await bearer(app, "patient/*.rs", patient="p1")):
        assert (await client.get("/fhir/AuditEvent", headers=wildcard)).status_code == 403
        assert (await client.get(f"/fhir/AuditEvent/{event['id']}", headers=wildcard)).status_code == 403
        system_wide = (await client.get("/fhir/_history", headers=wildcard)).json()
        assert not [e for e in system_wide.get("entry", []) if "/AuditEvent/" in e["fullUrl"]]
    assert (await client.get(f"/fhir/AuditEvent/{event['id']}", headers=auditor)).json() == event


async def test_refused_requests_are_audited_too(app: FastAPI, client: httpx.AsyncClient) -> None:
    assert (await client.get("/fhir/Patient", headers=NO_TOKEN)).status_code == 401
    auditor = await bearer(app, "system/AuditEvent.rs")
    deadline = time.monotonic() + 10
    while True:
        # The buffered event is written by the next flush: ours, or the trail's own if it is
        # already writing (then ours finds an empty buffer), so wait for the row itself.
        await app.state.audit.flush()
        events = (
            await client.get(
                "/fhir/AuditEvent",
                params={"agent:identifier": "urn:carecoord:oauth-client|unauthenticated"},
                headers=auditor,
            )
        ).json()
        found = [e["resource"] for e in entries(events)]
        if found or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert [(e["outcome"], e["subtype"][0]["code"], e["outcomeDesc"]) for e in found] == [
        ("4", "search-type", "HTTP 401")
    ]


async def test_limited_clients_cannot_forge_audit_events(
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


async def test_patient_app_reads_no_audit_events_naming_other_patients(
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


# -- regression net over every way in ---------------------------------------------------------


async def test_limited_tokens_reach_nothing_else_through_includes_cursors_and_conditional_writes(
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
