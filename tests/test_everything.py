"""``Patient/[id]/$everything`` and ``Patient/$everything`` (R4 patient-operation-everything.html):
the record, what it references outside the compartment, care-date windows, _since, _type, keyset
paging under concurrent writes, and the caller's access limits, on the real PostgreSQL."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.openapi import build_openapi
from tests import test_authorization as authorization
from tests.conftest import BASE_URL, bearer, wait_until
from tests.test_search_support import JSON, delete, link, put, typed_ids

world = authorization.world
partner_a = authorization.partner_a

EVERYTHING_URL = "/fhir/Patient/p1/$everything"

RECORD = {
    "Patient/p1",
    "Observation/o-2020",
    "Observation/o-2023",
    "Observation/o-undated",
    "Condition/c-2021",
    "Appointment/a-2023",
    "ServiceRequest/sr-2022",
    "Goal/g-2024",
    "RelatedPerson/rp1",
}
REFERENCED = {
    "Organization/org1",
    "Practitioner/dr1",
    "Location/loc1",
    "HealthcareService/hs1",
    "PractitionerRole/role1",
}


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


def _observation(fhir_id: str, patient: str, effective: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": fhir_id},
        "subject": ref(f"Patient/{patient}"),
        "performer": [ref("Practitioner/dr1")],
    }
    if effective is not None:
        body["effectiveDateTime"] = effective
    return body


@pytest.fixture
async def record(client: httpx.AsyncClient) -> None:
    """Patient p1's record (one resource per care-date case), the directory it points to, and
    patient p2 whose record shares p1's practitioner."""
    await put(client, "Organization", "org1", {"name": "Eastside Clinic"})
    await put(client, "Organization", "org2", {"name": "Not referenced by p1's record"})
    await put(client, "Practitioner", "dr1", {"name": [{"family": "Osei"}]})
    await put(client, "Practitioner", "dr2", {"name": [{"family": "Unrelated"}]})
    await put(
        client,
        "PractitionerRole",
        "role1",
        {"practitioner": ref("Practitioner/dr2"), "organization": ref("Organization/org2")},
    )
    await put(client, "Location", "loc1", {"name": "Room 1"})
    await put(client, "HealthcareService", "hs1", {"name": "Food pantry"})
    for patient in ("p1", "p2"):
        await put(
            client,
            "Patient",
            patient,
            {
                "name": [{"family": patient}],
                "managingOrganization": ref("Organization/org1"),
                "generalPractitioner": [ref("Practitioner/dr1")],
            },
        )
    await put(client, "Observation", "o-2020", _observation("o-2020", "p1", "2020-05-01T10:00:00Z"))
    await put(client, "Observation", "o-2023", _observation("o-2023", "p1", "2023-06-15"))
    await put(client, "Observation", "o-undated", _observation("o-undated", "p1"))
    await put(client, "Observation", "o-p2", _observation("o-p2", "p2", "2023-06-15"))
    await put(client, "Observation", "o-deleted", _observation("o-deleted", "p1", "2023-06-15"))
    await delete(client, "Observation", "o-deleted")
    await put(
        client,
        "Condition",
        "c-2021",
        {"subject": ref("Patient/p1"), "onsetDateTime": "2021-03-01", "code": {"text": "housing"}},
    )
    await put(
        client,
        "Appointment",
        "a-2023",
        {
            "status": "booked",
            "start": "2023-07-01T09:00:00Z",
            "end": "2023-07-01T09:30:00Z",
            "participant": [
                {"actor": ref("Patient/p1"), "status": "accepted"},
                {"actor": ref("Location/loc1"), "status": "accepted"},
                {"actor": ref("HealthcareService/hs1"), "status": "accepted"},
            ],
        },
    )
    await put(
        client,
        "ServiceRequest",
        "sr-2022",
        {
            "status": "active",
            "intent": "order",
            "subject": ref("Patient/p1"),
            "occurrenceDateTime": "2022-02-02",
            "performer": [ref("PractitionerRole/role1")],
        },
    )
    await put(
        client,
        "Goal",
        "g-2024",
        {
            "lifecycleStatus": "active",
            "description": {"text": "stable housing"},
            "subject": ref("Patient/p1"),
            "startDate": "2024-01-10",
        },
    )
    await put(client, "RelatedPerson", "rp1", {"patient": ref("Patient/p1"), "name": [{"family": "Kin"}]})


