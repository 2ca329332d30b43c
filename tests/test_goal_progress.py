"""Goal/$progress and CarePlan/$progress over a series of Observations, one case per suggested
achievementStatus; the caller's access limits what is read; CARECOORD_GOAL_AUTO_STATUS sets the
status through a job and records a Provenance."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.casework.goal_status import GOAL_STATUS, GoalStatus
from app.jobs import Runner
from app.main import create_app
from app.settings import Settings
from tests.conftest import BASE_URL, bearer

LOINC = "http://loinc.org"
HBA1C = {"coding": [{"system": LOINC, "code": "4548-4", "display": "Hemoglobin A1c"}]}
HOUSING = {"coding": [{"system": LOINC, "code": "71802-3", "display": "Housing status"}]}
STEADY = {"coding": [{"system": LOINC, "code": "LA31993-1", "display": "I have a steady place to live"}]}
WORRIED = {"coding": [{"system": LOINC, "code": "LA31994-9"}]}
LAB = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}
SURVEY = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}


def hba1c_goal(goal_id: str, due: str = "2099-12-31", patient: str = "p1") -> dict[str, Any]:
    return {
        "resourceType": "Goal",
        "id": goal_id,
        "lifecycleStatus": "active",
        "description": {"text": "HbA1c below 7%"},
        "subject": {"reference": f"Patient/{patient}"},
        "startDate": "2026-01-01",
        "target": [
            {
                "measure": HBA1C,
                "detailQuantity": {
                    "value": 7,
                    "comparator": "<",
                    "unit": "%",
                    "system": "http://unitsofmeasure.org",
                    "code": "%",
                },
                "dueDate": due,
            }
        ],
    }


async def put(client: httpx.AsyncClient, resource: dict[str, Any]) -> None:
    response = await client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
    assert response.status_code in (200, 201), response.text


async def observe(
    client: httpx.AsyncClient, when: str, value: float, patient: str = "p1", category: dict[str, str] = LAB
) -> str:
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [category]}],
        "code": HBA1C,
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
    }
    response = await client.post("/fhir/Observation", json=observation)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def progress(client: httpx.AsyncClient, path: str, **headers: str) -> dict[str, Any]:
    response = await client.get(f"/fhir/{path}/$progress", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def named(parameters: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [p for p in parameters if p["name"] == name]


def status_of(parameters: list[dict[str, Any]]) -> str:
    [status] = named(parameters, "achievementStatus")
    code: str = status["valueCodeableConcept"]["coding"][0]["code"]
    return code


@pytest.fixture
async def patients(client: httpx.AsyncClient) -> httpx.AsyncClient:
    for patient in ("p1", "p2"):
        await put(client, {"resourceType": "Patient", "id": patient})
    return client


@pytest.mark.parametrize(
    ("values", "expected", "meets"),
    [
        ([], "in-progress", None),
        ([9.1], "in-progress", False),
        ([9.1, 8.2], "improving", False),
        ([8.2, 8.9], "worsening", False),
        ([8.2, 8.2], "no-change", False),
        ([8.2, 6.8], "achieved", True),
    ],
)
async def test_each_suggested_status_from_a_series(
    patients: httpx.AsyncClient, values: list[float], expected: str, meets: bool | None
) -> None:
    client = patients
    await put(client, hba1c_goal("g1"))
    ids = [await observe(client, f"2026-0{month + 1}-15", value) for month, value in enumerate(values)]
    await observe(client, "2026-05-01", 5.0, patient="p2")  # another patient's: never counted
    body = await progress(client, "Goal/g1")
    parameters = body["parameter"]
    assert named(parameters, "goal")[0]["valueReference"] == {"reference": "Goal/g1"}
    [target] = named(parameters, "target")
    parts = target["part"]
    assert named(parts, "measure")[0]["valueCodeableConcept"] == HBA1C
    assert named(parts, "detail")[0]["valueQuantity"]["comparator"] == "<"
    assert named(parts, "due")[0]["valueDate"] == "2099-12-31"
    series = named(parts, "observation")
    assert [named(o["part"], "reference")[0]["valueReference"]["reference"] for o in series] == [
        f"Observation/{i}" for i in ids
    ]
    assert [named(o["part"], "value")[0]["valueQuantity"]["value"] for o in series] == values
    if values:
        assert named(parts, "latest")[0]["valueQuantity"]["value"] == values[-1]
        assert named(parts, "meetsTarget")[0]["valueBoolean"] is meets
    assert status_of(parts) == expected
    assert named(parts, "rule")[0]["valueString"]
    assert status_of(parameters) == expected


async def test_a_missed_due_date_is_not_achieved(patients: httpx.AsyncClient) -> None:
    await put(patients, hba1c_goal("g1", due="2026-02-01"))
    await observe(patients, "2026-01-10", 9.0)
    await observe(patients, "2026-01-20", 8.0)  # improving, but the due date has passed
    body = await progress(patients, "Goal/g1")
    assert status_of(body["parameter"]) == "not-achieved"


async def test_a_coded_target(patients: httpx.AsyncClient) -> None:
    goal = {
        "resourceType": "Goal",
        "id": "housed",
        "lifecycleStatus": "active",
        "description": {"text": "Steady housing"},
        "subject": {"reference": "Patient/p1"},
        "target": [{"measure": HOUSING, "detailCodeableConcept": STEADY}],
    }
    await put(patients, goal)
    for when, answer in (("2026-01-05", WORRIED), ("2026-03-05", STEADY)):
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": HOUSING,
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": when,
            "valueCodeableConcept": answer,
        }
        assert (await patients.post("/fhir/Observation", json=observation)).status_code == 201
    body = await progress(patients, "Goal/housed")
    assert status_of(body["parameter"]) == "achieved"


async def test_only_observations_the_token_may_read_count(app: FastAPI, patients: httpx.AsyncClient) -> None:
    await put(patients, hba1c_goal("g1"))
    await observe(patients, "2026-01-15", 9.0)
    await observe(patients, "2026-02-15", 6.5, category=SURVEY)  # meets the target, but not a lab result
    everything = await progress(patients, "Goal/g1")
    assert status_of(everything["parameter"]) == "achieved"
    scope = f"system/Goal.rs system/Observation.rs?category={LAB['system']}|laboratory"
    headers = await bearer(app, scope, client_id="lab-only")
    limited = await progress(patients, "Goal/g1", **headers)
    [target] = named(limited["parameter"], "target")
    assert len(named(target["part"], "observation")) == 1
    assert status_of(limited["parameter"]) == "in-progress"
    # No permission on Observation at all: refused, not answered from what the server sees.
    goal_only = await bearer(app, "system/Goal.rs", client_id="goal-only")
    assert (await patients.get("/fhir/Goal/g1/$progress", headers=goal_only)).status_code == 403


async def test_a_care_plan_rolls_up_its_goals(patients: httpx.AsyncClient) -> None:
    await put(patients, hba1c_goal("improving"))
    achieved = hba1c_goal("achieved")
    achieved["target"][0]["measure"] = {"coding": [{"system": LOINC, "code": "2345-7"}]}
    achieved["target"][0]["detailRange"] = {"high": {"value": 100}}
    del achieved["target"][0]["detailQuantity"]
    await put(patients, achieved)
    await observe(patients, "2026-01-15", 9.0)
    await observe(patients, "2026-02-15", 8.0)
    glucose = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2026-02-01",
        "valueQuantity": {"value": 95},
    }
    assert (await patients.post("/fhir/Observation", json=glucose)).status_code == 201
    plan = {
        "resourceType": "CarePlan",
        "id": "cp1",
        "status": "active",
        "intent": "plan",
        "subject": {"reference": "Patient/p1"},
        "goal": [{"reference": "Goal/improving"}, {"reference": "Goal/achieved"}, {"reference": "Goal/gone"}],
    }
    await put(patients, plan)
    body = await progress(patients, "CarePlan/cp1")
    parameters = body["parameter"]
    goals = named(parameters, "goalProgress")
    assert [status_of(g["part"]) for g in goals] == ["improving", "achieved"]
    [missing] = named(parameters, "unavailableGoal")
    assert named(missing["part"], "reason")[0]["valueString"] == "not found"
    [summary] = named(parameters, "summary")
    counts = {p["name"]: p["valueInteger"] for p in summary["part"]}
    assert counts["goals"] == 2 and counts["improving"] == 1 and counts["achieved"] == 1
    assert status_of(parameters) == "improving"


@pytest.fixture
async def auto_client(
    app: FastAPI, settings: Settings, clean_db: None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A second app on the test database with CARECOORD_GOAL_AUTO_STATUS on."""
    auto = create_app(settings.model_copy(update={"goal_auto_status": True}))
    transport = httpx.ASGITransport(app=auto)
    async with (
        auto.router.lifespan_context(auto),
        httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http,
    ):
        http.headers["accept"] = "application/fhir+json"
        http.headers.update(await bearer(app))
        yield auto, http


