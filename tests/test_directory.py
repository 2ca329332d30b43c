"""The human-services directory: HealthcareService, Location, OrganizationAffiliation,
DocumentReference and Basic with every R4 search parameter, ``Location?near`` (R4
location.html#search), chaining into Location and ``_include`` of a service's sites."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from tests.test_search_support import JSON, bad_request, ids, put, search, typed_ids

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