async def _everything(
    client: httpx.AsyncClient,
    params: list[tuple[str, str]] | None = None,
    *,
    url: str = EVERYTHING_URL,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    response = await client.get(url, params=params or [], headers=headers)
    assert response.status_code == 200, response.text
    bundle: dict[str, Any] = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle


async def _walk(
    client: httpx.AsyncClient, first: dict[str, Any], headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    pages = [first]
    while (url := link(pages[-1], "next")) is not None:
        assert url.startswith(BASE_URL), url
        response = await client.get(url[len(BASE_URL) :], headers=headers)
        assert response.status_code == 200, response.text
        pages.append(response.json())
    return pages


def _outcome(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    diagnostics: str = body["issue"][0].get("diagnostics", "")
    return diagnostics


# -- the record and what it references --------------------------------------------------------------


async def test_the_record_and_what_it_references_each_once(client: httpx.AsyncClient, record: None) -> None:
    bundle = await _everything(client)
    assert set(typed_ids(bundle, "match")) == RECORD
    assert set(typed_ids(bundle, "include")) == REFERENCED
    every = typed_ids(bundle, "match") + typed_ids(bundle, "include")
    assert not [key for key, seen in Counter(every).items() if seen > 1]  # dr1 is referenced 4 times
    assert "Observation/o-p2" not in every and "Patient/p2" not in every  # the other patient's record
    assert "Observation/o-deleted" not in every
    assert "Practitioner/dr2" not in every  # a PractitionerRole's own references are not followed
    assert bundle["total"] == len(RECORD | REFERENCED)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"{BASE_URL}/fhir/{resource['resourceType']}/{resource['id']}"
    assert (link(bundle, "self") or "").startswith(f"{BASE_URL}/fhir/Patient/p1/$everything?")
    assert link(bundle, "next") is None


async def test_post_with_parameters_is_the_same_as_get(client: httpx.AsyncClient, record: None) -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "start", "valueDate": "2023-01-01"},
            {"name": "_type", "valueCode": "Observation,Practitioner"},
            {"name": "_count", "valueInteger": 50},
        ],
    }
    response = await client.post(EVERYTHING_URL, json=body, headers=JSON)
    assert response.status_code == 200, response.text
    posted = response.json()
    got = await _everything(
        client, [("start", "2023-01-01"), ("_type", "Observation,Practitioner"), ("_count", "50")]
    )
    assert (
        typed_ids(posted, "match")
        == typed_ids(got, "match")
        == ["Observation/o-2023", "Observation/o-undated"]
    )
    assert typed_ids(posted, "include") == typed_ids(got, "include") == ["Practitioner/dr1"]
    # An empty POST body is the operation without parameters.
    plain = await client.post(EVERYTHING_URL)
    assert plain.status_code == 200, plain.text
    assert set(typed_ids(plain.json(), "match")) == RECORD


# -- start / end: care dates --------------------------------------------------------------------------


async def test_start_and_end_select_by_each_types_care_date(client: httpx.AsyncClient, record: None) -> None:
    bundle = await _everything(client, [("start", "2023-01-01"), ("end", "2023-12-31")])
    undated = {"Patient/p1", "Observation/o-undated", "RelatedPerson/rp1"}  # no care date: kept
    # Observation.effective 2023-06-15, Appointment.start 2023-07-01 are in; Condition.onset 2021,
    # ServiceRequest.occurrence 2022 and Goal.start 2024 are not.
    assert set(typed_ids(bundle, "match")) == undated | {"Observation/o-2023", "Appointment/a-2023"}
    # What is referenced follows the record in the window: role1 only from the 2022 ServiceRequest.
    assert set(typed_ids(bundle, "include")) == {
        "Organization/org1",
        "Practitioner/dr1",
        "Location/loc1",
        "HealthcareService/hs1",
    }


