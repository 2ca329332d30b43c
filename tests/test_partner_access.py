"""The partner-organisation access model under attack (issue 15, findings 1, 5, 8 and 15).

World: tests/test_authorization.py ``world`` (cm refers p1 to partnerA and p2 to partnerB).
Each test does what an attacker holding a partner's (or a patient app's) token did in the
review, and asserts that it gets nothing: no read, no write, no redirected delivery, no
answer that tells a hidden id from a free one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.outbound import outbound_client
from app.referrals.credentials import confirm_address, list_partners, set_credentials
from app.referrals.status import referral_status
from app.referrals.worker import Worker
from tests import test_authorization as authorization
from tests.conftest import bearer
from tests.partner_support import MisbehavingServer, Reply, token_reply
from tests.test_outbound_policy import Listener
from tests.test_referrals import FULFILL, add_partner, delivery_state
from tests.test_search_support import JSON, match_ids, put

world = authorization.world
partner_a = authorization.partner_a
patient_p1 = authorization.patient_p1


def _hidden_or_refused(response: httpx.Response) -> None:
    assert response.status_code in (403, 404), response.text[:300]


async def _referral(client: httpx.AsyncClient, task_id: str, owner: str, patient: str = "p1") -> None:
    await put(
        client,
        "ServiceRequest",
        f"sr-{task_id}",
        {
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{patient}"},
            "performer": [{"reference": f"Organization/{owner}"}],
        },
    )
    await put(
        client,
        "Task",
        task_id,
        {
            "status": "requested",
            "intent": "order",
            "code": FULFILL,
            "authoredOn": "2026-12-03",
            "focus": {"reference": f"ServiceRequest/sr-{task_id}"},
            "for": {"reference": f"Patient/{patient}"},
            "requester": {"reference": "Organization/cm"},
            "owner": {"reference": f"Organization/{owner}"},
        },
    )


# -- finding 1: endpoint takeover --------------------------------------------------------------------


async def test_a_reference_from_a_partners_task_opens_nothing(
    client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    """Task.input pointing at another partner's Endpoint, the case manager's Organization and
    another patient made none of them readable, and what a referral does grant is read-only."""
    await add_partner(client, "partnerB", "https://partner-b.example/fhir")
    task = (await client.get("/fhir/Task/task-p1", headers=partner_a)).json()
    task["input"] = [
        {"type": {"text": "x"}, "valueReference": {"reference": "Endpoint/ep-partnerB"}},
        {"type": {"text": "x"}, "valueReference": {"reference": "Patient/p2"}},
    ]
    written = await client.put("/fhir/Task/task-p1", json=task, headers={**JSON, **partner_a})
    assert written.status_code in (200, 403), written.text
    assert (await client.get("/fhir/Endpoint/ep-partnerB", headers=partner_a)).status_code == 404
    assert (await client.get("/fhir/Patient/p2", headers=partner_a)).status_code == 404
    hijack = {
        "resourceType": "Endpoint",
        "id": "ep-partnerB",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "hl7-fhir-rest",
        },
        "payloadType": [{"text": "FHIR R4"}],
        "address": "https://attacker.example/fhir",
    }
    _hidden_or_refused(
        await client.put("/fhir/Endpoint/ep-partnerB", json=hijack, headers={**JSON, **partner_a})
    )
    assert (await client.get("/fhir/Endpoint/ep-partnerB")).json()[
        "address"
    ] == "https://partner-b.example/fhir"
    # What the referral grants (its Patient, the requester) is readable, never writable.
    for key, body in (
        ("Organization/cm", {"name": "Renamed by a partner"}),
        ("Patient/p1", {"gender": "male"}),
        (
            "ServiceRequest/sr-p1",
            {"status": "revoked", "intent": "order", "subject": {"reference": "Patient/p1"}},
        ),
        ("Consent/consent-p1", {"status": "inactive", "scope": {"text": "x"}, "category": [{"text": "x"}]}),
    ):
        assert (await client.get(f"/fhir/{key}", headers=partner_a)).status_code == 200, key
        resource_type, fhir_id = key.split("/")
        resource = {"resourceType": resource_type, "id": fhir_id, **body}
        _hidden_or_refused(await client.put(f"/fhir/{key}", json=resource, headers={**JSON, **partner_a}))
        _hidden_or_refused(await client.delete(f"/fhir/{key}", headers=partner_a))
        patch = [{"op": "add", "path": "/language", "value": "fr"}]
        _hidden_or_refused(
            await client.patch(
                f"/fhir/{key}",
                json=patch,
                headers={**partner_a, "content-type": "application/json-patch+json"},
            )
        )
        assert "language" not in (await client.get(f"/fhir/{key}")).json()
        assert (await client.get(f"/fhir/{key}")).json()["meta"]["versionId"] == "1"


async def test_only_system_level_clients_change_partner_endpoints(
    app: FastAPI, client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    endpoint = {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "hl7-fhir-rest",
        },
        "payloadType": [{"text": "FHIR R4"}],
        "address": "http://127.0.0.1:9/internal",
    }
    assert (
        await client.post("/fhir/Endpoint", json=endpoint, headers={**JSON, **partner_a})
    ).status_code == 403
    patient_app = await bearer(app, "patient/*.cruds", patient="p1", client_id="app-p1")
    assert (
        await client.post("/fhir/Endpoint", json=endpoint, headers={**JSON, **patient_app})
    ).status_code == 403
    # Its own Organization: readable, but its endpoint list is not the partner's to set.
    own = (await client.get("/fhir/Organization/partnerA", headers=partner_a)).json()
    created = await client.post("/fhir/Endpoint", json=endpoint, headers=JSON)  # an operator's
    assert created.status_code == 201
    own["endpoint"] = [{"reference": f"Endpoint/{created.json()['id']}"}]
    _hidden_or_refused(
        await client.put("/fhir/Organization/partnerA", json=own, headers={**JSON, **partner_a})
    )
    # A new Organization with an endpoint is refused too; without one it is the partner's own.
    new_org = {"resourceType": "Organization", "name": "shadow", "endpoint": own["endpoint"]}
    assert (
        await client.post("/fhir/Organization", json=new_org, headers={**JSON, **partner_a})
    ).status_code == 403
    del new_org["endpoint"]
    assert (
        await client.post("/fhir/Organization", json=new_org, headers={**JSON, **partner_a})
    ).status_code == 201
    # An operator (system-level) does it.
    assert (await client.put("/fhir/Organization/partnerA", json=own, headers=JSON)).status_code == 200


async def _run_until(worker: Worker, done: Any, what: str) -> None:
    for _ in range(100):
        async with worker.pool.acquire() as conn:
            await conn.execute("UPDATE job SET not_before = now() WHERE state = 'pending'")
        await worker.run_once()
        if await done():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_changed_endpoint_address_gets_neither_the_token_nor_the_referral(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    """Credentials are bound to the address they were set for: when the Endpoint's address
    changes, delivery pauses (nothing is sent anywhere) and ``partners list`` shows it until an
    operator confirms the new address."""
    with MisbehavingServer() as partner, MisbehavingServer() as moved:
        for server in (partner, moved):
            server.script("/token", token_reply())
            server.script(
                "/fhir",
                Reply(
                    200,
                    {
                        "resourceType": "Bundle",
                        "type": "transaction-response",
                        # One answer per entry sent (Patient, requester, ServiceRequest, Task).
                        "entry": [{"response": {"status": "201 Created", "location": "Task/t1/_history/1"}}]
                        * 8,
                    },
                ),
            )
        await add_partner(client, "partnerB", partner.url("/fhir"))
        async with app.state.pool.acquire() as conn:
            await set_credentials(
                conn,
                app.state.settings,
                endpoint_id="ep-partnerB",
                token_url=partner.url("/token"),
                client_id="carecoord",
                client_secret="s3cret",
            )
        worker = Worker(app.state.pool, app.state.http, app.state.settings, name="bound")
        await _referral(client, "ref-1", "partnerB", patient="p2")

        async def delivered(task_id: str) -> bool:
            task = (await client.get(f"/fhir/Task/{task_id}")).json()
            return delivery_state(task) == "delivered"

        await _run_until(worker, lambda: delivered("ref-1"), "the first delivery")
        assert len(partner.requests_to("/fhir")) == 1
        assert partner.requests_to("/fhir")[0].headers["authorization"].startswith("Bearer ")

        # The address changes (an operator's client; partners cannot): nothing goes anywhere.
        endpoint = (await client.get("/fhir/Endpoint/ep-partnerB")).json()
        endpoint["address"] = moved.url("/fhir")
        assert (
            await client.put("/fhir/Endpoint/ep-partnerB", json=endpoint, headers=JSON)
        ).status_code == 200
        await _referral(client, "ref-2", "partnerB", patient="p2")

        async def paused() -> bool:
            task = (await client.get("/fhir/Task/ref-2")).json()
            return delivery_state(task) == "paused"

        await _run_until(worker, paused, "the delivery to pause")
        assert moved.requests == [] and len(partner.requests_to("/fhir")) == 1
        async with app.state.pool.acquire() as conn:
            (listed,) = [p for p in await list_partners(conn) if p.endpoint_id == "ep-partnerB"]
            assert listed.address_changed and listed.paused == 1
            assert await confirm_address(conn, "Endpoint/ep-partnerB") == moved.url("/fhir")
        await _run_until(worker, lambda: delivered("ref-2"), "the delivery after confirmation")
        # A fresh token for the new address, then the referral.
        assert [r.path for r in moved.requests] == ["/fhir"]
        assert len(partner.requests_to("/token")) == 2


# -- finding 5: restrictions as an oracle ---------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "context", "query"),
    [
        ("system/Patient.rs?_has:Condition:subject:code=hiv", {}, "Patient"),
        ("patient/Organization.rs?_has:Task:owner:patient=Patient/p2", {"patient": "p1"}, "Organization"),
        (
            "system/Task.rs?focus:ServiceRequest.subject:Patient.name=Beta",
            {"organization": "Organization/partnerA"},
            "Task",
        ),
    ],
)
async def test_a_restriction_never_looks_at_other_rows(
    app: FastAPI, client: httpx.AsyncClient, world: None, scope: str, context: dict[str, str], query: str
) -> None:
    """A restriction with a chain or _has is not honoured: the permission grants nothing, so
    the answer cannot depend on rows the token may not see."""
    headers = await bearer(app, scope, client_id="restricted", **context)
    response = await client.get(f"/fhir/{query}", headers=headers)
    assert response.status_code == 200, response.text
    assert match_ids(response.json()) == []


# -- finding 8: id squatting; finding 15: existence oracle through PUT ---------------------------


async def test_limited_tokens_cannot_squat_ids(
    app: FastAPI, client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    squat = {"resourceType": "Patient", "id": "future-patient", "gender": "other"}
    response = await client.put("/fhir/Patient/future-patient", json=squat, headers={**JSON, **partner_a})
    assert response.status_code == 404, response.text
    # The real record arrives later: the partner never gets it.
    await put(client, "Patient", "future-patient", {"gender": "female"})
    assert (await client.get("/fhir/Patient/future-patient", headers=partner_a)).status_code == 404
    # Nor through a Task of its own pointing at a Patient id that does not exist yet.
    task = {
        "resourceType": "Task",
        "status": "draft",
        "intent": "order",
        "code": FULFILL,
        "for": {"reference": "Patient/future-patient-2"},
        "requester": {"reference": "Organization/partnerA"},
    }
    missing = await client.post("/fhir/Task", json=task, headers={**JSON, **partner_a})
    task["for"] = {"reference": "Patient/p2"}  # exists, hidden
    hidden = await client.post("/fhir/Task", json=task, headers={**JSON, **partner_a})
    assert missing.status_code == hidden.status_code == 403
    assert missing.json() == hidden.json()  # the same answer: which one exists is not revealed


async def test_what_another_principal_writes_leaves_the_partners_grant(
    client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    note = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "note"},
        "subject": {"reference": "Patient/p1"},
    }
    created = await client.post("/fhir/Observation", json=note, headers={**JSON, **partner_a})
    assert created.status_code == 201, created.text
    observation_id = created.json()["id"]
    assert (await client.get(f"/fhir/Observation/{observation_id}", headers=partner_a)).status_code == 200
    amended = {**created.json(), "status": "amended"}
    assert (
        await client.put(f"/fhir/Observation/{observation_id}", json=amended, headers=JSON)
    ).status_code == 200
    assert (await client.get(f"/fhir/Observation/{observation_id}", headers=partner_a)).status_code == 404


async def test_a_transaction_may_point_at_what_it_creates(
    client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:8c3c2b8e-9d8b-4a2e-9d40-0d0b1f3d0f11",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "a"},
                    "subject": {"reference": "Patient/p1"},
                    "hasMember": [{"reference": "urn:uuid:1f0e3c4a-2f4b-4b8e-8a7d-5b1b9f0c2d22"}],
                },
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": "urn:uuid:1f0e3c4a-2f4b-4b8e-8a7d-5b1b9f0c2d22",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "b"},
                    "subject": {"reference": "Patient/p1"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    response = await client.post("/fhir", json=bundle, headers={**JSON, **partner_a})
    assert response.status_code == 200, response.text


async def test_a_patient_app_put_tells_no_hidden_id_from_a_free_one(
    client: httpx.AsyncClient, world: None, patient_p1: dict[str, str]
) -> None:
    def body(fhir_id: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": fhir_id,
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": "Patient/p1"},
        }

    hidden = await client.put("/fhir/Observation/obs-p2", json=body("obs-p2"), headers={**JSON, **patient_p1})
    free = await client.put(
        "/fhir/Observation/obs-free", json=body("obs-free"), headers={**JSON, **patient_p1}
    )
    assert hidden.status_code == free.status_code == 404
    assert hidden.json()["issue"][0]["diagnostics"].replace("obs-p2", "ID") == free.json()["issue"][0][
        "diagnostics"
    ].replace("obs-free", "ID")
    assert (await client.get("/fhir/Observation/obs-free")).status_code == 404


# -- finding 4: server-side request forgery through the referral worker ------------------------------


async def test_a_referral_to_an_internal_address_sends_nothing_and_reveals_nothing(
    app: FastAPI, client: httpx.AsyncClient, world: None
) -> None:
    """An Endpoint at a loopback address (an operator's mistake, or what a partner could once
    write) gets no connection under the default policy; the Task says only that the partner
    could not be reached, the operator sees why in ``referrals status``."""
    production = app.state.settings.model_copy(update={"outbound_allowlist": ""})
    async with Listener() as internal, outbound_client(production) as http:
        await add_partner(client, "internal", internal.url("/internal/fhir"))
        worker = Worker(app.state.pool, http, production, name="ssrf")
        await _referral(client, "ref-ssrf", "internal", patient="p2")

        async def failed() -> bool:
            task = (await client.get("/fhir/Task/ref-ssrf")).json()
            return delivery_state(task) == "failed"

        await _run_until(worker, failed, "the delivery to fail")
        await internal.assert_untouched()
        port = internal.port
    task = (await client.get("/fhir/Task/ref-ssrf")).json()
    shown = str(task["extension"])
    assert "could not be reached" in shown
    for detail in ("127.0.0.1", str(port), "policy", "Connect", "refused"):
        assert detail not in shown, detail
    async with app.state.pool.acquire() as conn:
        (row,) = await referral_status(conn, "ref-ssrf")
    assert row["state"] == "failed" and row["attempts"] == 1
    assert "outbound address policy" in row["last_error"]


# -- from the review of the fixes --------------------------------------------------------------------


async def test_a_partners_own_service_request_keeps_nothing_open(
    client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    """While referred, partner A wrote a ServiceRequest of its own pointing at the patient and a
    diagnosis; once the case manager handed the referral to someone else, A still read them."""
    mine = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "performer": [{"reference": "Organization/partnerA"}],
        "reasonReference": [{"reference": "Condition/cond-p1"}],
    }
    assert (
        await client.post("/fhir/ServiceRequest", json=mine, headers={**JSON, **partner_a})
    ).status_code == 201
    for key in ("Task/task-p1", "ServiceRequest/sr-p1"):
        resource = (await client.get(f"/fhir/{key}")).json()
        field = "owner" if key.startswith("Task") else "performer"
        resource[field] = (
            {"reference": "Organization/partnerB"}
            if field == "owner"
            else [{"reference": "Organization/partnerB"}]
        )
        assert (await client.put(f"/fhir/{key}", json=resource, headers=JSON)).status_code == 200
    for key in ("Patient/p1", "Condition/cond-p1", "Consent/consent-p1"):
        assert (await client.get(f"/fhir/{key}", headers=partner_a)).status_code == 404, key


async def test_a_partner_names_no_other_organisation(
    client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    """A ServiceRequest naming another partner as performer would give that partner the
    patient's record (and is how a partner would refer a client on)."""
    onward = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "performer": [{"reference": "Organization/partnerB"}],
    }
    response = await client.post("/fhir/ServiceRequest", json=onward, headers={**JSON, **partner_a})
    assert response.status_code == 403, response.text


