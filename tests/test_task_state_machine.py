"""The Task state machine (issue 6, item 8): SDOHCC rules for referral Tasks, the base R4
graph for other Tasks. An illegal change is a 422 business-rule OperationOutcome and changes
nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import bearer
from tests.test_search_support import JSON, put

FULFILL = {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]}


def referral(
    status: str, ids: dict[str, str], owner: str = "partnerA", requester: str = "cm"
) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": status,
        "intent": "order",
        "code": FULFILL,
        "focus": {"reference": f"ServiceRequest/{ids['sr']}"},
        "for": {"reference": f"Patient/{ids['patient']}"},
        "requester": {"reference": f"Organization/{requester}"},
        "owner": {"reference": f"Organization/{owner}"},
    }


@pytest.fixture
def client(home_client: httpx.AsyncClient) -> httpx.AsyncClient:
    """The case-management organisation's own carecoord (tests/conftest.py ``home_client``): its
    system-level clients act for cm, the referral's source; partners are organisation clients."""
    return home_client


@pytest.fixture
async def parties(app: FastAPI, client: httpx.AsyncClient) -> dict[str, dict[str, str]]:
    """The requester (a client of the case-management organisation), the owner (a partner) and
    a stranger (another partner); ``ids`` holds the Patient and ServiceRequest of the referral."""
    for org in ("cm", "partnerA", "partnerB"):
        await put(client, "Organization", org, {"name": org})
    tokens = {
        "owner": await bearer(app, "system/*.cruds", organization="Organization/partnerA", client_id="a"),
        "requester": await bearer(app, "system/*.cruds", client_id="cm"),
        "stranger": await bearer(app, "system/*.cruds", organization="Organization/partnerB", client_id="b"),
    }
    await put(client, "Patient", "p1", {"gender": "other"})
    await put(
        client,
        "ServiceRequest",
        "sr1",
        {
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "Organization/partnerA"}],
        },
    )
    return {**tokens, "ids": {"patient": "p1", "sr": "sr1"}}