async def test_auto_status_sets_the_goal_and_records_provenance(
    auto_client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    auto, client = auto_client
    runner = Runner(auto.state.pool, lease=5.0, concurrency=2)
    GoalStatus(auto.state.pool, auto.state.repositories).register(runner)
    await put(client, {"resourceType": "Patient", "id": "p1"})
    await put(client, hba1c_goal("g1"))
    await put(
        client,
        hba1c_goal("other-measure") | {"target": [{"measure": HOUSING, "detailCodeableConcept": STEADY}]},
    )

    await observe(client, "2026-01-15", 9.0)
    assert await runner.run_once() == 1
    goal = (await client.get("/fhir/Goal/g1")).json()
    assert goal["achievementStatus"]["coding"][0]["code"] == "in-progress"
    assert goal["meta"]["versionId"] == "2"

    observation_id = await observe(client, "2026-02-15", 6.2)
    assert await runner.run_once() == 1
    goal = (await client.get("/fhir/Goal/g1")).json()
    assert goal["achievementStatus"]["coding"][0]["code"] == "achieved"
    assert goal["meta"]["versionId"] == "3"
    untouched = (await client.get("/fhir/Goal/other-measure")).json()
    assert "achievementStatus" not in untouched and untouched["meta"]["versionId"] == "1"

    provenances = (await client.get("/fhir/Provenance?target=Goal/g1&_sort=_lastUpdated")).json()["entry"]
    assert [p["resource"]["target"][0]["reference"] for p in provenances] == [
        "Goal/g1/_history/2",
        "Goal/g1/_history/3",
    ]
    latest = provenances[-1]["resource"]
    assert latest["activity"]["coding"][0]["code"] == "UPDATE"
    assert "meets the target" in latest["reason"][0]["text"]
    assert {"role": "source", "what": {"reference": f"Observation/{observation_id}"}} in latest["entity"]

    # The same value again: the suggestion does not change, nothing is written.
    await observe(client, "2026-03-15", 6.0)
    assert await runner.run_once() == 1
    assert (await client.get("/fhir/Goal/g1")).json()["meta"]["versionId"] == "3"


async def test_without_auto_status_no_job_is_queued(app: FastAPI, patients: httpx.AsyncClient) -> None:
    await put(patients, hba1c_goal("g1"))
    await observe(patients, "2026-01-15", 9.0)
    queued = await app.state.pool.fetchval("SELECT count(*) FROM job WHERE kind = $1", GOAL_STATUS)
    assert queued == 0