async def test_a_reassigned_tasks_earlier_versions_stay_with_their_organisation(
    client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    task = (await client.get("/fhir/Task/task-p2")).json()  # partnerB's
    noted = {**task, "note": [{"text": "B internal: do not share"}]}
    assert (await client.put("/fhir/Task/task-p2", json=noted, headers=JSON)).status_code == 200
    handed = {**noted, "owner": {"reference": "Organization/partnerA"}, "note": []}
    del handed["note"]
    handed["focus"] = {"reference": "ServiceRequest/sr-p1"}
    handed["for"] = {"reference": "Patient/p1"}
    assert (await client.put("/fhir/Task/task-p2", json=handed, headers=JSON)).status_code == 200
    current = (await client.get("/fhir/Task/task-p2", headers=partner_a)).json()
    accepted = {**current, "status": "accepted"}
    assert (
        await client.put("/fhir/Task/task-p2", json=accepted, headers={**JSON, **partner_a})
    ).status_code == 200
    history = (await client.get("/fhir/Task/task-p2/_history", headers=partner_a)).json()
    versions = {e["resource"]["meta"]["versionId"] for e in history["entry"] if "resource" in e}
    assert versions == {"3", "4"}
    assert "B internal" not in str(history)
    assert (await client.get("/fhir/Task/task-p2/_history/2", headers=partner_a)).status_code == 404


async def test_a_focused_service_requests_earlier_versions_are_read_as_its_current_one(
    client: httpx.AsyncClient, world: None, partner_a: dict[str, str], app: FastAPI
) -> None:
    """Issue 14: vread and history judge an older version with the same condition tree as read
    and search. A partner reads a ServiceRequest because a Task it was asked to do focuses it
    (not because it performs it): that grant concerns the ServiceRequest, so its earlier
    versions are the partner's too (a second Python implementation refused them)."""
    request = {
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "performer": [{"reference": "Organization/cm"}],  # not partnerA
    }
    await put(client, "ServiceRequest", "sr-focused", request)
    await put(client, "ServiceRequest", "sr-focused", {**request, "status": "active"})
    task = {
        "status": "requested",
        "intent": "order",
        "code": FULFILL,
        "focus": {"reference": "ServiceRequest/sr-focused"},
        "for": {"reference": "Patient/p1"},
        "requester": {"reference": "Organization/cm"},
        "owner": {"reference": "Organization/partnerA"},
    }
    await put(client, "Task", "task-focused", task)
    assert (await client.get("/fhir/ServiceRequest/sr-focused", headers=partner_a)).status_code == 200
    found = await client.get("/fhir/ServiceRequest", params={"_id": "sr-focused"}, headers=partner_a)
    assert match_ids(found.json()) == ["sr-focused"]
    earlier = await client.get("/fhir/ServiceRequest/sr-focused/_history/1", headers=partner_a)
    assert earlier.status_code == 200, earlier.text
    assert earlier.json()["status"] == "draft"
    history = (await client.get("/fhir/ServiceRequest/sr-focused/_history", headers=partner_a)).json()
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    type_history = (await client.get("/fhir/ServiceRequest/_history", headers=partner_a)).json()
    versions = {
        (e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in type_history["entry"]
    }
    assert {("sr-focused", "1"), ("sr-focused", "2")} <= versions
    # Another partner reads none of it; and once the Task is cancelled, neither does partnerA.
    partner_b = await bearer(app, "system/*.rs", organization="Organization/partnerB", client_id="partner-b")
    for path in ("sr-focused", "sr-focused/_history/1", "sr-focused/_history"):
        response = await client.get(f"/fhir/ServiceRequest/{path}", headers=partner_b)
        assert response.status_code == 404, path
    await put(client, "Task", "task-focused", {**task, "status": "cancelled"})
    for path in ("sr-focused", "sr-focused/_history/1", "sr-focused/_history"):
        response = await client.get(f"/fhir/ServiceRequest/{path}", headers=partner_a)
        assert response.status_code == 404, path


async def test_a_restriction_judges_each_older_version(app: FastAPI, client: httpx.AsyncClient) -> None:
    """A scope restriction is part of the condition tree that judges older versions too: an
    earlier version is shown where it matched the restriction itself (issue 14)."""

    def observation(category: str) -> dict[str, Any]:
        return {
            "status": "final",
            "code": {"text": "bp"},
            "subject": {"reference": "Patient/p1"},
            "category": [{"coding": [{"system": "urn:cat", "code": category}]}],
        }

    await put(client, "Patient", "p1", {"gender": "female"})
    for category in ("vital", "lab", "vital"):
        await put(client, "Observation", "changing", observation(category))
    for number, (scope, context) in enumerate(
        (
            ("system/Observation.rs?category=urn:cat|vital", {}),
            ("patient/Observation.rs?category=urn:cat|vital", {"patient": "p1"}),
        )
    ):
        headers = await bearer(app, scope, client_id=f"vitals-{number}", **context)
        history = (await client.get("/fhir/Observation/changing/_history", headers=headers)).json()
        assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["3", "1"], scope
        for version, status in (("1", 200), ("2", 404), ("3", 200)):
            response = await client.get(f"/fhir/Observation/changing/_history/{version}", headers=headers)
            assert response.status_code == status, (scope, version)


async def test_naming_a_resource_never_makes_it_readable(
    client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    """A partner's own Task naming a Practitioner (or any hidden resource, anywhere in it, even
    where no search parameter indexes it) is refused like one naming a missing resource."""
    await put(client, "Practitioner", "pr1", {"telecom": [{"system": "phone", "value": "555-SECRET"}]})
    task = {
        "resourceType": "Task",
        "status": "draft",
        "intent": "plan",
        "requester": {"reference": "Organization/partnerA"},
        "owner": {"reference": "Organization/partnerA"},
    }
    answers = []
    for target in ("Practitioner/pr1", "Practitioner/nobody", "Condition/secret-p1", "Endpoint/none"):
        for where in (
            {"focus": {"reference": target}},
            {"output": [{"type": {"text": "x"}, "valueReference": {"reference": target}}]},
        ):
            response = await client.post("/fhir/Task", json={**task, **where}, headers={**JSON, **partner_a})
            answers.append((response.status_code, response.json()["issue"][0]["diagnostics"]))
    assert {status for status, _ in answers} == {403}
    assert len({diagnostics for _, diagnostics in answers}) == 1
    assert (await client.get("/fhir/Practitioner/pr1", headers=partner_a)).status_code == 404


async def test_a_restricted_scope_reads_the_current_version(app: FastAPI, client: httpx.AsyncClient) -> None:
    await put(
        client,
        "Observation",
        "vital",
        {
            "status": "final",
            "code": {"text": "bp"},
            "category": [{"coding": [{"system": "urn:cat", "code": "vital"}]}],
        },
    )
    headers = await bearer(app, "system/Observation.rs?category=urn:cat|vital", client_id="vitals")
    assert (await client.get("/fhir/Observation/vital", headers=headers)).status_code == 200
    assert (await client.get("/fhir/Observation/vital/_history/1", headers=headers)).status_code == 200
    history = (await client.get("/fhir/Observation/vital/_history", headers=headers)).json()
    assert [e["resource"]["id"] for e in history["entry"]] == ["vital"]


# -- from the second review ------------------------------------------------------------------------


async def test_a_partner_writes_no_task_that_would_grant_it_access(
    client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    """A Task partner A owns but did not request is what grants it a patient's record: A may not
    write one (naming the case manager, a patient or no one as requester)."""
    for requester in ({"reference": "Organization/cm"}, {"reference": "Patient/p1"}, None):
        task: dict[str, Any] = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "plan",
            "owner": {"reference": "Organization/partnerA"},
            "for": {"reference": "Patient/p1"},
            "focus": {"reference": "ServiceRequest/sr-p1"},
        }
        if requester is not None:
            task["requester"] = requester
        response = await client.post("/fhir/Task", json=task, headers={**JSON, **partner_a})
        assert response.status_code == 403, response.text


async def test_a_cancelled_referral_grants_nothing_more(
    client: httpx.AsyncClient, world: None, partner_a: dict[str, str]
) -> None:
    assert (await client.get("/fhir/Patient/p1", headers=partner_a)).status_code == 200
    for key, status in (("Task/task-p1", "cancelled"), ("ServiceRequest/sr-p1", "revoked")):
        resource = (await client.get(f"/fhir/{key}")).json()
        assert (
            await client.put(f"/fhir/{key}", json={**resource, "status": status}, headers=JSON)
        ).status_code == 200
    assert (await client.get("/fhir/Patient/p1", headers=partner_a)).status_code == 404
    assert (await client.get("/fhir/Task/task-p1", headers=partner_a)).status_code == 200  # its own Task


async def test_a_partner_cannot_reach_records_by_naming_them_in_a_referral_task(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """HIGH (authorization, issue 6). A partner organisation's client may create a referral Task
    it is the requester of, and nothing checks that it may read the Task's ``for``/``focus``.
    The Task then makes them visible to it (access.py: rows a Task naming the organisation
    points to, and what its focus ServiceRequest points to), and the worker, reading with
    OPEN_ACCESS, ships them to whatever partner the Task names as owner. (Fails on HEAD; passes
    with the uncommitted FhirRepository._check_references change in the working tree.)"""
    await put(client, "Patient", "victim", {"name": [{"family": "Private"}]})
    await put(
        client,
        "Condition",
        "victim-dx",
        {"code": {"text": "HIV"}, "subject": {"reference": "Patient/victim"}},
    )
    await put(
        client,
        "ServiceRequest",
        "victim-sr",
        {
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/victim"},
            "reasonReference": [{"reference": "Condition/victim-dx"}],
        },
    )
    for org in ("cm", "snoop"):
        await put(client, "Organization", org, {"name": org})
    snoop = await bearer(app, "system/*.cruds", organization="Organization/snoop", client_id="snoop")
    assert (await client.get("/fhir/Condition/victim-dx", headers=snoop)).status_code == 404
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": FULFILL,
        "authoredOn": "2026-11-25",
        "focus": {"reference": "ServiceRequest/victim-sr"},
        "for": {"reference": "Patient/victim"},
        "requester": {"reference": "Organization/snoop"},
        "owner": {"reference": "Organization/cm"},
    }
    created = await client.post("/fhir/Task", json=task, headers={**JSON, **snoop})
    readable = (await client.get("/fhir/Condition/victim-dx", headers=snoop)).status_code
    assert created.status_code in (400, 403, 404, 422) or readable == 404, (created.status_code, readable)