async def _create(client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    return await client.post("/fhir/Task", json=body, headers={**JSON, **headers})


async def _move(
    client: httpx.AsyncClient, task_id: str, status: str, headers: dict[str, str]
) -> httpx.Response:
    current = (await client.get(f"/fhir/Task/{task_id}")).json()
    changed = {**current, "status": status}
    return await client.put(f"/fhir/Task/{task_id}", json=changed, headers={**JSON, **headers})


def _business_rule(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    issue = response.json()["issue"][0]
    assert issue["code"] == "business-rule"


async def test_referral_happy_path_by_the_right_parties(
    client: httpx.AsyncClient, parties: dict[str, dict[str, str]]
) -> None:
    created = await _create(client, referral("requested", parties["ids"]), parties["requester"])
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    for status in ("accepted", "in-progress", "on-hold", "in-progress", "completed"):
        response = await _move(client, task_id, status, parties["owner"])
        assert response.status_code == 200, f"{status}: {response.text}"


@pytest.mark.parametrize(
    ("path", "actor", "status"),
    [
        ((), "requester", "accepted"),  # only the owner accepts
        ((), "owner", "entered-in-error"),  # only the requester
        ((), "owner", "received"),  # never used for referrals
        ((), "owner", "ready"),
        ((), "owner", "completed"),  # requested -> completed skips acceptance
        (("accepted",), "requester", "completed"),
        (("rejected",), "owner", "accepted"),  # terminal
        (("accepted", "completed"), "owner", "in-progress"),
    ],
)
async def test_illegal_referral_transitions_are_422_and_change_nothing(
    client: httpx.AsyncClient,
    parties: dict[str, dict[str, str]],
    path: tuple[str, ...],
    actor: str,
    status: str,
) -> None:
    task_id = (await _create(client, referral("requested", parties["ids"]), parties["requester"])).json()[
        "id"
    ]
    for step in path:
        assert (await _move(client, task_id, step, parties["owner"])).status_code == 200
    before = (await client.get(f"/fhir/Task/{task_id}")).json()
    _business_rule(await _move(client, task_id, status, parties[actor]))
    assert (await client.get(f"/fhir/Task/{task_id}")).json() == before


async def test_cancel_by_requester_or_owner_and_entered_in_error_by_requester(
    client: httpx.AsyncClient, parties: dict[str, dict[str, str]]
) -> None:
    first = (await _create(client, referral("requested", parties["ids"]), parties["requester"])).json()["id"]
    assert (await _move(client, first, "cancelled", parties["requester"])).status_code == 200
    second = (await _create(client, referral("requested", parties["ids"]), parties["requester"])).json()["id"]
    assert (await _move(client, second, "accepted", parties["owner"])).status_code == 200
    assert (await _move(client, second, "cancelled", parties["owner"])).status_code == 200
    third = (await _create(client, referral("requested", parties["ids"]), parties["requester"])).json()["id"]
    assert (await _move(client, third, "entered-in-error", parties["requester"])).status_code == 200


async def test_a_partner_cannot_touch_a_task_it_does_not_own(
    client: httpx.AsyncClient, parties: dict[str, dict[str, str]]
) -> None:
    task_id = (await _create(client, referral("requested", parties["ids"]), parties["requester"])).json()[
        "id"
    ]
    response = await _move(client, task_id, "accepted", parties["stranger"])
    assert response.status_code == 404  # not its referral: not even visible
    assert (await client.get(f"/fhir/Task/{task_id}")).json()["status"] == "requested"


async def test_a_referral_cannot_be_created_in_a_later_state(
    client: httpx.AsyncClient, parties: dict[str, dict[str, str]]
) -> None:
    _business_rule(await _create(client, referral("accepted", parties["ids"]), parties["requester"]))
    _business_rule(await _create(client, referral("received", parties["ids"]), parties["requester"]))


async def test_patient_apps_never_change_a_referral_status(
    app: FastAPI, client: httpx.AsyncClient, parties: dict[str, dict[str, str]]
) -> None:
    task_id = (await _create(client, referral("requested", parties["ids"]), parties["requester"])).json()[
        "id"
    ]
    patient_app = await bearer(
        app, "patient/Task.rs patient/Task.u", patient=parties["ids"]["patient"], client_id="app"
    )
    _business_rule(await _move(client, task_id, "cancelled", patient_app))


async def test_other_tasks_follow_the_base_state_machine(client: httpx.AsyncClient) -> None:
    plain = {"resourceType": "Task", "status": "ready", "intent": "plan"}
    task_id = (await client.post("/fhir/Task", json=plain, headers=JSON)).json()["id"]
    _business_rule(await _move(client, task_id, "completed", {}))  # ready -> completed skips in-progress
    assert (await _move(client, task_id, "in-progress", {})).status_code == 200
    assert (await _move(client, task_id, "ready", {})).status_code == 200  # stopped: back to ready
    assert (await _move(client, task_id, "in-progress", {})).status_code == 200
    assert (await _move(client, task_id, "completed", {})).status_code == 200
    _business_rule(await _move(client, task_id, "in-progress", {}))


async def test_illegal_transition_in_a_transaction_rolls_it_back(
    client: httpx.AsyncClient, parties: dict[str, dict[str, str]]
) -> None:
    task_id = (await _create(client, referral("requested", parties["ids"]), parties["requester"])).json()[
        "id"
    ]
    current = (await client.get(f"/fhir/Task/{task_id}")).json()
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "gender": "male"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {**current, "status": "completed"},
                "request": {"method": "PUT", "url": f"Task/{task_id}"},
            },
        ],
    }
    response = await client.post("/fhir", json=bundle, headers={**JSON, **parties["owner"]})
    assert response.status_code == 422, response.text
    assert (await client.get(f"/fhir/Task/{task_id}")).json()["status"] == "requested"


@pytest.mark.parametrize(
    ("actor", "change"),
    [
        ("owner", {"intent": "plan"}),  # out of the referral rules, then any status
        ("owner", {"code": {"text": "something else"}}),
        ("owner", {"requester": {"reference": "Organization/partnerA"}}),
        ("patient", {"intent": "plan"}),
        ("patient", {"owner": {"reference": "Organization/partnerB"}}),
    ],
)
async def test_a_referral_stays_a_referral_and_its_parties_stay_put(
    app: FastAPI,
    client: httpx.AsyncClient,
    parties: dict[str, dict[str, str]],
    actor: str,
    change: dict[str, Any],
) -> None:
    """Issue 15, finding 7: changing intent (or code, or the requester) took a Task out of the
    SDOHCC rules; afterwards any status could be set and set back."""
    task_id = (await _create(client, referral("requested", parties["ids"]), parties["requester"])).json()[
        "id"
    ]
    headers = parties["owner"]
    if actor == "patient":
        headers = await bearer(app, "patient/Task.rs patient/Task.u", patient=parties["ids"]["patient"])
    before = (await client.get(f"/fhir/Task/{task_id}")).json()
    changed = {**before, **change}
    _business_rule(await client.put(f"/fhir/Task/{task_id}", json=changed, headers={**JSON, **headers}))
    assert (await client.get(f"/fhir/Task/{task_id}")).json() == before


