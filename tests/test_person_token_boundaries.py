"""Where one person's token ends (issue 11): people signed in to one app share its client id, so
exports and Subscriptions belong to the person, not only the client; a person changes only the
records about its Patients, not those that merely mention one; a person reads the audit trail of
its Patients; a trusted external issuer's person token keeps its person. Found by an adversarial
review; each test failed before the fix."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from tests import test_subscriptions as subscriptions
from tests.conftest import bearer
from tests.partner_support import MisbehavingServer, misbehaving_server_fixture
from tests.test_bulk_export import ASYNC, export_app, http, run_jobs  # noqa: F401
from tests.test_search_support import JSON
from tests.test_user_access import world  # noqa: F401


async def kickoff(http: httpx.AsyncClient, path: str, token: dict[str, str]) -> str:  # noqa: F811
    response = await http.get(f"/fhir/{path}", headers={**ASYNC, **token})
    assert response.status_code == 202, response.text
    return str(response.headers["content-location"])


async def _seed_caseload(http: httpx.AsyncClient) -> None:  # noqa: F811
    for pid in ("p1", "p2"):
        patient = {"resourceType": "Patient", "id": pid, "active": True}
        r = await http.put(f"/fhir/Patient/{pid}", json=patient)
        assert r.status_code in (200, 201), r.text
        r = await http.put(
            f"/fhir/Observation/obs-{pid}",
            json={
                "resourceType": "Observation",
                "id": f"obs-{pid}",
                "status": "final",
                "code": {"text": "weight"},
                "subject": {"reference": f"Patient/{pid}"},
            },
        )
        assert r.status_code in (200, 201), r.text
    for dr in ("dr1", "dr2"):
        r = await http.put(f"/fhir/Practitioner/{dr}", json={"resourceType": "Practitioner", "id": dr})
        assert r.status_code in (200, 201), r.text
    for dr, pid in (("dr1", "p1"), ("dr2", "p2")):
        r = await http.put(
            f"/fhir/CareTeam/ct-{pid}",
            json={
                "resourceType": "CareTeam",
                "id": f"ct-{pid}",
                "status": "active",
                "subject": {"reference": f"Patient/{pid}"},
                "participant": [{"member": {"reference": f"Practitioner/{dr}"}}],
            },
        )
        assert r.status_code in (200, 201), r.text


async def test_another_person_of_the_same_app_cannot_read_a_persons_export(
    export_app: FastAPI,  # noqa: F811
    http: httpx.AsyncClient,  # noqa: F811
) -> None:
    """Exports are owned by client_id only (app/exports/router.py _owned): dr2, signed in to the
    same SMART app as dr1, polls dr1's export and downloads dr1's caseload (p1's data)."""
    await _seed_caseload(http)
    dr1 = await bearer(export_app, "user/*.rs", client_id="ehr-app", fhir_user="Practitioner/dr1")
    dr2 = await bearer(export_app, "user/*.rs", client_id="ehr-app", fhir_user="Practitioner/dr2")
    status_url = await kickoff(http, "Patient/$export", dr1)
    await run_jobs(export_app)
    own = await http.get(status_url, headers=dr1)
    assert own.status_code == 200, own.text
    files = own.json()["output"]
    assert any(f["type"] == "Observation" for f in files)
    other = await http.get(status_url, headers=dr2)
    assert other.status_code == 404, "dr2 reads dr1's export manifest"
    for entry in files:
        download = await http.get(entry["url"], headers=dr2)
        assert download.status_code == 404, f"dr2 downloads dr1's {entry['type']} file: {download.text[:200]}"


async def test_another_patient_of_the_same_app_cannot_read_a_patients_export(
    export_app: FastAPI,  # noqa: F811
    http: httpx.AsyncClient,  # noqa: F811
) -> None:
    """The same hole for patient-facing apps: two patients of one app (patient context p1, p2)."""
    await _seed_caseload(http)
    p1 = await bearer(export_app, "patient/*.rs", client_id="portal", patient="p1", fhir_user="Patient/p1")
    p2 = await bearer(export_app, "patient/*.rs", client_id="portal", patient="p2", fhir_user="Patient/p2")
    status_url = await kickoff(http, "Patient/$export", p1)
    await run_jobs(export_app)
    own = await http.get(status_url, headers=p1)
    assert own.status_code == 200, own.text
    other = await http.get(status_url, headers=p2)
    assert other.status_code == 404, "patient p2 reads patient p1's export manifest"
    for entry in own.json()["output"]:
        download = await http.get(entry["url"], headers=p2)
        assert download.status_code == 404, f"p2 downloads p1's {entry['type']} file"


async def test_a_practitioner_cannot_join_the_care_team_of_a_patient_outside_its_caseload(
    app: FastAPI,
    client: httpx.AsyncClient,
    world: None,  # noqa: F811
) -> None:
    """CareTeam is in a Patient's compartment through ``participant`` as well as ``subject``
    (R4 CompartmentDefinition/patient), so dr sees and may update a CareTeam *about p3* that
    merely lists p1 (dr's patient) as a participant. _check_references exempts references the
    previous version already had (Patient/p3) and Practitioner/dr is directory data, so dr adds
    itself as a participant and p3 (outside its caseload) enters its caseload."""
    r = await client.put(
        "/fhir/CareTeam/ct-family",
        json={
            "resourceType": "CareTeam",
            "id": "ct-family",
            "status": "active",
            "subject": {"reference": "Patient/p3"},
            "participant": [{"member": {"reference": "Patient/p1"}}],
        },
    )
    assert r.status_code in (200, 201), r.text
    dr = await bearer(app, "user/*.cruds", client_id="ehr", fhir_user="Practitioner/dr")
    assert (await client.get("/fhir/Patient/p3", headers=dr)).status_code == 404
    team = (await client.get("/fhir/CareTeam/ct-family", headers=dr)).json()
    team["participant"].append({"member": {"reference": "Practitioner/dr"}})
    await client.put("/fhir/CareTeam/ct-family", json=team, headers=dr)
    leaked = await client.get("/fhir/Patient/p3", headers=dr)
    assert leaked.status_code == 404, "dr put itself on p3's CareTeam and now reads Patient/p3"
    observation = await client.get("/fhir/Observation/obs-p3", headers=dr)
    assert observation.status_code == 404, "dr reads p3's Observation"


misbehaving_server = misbehaving_server_fixture


async def test_a_persons_subscription_is_not_another_persons_of_the_same_app(
    app: FastAPI,
    client: httpx.AsyncClient,
    world: None,  # noqa: F811
    misbehaving_server: MisbehavingServer,
) -> None:
    """Subscriptions are owned by client_id only (access.py OWNED_TYPES / _owner_condition):
    dr2, signed in to the same app as dr1, reads dr1's Subscription with its channel headers
    (the secret dr1's endpoint checks) and can re-point or delete it."""
    scope = "user/Task.rs user/Subscription.crud"
    dr1 = await bearer(app, scope, client_id="dr-app", fhir_user="Practitioner/dr")
    dr2 = await bearer(app, scope, client_id="dr-app", fhir_user="Practitioner/dr2")
    body = subscriptions.subscription(
        misbehaving_server.url("/dr"), headers=("Authorization: Bearer dr1-endpoint-secret",)
    )
    created = await client.post("/fhir/Subscription", json=body, headers={**JSON, **dr1})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    read = await client.get(f"/fhir/Subscription/{sid}", headers=dr2)
    assert read.status_code == 404, f"dr2 reads dr1's Subscription: {read.text[:300]}"
    found = await client.get("/fhir/Subscription", headers=dr2)
    assert "dr1-endpoint-secret" not in found.text, "dr2 finds dr1's Subscription secret by search"
    deleted = await client.delete(f"/fhir/Subscription/{sid}", headers=dr2)
    assert deleted.status_code == 404, "dr2 deletes dr1's Subscription"


async def test_a_person_reads_the_audit_events_of_its_patients(
    app: FastAPI,
    client: httpx.AsyncClient,
    world: None,  # noqa: F811
) -> None:
    """The audit store has no index rows, so a person's limit there is over its ``patient``
    column (app/audit/fhir.py access_condition); it used to render the index-row condition and
    fail with a 500."""
    for patient in ("p1", "p2"):
        assert (await client.get(f"/fhir/Patient/{patient}")).status_code == 200  # audited reads
    tokens = {
        "practitioner": await bearer(
            app, "user/*.rs user/AuditEvent.rs", client_id="ehr", fhir_user="Practitioner/dr"
        ),
        "patient": await bearer(
            app,
            "patient/*.rs patient/AuditEvent.rs",
            client_id="portal",
            patient="p1",
            fhir_user="Patient/p1",
        ),
    }
    await app.state.audit.flush()
    for who, token in tokens.items():
        response = await client.get("/fhir/AuditEvent?patient=p1", headers=token)
        assert response.status_code == 200, f"{who}: {response.status_code} {response.text[:200]}"
        assert response.json().get("entry"), f"{who} sees the reads of p1"
        assert "Patient/p2" not in response.text
    # The patient sees nothing of another patient's audit trail.
    other = await client.get("/fhir/AuditEvent?patient=p2", headers=tokens["patient"])
    assert other.status_code == 200 and not other.json().get("entry")


async def test_an_external_token_with_a_local_client_id_cannot_open_that_clients_export(
    export_app: FastAPI,  # noqa: F811
    http: httpx.AsyncClient,  # noqa: F811
) -> None:
    """app/exports/router.py _owned compares client_id only and ignores AccessContext.external:
    a trusted external issuer's token whose client_id/azp/sub is the same string as a client
    registered here (another issuer's namespace) polls and downloads that client's export.
    Subscriptions refuse exactly this (access.py _owner_condition, test_subscriptions.py
    test_an_external_issuers_token_owns_no_subscription); exports do not."""
    from types import SimpleNamespace

    from app.auth.scopes import parse_scopes
    from app.exports.router import _owned
    from app.fhir.access import AccessContext
    from app.fhir.errors import NotFound

    await _seed_caseload(http)
    status_url = await kickoff(http, "$export", {})  # the fixture's client "exporter"
    await run_jobs(export_app)
    export_id = status_url.rstrip("/").rsplit("/", 1)[1]
    external = AccessContext(
        client_id="exporter", permissions=parse_scopes("system/*.rs"), unrestricted=False, external=True
    )
    request = SimpleNamespace(app=export_app)
    try:
        await _owned(request, external, export_id)  # type: ignore[arg-type]
    except NotFound:
        return
    raise AssertionError("an external issuer's token opened the export of the local client 'exporter'")


def test_an_external_person_token_keeps_its_person() -> None:
    """app/auth/tokens.py TokenService._external_claims drops the ``fhirUser`` claim of a
    trusted external issuer's token: a clinician's SMART token from an external EHR
    authorization server (``scope`` user/*.rs, ``fhirUser`` Practitioner/dr) becomes a
    person-less ``user/`` token, which access.py treats as the client's registered reach: every
    patient, instead of dr's caseload. Secure: keep the person (AccessContext.user), or refuse
    user/ scopes on an external token that names none."""
    import time

    from app.auth.context import access_context
    from app.auth.tokens import TokenService

    now = int(time.time())
    claims = {
        "iss": "https://ehr-idp.test",
        "aud": "http://cc.test/fhir",
        "sub": "clinician-17",
        "azp": "ehr-app",
        "scope": "openid fhirUser user/*.rs",
        "fhirUser": "Practitioner/dr",
        "iat": now,
        "exp": now + 300,
    }
    verified = TokenService._external_claims(claims, "https://ehr-idp.test", now + 300, now)
    access = access_context(verified)
    assert access.user == "Practitioner/dr", (
        f"the external person token is a person-less user/ token (user={access.user!r},"
        f" scope {verified.scope!r}): no caseload limit applies"
    )


async def test_a_person_changes_only_records_about_its_patients(
    app: FastAPI,
    client: httpx.AsyncClient,
    world: None,  # noqa: F811
) -> None:
    """The person limits admit every resource in the compartment of an allowed patient by ANY
    compartment parameter (access.py _user_condition: patient_compartment params, e.g.
    Observation.performer, Patient.link), for writes too. So the patient user p1 rewrites the
    Patient record of p3 because p3 links to p1 (``seealso``), and dr (caseload p1) rewrites an
    Observation *about p3* because p1 is named as its performer; the references to p3 are
    exempt from _check_references as the previous version had them."""
    r = await client.put(
        "/fhir/Patient/p3",
        json={
            "resourceType": "Patient",
            "id": "p3",
            "name": [{"family": "Three"}],
            "link": [{"other": {"reference": "Patient/p1"}, "type": "seealso"}],
        },
    )
    assert r.status_code == 200, r.text
    r = await client.put(
        "/fhir/Observation/obs-perf",
        json={
            "resourceType": "Observation",
            "id": "obs-perf",
            "status": "final",
            "code": {"text": "blood pressure"},
            "subject": {"reference": "Patient/p3"},
            "performer": [{"reference": "Patient/p1"}],
        },
    )
    assert r.status_code == 201, r.text
    p1 = await bearer(app, "patient/*.cruds", client_id="portal", patient="p1", fhir_user="Patient/p1")
    dr = await bearer(app, "user/*.cruds", client_id="ehr", fhir_user="Practitioner/dr")
    p3 = (await client.get("/fhir/Patient/p3")).json()
    changed = await client.put(
        "/fhir/Patient/p3", json={**p3, "name": [{"family": "Renamed by p1"}]}, headers=p1
    )
    assert changed.status_code in (403, 404), "patient p1 rewrote Patient/p3's record"
    observation = (await client.get("/fhir/Observation/obs-perf")).json()
    changed = await client.put(
        "/fhir/Observation/obs-perf", json={**observation, "valueString": "changed by dr"}, headers=dr
    )
    assert changed.status_code in (403, 404), "dr rewrote an Observation about p3 (outside its caseload)"
