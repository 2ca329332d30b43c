"""The human-services directory: HealthcareService, Location, OrganizationAffiliation,
DocumentReference and Basic with every R4 search parameter, ``Location?near`` (R4
location.html#search), chaining into Location and ``_include`` of a service's sites."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from tests.test_search_support import bad_request, ids, put, search, typed_ids

HOME = (40.0, -75.0)
"""A client's home; the test sites lie due north of it."""


def north_of(point: tuple[float, float], km: float) -> dict[str, float]:
    """The position ``km`` kilometres due north of ``point`` (along a meridian)."""
    return {"latitude": point[0] + math.degrees(km / 6371.0088), "longitude": point[1]}


def near(distance: str, point: tuple[float, float] = HOME) -> str:
    return f"{point[0]}|{point[1]}|{distance}"


async def _sites(client: httpx.AsyncClient) -> None:
    for fhir_id, km in (("one", 1), ("twenty", 20), ("three-hundred", 300)):
        await put(client, "Location", fhir_id, {"name": f"Site {km} km", "position": north_of(HOME, km)})
    await put(client, "Location", "nowhere", {"name": "Mobile outreach (no position)"})


async def test_near_selects_by_great_circle_distance(client: httpx.AsyncClient) -> None:
    await _sites(client)
    assert await ids(client, "Location", ("near", near("10|km"))) == {"one"}
    assert await ids(client, "Location", ("near", near("50|km"))) == {"one", "twenty"}
    assert await ids(client, "Location", ("near", near("500|km"))) == {"one", "twenty", "three-hundred"}
    # km is assumed without units; other UCUM lengths convert
    assert await ids(client, "Location", ("near", near("50"))) == {"one", "twenty"}
    assert await ids(client, "Location", ("near", near("2000|m"))) == {"one"}
    assert await ids(client, "Location", ("near", near("15|[mi_i]"))) == {"one", "twenty"}
    assert await ids(client, "Location", ("near", near("15|mi"))) == {"one", "twenty"}
    assert await ids(client, "Location", ("near", near("10|http://unitsofmeasure.org|km"))) == {"one"}
    # OR over comma-separated points; :missing on a position
    far = (HOME[0] + math.degrees(300 / 6371.0088), HOME[1])
    assert await ids(client, "Location", ("near", f"{near('5|km')},{near('5|km', far)}")) == {
        "one",
        "three-hundred",
    }
    assert await ids(client, "Location", ("near:missing", "true")) == {"nowhere"}
    # with other parameters, and on page boundaries of the index-driven path
    assert await ids(client, "Location", ("near", near("500|km")), ("name", "site 2")) == {"twenty"}
    bundle = await search(client, "Location", [("near", near("500|km")), ("_count", "1")])
    assert len(bundle["entry"]) == 1


async def test_near_across_the_antimeridian_and_at_a_pole(client: httpx.AsyncClient) -> None:
    await put(client, "Location", "fiji-east", {"position": {"latitude": -17.0, "longitude": 179.9}})
    await put(client, "Location", "fiji-west", {"position": {"latitude": -17.0, "longitude": -179.9}})
    await put(client, "Location", "pole", {"position": {"latitude": 89.99, "longitude": 10.0}})
    assert await ids(client, "Location", ("near", "-17.0|179.95|20|km")) == {"fiji-east", "fiji-west"}
    assert await ids(client, "Location", ("near", "-17.0|-179.95|20|km")) == {"fiji-east", "fiji-west"}
    assert await ids(client, "Location", ("near", "89.99|-170.0|10|km")) == {"pole"}


@pytest.mark.parametrize(
    "value",
    [
        "40.0",  # no longitude
        "abc|-75|10|km",
        "40|-75|ten|km",
        "91|-75|10|km",
        "40|-181|10|km",
        "40|-75|-1|km",
        "40|-75|10|parsec",
        "40|-75|10|km|extra|more",
        "40|-75|1e9|km",
    ],
)
async def test_bad_near_values_are_400(client: httpx.AsyncClient, value: str) -> None:
    await bad_request(client, "Location", ("near", value), names="near")


async def test_near_cannot_sort_or_take_modifiers(client: httpx.AsyncClient) -> None:
    await bad_request(client, "Location", ("near:exact", near("10|km")), names="near:exact")
    await bad_request(client, "Location", ("_sort", "near"), names="_sort")