async def test_end_alone_and_start_alone(client: httpx.AsyncClient, record: None) -> None:
    before = set(typed_ids(await _everything(client, [("end", "2021")]), "match"))
    assert before == {
        "Patient/p1",
        "Observation/o-undated",
        "RelatedPerson/rp1",
        "Observation/o-2020",
        "Condition/c-2021",
    }
    after = set(typed_ids(await _everything(client, [("start", "2024-01-10")]), "match"))
    assert after == {"Patient/p1", "Observation/o-undated", "RelatedPerson/rp1", "Goal/g-2024"}
    # The window includes its end day: 2020-05-01T10:00Z lies within end=2020-05-01.
    assert "Observation/o-2020" in typed_ids(await _everything(client, [("end", "2020-05-01")]), "match")


# -- _since and _type -----------------------------------------------------------------------------------


async def test_since_keeps_what_changed_at_or_after_it(client: httpx.AsyncClient, record: None) -> None:
    changed = await put(
        client, "Observation", "o-2020", {**_observation("o-2020", "p1"), "status": "amended"}
    )
    since = changed["meta"]["lastUpdated"]
    bundle = await _everything(client, [("_since", since)])
    # dr1 did not change: _since applies to every entry, referenced ones too.
    assert typed_ids(bundle, "match") == ["Observation/o-2020"]
    assert typed_ids(bundle, "include") == []
    later = await put(client, "Practitioner", "dr1", {"name": [{"family": "Osei-Mensah"}]})
    bundle = await _everything(client, [("_since", later["meta"]["lastUpdated"])])
    assert typed_ids(bundle, "include") == ["Practitioner/dr1"] and typed_ids(bundle, "match") == []


async def test_type_limits_every_entry(client: httpx.AsyncClient, record: None) -> None:
    bundle = await _everything(client, [("_type", "Observation"), ("_type", "Condition,Organization")])
    assert set(typed_ids(bundle, "match")) == {
        "Observation/o-2020",
        "Observation/o-2023",
        "Observation/o-undated",
        "Condition/c-2021",
    }
    # The Patient is not returned but what it references still is (org1: its managingOrganization).
    assert typed_ids(bundle, "include") == ["Organization/org1"]
    only_directory = await _everything(client, [("_type", "Practitioner")])
    assert typed_ids(only_directory, "include") == ["Practitioner/dr1"]


async def test_audit_events_are_not_part_of_the_record(
    app: FastAPI, client: httpx.AsyncClient, record: None
) -> None:
    """Every read of p1 leaves an AuditEvent naming p1 (the server's access log, in the audit store
    of its own): $everything returns the record without them, even when _type names AuditEvent;
    AuditEvent?patient= is where they are read."""
    await client.get("/fhir/Patient/p1")
    auditor = await bearer(app, "system/*.rs system/AuditEvent.rs", client_id="auditor")

    async def logged() -> list[dict[str, Any]]:
        await app.state.audit.flush()
        found = await client.get("/fhir/AuditEvent", params={"patient": "p1"}, headers=auditor)
        return list(found.json().get("entry", []))

    assert await wait_until(logged, "the AuditEvent of the read of Patient/p1")
    assert set(typed_ids(await _everything(client, headers=auditor), "match")) == RECORD
    assert typed_ids(await _everything(client, [("_type", "AuditEvent")], headers=auditor), "match") == []


# -- paging -------------------------------------------------------------------------------------------


async def test_pages_are_the_set_without_repeats_under_concurrent_writes(
    client: httpx.AsyncClient, record: None
) -> None:
    first = await _everything(client, [("_count", "3")])
    assert len(first["entry"]) == 3 and link(first, "next") is not None
    seen = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in first["entry"]]
    # Between pages: an entry already sent changes, a new record resource appears, one not yet
    # sent is deleted.
    sent = (await client.get(f"/fhir/{seen[-1]}")).json()
    sent_type, sent_id = seen[-1].split("/")
    await put(client, sent_type, sent_id, {**sent, "language": "en-GB"})
    await put(client, "Observation", "o-new", _observation("o-new", "p1", "2023-08-01"))
    await delete(client, "Goal", "g-2024")
    pages = await _walk(client, first)
    keys = [
        f"{e['resource']['resourceType']}/{e['resource']['id']}" for p in pages for e in p.get("entry", [])
    ]
    assert len(keys) == len(set(keys)), Counter(keys)
    # What was there throughout comes once; the deleted Goal only if it was sent before.
    assert set(keys) == (RECORD | REFERENCED | {"Observation/o-new"}) - ({"Goal/g-2024"} - set(seen))
    assert all(len(p.get("entry", [])) <= 3 for p in pages)


