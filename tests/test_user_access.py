"""What a person's token sees (issue 11 item 5; app/fhir/access.py, "a person's token").

World: three patients; ``dr`` is on p1's active CareTeam (and on an inactive one of p3),
``dr2`` reaches p2 through a PractitionerRole on p2's CareTeam, ``dr3`` manages p3's active
EpisodeOfCare. Tasks and ServiceRequests that ``dr`` owns or requested lie outside its caseload.
RelatedPersons: ``rp-on`` (p1, active) and ``rp-off`` (p2, inactive). Every token is minted by
the server (tests/conftest.py ``bearer``) with a ``fhirUser``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.auth.scopes import parse_scopes
from app.fhir.access import AccessContext
from app.fhir.search import parse_search
from app.fhir.search_params import registry
from tests import test_subscriptions as subscriptions
from tests.conftest import BASE_URL, bearer, wait_until
from tests.partner_support import MisbehavingServer, Reply, misbehaving_server_fixture
from tests.test_search_support import JSON, match_ids, put, search, typed_ids

READ = "user/*.rs"
WRITE = "user/*.cruds"


def _patient(family: str) -> dict[str, Any]:
    return {"name": [{"family": family}], "active": True}


def _observation(patient: str, code: str = "obs") -> dict[str, Any]:
    return {
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


def _care_team(patient: str, member: str, status: str = "active") -> dict[str, Any]:
    return {
        "status": status,
        "subject": {"reference": f"Patient/{patient}"},
        "participant": [{"member": {"reference": member}}],
    }


def _task(patient: str, **references: str) -> dict[str, Any]:
    return {
        "status": "requested",
        "intent": "order",
        "for": {"reference": f"Patient/{patient}"},
        **{name: {"reference": target} for name, target in references.items()},
    }


@pytest.fixture
async def world(client: httpx.AsyncClient) -> None:
    for number, family in ((1, "One"), (2, "Two"), (3, "Three")):
        await put(client, "Patient", f"p{number}", _patient(family))
        await put(client, "Observation", f"obs-p{number}", _observation(f"p{number}"))
    for practitioner in ("dr", "dr2", "dr3"):
        await put(client, "Practitioner", practitioner, {"name": [{"family": practitioner}]})
    await put(client, "Organization", "org", {"name": "Directory entry"})
    await put(client, "PractitionerRole", "role-dr2", {"practitioner": {"reference": "Practitioner/dr2"}})
    await put(client, "CareTeam", "ct1", _care_team("p1", "Practitioner/dr"))
    await put(client, "CareTeam", "ct-old", _care_team("p3", "Practitioner/dr", status="inactive"))
    await put(client, "CareTeam", "ct2", _care_team("p2", "PractitionerRole/role-dr2"))
    await put(
        client,
        "EpisodeOfCare",
        "eoc3",
        {
            "status": "active",
            "patient": {"reference": "Patient/p3"},
            "careManager": {"reference": "Practitioner/dr3"},
        },
    )
    await put(client, "Condition", "cond-p2", {"subject": {"reference": "Patient/p2"}})
    await put(client, "Task", "task-own", _task("p3", owner="Practitioner/dr"))
    await put(client, "Task", "task-asked", _task("p2", requester="Practitioner/dr"))
    await put(client, "Task", "task-p1", _task("p1", owner="Organization/org"))
    await put(client, "Task", "task-other", _task("p2", owner="Organization/org"))
    await put(
        client,
        "ServiceRequest",
        "sr-asked",
        {
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p3"},
            "requester": {"reference": "Practitioner/dr"},
        },
    )
    await put(client, "RelatedPerson", "rp-on", {"active": True, "patient": {"reference": "Patient/p1"}})
    await put(client, "RelatedPerson", "rp-off", {"active": False, "patient": {"reference": "Patient/p2"}})


async def _ids(client: httpx.AsyncClient, path: str, headers: dict[str, str], **params: str) -> list[str]:
    return sorted(match_ids(await search(client, path, list(params.items()), headers=headers)))


async def _status(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> int:
    return (await client.get(f"/fhir/{path}", headers=headers)).status_code


async def _batch_statuses(client: httpx.AsyncClient, headers: dict[str, str], *urls: str) -> list[int]:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": url}} for url in urls],
    }
    response = await client.post("/fhir", json=bundle, headers={**JSON, **headers})
    assert response.status_code == 200, response.text
    return [int(e["response"]["status"].split()[0]) for e in response.json()["entry"]]


# -- Patient users ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "context"),
    [(READ, None), ("patient/*.rs", "p1")],
    ids=["user-scopes", "patient-scopes"],
)
async def test_a_patient_user_sees_their_compartment_only(
    app: FastAPI, client: httpx.AsyncClient, world: None, scope: str, context: str | None
) -> None:
    me = await bearer(app, scope, fhir_user="Patient/p1", patient=context)
    assert await _ids(client, "Patient", me) == ["p1"]
    assert await _ids(client, "Observation", me) == ["obs-p1"]
    assert await _status(client, "Patient/p1", me) == 200
    assert await _status(client, "Patient/p2", me) == 404
    assert await _status(client, "Observation/obs-p2", me) == 404
    assert await _status(client, "Observation/obs-p2/_history/1", me) == 404
    # Directory types outside the compartment stay readable.
    assert await _status(client, "Organization/org", me) == 200
    assert await _ids(client, "Practitioner", me) == ["dr", "dr2", "dr3"]
    # Includes, chains and _has see only the compartment.
    bundle = await search(client, "Patient", [("_revinclude", "Observation:subject")], headers=me)
    assert sorted(typed_ids(bundle, "include")) == ["Observation/obs-p1"]
    bundle = await search(
        client, "Observation", [("_include", "Observation:subject"), ("code", "obs")], headers=me
    )
    assert typed_ids(bundle, "include") == ["Patient/p1"]
    assert await _ids(client, "Observation", me, **{"subject:Patient.name": "Two"}) == []
    assert await _ids(client, "Patient", me, **{"_has:Observation:subject:code": "obs"}) == ["p1"]
    assert await _ids(client, "RelatedPerson", me) == ["rp-on"]
    assert await _batch_statuses(client, me, "Observation/obs-p1", "Observation/obs-p2") == [200, 404]
    history = (await client.get("/fhir/Observation/_history", headers=me)).json()
    assert {e["resource"]["id"] for e in history.get("entry", [])} == {"obs-p1"}


# -- RelatedPerson users ------------------------------------------------------------------------


async def test_a_related_person_sees_their_patient_while_active(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    active = await bearer(app, READ, fhir_user="RelatedPerson/rp-on")
    assert await _ids(client, "Patient", active) == ["p1"]
    assert await _ids(client, "Observation", active) == ["obs-p1"]
    assert await _status(client, "Observation/obs-p2", active) == 404
    assert await _ids(client, "Patient", active, **{"_has:Observation:subject:code": "obs"}) == ["p1"]

    inactive = await bearer(app, READ, fhir_user="RelatedPerson/rp-off")
    assert await _ids(client, "Patient", inactive) == []
    assert await _ids(client, "Observation", inactive) == []
    assert await _status(client, "Patient/p2", inactive) == 404
    assert await _status(client, "Condition/cond-p2", inactive) == 404

    # Activated: the same token sees p2 on its next request; deactivated again, it does not.
    await put(client, "RelatedPerson", "rp-off", {"active": True, "patient": {"reference": "Patient/p2"}})
    assert await _ids(client, "Condition", inactive) == ["cond-p2"]
    await put(client, "RelatedPerson", "rp-off", {"active": False, "patient": {"reference": "Patient/p2"}})
    assert await _ids(client, "Condition", inactive) == []


# -- Practitioner users ------------------------------------------------------------------------


async def test_a_practitioner_sees_their_caseload_and_own_work(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    dr = await bearer(app, READ, fhir_user="Practitioner/dr")
    assert await _ids(client, "Patient", dr) == ["p1"]  # ct-old is inactive: not p3
    assert await _ids(client, "Observation", dr) == ["obs-p1"]
    assert await _ids(client, "Condition", dr) == []
    # Its caseload's Tasks (task-p1) and the Tasks it owns or requested elsewhere.
    assert await _ids(client, "Task", dr) == ["task-asked", "task-own", "task-p1"]
    assert await _ids(client, "Task", dr, owner="Practitioner/dr", status="requested") == ["task-own"]
    assert await _ids(client, "ServiceRequest", dr) == ["sr-asked"]
    assert await _status(client, "Task/task-other", dr) == 404
    assert await _status(client, "Patient/p3", dr) == 404  # owning p3's Task does not open p3
    assert await _status(client, "Organization/org", dr) == 200
    # Includes are filtered too: task-own's patient is not in the caseload.
    bundle = await search(client, "Task", [("_include", "Task:patient")], headers=dr)
    assert typed_ids(bundle, "include") == ["Patient/p1"]
    bundle = await search(client, "Patient", [("_revinclude", "Task:patient")], headers=dr)
    assert sorted(typed_ids(bundle, "include")) == ["Task/task-p1"]
    # Chains and _has look only at what it may see.
    assert await _ids(client, "Observation", dr, **{"subject:Patient.name": "Two"}) == []
    assert await _ids(client, "Observation", dr, **{"subject:Patient.name": "One"}) == ["obs-p1"]
    assert await _ids(client, "Patient", dr, **{"_has:Observation:subject:code": "obs"}) == ["p1"]
    assert await _ids(client, "Patient", dr, **{"_has:Task:patient:status": "requested"}) == ["p1"]
    assert await _batch_statuses(client, dr, "Patient/p1", "Patient/p2", "Task/task-own") == [200, 404, 200]
    history = (await client.get("/fhir/_history", headers=dr)).json()
    seen = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in history.get("entry", [])}
    assert "Patient/p2" not in seen and "Observation/obs-p3" not in seen
    assert {"Patient/p1", "Observation/obs-p1", "Task/task-own"} <= seen


async def test_leaving_the_care_team_ends_access_on_the_next_request(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    dr = await bearer(app, READ, fhir_user="Practitioner/dr")
    assert await _status(client, "Patient/p1", dr) == 200
    await put(client, "CareTeam", "ct1", _care_team("p1", "Practitioner/someone-else"))
    assert await _status(client, "Patient/p1", dr) == 404
    assert await _ids(client, "Observation", dr) == []
    assert await _ids(client, "Task", dr) == ["task-asked", "task-own"]
    await put(client, "CareTeam", "ct1", _care_team("p1", "Practitioner/dr"))
    assert await _status(client, "Patient/p1", dr) == 200
    # A CareTeam that ends (status) or is deleted grants nothing either.
    await put(client, "CareTeam", "ct1", _care_team("p1", "Practitioner/dr", status="inactive"))
    assert await _ids(client, "Patient", dr) == []
    await put(client, "CareTeam", "ct1", _care_team("p1", "Practitioner/dr"))
    assert (await client.delete("/fhir/CareTeam/ct1")).status_code in (200, 204)
    assert await _ids(client, "Patient", dr) == []


async def test_a_practitioner_role_and_an_episode_of_care_open_the_caseload(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    through_role = await bearer(app, READ, fhir_user="Practitioner/dr2")
    assert await _ids(client, "Patient", through_role) == ["p2"]
    assert await _ids(client, "Condition", through_role) == ["cond-p2"]
    await put(
        client,
        "PractitionerRole",
        "role-dr2",
        {"active": False, "practitioner": {"reference": "Practitioner/dr2"}},
    )
    assert await _ids(client, "Patient", through_role) == []

    manager = await bearer(app, READ, fhir_user="Practitioner/dr3")
    assert await _ids(client, "Patient", manager) == ["p3"]
    assert await _ids(client, "Observation", manager) == ["obs-p3"]
    episode = {"patient": {"reference": "Patient/p3"}, "careManager": {"reference": "Practitioner/dr3"}}
    await put(client, "EpisodeOfCare", "eoc3", {**episode, "status": "finished"})
    assert await _ids(client, "Observation", manager) == []


async def test_old_versions_are_judged_by_the_caseload(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    """An Observation moved from p2 to p1: dr sees version 2, not version 1 (p2's)."""
    await put(client, "Observation", "moved", _observation("p2"))
    await put(client, "Observation", "moved", _observation("p1"))
    dr = await bearer(app, READ, fhir_user="Practitioner/dr")
    history = (await client.get("/fhir/Observation/moved/_history", headers=dr)).json()
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2"]
    assert await _status(client, "Observation/moved/_history/2", dr) == 200
    assert await _status(client, "Observation/moved/_history/1", dr) == 404
    type_history = (await client.get("/fhir/Observation/_history", headers=dr)).json()
    versions = {(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in type_history["entry"]}
    assert versions == {("moved", "2"), ("obs-p1", "1")}


# -- writes ------------------------------------------------------------------------------------


async def _count(client: httpx.AsyncClient, resource_type: str) -> int:
    bundle = await search(client, resource_type, [("_summary", "count")])
    return int(bundle["total"])


async def test_writes_outside_the_caseload_are_refused_and_change_nothing(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    dr = await bearer(app, WRITE, fhir_user="Practitioner/dr")
    headers = {**JSON, **dr}
    before = await _count(client, "Condition")
    outside = {"resourceType": "Condition", "subject": {"reference": "Patient/p2"}}
    assert (await client.post("/fhir/Condition", json=outside, headers=headers)).status_code in (403, 404)
    inside = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}}
    created = await client.post("/fhir/Condition", json=inside, headers=headers)
    assert created.status_code == 201, created.text
    # Moving its own Condition to p2, changing p2's, choosing an id: refused.
    moved = {**created.json(), "subject": {"reference": "Patient/p2"}}
    response = await client.put(f"/fhir/Condition/{moved['id']}", json=moved, headers=headers)
    assert response.status_code in (403, 404)
    changed = {"resourceType": "Condition", "id": "cond-p2", "subject": {"reference": "Patient/p2"}}
    assert (await client.put("/fhir/Condition/cond-p2", json=changed, headers=headers)).status_code == 404
    assert (await client.delete("/fhir/Condition/cond-p2", headers=dr)).status_code == 404
    chosen = {"resourceType": "Condition", "id": "mine", "subject": {"reference": "Patient/p1"}}
    assert (await client.put("/fhir/Condition/mine", json=chosen, headers=headers)).status_code == 404
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": inside, "request": {"method": "POST", "url": "Condition"}},
            {"resource": outside, "request": {"method": "POST", "url": "Condition"}},
        ],
    }
    response = await client.post("/fhir", json=transaction, headers=headers)
    assert response.status_code in (403, 404), response.text
    assert await _count(client, "Condition") == before + 1
    current = (await client.get(f"/fhir/Condition/{moved['id']}")).json()
    assert current["subject"]["reference"] == "Patient/p1" and current["meta"]["versionId"] == "1"
    assert (await client.get("/fhir/Condition/cond-p2")).json()["meta"]["versionId"] == "1"

    # A patient cannot write into another patient's compartment either.
    patient = await bearer(app, WRITE, fhir_user="Patient/p1")
    response = await client.post("/fhir/Condition", json=outside, headers={**JSON, **patient})
    assert response.status_code in (403, 404)
    assert await _count(client, "Condition") == before + 1


