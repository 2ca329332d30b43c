"""Chained parameters and _has (R4 search.html#chaining, #has)."""

from __future__ import annotations

import httpx

from tests.test_search_support import bad_request, delete, ids, put


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


async def _people(client: httpx.AsyncClient) -> None:
    await put(client, "Organization", "east", {"name": "Eastside Housing Partners"})
    await put(client, "Organization", "west", {"name": "Westside Food Bank"})
    await put(
        client,
        "Patient",
        "smith",
        {"name": [{"family": "Smith", "given": ["Ana"]}], "managingOrganization": ref("Organization/east")},
    )
    await put(
        client,
        "Patient",
        "jones",
        {
            "name": [{"family": "Jones", "given": ["Smithy"]}],
            "managingOrganization": ref("Organization/west"),
        },
    )
    await put(client, "Patient", "lee", {"name": [{"family": "Lee"}]})


async def _service_request(client: httpx.AsyncClient, fhir_id: str, subject: str) -> None:
    await put(
        client,
        "ServiceRequest",
        fhir_id,
        {"status": "active", "intent": "order", "subject": ref(subject), "code": {"text": "Housing"}},
    )


async def test_chain_with_type(client: httpx.AsyncClient) -> None:
    await _people(client)
    await _service_request(client, "sr-smith", "Patient/smith")
    await _service_request(client, "sr-jones", "Patient/jones")
    await _service_request(client, "sr-dangling", "Patient/missing")
    assert await ids(client, "ServiceRequest", ("subject:Patient.name", "smith")) == {"sr-smith", "sr-jones"}
    assert await ids(client, "ServiceRequest", ("subject:Patient.family", "smith")) == {"sr-smith"}
    assert await ids(client, "ServiceRequest", ("subject:Patient.family:exact", "Smith")) == {"sr-smith"}
    assert await ids(client, "ServiceRequest", ("subject:Patient.family", "nobody")) == set()
    assert await ids(client, "ServiceRequest", ("subject:Patient._id", "jones")) == {"sr-jones"}


async def test_chain_without_type_searches_every_target_type(client: httpx.AsyncClient) -> None:
    await _people(client)
    goal = {"lifecycleStatus": "active", "description": {"text": "g"}}
    await put(client, "Organization", "smithfield", {"name": "Smithfield Shelter"})
    await put(client, "Goal", "g-smith", {**goal, "subject": ref("Patient/smith")})
    await put(client, "Goal", "g-lee", {**goal, "subject": ref("Patient/lee")})
    await put(client, "Goal", "g-org", {**goal, "subject": ref("Organization/smithfield")})
    assert await ids(client, "Goal", ("subject.name", "smith")) == {"g-smith", "g-org"}
    assert await ids(client, "Goal", ("subject:Patient.name", "smith")) == {"g-smith"}
    assert await ids(client, "Goal", ("patient.family", "lee")) == {"g-lee"}


async def test_chain_or_and(client: httpx.AsyncClient) -> None:
    await _people(client)
    await _service_request(client, "sr-smith", "Patient/smith")
    await _service_request(client, "sr-jones", "Patient/jones")
    await _service_request(client, "sr-lee", "Patient/lee")
    assert await ids(client, "ServiceRequest", ("subject:Patient.family", "smith,lee")) == {
        "sr-smith",
        "sr-lee",
    }
    assert await ids(
        client, "ServiceRequest", ("subject:Patient.family", "jones"), ("subject:Patient.given", "smithy")
    ) == {"sr-jones"}


async def test_multi_hop_chains(client: httpx.AsyncClient) -> None:
    await _people(client)
    await _service_request(client, "sr-smith", "Patient/smith")
    await _service_request(client, "sr-jones", "Patient/jones")
    for fhir_id, focus in (("t-smith", "ServiceRequest/sr-smith"), ("t-jones", "ServiceRequest/sr-jones")):
        await put(client, "Task", fhir_id, {"status": "requested", "intent": "order", "focus": ref(focus)})
    assert await ids(client, "Task", ("focus:ServiceRequest.subject:Patient.family", "smith")) == {"t-smith"}
    assert await ids(client, "Task", ("focus:ServiceRequest.subject:Patient.organization.name", "west")) == {
        "t-jones"
    }
    obs = {"status": "final", "code": {"text": "screen"}}
    await put(client, "Observation", "o-smith", {**obs, "subject": ref("Patient/smith")})
    await put(client, "Observation", "o-jones", {**obs, "subject": ref("Patient/jones")})
    await put(client, "Observation", "o-lee", {**obs, "subject": ref("Patient/lee")})
    assert await ids(client, "Observation", ("subject:Patient.organization.name", "eastside")) == {"o-smith"}
    assert await ids(client, "Observation", ("patient.organization:Organization.name", "westside food")) == {
        "o-jones"
    }