async def test_next_links_keep_the_parameters(client: httpx.AsyncClient, record: None) -> None:
    params = [("start", "2023-01-01"), ("end", "2023-12-31"), ("_type", "Observation,Patient,Practitioner")]
    first = await _everything(client, [*params, ("_count", "1")])
    pages = await _walk(client, first)
    keys = [typed for page in pages for typed in typed_ids(page, "match") + typed_ids(page, "include")]
    assert sorted(keys) == sorted(
        ["Patient/p1", "Observation/o-2023", "Observation/o-undated", "Practitioner/dr1"]
    )
    assert all("_type=Observation%2CPatient%2CPractitioner" in (link(p, "self") or "") for p in pages)


# -- errors -------------------------------------------------------------------------------------------


async def test_unknown_and_deleted_patients(client: httpx.AsyncClient, record: None) -> None:
    _outcome(await client.get("/fhir/Patient/nobody/$everything"), 404)
    await delete(client, "Patient", "p2")
    _outcome(await client.get("/fhir/Patient/p2/$everything"), 410)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ([("start", "yesterday")], "start"),
        ([("end", "2023-02-30")], "end"),
        ([("start", "2023-01-01T10:00:00Z")], "start"),
        ([("start", "2024"), ("end", "2023")], "start"),
        ([("_since", "soon")], "_since"),
        ([("_type", "Nonsense")], "_type"),
        ([("_count", "ten")], "_count"),
        ([("_count", "0")], "_count"),
        ([("patient", "p2")], "patient"),
        ([("start", "2020"), ("start", "2021")], "start"),
        ([("_cursor", "forged.cursor")], "_cursor"),
    ],
)
async def test_bad_parameters_are_400(
    client: httpx.AsyncClient, record: None, params: list[tuple[str, str]], named: str
) -> None:
    response = await client.get(EVERYTHING_URL, params=params)
    assert named in _outcome(response, 400)


async def test_a_cursor_belongs_to_its_query(client: httpx.AsyncClient, record: None) -> None:
    first = await _everything(client, [("_count", "2")])
    next_url = link(first, "next")
    assert next_url is not None
    moved = next_url.replace("/Patient/p1/", "/Patient/p2/")
    _outcome(await client.get(moved[len(BASE_URL) :]), 400)
    other_query = next_url.replace("_count=2", "_count=2&_type=Observation")
    _outcome(await client.get(other_query[len(BASE_URL) :]), 400)


async def test_bad_post_bodies_are_400(client: httpx.AsyncClient, record: None) -> None:
    wrong_type = {"resourceType": "Parameters", "parameter": [{"name": "start", "valueString": "2023"}]}
    _outcome(await client.post(EVERYTHING_URL, json=wrong_type, headers=JSON), 400)
    not_parameters = {"resourceType": "Patient"}
    _outcome(await client.post(EVERYTHING_URL, json=not_parameters, headers=JSON), 400)


# -- type level ---------------------------------------------------------------------------------------


async def test_type_level_pages_through_every_patient(client: httpx.AsyncClient, record: None) -> None:
    first = await _everything(client, [("_count", "4")], url="/fhir/Patient/$everything")
    pages = await _walk(client, first)
    match = [key for page in pages for key in typed_ids(page, "match")]
    include = [key for page in pages for key in typed_ids(page, "include")]
    assert len(match + include) == len(set(match + include))
    assert set(match) == RECORD | {"Patient/p2", "Observation/o-p2"}
    assert set(include) == REFERENCED
    windowed = await _everything(
        client,
        [("start", "2023-06-01"), ("end", "2023-06-30"), ("_type", "Observation")],
        url="/fhir/Patient/$everything",
    )
    assert set(typed_ids(windowed, "match")) == {
        "Observation/o-2023",
        "Observation/o-p2",
        "Observation/o-undated",
    }


async def test_type_level_is_for_system_clients(
    app: FastAPI, client: httpx.AsyncClient, record: None
) -> None:
    patient_app = await bearer(app, "patient/*.rs", patient="p1", client_id="p1-everything")
    _outcome(await client.get("/fhir/Patient/$everything", headers=patient_app), 403)


