"""QuestionnaireResponse/$extract (SDC observation-based extraction) of the AHC HRSN screening
carecoord ships: the Observations and candidate Conditions a completed screening becomes,
written as one transaction; nothing written when a response is refused or a write fails."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from app.casework import ahc_hrsn
from app.casework.loader import load_questionnaires
from tests.conftest import bearer, count_rows

LOINC = "http://loinc.org"
CANONICAL = f"{ahc_hrsn.URL}|{ahc_hrsn.VERSION}"
AUTHORED = "2026-03-02T10:15:00Z"


def _answer(link: str, *codes: str) -> dict[str, Any]:
    return {"linkId": f"/{link}", "answer": [{"valueCoding": {"system": LOINC, "code": c}} for c in codes]}


def screening(**changes: Any) -> dict[str, Any]:
    """A completed AHC HRSN screening: not housed, pests and mold, food worries (often and
    sometimes), no transportation, utilities fine, safe."""
    response = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": CANONICAL,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "authored": AUTHORED,
        "author": {"reference": "Practitioner/cm1"},
        "source": {"reference": "Patient/p1"},
        "item": [
            _answer("71802-3", "LA31995-6"),
            _answer("96778-6", "LA31996-4", "LA28580-1"),
            _answer("88122-7", "LA28397-0"),
            _answer("88123-5", "LA6729-3"),
            _answer("93030-5", "LA33-6"),
            _answer("96779-4", "LA32-8"),
            _answer("95618-5", "LA6270-8"),
            _answer("95617-7", "LA6270-8"),
            _answer("95616-9", "LA6270-8"),
            _answer("95615-1", "LA6270-8"),
        ],
    }
    response.update(changes)
    return response


async def _setup(client: httpx.AsyncClient) -> None:
    # Encounter is not a type carecoord serves: the response's encounter reference is copied as is.
    for resource_type, fhir_id in (("Patient", "p1"), ("Practitioner", "cm1")):
        body: dict[str, Any] = {"resourceType": resource_type, "id": fhir_id}
        response = await client.put(f"/fhir/{resource_type}/{fhir_id}", json=body)
        assert response.status_code in (200, 201), response.text


async def _search(client: httpx.AsyncClient, query: str) -> list[dict[str, Any]]:
    response = await client.get(f"/fhir/{query}")
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", []) if e["search"]["mode"] == "match"]


def _codes(concept: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in concept["coding"]}


async def test_the_screening_questionnaire_is_loaded_once(app: FastAPI, client: httpx.AsyncClient) -> None:
    assert await load_questionnaires(app.state.pool, app.state.repositories) == 1
    assert await load_questionnaires(app.state.pool, app.state.repositories) == 0
    [found] = await _search(client, f"Questionnaire?url={ahc_hrsn.URL}&version={ahc_hrsn.VERSION}")
    assert _codes({"coding": found["code"]}) == {(LOINC, "96777-8")}
    assert [i["code"][0]["code"] for i in found["item"]] == [
        "71802-3", "96778-6", "88122-7", "88123-5", "93030-5", "96779-4",
        "95618-5", "95617-7", "95616-9", "95615-1",
    ]  # fmt: skip


async def test_a_completed_screening_becomes_observations_and_candidate_conditions(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await load_questionnaires(app.state.pool, app.state.repositories)
    await _setup(client)
    created = await client.post("/fhir/QuestionnaireResponse", json=screening())
    assert created.status_code == 201, created.text
    qr_id = created.json()["id"]

    response = await client.post(f"/fhir/QuestionnaireResponse/{qr_id}/$extract")
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["type"] == "transaction-response"
    assert {e["response"]["status"] for e in bundle["entry"]} == {"201 Created"}

    observations = await _search(client, f"Observation?derived-from=QuestionnaireResponse/{qr_id}&_count=50")
    # One per answer: housing 1, housing problems 2, food 2, transportation 1, utilities 1, safety 4.
    assert len(observations) == 11
    by_code: dict[str, list[dict[str, Any]]] = {}
    for observation in observations:
        by_code.setdefault(observation["code"]["coding"][0]["code"], []).append(observation)
    assert sorted(c["valueCodeableConcept"]["coding"][0]["code"] for c in by_code["96778-6"]) == [
        "LA28580-1",
        "LA31996-4",
    ]
    food = by_code["88122-7"][0]
    assert food["valueCodeableConcept"]["coding"][0]["code"] == "LA28397-0"
    assert food["status"] == "final"
    assert food["subject"] == {"reference": "Patient/p1"}
    assert food["encounter"] == {"reference": "Encounter/e1"}
    assert food["effectiveDateTime"] == AUTHORED
    assert food["performer"] == [{"reference": "Practitioner/cm1"}, {"reference": "Patient/p1"}]
    assert food["derivedFrom"] == [{"reference": f"QuestionnaireResponse/{qr_id}"}]
    categories = set().union(*(_codes(c) for c in food["category"]))
    assert {
        ("http://terminology.hl7.org/CodeSystem/observation-category", "social-history"),
        ("http://terminology.hl7.org/CodeSystem/observation-category", "survey"),
        ("http://hl7.org/fhir/us/core/CodeSystem/us-core-category", "sdoh"),
        (ahc_hrsn.SDOHCC_CODES, "food-insecurity"),
    } <= categories
    transport = by_code["93030-5"][0]
    assert _codes(transport["valueCodeableConcept"]) == {(LOINC, "LA33-6")}
    assert (ahc_hrsn.SDOHCC_CODES, "transportation-insecurity") in set().union(
        *(_codes(c) for c in transport["category"])
    )

    conditions = await _search(client, "Condition?subject=Patient/p1")
    by_snomed = {
        next(c["code"] for c in condition["code"]["coding"] if c["system"] == ahc_hrsn.SNOMED): condition
        for condition in conditions
    }
    # Homeless (not housed), food insecurity (two answers, one Condition), transportation.
    assert set(by_snomed) == {"32911000", "733423003", "713458007"}
    food_insecurity = by_snomed["733423003"]
    assert _codes(food_insecurity["code"]) == {(ahc_hrsn.SNOMED, "733423003"), (ahc_hrsn.ICD10CM, "Z59.41")}
    assert food_insecurity["verificationStatus"]["coding"][0]["code"] == "unconfirmed"
    assert food_insecurity["clinicalStatus"]["coding"][0]["code"] == "active"
    condition_categories = set().union(*(_codes(c) for c in food_insecurity["category"]))
    assert {
        ("http://hl7.org/fhir/us/core/CodeSystem/condition-category", "health-concern"),
        ("http://hl7.org/fhir/us/core/CodeSystem/us-core-category", "sdoh"),
        (ahc_hrsn.SDOHCC_CODES, "food-insecurity"),
    } <= condition_categories
    evidence = {d["reference"] for d in food_insecurity["evidence"][0]["detail"]}
    food_ids = {f"Observation/{o['id']}" for o in by_code["88122-7"] + by_code["88123-5"]}
    assert evidence == food_ids
    assert _codes(by_snomed["713458007"]["code"]) == {
        (ahc_hrsn.SNOMED, "713458007"),
        (ahc_hrsn.ICD10CM, "Z59.82"),
    }


async def test_extracting_one_response_again_writes_nothing_new(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """A client retrying $extract (a lost answer, a double click) must not double the client's
    Observations and Conditions: the second run answers with what the first one wrote. An amended
    response (a new version) extracts anew."""
    await load_questionnaires(app.state.pool, app.state.repositories)
    await _setup(client)
    qr_id = (await client.post("/fhir/QuestionnaireResponse", json=screening())).json()["id"]
    first = await client.post(f"/fhir/QuestionnaireResponse/{qr_id}/$extract")
    assert first.status_code == 200, first.text
    again = await client.post(f"/fhir/QuestionnaireResponse/{qr_id}/$extract")
    assert again.status_code == 200, again.text
    assert {e["response"]["status"] for e in again.json()["entry"]} == {"200 OK"}
    locations = [e["response"]["location"].split("/_history")[0] for e in first.json()["entry"]]
    assert [e["response"]["location"].split("/_history")[0] for e in again.json()["entry"]] == locations
    observations = await _search(client, f"Observation?derived-from=QuestionnaireResponse/{qr_id}&_count=50")
    assert len(observations) == 11
    assert len(await _search(client, "Condition?subject=Patient/p1")) == 3

    amended = screening(id=qr_id, status="amended")
    assert (await client.put(f"/fhir/QuestionnaireResponse/{qr_id}", json=amended)).status_code == 200
    third = await client.post(f"/fhir/QuestionnaireResponse/{qr_id}/$extract")
    assert {e["response"]["status"] for e in third.json()["entry"]} == {"201 Created"}
    observations = await _search(client, f"Observation?derived-from=QuestionnaireResponse/{qr_id}&_count=50")
    assert len(observations) == 22


async def test_a_screening_posted_at_the_type_level_is_stored_with_what_it_extracts(
    client: httpx.AsyncClient,
) -> None:
    # No Questionnaire stored (clean database): the built-in definition is used.
    await _setup(client)
    calm = screening(
        item=[_answer("71802-3", "LA31994-9"), _answer("88122-7", "LA28398-8"), _answer("93030-5", "LA32-8")]
    )
    body = {"resourceType": "Parameters", "parameter": [{"name": "questionnaire-response", "resource": calm}]}
    response = await client.post("/fhir/QuestionnaireResponse/$extract", json=body)
    assert response.status_code == 200, response.text
    locations = [e["response"]["location"] for e in response.json()["entry"]]
    assert locations[0].startswith("QuestionnaireResponse/")
    qr_id = locations[0].split("/")[1]
    observations = await _search(client, f"Observation?derived-from=QuestionnaireResponse/{qr_id}")
    assert len(observations) == 3
    # Worried about losing housing: housing instability only.
    [condition] = await _search(client, "Condition?subject=Patient/p1")
    assert _codes(condition["code"]) == {
        (ahc_hrsn.SNOMED, "1156191002"),
        (ahc_hrsn.ICD10CM, "Z59.811"),
    }


async def test_persist_false_returns_the_transaction_and_writes_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    before = await count_rows(engine)
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "questionnaire-response", "resource": screening()},
            {"name": "persist", "valueBoolean": False},
        ],
    }
    response = await client.post("/fhir/QuestionnaireResponse/$extract", json=body)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["type"] == "transaction"
    kinds = [e["request"]["url"] for e in bundle["entry"]]
    assert kinds.count("Observation") == 11 and kinds.count("Condition") == 3
    assert kinds[0] == "QuestionnaireResponse"
    assert await count_rows(engine) == before


async def test_a_bad_response_writes_nothing(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    await _setup(client)
    before = await count_rows(engine)

    async def extract(response: dict[str, Any]) -> httpx.Response:
        body = {
            "resourceType": "Parameters",
            "parameter": [{"name": "questionnaire-response", "resource": response}],
        }
        return await client.post("/fhir/QuestionnaireResponse/$extract", json=body)

    # An answer that is not one of the item's options (the last item): refused before any write.
    wrong = screening()
    wrong["item"][-1] = _answer("95615-1", "LA33-6")
    refused = await extract(wrong)
    assert refused.status_code == 400, refused.text
    assert refused.json()["issue"][0]["code"] == "code-invalid"
    # An item the Questionnaire does not have.
    unknown = screening(item=[*screening()["item"], _answer("99999-9", "LA33-6")])
    assert (await extract(unknown)).status_code == 400
    # Not completed.
    assert (await extract(screening(status="in-progress"))).status_code == 422
    # A questionnaire carecoord does not know.
    assert (await extract(screening(questionnaire="http://example.org/Questionnaire/x"))).status_code == 422
    # Invalid as a QuestionnaireResponse.
    assert (await extract(screening(status="finished-ish"))).status_code == 400
    assert await count_rows(engine) == before


async def test_a_write_failing_midway_rolls_the_whole_extraction_back(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """A token that may write the response and its Observations but not Conditions: the
    Observations are written first in the transaction, the first Condition is refused (403),
    and nothing of it stays."""
    await _setup(client)
    before = await count_rows(engine)
    scope = "system/QuestionnaireResponse.crs system/Observation.crs system/Questionnaire.rs"
    headers = await bearer(app, scope, client_id="screener")
    body = {
        "resourceType": "Parameters",
        "parameter": [{"name": "questionnaire-response", "resource": screening()}],
    }
    response = await client.post("/fhir/QuestionnaireResponse/$extract", json=body, headers=headers)
    assert response.status_code == 403, response.text
    assert "Bundle.entry[" in response.json()["issue"][0]["diagnostics"]
    assert await count_rows(engine) == before
    assert await _search(client, "Observation?subject=Patient/p1") == []


async def test_extract_is_declared_with_the_sdc_canonical(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/OperationDefinition/QuestionnaireResponse-extract")
    assert response.status_code == 200, response.text
    definition = response.json()
    assert (
        definition["base"] == "http://hl7.org/fhir/uv/sdc/OperationDefinition/QuestionnaireResponse-extract"
    )
    assert definition["resource"] == ["QuestionnaireResponse"]
    capability = (await client.get("/fhir/metadata")).json()
    [rest] = capability["rest"]
    [resource] = [r for r in rest["resource"] if r["type"] == "QuestionnaireResponse"]
    assert "extract" in {o["name"] for o in resource["operation"]}