async def test_a_person_writes_no_directory_resource_but_its_own(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    """Taking over dr2's PractitionerRole would hand dr the CareTeams of dr2's role."""
    dr = await bearer(app, WRITE, fhir_user="Practitioner/dr")
    headers = {**JSON, **dr}
    role = {
        "resourceType": "PractitionerRole",
        "id": "role-dr2",
        "practitioner": {"reference": "Practitioner/dr"},
    }
    assert (
        await client.put("/fhir/PractitionerRole/role-dr2", json=role, headers=headers)
    ).status_code == 404
    assert await _ids(client, "Patient", dr) == ["p1"]
    new_role = {"resourceType": "PractitionerRole", "practitioner": {"reference": "Practitioner/dr"}}
    assert (await client.post("/fhir/PractitionerRole", json=new_role, headers=headers)).status_code == 403
    assert (await client.delete("/fhir/Organization/org", headers=dr)).status_code == 404
    me = {"resourceType": "Practitioner", "id": "dr", "name": [{"family": "Renamed"}]}
    assert (await client.put("/fhir/Practitioner/dr", json=me, headers=headers)).status_code == 200
    current = (await client.get("/fhir/PractitionerRole/role-dr2")).json()
    assert current["practitioner"]["reference"] == "Practitioner/dr2" and current["meta"]["versionId"] == "1"
    assert (await client.get("/fhir/Organization/org")).status_code == 200


async def test_a_transaction_of_a_practitioner_inside_its_caseload(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    dr = await bearer(app, WRITE, fhir_user="Practitioner/dr")
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}},
                "request": {"method": "POST", "url": "Condition"},
            },
            {"request": {"method": "GET", "url": "Observation?subject=Patient/p2"}},
            {"request": {"method": "GET", "url": "Observation?subject=Patient/p1"}},
        ],
    }
    response = await client.post("/fhir", json=transaction, headers={**JSON, **dr})
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert entries[0]["response"]["status"].startswith("201")
    assert match_ids(entries[1]["resource"]) == []
    assert match_ids(entries[2]["resource"]) == ["obs-p1"]


