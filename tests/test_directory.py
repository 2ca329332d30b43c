"""The human-services directory: HealthcareService, Location, OrganizationAffiliation,
DocumentReference and Basic with every R4 search parameter, ``Location?near`` (R4
location.html#search), chaining into Location and ``_include`` of a service's sites."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from tests.conftest import bearer
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


async def _all_pages(
    client: httpx.AsyncClient, params: list[tuple[str, str]], headers: dict[str, str] | None = None
) -> list[str]:
    """The matches of every page (``_count=2``), following ``next`` links."""
    from tests.test_search_support import BASE_URL, link, match_ids

    bundle = await search(client, "Task", [*params, ("_count", "2")], headers=headers)
    found = match_ids(bundle)
    while (url := link(bundle, "next")) is not None:
        response = await client.get(url[len(BASE_URL) :], headers=headers)
        assert response.status_code == 200, response.text
        bundle = response.json()
        found.extend(match_ids(bundle))
    return found


async def test_worklist_sorts_by_priority_order_then_authored_on(app: Any, client: httpx.AsyncClient) -> None:
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
    # the general sort (no single owner: sort keys from the index rows) gives the same order
    general = await _all_pages(client, [("status", "requested,accepted"), ("_sort", "-priority,authored-on")])
    assert general == ["t-stat", "t-asap", "t-urgent", "t-routine-old", "t-routine-new", "t-none"]
    # the owner's own (limited) token pages through the same worklist
    owner = await bearer(app, "system/Task.rs", client_id="cbo-client", organization="Organization/cbo")
    assert await _all_pages(client, [*worklist, ("_sort", "-priority,authored-on")], owner) == [
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
    general = await _all_pages(client, [("status", "requested,accepted"), ("_sort", "-period")])
    assert general == ["t-none", "t-urgent", "t-stat", "t-routine-old", "t-asap", "t-routine-new"]
    assert await _all_pages(client, [*worklist, ("_sort", "period")]) == [
        "t-routine-old",
        "t-none",
        "t-urgent",
        "t-routine-new",
        "t-asap",
        "t-stat",
    ]


# -- every R4 search parameter of the directory types ------------------------------------------

SYS = "http://example.org/codes"


def _cc(code: str) -> dict[str, Any]:
    return {"coding": [{"system": SYS, "code": code}]}


META = {
    "profile": ["http://example.org/StructureDefinition/directory"],
    "tag": [{"system": SYS, "code": "tagged"}],
    "security": [{"system": SYS, "code": "sec"}],
    "source": "http://example.org/source",
}
ADDRESS = {
    "use": "work",
    "line": ["12 Harbor Street"],
    "city": "Springfield",
    "state": "IL",
    "postalCode": "62701",
    "country": "USA",
}
DIRECTORY: dict[str, dict[str, Any]] = {
    "HealthcareService": {
        "meta": META,
        "identifier": [{"system": SYS, "value": "hs-1"}],
        "active": True,
        "providedBy": {"reference": "Organization/org"},
        "category": [_cc("housing")],
        "type": [_cc("shelter")],
        "specialty": [_cc("families")],
        "location": [{"reference": "Location/loc"}],
        "name": "Family shelter",
        "coverageArea": [{"reference": "Location/loc"}],
        "program": [_cc("hud")],
        "characteristic": [_cc("wheelchair")],
        "endpoint": [{"reference": "Endpoint/ep"}],
    },
    "Location": {
        "meta": META,
        "identifier": [{"system": SYS, "value": "loc-1"}],
        "status": "active",
        "operationalStatus": {"system": SYS, "code": "open"},
        "name": "Harbor site",
        "alias": ["Old harbor"],
        "type": [_cc("site")],
        "address": ADDRESS,
        "position": {"longitude": -89.65, "latitude": 39.78},
        "managingOrganization": {"reference": "Organization/org"},
        "partOf": {"reference": "Location/parent"},
        "endpoint": [{"reference": "Endpoint/ep"}],
    },
    "OrganizationAffiliation": {
        "meta": META,
        "identifier": [{"system": SYS, "value": "oa-1"}],
        "active": True,
        "period": {"start": "2026-01-01", "end": "2026-12-31"},
        "organization": {"reference": "Organization/org"},
        "participatingOrganization": {"reference": "Organization/partner"},
        "network": [{"reference": "Organization/network"}],
        "code": [_cc("provider")],
        "specialty": [_cc("families")],
        "location": [{"reference": "Location/loc"}],
        "healthcareService": [{"reference": "HealthcareService/hs"}],
        "telecom": [{"system": "phone", "value": "555-0100"}, {"system": "email", "value": "a@example.org"}],
        "endpoint": [{"reference": "Endpoint/ep"}],
    },
    "DocumentReference": {
        "meta": META,
        "masterIdentifier": {"system": SYS, "value": "master-1"},
        "identifier": [{"system": SYS, "value": "doc-1"}],
        "status": "current",
        "type": _cc("referral-note"),
        "category": [_cc("social")],
        "subject": {"reference": "Patient/pat"},
        "date": "2026-03-01T10:00:00Z",
        "author": [{"reference": "Practitioner/doc"}],
        "authenticator": {"reference": "Organization/org"},
        "custodian": {"reference": "Organization/org"},
        "relatesTo": [{"code": "replaces", "target": {"reference": "DocumentReference/old"}}],
        "description": "Intake summary",
        "securityLabel": [_cc("restricted")],
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain",
                    "language": "en",
                    "url": "http://example.org/docs/intake.txt",
                },
                "format": {"system": SYS, "code": "plain"},
            }
        ],
        "context": {
            "encounter": [{"reference": "EpisodeOfCare/eoc"}],
            "event": [_cc("intake")],
            "period": {"start": "2026-02-01", "end": "2026-02-28"},
            "facilityType": _cc("community"),
            "practiceSetting": _cc("social-work"),
            "related": [{"reference": "ServiceRequest/sr"}],
        },
    },
    "Basic": {
        "meta": META,
        "identifier": [{"system": SYS, "value": "basic-1"}],
        "code": _cc("consent-note"),
        "subject": {"reference": "Patient/pat"},
        "created": "2026-03-02",
        "author": {"reference": "Practitioner/doc"},
    },
}
MINIMAL: dict[str, dict[str, Any]] = {
    "HealthcareService": {},
    "Location": {},
    "OrganizationAffiliation": {},
    "DocumentReference": {
        "status": "superseded",
        "content": [{"attachment": {"contentType": "application/pdf"}}],
    },
    "Basic": {"code": _cc("other")},
}
"""A resource of each type that none of the searches below may find."""
COMMON = [
    ("_id", "it"),
    ("_lastUpdated", "gt2000-01-01"),
    ("_profile", "http://example.org/StructureDefinition/directory"),
    ("_tag", f"{SYS}|tagged"),
    ("_security", f"{SYS}|sec"),
    ("_source", "http://example.org/source"),
]
SEARCHES: dict[str, list[tuple[str, str]]] = {
    "HealthcareService": [
        ("active", "true"),
        ("characteristic", f"{SYS}|wheelchair"),
        ("coverage-area", "Location/loc"),
        ("endpoint", "Endpoint/ep"),
        ("identifier", f"{SYS}|hs-1"),
        ("location", "Location/loc"),
        ("name", "family"),
        ("organization", "Organization/org"),
        ("program", f"{SYS}|hud"),
        ("service-category", f"{SYS}|housing"),
        ("service-type", f"{SYS}|shelter"),
        ("specialty", f"{SYS}|families"),
    ],
    "Location": [
        ("address", "12 harbor"),
        ("address-city", "springfield"),
        ("address-country", "usa"),
        ("address-postalcode", "627"),
        ("address-state", "il"),
        ("address-use", "work"),
        ("endpoint", "Endpoint/ep"),
        ("identifier", f"{SYS}|loc-1"),
        ("name", "old harbor"),
        ("near", "39.78|-89.65|1|km"),
        ("operational-status", f"{SYS}|open"),
        ("organization", "Organization/org"),
        ("partof", "Location/parent"),
        ("status", "active"),
        ("type", f"{SYS}|site"),
    ],
    "OrganizationAffiliation": [
        ("active", "true"),
        ("date", "2026"),
        ("email", "a@example.org"),
        ("endpoint", "Endpoint/ep"),
        ("identifier", f"{SYS}|oa-1"),
        ("location", "Location/loc"),
        ("network", "Organization/network"),
        ("participating-organization", "Organization/partner"),
        ("phone", "555-0100"),
        ("primary-organization", "Organization/org"),
        ("role", f"{SYS}|provider"),
        ("service", "HealthcareService/hs"),
        ("specialty", f"{SYS}|families"),
        ("telecom", "555-0100"),
    ],
    "DocumentReference": [
        ("authenticator", "Organization/org"),
        ("author", "Practitioner/doc"),
        ("category", f"{SYS}|social"),
        ("contenttype", "text/plain"),
        ("custodian", "Organization/org"),
        ("date", "2026-03-01"),
        ("description", "intake"),
        ("encounter", "EpisodeOfCare/eoc"),
        ("event", f"{SYS}|intake"),
        ("facility", f"{SYS}|community"),
        ("format", f"{SYS}|plain"),
        ("identifier", f"{SYS}|master-1"),
        ("language", "en"),
        ("location", "http://example.org/docs/intake.txt"),
        ("patient", "Patient/pat"),
        ("period", "2026-02"),
        ("related", "ServiceRequest/sr"),
        ("relatesto", "DocumentReference/old"),
        ("relation", "replaces"),
        ("relationship", "DocumentReference/old$replaces"),
        ("security-label", f"{SYS}|restricted"),
        ("setting", f"{SYS}|social-work"),
        ("status", "current"),
        ("subject", "Patient/pat"),
        ("type", f"{SYS}|referral-note"),
    ],
    "Basic": [
        ("author", "Practitioner/doc"),
        ("code", f"{SYS}|consent-note"),
        ("created", "2026-03-02"),
        ("identifier", f"{SYS}|basic-1"),
        ("patient", "Patient/pat"),
        ("subject", "Patient/pat"),
    ],
}


@pytest.mark.parametrize("resource_type", sorted(DIRECTORY))
async def test_every_r4_search_parameter_of_the_directory_types(
    client: httpx.AsyncClient, resource_type: str
) -> None:
    from app.fhir.search_params import registry

    searches = [*COMMON, *SEARCHES[resource_type]]
    assert {name for name, _ in searches} == set(registry().for_type(resource_type)), (
        "a parameter is untested"
    )
    await put(client, resource_type, "it", DIRECTORY[resource_type])
    await put(client, resource_type, "other", MINIMAL[resource_type])
    for name, value in searches:
        expected = {"it", "other"} if name == "_lastUpdated" else {"it"}
        assert await ids(client, resource_type, (name, value)) == expected, f"{resource_type}?{name}={value}"


async def test_document_reference_relationship_pairs_target_and_code(client: httpx.AsyncClient) -> None:
    body = DIRECTORY["DocumentReference"]
    await put(client, "DocumentReference", "it", body)
    assert (
        await ids(client, "DocumentReference", ("relationship", "DocumentReference/old$transforms")) == set()
    )
    assert await ids(client, "DocumentReference", ("relationship", "DocumentReference/new$replaces")) == set()
    await bad_request(
        client, "DocumentReference", ("relationship", "DocumentReference/old"), names="relationship"
    )


# -- attachments -------------------------------------------------------------------------------


def _document(data: bytes) -> dict[str, Any]:
    import base64

    return {
        "status": "current",
        "content": [
            {"attachment": {"contentType": "application/pdf", "data": base64.b64encode(data).decode()}}
        ],
    }


async def test_inline_attachments_are_limited_by_their_decoded_size(
    app: Any, client: httpx.AsyncClient
) -> None:
    limit = app.state.settings.attachment_max_bytes
    stored = await put(client, "DocumentReference", "small", _document(b"%PDF" * 10))
    assert stored["content"][0]["attachment"]["data"]
    response = await client.put(
        "/fhir/DocumentReference/big",
        json={"resourceType": "DocumentReference", "id": "big", **_document(b"x" * (limit + 1))},
        headers={"content-type": "application/fhir+json"},
    )
    assert response.status_code == 413, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["DocumentReference.content[0].attachment.data"]
    assert (await client.get("/fhir/DocumentReference/big")).status_code == 404
    # exactly the limit is accepted; a URL instead of inline data always is
    await put(client, "DocumentReference", "edge", _document(b"x" * limit))
    await put(
        client,
        "DocumentReference",
        "by-url",
        {"status": "current", "content": [{"attachment": {"url": "https://files.example.org/big.pdf"}}]},
    )