async def test_chain_ignores_deleted_and_follows_updated_targets(client: httpx.AsyncClient) -> None:
    await _people(client)
    await _service_request(client, "sr-smith", "Patient/smith")
    await _service_request(client, "sr-lee", "Patient/lee")
    await delete(client, "Patient", "smith")
    assert await ids(client, "ServiceRequest", ("subject:Patient.family", "smith")) == set()
    await put(client, "Patient", "lee", {"name": [{"family": "Smithson"}]})
    assert await ids(client, "ServiceRequest", ("subject:Patient.family", "smith")) == {"sr-lee"}
    assert await ids(client, "ServiceRequest", ("subject:Patient.family", "lee")) == set()


async def test_chain_on_non_reference_parameter_is_400(client: httpx.AsyncClient) -> None:
    await bad_request(client, "Patient", ("name.family", "smith"), names="name.family")
    await bad_request(client, "Goal", ("lifecycle-status.code", "x"), names="lifecycle-status.code")


async def test_chain_to_unknown_type_is_400(client: httpx.AsyncClient) -> None:
    await bad_request(client, "Goal", ("subject:Spaceship.name", "x"), names="subject:Spaceship.name")


async def _tasks_for(client: httpx.AsyncClient) -> None:
    await _people(client)
    base = {"status": "requested", "intent": "order"}
    await put(client, "Task", "t1", {**base, "for": ref("Patient/smith"), "owner": ref("Organization/east")})
    await put(client, "Task", "t2", {**base, "for": ref("Patient/jones"), "owner": ref("Organization/west")})
    await put(
        client,
        "Task",
        "t3",
        {**base, "for": ref("Patient/lee"), "owner": ref("Organization/east"), "status": "completed"},
    )


async def test_has_reverse_chain(client: httpx.AsyncClient) -> None:
    await _tasks_for(client)
    assert await ids(client, "Patient", ("_has:Task:patient:owner", "Organization/east")) == {"smith", "lee"}
    assert await ids(client, "Patient", ("_has:Task:patient:owner", "Organization/west")) == {"jones"}
    assert await ids(client, "Patient", ("_has:Task:patient:status", "completed")) == {"lee"}
    assert await ids(
        client,
        "Patient",
        ("_has:Task:patient:owner", "Organization/east"),
        ("_has:Task:patient:status", "requested"),
    ) == {"smith"}


async def test_has_goal_lifecycle_status(client: httpx.AsyncClient) -> None:
    await _people(client)
    for fhir_id, patient, status in (
        ("g1", "smith", "active"),
        ("g2", "jones", "completed"),
        ("g3", "jones", "cancelled"),
    ):
        await put(
            client,
            "Goal",
            fhir_id,
            {"lifecycleStatus": status, "description": {"text": "g"}, "subject": ref(f"Patient/{patient}")},
        )
    assert await ids(client, "Patient", ("_has:Goal:patient:lifecycle-status", "active")) == {"smith"}
    assert await ids(client, "Patient", ("_has:Goal:patient:lifecycle-status", "completed,active")) == {
        "smith",
        "jones",
    }
    assert await ids(client, "Patient", ("_has:Goal:patient:lifecycle-status", "proposed")) == set()
    await delete(client, "Goal", "g1")
    assert await ids(client, "Patient", ("_has:Goal:patient:lifecycle-status", "active")) == set()


async def test_nested_has(client: httpx.AsyncClient) -> None:
    """Patients with a ServiceRequest that a completed Task has as its focus."""
    await _people(client)
    await _service_request(client, "sr-smith", "Patient/smith")
    await _service_request(client, "sr-jones", "Patient/jones")
    base = {"intent": "order"}
    await put(
        client, "Task", "done", {**base, "status": "completed", "focus": ref("ServiceRequest/sr-smith")}
    )
    await put(
        client, "Task", "open", {**base, "status": "requested", "focus": ref("ServiceRequest/sr-jones")}
    )
    assert await ids(
        client, "Patient", ("_has:ServiceRequest:subject:_has:Task:focus:status", "completed")
    ) == {"smith"}


async def test_has_combined_with_chain(client: httpx.AsyncClient) -> None:
    await _tasks_for(client)
    assert await ids(client, "Patient", ("_has:Task:patient:owner:Organization.name", "westside")) == {
        "jones"
    }


async def test_malformed_has_is_400(client: httpx.AsyncClient) -> None:
    await bad_request(client, "Patient", ("_has:Task:patient", "x"), names="_has:Task:patient")
    await bad_request(client, "Patient", ("_has:Spaceship:patient:status", "x"), names="_has:Spaceship")
    await bad_request(client, "Patient", ("_has:Task:status:owner", "x"), names="_has:Task:status:owner")