# -- access -------------------------------------------------------------------------------------------


async def test_a_patient_token_sees_its_own_record_only(
    app: FastAPI, client: httpx.AsyncClient, record: None
) -> None:
    p1_app = await bearer(app, "patient/*.rs", patient="p1", client_id="p1-everything")
    bundle = await _everything(client, headers=p1_app)
    assert set(typed_ids(bundle, "match")) == RECORD
    assert set(typed_ids(bundle, "include")) == REFERENCED  # directory data: not limited to a patient
    # Another patient's record is not there for this token: 404, as if it did not exist.
    _outcome(await client.get("/fhir/Patient/p2/$everything", headers=p1_app), 404)
    _outcome(await client.get("/fhir/Patient/nobody/$everything", headers=p1_app), 404)
    # Observations only: the rest of the record is left out, not refused.
    observations = await bearer(
        app, "patient/Patient.r patient/Observation.rs", patient="p1", client_id="p1-obs"
    )
    limited = await _everything(client, headers=observations)
    assert set(typed_ids(limited, "match")) == {
        "Patient/p1",
        "Observation/o-2020",
        "Observation/o-2023",
        "Observation/o-undated",
    }
    assert typed_ids(limited, "include") == []


async def test_without_patient_read_it_is_403(app: FastAPI, client: httpx.AsyncClient, record: None) -> None:
    observations_only = await bearer(app, "system/Observation.rs", client_id="obs-reader")
    _outcome(await client.get(EVERYTHING_URL, headers=observations_only), 403)


async def test_a_partner_sees_what_its_referral_grants(
    client: httpx.AsyncClient, partner_a: dict[str, str]
) -> None:
    """tests/test_authorization.py world: cm refers p1 to partnerA; partnerA may read the
    referral, the Patient, the Consent and the Condition it names, and the organisations."""
    bundle = await _everything(client, headers=partner_a)
    assert set(typed_ids(bundle, "match")) == {
        "Patient/p1",
        "Task/task-p1",
        "ServiceRequest/sr-p1",
        "Consent/consent-p1",
        "Condition/cond-p1",
    }
    # obs-p1 and secret-p1 are p1's too, but no referral grants them.
    assert set(typed_ids(bundle, "include")) == {"Organization/partnerA", "Organization/cm"}
    _outcome(await client.get("/fhir/Patient/p2/$everything", headers=partner_a), 404)
    unlimited = await _everything(client)
    assert {"Observation/obs-p1", "Condition/secret-p1"} <= set(typed_ids(unlimited, "match"))


# -- registration -------------------------------------------------------------------------------------


async def test_capability_statement_and_operation_definition(client: httpx.AsyncClient) -> None:
    statement = (await client.get("/fhir/metadata")).json()
    [patient] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Patient"]
    [listed] = [o for o in patient["operation"] if o["name"] == "everything"]
    definition = (await client.get(listed["definition"][len(BASE_URL) :])).json()
    assert definition["base"] == "http://hl7.org/fhir/OperationDefinition/Patient-everything"
    assert definition["id"] == "Patient-everything" and definition["code"] == "everything"
    assert definition["resource"] == ["Patient"] and definition["type"] and definition["instance"]
    assert not definition["system"] and not definition["affectsState"]
    names = [(p["name"], p["use"], p["type"], p["max"]) for p in definition["parameter"]]
    assert names == [
        ("start", "in", "date", "1"),
        ("end", "in", "date", "1"),
        ("_since", "in", "instant", "1"),
        ("_type", "in", "code", "*"),
        ("_count", "in", "integer", "1"),
        ("return", "out", "Bundle", "1"),
    ]


def test_openapi_documents_both_levels(app: FastAPI) -> None:
    paths = build_openapi(app)["paths"]
    instance = paths["/fhir/Patient/{id}/$everything"]
    assert set(instance) == {"get", "post"}
    documented = {p["name"] for p in instance["get"]["parameters"]}
    assert documented >= {"id", "start", "end", "_since", "_type", "_count", "_cursor"}
    assert set(paths["/fhir/Patient/$everything"]) == {"get", "post"}