async def test_an_unknown_kind_of_user_sees_no_patient_data(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    device = await bearer(app, READ, fhir_user="Device/d1")
    assert await _ids(client, "Patient", device) == []
    assert await _ids(client, "Observation", device) == []
    assert await _status(client, "Organization/org", device) == 200


@pytest.mark.parametrize("user", ["Practitioner/dr", "Patient/p1", "RelatedPerson/rp-on"])
def test_a_persons_search_keeps_the_index_driven_page(user: str) -> None:
    """The person's limits are a set of rids, so a page is still cut from the index rows
    (repository.py ``_driver``) instead of reading and sorting every match."""
    access = AccessContext(user=user, permissions=parse_scopes(READ), unrestricted=False)
    for resource_type, pairs in (
        ("Task", [("owner", "Practitioner/dr"), ("status", "requested")]),
        ("Patient", [("name", "One")]),
        ("Observation", []),
    ):
        request = parse_search(
            (resource_type,),
            pairs,
            registry=registry(),
            fhir_base=BASE_URL + "/fhir",
            strict=False,
            access=access,
        )
        assert request.drivable and request.driven_limits, resource_type


@pytest.mark.parametrize(
    "scope, patient",
    [("patient/*.rs", "p1"), ("system/Observation.rs?category=urn:cat|vital", None)],
)
def test_a_patient_or_restricted_search_keeps_the_index_driven_page(scope: str, patient: str | None) -> None:
    """A patient permission's compartment and a scope restriction are sets of rids too (issue 14):
    the page is cut from the index rows as for a system token."""
    access = AccessContext(patient=patient, permissions=parse_scopes(scope), unrestricted=False)
    for pairs in ([("code", "http://loinc.org|1234-5")], []):
        request = parse_search(
            ("Observation",),
            pairs,
            registry=registry(),
            fhir_base=BASE_URL + "/fhir",
            strict=False,
            access=access,
        )
        assert request.drivable and request.driven_limits, pairs


# -- subscriptions -----------------------------------------------------------------------------

misbehaving_server = misbehaving_server_fixture
running = subscriptions.running


async def test_a_practitioners_subscription_learns_only_of_its_caseload(
    app: FastAPI,
    client: httpx.AsyncClient,
    world: None,
    misbehaving_server: MisbehavingServer,
    running: None,
) -> None:
    """The notifications of a Subscription a practitioner created are judged with its caseload
    (the person is kept with the subscription, migration 0018): a Task of p2 moves nothing."""
    server = misbehaving_server
    dr = await bearer(
        app, "user/Task.rs user/Subscription.crud", client_id="dr-app", fhir_user="Practitioner/dr"
    )
    server.script("/dr", Reply(200))
    created = await client.post(
        "/fhir/Subscription", json=subscriptions.subscription(server.url("/dr")), headers={**JSON, **dr}
    )
    assert created.status_code == 201, created.text
    subscription_id = created.json()["id"]

    async def active() -> bool:
        answer = await client.get(f"/fhir/Subscription/{subscription_id}", headers=dr)
        return answer.json().get("status") == "active"

    # Generous: the dispatcher and the delivery share a busy machine with the test.
    await wait_until(active, "the practitioner's subscription to be active", timeout=30)
    hidden = await put(client, "Task", "task-p2-new", _task("p2", owner="Organization/org"))
    seen = await put(client, "Task", "task-p1-new", _task("p1", owner="Organization/org"))
    await wait_until(
        lambda: subscriptions.event_numbers(server, "/dr"), "the practitioner's event", timeout=30
    )
    assert subscriptions.event_numbers(server, "/dr") == [1]
    sent = b"".join(r.body for r in server.requests_to("/dr"))
    assert seen["id"].encode() in sent and hidden["id"].encode() not in sent
