"""History for an instance, a type and the whole system (http.html#history)."""

from __future__ import annotations

import asyncio

import httpx

from tests import test_authorization as authorization
from tests.samples import SAMPLES
from tests.test_authorization import _observation
from tests.test_search_support import put

JSON = {"content-type": "application/fhir+json"}


async def _create(client: httpx.AsyncClient, resource_type: str) -> str:
    response = await client.post(f"/fhir/{resource_type}", json=SAMPLES[resource_type], headers=JSON)
    return str(response.json()["id"])


async def test_type_and_system_history(client: httpx.AsyncClient) -> None:
    patient = await _create(client, "Patient")
    goal = await _create(client, "Goal")
    patient_history = (await client.get("/fhir/Patient/_history")).json()
    assert patient_history["type"] == "history"
    assert [e["resource"]["id"] for e in patient_history["entry"]] == [patient]
    system = (await client.get("/fhir/_history")).json()
    assert [e["resource"]["id"] for e in system["entry"]] == [goal, patient]
    assert system["entry"][0]["fullUrl"] == f"http://cc.test/fhir/Goal/{goal}"
    assert system["entry"][0]["request"] == {"method": "POST", "url": "Goal"}
    assert system["entry"][0]["response"]["status"] == "201 Created"


async def test_history_paging_is_stable_under_writes(client: httpx.AsyncClient) -> None:
    ids = [await _create(client, "Task") for _ in range(7)]
    page = (await client.get("/fhir/Task/_history?_count=3")).json()
    seen: list[str] = []
    pages = 0
    while True:
        pages += 1
        seen.extend(e["resource"]["id"] for e in page["entry"])
        await _create(client, "Task")  # a write between page requests
        following = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not following:
            break
        page = (await client.get(following[0].removeprefix("http://cc.test"))).json()
    assert seen == list(reversed(ids))
    assert pages == 3


async def test_since_filters_older_versions(client: httpx.AsyncClient) -> None:
    await _create(client, "Condition")
    await asyncio.sleep(0.01)
    later = (await client.post("/fhir/Condition", json=SAMPLES["Condition"], headers=JSON)).json()
    since = later["meta"]["lastUpdated"]
    history = (await client.get("/fhir/Condition/_history", params={"_since": since})).json()
    assert [e["resource"]["id"] for e in history["entry"]] == [later["id"]]


async def test_bad_history_parameters(client: httpx.AsyncClient) -> None:
    assert (await client.get("/fhir/_history?_since=yesterday")).status_code == 400
    assert (await client.get("/fhir/_history?_count=-1")).status_code == 400
    tampered = await client.get("/fhir/_history?_cursor=eyJ4IjoxfQ.AAAA")
    assert tampered.status_code == 400
    assert tampered.json()["issue"][0]["expression"] == ["_cursor"]
    assert (await client.get("/fhir/_history?_cursor=garbage")).status_code == 400


async def test_count_zero_returns_no_entries(client: httpx.AsyncClient) -> None:
    await _create(client, "Patient")
    bundle = (await client.get("/fhir/_history?_count=0")).json()
    assert "entry" not in bundle  # FHIR JSON has no empty arrays


async def test_total_on_a_later_search_page(client: httpx.AsyncClient) -> None:
    for _ in range(5):
        await _create(client, "Task")
    params = {"status": "requested", "_count": "2", "_total": "accurate"}
    first = (await client.get("/fhir/Task", params=params)).json()
    assert first["total"] == 5
    following = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = await client.get(following.removeprefix("http://cc.test"))
    assert second.status_code == 200
    assert second.json()["total"] == 5
    assert len(second.json()["entry"]) == 2


# -- a patient-scoped token and the versions of a resource that moved into its compartment ------

# The leakage world and its patient-scoped token (fixtures of tests/test_authorization.py).
world = authorization.world
patient_p1 = authorization.patient_p1


async def test_patient_scope_never_reads_old_versions_outside_the_compartment(
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