async def test_a_case_manager_finds_services_near_a_client(client: httpx.AsyncClient) -> None:
    """``HealthcareService?service-category=...&location.near=...&_include=HealthcareService:location``."""
    await _sites(client)
    housing = {"coding": [{"system": "http://example.org/service-category", "code": "housing"}]}
    food = {"coding": [{"system": "http://example.org/service-category", "code": "food"}]}
    await put(
        client,
        "HealthcareService",
        "shelter",
        {"name": "Shelter", "category": [housing], "location": [{"reference": "Location/twenty"}]},
    )
    await put(
        client,
        "HealthcareService",
        "pantry",
        {"name": "Pantry", "category": [food], "location": [{"reference": "Location/one"}]},
    )
    await put(
        client,
        "HealthcareService",
        "far-shelter",
        {"name": "Far shelter", "category": [housing], "location": [{"reference": "Location/three-hundred"}]},
    )
    category = "http://example.org/service-category|housing"
    assert await ids(client, "HealthcareService", ("location.near", near("50|km"))) == {"shelter", "pantry"}
    bundle = await search(
        client,
        "HealthcareService",
        [
            ("service-category", category),
            ("location.near", near("50|km")),
            ("_include", "HealthcareService:location"),
        ],
    )
    assert typed_ids(bundle) == ["HealthcareService/shelter"]
    assert typed_ids(bundle, "include") == ["Location/twenty"]
    assert await ids(
        client, "HealthcareService", ("service-category", category), ("location.near", near("500|km"))
    ) == {"shelter", "far-shelter"}
    await bad_request(client, "HealthcareService", ("location.near", "north|south"), names="near")


# -- worklists -------------------------------------------------------------------------------


async def _worklist(client: httpx.AsyncClient) -> None:
    await put(client, "Organization", "cbo", {"name": "Food bank"})
    tasks: list[tuple[str, str, str | None, str, str]] = [
        # id, status, priority, authoredOn, executionPeriod.end (the due date)
        ("t-routine-old", "requested", "routine", "2026-01-01", "2026-03-01"),
        ("t-routine-new", "accepted", "routine", "2026-02-01", "2026-02-15"),
        ("t-stat", "requested", "stat", "2026-03-01", "2026-03-02"),
        ("t-urgent", "accepted", "urgent", "2026-01-15", "2026-04-01"),
        ("t-asap", "requested", "asap", "2026-02-15", "2026-02-20"),
        ("t-none", "requested", None, "2026-01-10", "2026-05-01"),
        ("t-done", "completed", "stat", "2026-01-02", "2026-01-03"),
    ]
    for fhir_id, status, priority, authored, due in tasks:
        body: dict[str, Any] = {
            "status": status,
            "intent": "order",
            "owner": {"reference": "Organization/cbo"},
            "authoredOn": authored,
            "executionPeriod": {"start": authored, "end": due},
        }
        if priority:
            body["priority"] = priority
        await put(client, "Task", fhir_id, body)


async def _all_pages(client: httpx.AsyncClient, params: list[tuple[str, str]]) -> list[str]:
    """The matches of every page (``_count=2``), following ``next`` links."""
    from tests.test_search_support import get_url, link, match_ids

    bundle = await search(client, "Task", [*params, ("_count", "2")])
    found = match_ids(bundle)
    while (url := link(bundle, "next")) is not None:
        response = await get_url(client, url)
        assert response.status_code == 200, response.text
        bundle = response.json()
        found.extend(match_ids(bundle))
    return found


async def test_worklist_sorts_by_priority_order_then_authored_on(client: httpx.AsyncClient) -> None:
    """request-priority is ordered (stat > asap > urgent > routine), not alphabetical."""
    await _worklist(client)
    worklist = [("owner", "Organization/cbo"), ("status", "requested,accepted")]
    assert await _all_pages(client, [*worklist, ("_sort", "-priority,authored-on")]) == [
        "t-stat",
        "t-asap",
        "t-urgent",
        "t-routine-old",
        "t-routine-new",
        "t-none",
    ]
    assert await _all_pages(client, [*worklist, ("_sort", "priority,-authored-on")]) == [
        "t-none",
        "t-routine-new",
        "t-routine-old",
        "t-urgent",
        "t-asap",
        "t-stat",
    ]
    assert await _all_pages(client, [*worklist, ("_sort", "authored-on")]) == [
        "t-routine-old",
        "t-none",
        "t-urgent",
        "t-routine-new",
        "t-asap",
        "t-stat",
    ]


async def test_worklist_sorts_by_period(client: httpx.AsyncClient) -> None:
    """``_sort=period``: by the start of Task.executionPeriod; ``-period`` by its end (the due date)."""
    await _worklist(client)
    worklist = [("owner", "Organization/cbo"), ("status", "requested,accepted")]
    assert await _all_pages(client, [*worklist, ("_sort", "-period")]) == [
        "t-none",
        "t-urgent",
        "t-stat",
        "t-routine-old",
        "t-asap",
        "t-routine-new",
    ]
    assert await _all_pages(client, [*worklist, ("_sort", "period")]) == [
        "t-routine-old",
        "t-none",
        "t-urgent",
        "t-routine-new",
        "t-asap",
        "t-stat",
    ]
