"""What a hostile partner can put into carecoord through the tracking worker (issue 15, finding 3).

The partner is a real FHIR-speaking HTTP server on loopback (tests/referral_support.py
FakePartner) whose Task answers with hostile outputs: references to this server's own URL for
another patient's data, an identifier copied from a local resource, an Observation about an
unrelated Patient, invalid resources, types the workflow does not return, statuses the owner
cannot set. After the worker has polled, the partner's own client must see nothing it did not
see before, and no local record may have changed or gained data.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from tests.conftest import FHIR, bearer
from tests.referral_support import (
    FakePartner,
    complete,
    deliver,
    jobs,
    make_worker,
    partner_http,
    run_due,
)
from tests.test_referrals import add_partner
from tests.test_search_support import JSON, put


def _outputs(partner: FakePartner, status: str, *references: str) -> None:
    task = partner.resources[f"Task/{partner.task_id}"]
    task["status"] = status
    task["output"] = [
        {"type": {"text": "resulting-activity"}, "valueReference": {"reference": reference}}
        for reference in references
    ]


async def _other_patient(client: httpx.AsyncClient, suffix: str) -> None:
    """Another client of the case manager, with a diagnosis the partner must never see."""
    await put(client, "Patient", f"other{suffix}", {"gender": "male"})
    await put(
        client,
        "Condition",
        f"secret{suffix}",
        {"code": {"text": "HIV"}, "subject": {"reference": f"Patient/other{suffix}"}},
    )


async def _track(app: FastAPI, client: httpx.AsyncClient, partner: FakePartner, org: str, suffix: str) -> str:
    """Deliver a referral to ``partner``; the caller scripts the partner's answer, then polls."""
    await add_partner(client, org, partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        return await deliver(app, client, worker, org, suffix)


async def _poll(app: FastAPI, partner: FakePartner) -> None:
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        for _ in range(2):
            await run_due(worker)


async def test_an_output_naming_this_servers_url_grants_the_partner_nothing(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    partner = FakePartner("https://hostile1.example/fhir")
    task_id = await _track(app, client, partner, "hostile1", "-h1")
    await _other_patient(client, "-h1")
    _outputs(partner, "completed", f"{FHIR}/Condition/secret-h1", "Condition/secret-h1")
    await _poll(app, partner)

    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    assert local["status"] == "completed", await jobs(app, task_id)
    # The status arrived, but no output points at the local Condition (the partner's relative
    # reference names the partner's own Condition/secret-h1, not ours).
    references = {o["valueReference"].get("reference") for o in local["output"]}
    assert references == {None, f"{partner.base}/Condition/secret-h1"}
    as_partner = await bearer(app, "system/*.cruds", organization="Organization/hostile1", client_id="h1")
    assert (await client.get("/fhir/Condition/secret-h1", headers=as_partner)).status_code == 404
    overwrite = {"resourceType": "Condition", "id": "secret-h1", "subject": {"reference": "Patient/p"}}
    response = await client.put("/fhir/Condition/secret-h1", json=overwrite, headers={**JSON, **as_partner})
    assert response.status_code == 404
    assert (await client.get("/fhir/Condition/secret-h1")).json()["code"]["text"] == "HIV"


async def test_an_output_copying_a_local_identifier_is_not_matched_to_the_local_resource(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await _other_patient(client, "-h2")
    local_form = {
        "status": "completed",
        "identifier": {"system": "https://forms.example", "value": "assessment-7"},
        "subject": {"reference": "Patient/other-h2"},
    }
    await put(client, "QuestionnaireResponse", "qr-other-h2", local_form)
    partner = FakePartner("https://hostile2.example/fhir")
    partner.resources["QuestionnaireResponse/9"] = {
        "resourceType": "QuestionnaireResponse",
        "id": "9",
        "status": "completed",
        "identifier": {"system": "https://forms.example", "value": "assessment-7"},
    }
    task_id = await _track(app, client, partner, "hostile2", "-h2")
    _outputs(partner, "completed", "QuestionnaireResponse/9")
    await _poll(app, partner)

    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    assert local["status"] == "completed", await jobs(app, task_id)
    (output,) = local["output"]
    kept = output["valueReference"]["reference"]
    assert kept.startswith("QuestionnaireResponse/") and kept != "QuestionnaireResponse/qr-other-h2"
    as_partner = await bearer(app, "system/*.cruds", organization="Organization/hostile2", client_id="h2")
    assert (await client.get(f"/fhir/{kept}", headers=as_partner)).status_code == 200  # its own copy
    assert (
        await client.get("/fhir/QuestionnaireResponse/qr-other-h2", headers=as_partner)
    ).status_code == 404
    untouched = (await client.get("/fhir/QuestionnaireResponse/qr-other-h2")).json()
    assert untouched["meta"]["versionId"] == "1"


async def test_an_output_about_an_unrelated_patient_does_not_land_in_that_record(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await _other_patient(client, "-h3")
    partner = FakePartner("https://hostile3.example/fhir")
    partner.resources["Observation/5"] = {
        "resourceType": "Observation",
        "id": "5",
        "status": "final",
        "code": {"text": "planted"},
        "subject": {"reference": f"{FHIR}/Patient/other-h3"},
    }
    task_id = await _track(app, client, partner, "hostile3", "-h3")
    _outputs(partner, "completed", "Observation/5")
    await _poll(app, partner)

    assert (await client.get(f"/fhir/Task/{task_id}")).json()["status"] == "completed"
    planted = (await client.get("/fhir/Observation", params={"subject": "Patient/other-h3"})).json()
    assert planted.get("entry", []) == []
    anywhere = (await client.get("/fhir/Observation", params={"code:text": "planted"})).json()
    assert anywhere.get("entry", []) == []


async def test_invalid_and_unexpected_outputs_are_not_stored(app: FastAPI, client: httpx.AsyncClient) -> None:
    partner = FakePartner("https://hostile4.example/fhir")
    partner.resources["Observation/bad"] = {
        "resourceType": "Observation",
        "id": "bad",
        "status": "not-a-status",
        "code": {"text": "invalid"},
    }
    partner.resources["Condition/c1"] = {
        "resourceType": "Condition",
        "id": "c1",
        "code": {"text": "a partner's condition"},
        "subject": {"reference": "Patient/9"},
    }
    task_id = await _track(app, client, partner, "hostile4", "-h4")
    _outputs(partner, "completed", "Observation/bad", "Condition/c1")
    await _poll(app, partner)

    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    assert local["status"] == "completed", await jobs(app, task_id)
    references = {o["valueReference"]["reference"] for o in local["output"]}
    # Neither was copied: both outputs keep pointing at the partner.
    assert references == {f"{partner.base}/Observation/bad", f"{partner.base}/Condition/c1"}
    assert (await client.get("/fhir/Observation", params={"code:text": "invalid"})).json().get(
        "entry"
    ) is None
    found = await client.get("/fhir/Condition", params={"code:text": "a partner"})
    assert found.json().get("entry") is None
    # The partner did not ask for these fetches to happen: Condition is not even read.
    assert ("GET", "Condition/c1") not in partner.requests


async def test_a_kept_copy_belongs_to_its_partner_only(app: FastAPI, client: httpx.AsyncClient) -> None:
    partner = FakePartner("https://hostile5.example/fhir")
    partner.resources["Procedure/1"] = {
        "resourceType": "Procedure",
        "id": "1",
        "status": "completed",
        "subject": {"reference": "Patient/anything"},
        "code": {"text": "Food delivered"},
    }
    task_id = await _track(app, client, partner, "hostile5", "-h5")
    _outputs(partner, "completed", "Procedure/1")
    await _poll(app, partner)
    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    kept = local["output"][0]["valueReference"]["reference"]
    assert kept.startswith("Procedure/")
    copy = (await client.get(f"/fhir/{kept}")).json()
    # The partner's relative Patient/anything is the partner's own resource, never one of ours.
    assert copy["subject"]["reference"] == f"{partner.base}/Patient/anything"
    owner = await bearer(app, "system/*.cruds", organization="Organization/hostile5", client_id="h5")
    stranger = await bearer(app, "system/*.cruds", organization="Organization/hostile1", client_id="h1")
    assert (await client.get(f"/fhir/{kept}", headers=owner)).status_code == 200
    assert (await client.get(f"/fhir/{kept}", headers=stranger)).status_code == 404


async def test_statuses_the_owner_cannot_set_are_not_mirrored(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    partner = FakePartner("https://hostile6.example/fhir")
    task_id = await _track(app, client, partner, "hostile6", "-h6")
    seen: list[Any] = []
    for status in ("received", "ready", "accepted", "requested", "draft", "entered-in-error"):
        _outputs(partner, status)
        await _poll(app, partner)
        seen.append((await client.get(f"/fhir/Task/{task_id}")).json()["status"])
    # Only 'accepted' is the owner's to set; nothing takes the referral back afterwards, and
    # entered-in-error is the requester's alone.
    assert seen == ["requested", "requested", "accepted", "accepted", "accepted", "accepted"]


async def test_a_partner_cannot_use_carecoord_as_storage(app: FastAPI, client: httpx.AsyncClient) -> None:
    """Ever new outputs, each large: at most MAX_OUTPUTS_PER_POLL are fetched per poll, at most
    MAX_COPIES kept per referral, none over MAX_COPY_BYTES; the rest keep pointing at the partner."""
    from app.referrals.worker import MAX_COPIES, MAX_COPY_BYTES, MAX_OUTPUTS_PER_POLL

    partner = FakePartner("https://hostile7.example/fhir")
    task_id = await _track(app, client, partner, "hostile7", "-h7")
    fetched_before = 0
    for poll in range(4):
        references = []
        for number in range(15):
            key = f"Observation/p{poll}-{number}"
            partner.resources[key] = {
                "resourceType": "Observation",
                "id": key.split("/")[1],
                "status": "final",
                "code": {"text": "x" * (MAX_COPY_BYTES + 10 if number == 0 else 10)},
            }
            references.append(key)
        _outputs(partner, "in-progress", *references)
        async with partner_http(partner) as http:
            await run_due(make_worker(app, http))
        fetched = len([r for r in partner.requests if r[0] == "GET" and r[1].startswith("Observation/")])
        assert fetched - fetched_before <= MAX_OUTPUTS_PER_POLL
        fetched_before = fetched
    copies = (await client.get("/fhir/Observation", params={"_count": "100"})).json().get("entry", [])
    assert 0 < len(copies) <= MAX_COPIES
    assert all(len(e["resource"]["code"]["text"]) < MAX_COPY_BYTES for e in copies)
    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    assert len(local["output"]) == 15


async def test_every_reference_in_partner_data_is_made_safe(app: FastAPI, client: httpx.AsyncClient) -> None:
    """References outside ``valueReference`` (an annotation's author, an extension) and inside a
    copy's contained resources are judged like the others."""
    await _other_patient(client, "-h8")
    partner = FakePartner("https://hostile8.example/fhir")
    partner.resources["Observation/7"] = {
        "resourceType": "Observation",
        "id": "7",
        "status": "final",
        "code": {"text": "with a contained condition"},
        "contained": [
            {"resourceType": "Condition", "id": "c", "subject": {"reference": f"{FHIR}/Patient/other-h8"}}
        ],
        "hasMember": [{"reference": "#c"}],
    }
    task_id = await _track(app, client, partner, "hostile8", "-h8")
    task = partner.resources[f"Task/{partner.task_id}"]
    task["status"] = "completed"
    task["output"] = [
        {
            "type": {"text": "note"},
            "valueAnnotation": {"text": "x", "authorReference": {"reference": f"{FHIR}/Patient/other-h8"}},
        },
        {
            "type": {"text": "ext"},
            "valueString": "y",
            "extension": [{"url": "urn:x", "valueReference": {"reference": f"{FHIR}/Condition/secret-h8"}}],
        },
        {"type": {"text": "copy"}, "valueReference": {"reference": "Observation/7"}},
    ]
    await _poll(app, partner)
    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    assert local["status"] == "completed"
    assert "other-h8" not in str(local["output"]) and "secret-h8" not in str(local["output"])
    # The Observation pointing (from its contained Condition) at another patient was not kept.
    assert local["output"][2]["valueReference"]["reference"] == f"{partner.base}/Observation/7"


async def test_a_partner_cannot_make_carecoord_call_it_in_a_loop(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """503 with Retry-After: 0 and a large error body: the next poll still waits the floor, and
    only the start of the answer is kept."""
    from app.referrals.hooks import PARTNER_POLL_FLOOR
    from app.referrals.worker import MAX_ERROR_CHARS

    partner = FakePartner("https://hostile9.example/fhir")
    task_id = await _track(app, client, partner, "hostile9", "-h9")
    huge = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "transient", "diagnostics": "z" * 200_000}],
    }
    partner.override[("GET", f"Task/{partner.task_id}")] = lambda _: httpx.Response(
        503, json=huge, headers={"retry-after": "0"}
    )
    async with partner_http(partner) as http:
        await run_due(make_worker(app, http))
    async with app.state.pool.acquire() as conn:
        job = await conn.fetchrow(
            "SELECT state, not_before - now() AS wait, length(last_error) AS kept FROM job"
            " WHERE key = $1 AND kind = 'referral.track'",
            task_id,
        )
    assert job["state"] == "pending"
    assert job["wait"].total_seconds() > PARTNER_POLL_FLOOR - 2
    assert job["kept"] <= MAX_ERROR_CHARS


async def test_a_partners_invalid_task_fields_never_reach_the_local_task(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    partner = FakePartner("https://hostile10.example/fhir")
    task_id = await _track(app, client, partner, "hostile10", "-h10")
    remote = partner.resources[f"Task/{partner.task_id}"]
    remote["status"] = "accepted"
    remote["businessStatus"] = {"bogus": True, "text": 5}
    await _poll(app, partner)
    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    assert local["status"] == "accepted"
    assert "bogus" not in str(local.get("businessStatus"))
    # The case manager can still write the Task it reads (it was not made invalid).
    cancelled = {**local, "status": "cancelled", "statusReason": {"text": "client moved"}}
    assert (await client.put(f"/fhir/Task/{task_id}", json=cancelled, headers=JSON)).status_code == 200


async def test_a_slow_partner_holds_one_worker_slot_not_the_others(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """A partner that takes its time kept the whole batch of claimed jobs, and every job due
    after it, waiting (272 s for a delivery to a healthy partner in the review)."""
    import asyncio
    import time

    from app.referrals.worker import Worker
    from tests.test_referrals import delivery_state, make_referral

    slow = FakePartner("https://slow-h11.example/fhir")
    healthy = FakePartner("https://healthy-h11.example/fhir")

    async def hold(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(20)
        return httpx.Response(503)

    slow.handler = hold
    await add_partner(client, "slowh11", slow.base)
    await add_partner(client, "healthyh11", healthy.base)
    async with partner_http(slow, healthy) as http:
        worker = Worker(app.state.pool, http, app.state.settings, name="slots")
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            stuck = await make_referral(client, "slowh11", suffix="-s11")
            deadline = time.monotonic() + 20
            while (await jobs(app, stuck))["deliver"]["state"] != "leased":
                assert time.monotonic() < deadline, "the slow delivery never started"
                await asyncio.sleep(0.05)
            quick = await make_referral(client, "healthyh11", suffix="-q11")
            deadline = time.monotonic() + 15
            while delivery_state((await client.get(f"/fhir/Task/{quick}")).json()) != "delivered":
                assert time.monotonic() < deadline, "the healthy delivery waited for the slow one"
                await asyncio.sleep(0.05)
            assert (await jobs(app, stuck))["deliver"]["state"] == "leased"  # still at the slow partner
        finally:
            stop.set()
            await running


async def test_outputs_of_two_partners_with_the_same_id_are_kept_apart(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """HIGH. The copy's identifier is ``Procedure/1@Procedure/1``, without the partner's base:
    partner B's Procedure/1 is taken for partner A's copy, so B's referral closes with A's
    Procedure (another patient's record)."""
    a, b = FakePartner("https://a.example/fhir"), FakePartner("https://b.example/fhir")
    for partner, text in ((a, "A: food pantry visit"), (b, "B: housing navigation")):
        partner.resources["Procedure/1"] = {
            "resourceType": "Procedure",
            "id": "1",
            "status": "completed",
            "code": {"text": text},
            "subject": {"reference": "Patient/9"},
        }
    await add_partner(client, "pa", a.base)
    await add_partner(client, "pb", b.base)
    async with partner_http(a, b) as http:
        worker = make_worker(app, http)
        task_a = await deliver(app, client, worker, "pa", "-a")
        task_b = await deliver(app, client, worker, "pb", "-b")
        complete(a, "Procedure/1")
        complete(b, "Procedure/1")
        await run_due(worker)
    kept = {}
    for task_id in (task_a, task_b):
        local = (await client.get(f"/fhir/Task/{task_id}")).json()
        assert local["status"] == "completed"
        reference = local["output"][0]["valueReference"]["reference"]
        kept[task_id] = (await client.get(f"/fhir/{reference}")).json()["code"]["text"]
    assert kept == {task_a: "A: food pantry visit", task_b: "B: housing navigation"}


async def test_a_kept_output_does_not_point_at_an_unrelated_local_patient(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """HIGH. _keep_copy stores the partner's resource with its references unchanged: the
    partner's relative ``Patient/9`` now names carecoord's own Patient/9, an unrelated person,
    whose record (Procedure?subject=Patient/9, $everything, patient-compartment tokens) gains
    the referred client's Procedure."""
    partner = FakePartner("https://rel.example/fhir")
    partner.resources["Procedure/77"] = {
        "resourceType": "Procedure",
        "id": "77",
        "status": "completed",
        "code": {"text": "Housing navigation"},
        "subject": {"reference": "Patient/9"},  # the referred client, as the partner knows them
    }
    await put(client, "Patient", "9", {"name": [{"family": "Unrelated"}]})
    await add_partner(client, "prel", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "prel", "-rel")
        complete(partner, "Procedure/77")
        await run_due(worker)
    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    copy = (await client.get(f"/fhir/{local['output'][0]['valueReference']['reference']}")).json()
    assert copy["subject"]["reference"] != "Patient/9", copy["subject"]
    unrelated = (await client.get("/fhir/Procedure", params={"subject": "Patient/9"})).json()
    assert unrelated.get("total", len(unrelated.get("entry", []))) == 0


async def test_a_questionnaire_response_output_is_kept_once_and_valid(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """MEDIUM. SDOHCC lists QuestionnaireResponse among Task.output additional-content, and its
    ``identifier`` is 0..1 (an object). _keep_copy always does
    ``[*(copy.get('identifier') or []), ours]``: an existing identifier object is spread into
    its KEYS (``["system", "value", {...}]``), and without one the copy gets an array; either
    way the stored copy is not valid R4."""
    partner = FakePartner("https://qr.example/fhir")
    partner.resources["QuestionnaireResponse/5"] = {
        "resourceType": "QuestionnaireResponse",
        "id": "5",
        "status": "completed",
        "identifier": {"system": "https://qr.example/ids", "value": "qr-5"},
    }
    await add_partner(client, "pqr", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "pqr", "-qr")
        complete(partner, "QuestionnaireResponse/5")
        for _ in range(2):
            await run_due(worker)
    local = (await client.get(f"/fhir/Task/{task_id}")).json()
    assert local["status"] == "completed", await jobs(app, task_id)
    copies = (await client.get("/fhir/QuestionnaireResponse")).json().get("entry", [])
    assert len(copies) == 1
    assert isinstance(copies[0]["resource"]["identifier"], dict), copies[0]["resource"]["identifier"]


async def test_an_unreadable_output_does_not_end_tracking(app: FastAPI, client: httpx.AsyncClient) -> None:
    """MEDIUM. track() reads every Task.output reference before mirroring anything; one that the
    partner answers 404/403 for (deleted, or not readable by carecoord's client), or that is an
    absolute URL outside the partner's base (e.g. a Goal at the source), is a final
    DeliveryError: tracking ends 'failed' and the partner's status (completed) never reaches
    the local Task."""
    partner = FakePartner("https://out.example/fhir")
    await add_partner(client, "pout", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "pout", "-out")
        complete(partner, "Procedure/deleted")
        await run_due(worker)
    assert (await client.get(f"/fhir/Task/{task_id}")).json()["status"] == "completed", await jobs(
        app, task_id
    )