async def test_only_a_party_moves_the_status_of_other_tasks(
    app: FastAPI, client: httpx.AsyncClient, parties: dict[str, dict[str, str]]
) -> None:
    """A Task outside the referral rules still has parties: a patient app that neither owns nor
    requested it cannot move its status; the owner (here the patient itself) can."""
    patient = parties["ids"]["patient"]
    plain = {
        "resourceType": "Task",
        "status": "ready",
        "intent": "plan",
        "for": {"reference": f"Patient/{patient}"},
        "requester": {"reference": "Organization/cm"},
    }
    task_id = (await client.post("/fhir/Task", json=plain, headers=JSON)).json()["id"]
    patient_app = await bearer(app, "patient/Task.rs patient/Task.u", patient=patient, client_id="app")
    _business_rule(await _move(client, task_id, "in-progress", patient_app))
    assigned = {**plain, "owner": {"reference": f"Patient/{patient}"}}
    assigned_id = (await client.post("/fhir/Task", json=assigned, headers=JSON)).json()["id"]
    assert (await _move(client, assigned_id, "in-progress", patient_app)).status_code == 200
    assert (await _move(client, assigned_id, "completed", patient_app)).status_code == 200


async def test_only_the_requester_deletes_a_task(
    client: httpx.AsyncClient, parties: dict[str, dict[str, str]]
) -> None:
    """The owner deleted the requester's Task and wrote a new one at the same id, with itself as
    requester and another partner as owner (issue 15)."""
    task_id = (await _create(client, referral("requested", parties["ids"]), parties["requester"])).json()[
        "id"
    ]
    _business_rule(await client.delete(f"/fhir/Task/{task_id}", headers=parties["owner"]))
    assert (await client.get(f"/fhir/Task/{task_id}")).status_code == 200
    assert (await client.delete(f"/fhir/Task/{task_id}", headers=parties["requester"])).status_code == 200
    # Deleted, the id belongs to no one: the former owner cannot write there.
    revived = {**referral("requested", parties["ids"], requester="partnerA", owner="partnerA"), "id": task_id}
    response = await client.put(f"/fhir/Task/{task_id}", json=revived, headers={**JSON, **parties["owner"]})
    assert response.status_code == 404, response.text


async def test_a_partner_refers_no_one_on(
    client: httpx.AsyncClient, parties: dict[str, dict[str, str]]
) -> None:
    """A partner naming another organisation as owner (or requester, or performer) would hand
    the patient's record to it, and have the referral delivered there with its credentials."""
    onward = referral("requested", parties["ids"], requester="partnerA", owner="partnerB")
    response = await _create(client, onward, parties["owner"])
    assert response.status_code == 403, response.text
    assert "may not name Organization/partnerB" in response.text
    forged = referral("draft", parties["ids"], requester="partnerB", owner="partnerA")
    assert (await _create(client, forged, parties["owner"])).status_code in (403, 422)  # not its role either
    mine = referral("draft", parties["ids"], requester="partnerA", owner="partnerA")
    assert (await _create(client, mine, parties["owner"])).status_code == 201


async def test_the_case_managers_clients_may_delete_an_inbound_referral(
    client: httpx.AsyncClient, parties: dict[str, dict[str, str]]
) -> None:
    inbound = referral("requested", parties["ids"], requester="partnerA", owner="cm")
    created = await _create(client, inbound, parties["owner"])
    assert created.status_code == 201, created.text
    assert (await client.delete(f"/fhir/Task/{created.json()['id']}")).status_code == 200


async def test_the_owner_cannot_make_itself_requester(app: FastAPI, client: httpx.AsyncClient) -> None:
    """MEDIUM. check_transition returns at once when the status is unchanged, so who may change
    ``requester``/``owner``/``focus``/``for`` is never checked: the owner rewrites the requester
    to itself (200), and is then allowed what SDOHCC reserves to the requester
    (entered-in-error), or a partner hands the referral to another organisation."""
    for org in ("cm", "own"):
        await put(client, "Organization", org, {"name": org})
    await put(client, "Patient", "p-own", {"gender": "other"})
    await put(
        client,
        "ServiceRequest",
        "sr-own",
        {"status": "active", "intent": "order", "subject": {"reference": "Patient/p-own"}},
    )
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": FULFILL,
        "authoredOn": "2026-11-25",
        "focus": {"reference": "ServiceRequest/sr-own"},
        "for": {"reference": "Patient/p-own"},
        "requester": {"reference": "Organization/cm"},
        "owner": {"reference": "Organization/own"},
    }
    created = (await client.post("/fhir/Task", json=task, headers=JSON)).json()
    owner = await bearer(app, "system/*.cruds", organization="Organization/own", client_id="own")
    hijacked = await client.put(
        f"/fhir/Task/{created['id']}",
        json={**created, "requester": {"reference": "Organization/own"}},
        headers={**JSON, **owner},
    )
    if hijacked.status_code == 200:
        eie = await client.put(
            f"/fhir/Task/{created['id']}",
            json={**hijacked.json(), "status": "entered-in-error"},
            headers={**JSON, **owner},
        )
        assert eie.status_code == 422, "the owner marked the referral entered-in-error"
    assert hijacked.status_code == 422, hijacked.text
