"""Bulk Data Access IG v2.0.0 export (issue 12): kick-off, status, manifest, files, _since with
deletions, Patient and Group level, _typeFilter, _elements, cancel, access, retention; and an
export that stays exactly as of transactionTime while writes go on.

The export jobs run on a real job runner (app/jobs) against the test database; files are read
back over HTTP and compared resource by resource with what the API serves."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.background import job_runner
from app.main import create_app
from app.settings import Settings
from tests import REPO_ROOT
from tests.conftest import BASE_URL, bearer, wait_until

ASYNC = {"prefer": "respond-async", "accept": "application/fhir+json"}


@pytest.fixture
async def export_app(settings: Settings, clean_db: None) -> AsyncIterator[FastAPI]:
    """The application with export settings small enough to see files split and polls allowed."""
    application = create_app(
        settings.model_copy(
            update={"export_file_max_resources": 3, "export_chunk_resources": 2, "export_poll_interval": 0}
        )
    )
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(export_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=export_app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        client.headers["accept"] = "application/fhir+json"
        client.headers.update(await bearer(export_app, client_id="exporter"))
        yield client


async def run_jobs(app: FastAPI) -> None:
    """Run the due jobs (exports, not the expiry ones that wait) until none is left."""
    runner = job_runner(app.state.pool, app.state.http, app.state.settings, name="test-runner")
    while await runner.run_once():
        pass


async def kickoff(http: httpx.AsyncClient, path: str = "$export", **kwargs: Any) -> str:
    response = await http.get(f"/fhir/{path}", headers=ASYNC, **kwargs)
    assert response.status_code == 202, response.text
    return response.headers["content-location"]


async def manifest(app: FastAPI, http: httpx.AsyncClient, status_url: str) -> dict[str, Any]:
    await run_jobs(app)
    response = await http.get(status_url)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def lines(
    http: httpx.AsyncClient, files: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Every NDJSON line of ``files``, per type, checking each file's count and media type."""
    found: dict[str, list[dict[str, Any]]] = {}
    for entry in files:
        response = await http.get(entry["url"], headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/fhir+ndjson")
        rows = [json.loads(line) for line in response.text.splitlines() if line]
        assert len(rows) == entry["count"]
        found.setdefault(entry["type"], []).extend(rows)
    return found


async def create(http: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = await http.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def seed(http: httpx.AsyncClient) -> dict[str, list[dict[str, Any]]]:
    patients = [
        await create(http, {"resourceType": "Patient", "name": [{"family": f"P{i}"}]}) for i in range(4)
    ]
    observations = [
        await create(
            http,
            {
                "resourceType": "Observation",
                "status": "final" if i % 2 else "preliminary",
                "code": {"text": "weight"},
                "subject": {"reference": f"Patient/{patients[i % 4]['id']}"},
            },
        )
        for i in range(5)
    ]
    organization = await create(http, {"resourceType": "Organization", "name": "Clinic"})
    return {"Patient": patients, "Observation": observations, "Organization": [organization]}


async def test_system_export_holds_every_resource_exactly_as_served(
    export_app: FastAPI, http: httpx.AsyncClient
) -> None:
    data = await seed(http)
    status_url = await kickoff(http)
    assert status_url.startswith(f"{BASE_URL}/bulkstatus/")
    pending = await http.get(status_url)
    assert pending.status_code == 202 and pending.headers["x-progress"] and pending.headers["retry-after"]
    result = await manifest(export_app, http, status_url)
    assert result["requiresAccessToken"] is True
    assert result["request"].endswith("/fhir/$export")
    assert result["transactionTime"] and result["deleted"] == [] and result["error"] == []
    # Split at 3 resources per file: 4 Patients are two files, one type per file.
    assert [e["count"] for e in result["output"] if e["type"] == "Patient"] == [3, 1]
    exported = await lines(http, result["output"])
    for resource_type, resources in data.items():
        served = {}
        for resource in resources:
            read = await http.get(f"/fhir/{resource_type}/{resource['id']}")
            served[resource["id"]] = read.json()
        assert sorted(r["id"] for r in exported[resource_type]) == sorted(served)
        for row in exported[resource_type]:
            assert row == served[row["id"]]


async def test_kickoff_refuses_what_it_does_not_support(http: httpx.AsyncClient) -> None:
    response = await http.get("/fhir/$export", headers={"accept": "application/fhir+json"})
    assert response.status_code == 400 and "respond-async" in response.text
    for query in (
        "_outputFormat=text/csv",
        "_type=Nothing",
        "_typeFilter=Observation%3F_include%3DObservation:subject",
        "_typeFilter=Observation%3F_sort%3Ddate",
        "_typeFilter=Observation%3Fnot-a-param%3D1",
        "includeAssociatedData=LatestProvenanceResources",
        "_since=yesterday",
        "unknown=1",
    ):
        refused = await http.get(f"/fhir/$export?{query}", headers=ASYNC)
        assert refused.status_code == 400, (query, refused.text)
        assert refused.json()["resourceType"] == "OperationOutcome"
    # Lenient handling skips the unsupported parameter and reports it in the error file.
    lenient = await http.get(
        "/fhir/$export?includeAssociatedData=LatestProvenanceResources&_type=Organization",
        headers={**ASYNC, "prefer": "respond-async, handling=lenient"},
    )
    assert lenient.status_code == 202


async def test_lenient_export_reports_what_it_skipped_in_the_error_file(
    export_app: FastAPI, http: httpx.AsyncClient
) -> None:
    await seed(http)
    response = await http.get(
        "/fhir/$export?includeAssociatedData=LatestProvenanceResources&_type=Organization",
        headers={**ASYNC, "prefer": "respond-async, handling=lenient"},
    )
    result = await manifest(export_app, http, response.headers["content-location"])
    assert [e["type"] for e in result["output"]] == ["Organization"]
    errors = await lines(http, result["error"])
    assert "includeAssociatedData" in json.dumps(errors["OperationOutcome"])


async def test_post_kickoff_with_parameters_patient_level_and_elements(
    export_app: FastAPI, http: httpx.AsyncClient
) -> None:
    data = await seed(http)
    chosen = data["Patient"][0]["id"]
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Patient,Observation"},
            {"name": "_elements", "valueString": "Observation.status"},
            {"name": "patient", "valueReference": {"reference": f"Patient/{chosen}"}},
            {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
        ],
    }
    response = await http.post("/fhir/Patient/$export", json=body, headers=ASYNC)
    assert response.status_code == 202, response.text
    result = await manifest(export_app, http, response.headers["content-location"])
    exported = await lines(http, result["output"])
    assert [p["id"] for p in exported["Patient"]] == [chosen]
    assert "name" in exported["Patient"][0]  # _elements names only Observation elements
    observations = exported["Observation"]
    expected = [o["id"] for o in data["Observation"] if o["subject"]["reference"] == f"Patient/{chosen}"]
    assert sorted(o["id"] for o in observations) == sorted(expected)
    for observation in observations:
        assert "subject" not in observation and observation["status"]
        assert {"code": "SUBSETTED"}.items() <= observation["meta"]["tag"][-1].items()
    # A system-level export takes no patient.
    refused = await http.post("/fhir/$export", json=body, headers=ASYNC)
    assert refused.status_code == 400


async def test_group_export_holds_its_members_data_and_type_filter_narrows(
    export_app: FastAPI, http: httpx.AsyncClient
) -> None:
    data = await seed(http)
    members = [data["Patient"][1]["id"], data["Patient"][2]["id"]]
    group = await create(
        http,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{m}"}} for m in members]
            + [{"entity": {"reference": f"Patient/{data['Patient'][3]['id']}"}, "inactive": True}],
        },
    )
    status_url = await kickoff(
        http,
        f"Group/{group['id']}/$export",
        params={"_typeFilter": "Observation?status=final", "_type": "Patient,Observation"},
    )
    result = await manifest(export_app, http, status_url)
    exported = await lines(http, result["output"])
    assert sorted(p["id"] for p in exported["Patient"]) == sorted(members)
    expected = [
        o["id"]
        for o in data["Observation"]
        if o["subject"]["reference"] in {f"Patient/{m}" for m in members} and o["status"] == "final"
    ]
    assert sorted(o["id"] for o in exported.get("Observation", [])) == sorted(expected)
    missing = await http.get("/fhir/Group/nope/$export", headers=ASYNC)
    assert missing.status_code == 404
    not_group_level = await http.get("/fhir/Observation/$export", headers=ASYNC)
    assert not_group_level.status_code == 404


async def test_since_exports_changes_and_deletions(export_app: FastAPI, http: httpx.AsyncClient) -> None:
    data = await seed(http)
    first = await manifest(export_app, http, await kickoff(http))
    since = first["transactionTime"]
    changed = dict(data["Patient"][0], name=[{"family": "Changed"}])
    assert (await http.put(f"/fhir/Patient/{changed['id']}", json=changed)).status_code == 200
    gone = data["Observation"][0]["id"]
    assert (await http.delete(f"/fhir/Observation/{gone}")).status_code in (200, 204)
    second = await manifest(export_app, http, await kickoff(http, params={"_since": since}))
    exported = await lines(http, second["output"])
    assert [p["id"] for p in exported["Patient"]] == [changed["id"]]
    assert exported["Patient"][0]["name"] == [{"family": "Changed"}]
    assert "Observation" not in exported
    deleted = await lines(http, second["deleted"])
    assert deleted["Bundle"] == [
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"request": {"method": "DELETE", "url": f"Observation/{gone}"}}],
        }
    ]
    # Without _since there is no deleted list, and the deleted Observation is simply absent.
    full = await manifest(export_app, http, await kickoff(http))
    assert full["deleted"] == []
    assert gone not in {o["id"] for o in (await lines(http, full["output"]))["Observation"]}


async def test_group_and_patient_exports_list_their_members_deletions(
    export_app: FastAPI, http: httpx.AsyncClient
) -> None:
    """A deleted resource has no index rows left: its Patient compartment is judged from its last
    version, so a Group (or Patient) export with _since lists its members' deletions and no one
    else's (export.html: ``deleted`` holds what ``output`` would have held)."""
    data = await seed(http)
    patients = data["Patient"]
    group = await create(
        http,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{patients[1]['id']}"}}],
        },
    )
    first = await manifest(export_app, http, await kickoff(http))
    since = first["transactionTime"]
    by_subject = {o["subject"]["reference"]: o["id"] for o in data["Observation"]}
    member_observation = by_subject[f"Patient/{patients[1]['id']}"]
    other_observation = by_subject[f"Patient/{patients[2]['id']}"]
    for gone in (member_observation, other_observation):
        assert (await http.delete(f"/fhir/Observation/{gone}")).status_code in (200, 204)
    organization = data["Organization"][0]["id"]
    assert (await http.delete(f"/fhir/Organization/{organization}")).status_code in (200, 204)

    def urls(bundles: dict[str, list[dict[str, Any]]]) -> list[str]:
        return sorted(e["request"]["url"] for b in bundles.get("Bundle", []) for e in b["entry"])

    in_group = await manifest(
        export_app, http, await kickoff(http, f"Group/{group['id']}/$export", params={"_since": since})
    )
    assert urls(await lines(http, in_group["deleted"])) == [f"Observation/{member_observation}"]
    patient_level = await kickoff(http, "Patient/$export", params={"_since": since})
    all_patients = await manifest(export_app, http, patient_level)
    assert urls(await lines(http, all_patients["deleted"])) == sorted(
        [f"Observation/{member_observation}", f"Observation/{other_observation}"]
    )


async def test_only_the_client_that_started_an_export_sees_it(
    export_app: FastAPI, http: httpx.AsyncClient
) -> None:
    await seed(http)
    status_url = await kickoff(http)
    result = await manifest(export_app, http, status_url)
    file_url = result["output"][0]["url"]
    other = await bearer(export_app, client_id="someone-else")
    for url in (status_url, file_url):
        assert (await http.get(url, headers=other)).status_code == 404
        assert (await http.get(url, headers={"authorization": ""})).status_code == 401
    assert (await http.delete(status_url, headers=other)).status_code == 404
    # A token that may read no type this export holds cannot start one.
    narrow = await bearer(export_app, "system/Organization.rs", client_id="narrow")
    refused = await http.get("/fhir/$export?_type=Patient", headers={**ASYNC, **narrow})
    assert refused.status_code == 403


async def test_scopes_decide_which_types_go_in(export_app: FastAPI, http: httpx.AsyncClient) -> None:
    await seed(http)
    narrow = await bearer(export_app, "system/Organization.rs", client_id="narrow")
    response = await http.get("/fhir/$export", headers={**ASYNC, **narrow})
    assert response.status_code == 202
    await run_jobs(export_app)
    status = await http.get(response.headers["content-location"], headers=narrow)
    assert status.status_code == 200
    assert {e["type"] for e in status.json()["output"]} == {"Organization"}
    assert (await http.get(response.headers["content-location"])).status_code == 404  # not the exporter's


async def test_cancel_removes_the_export_and_its_files(export_app: FastAPI, http: httpx.AsyncClient) -> None:
    await seed(http)
    status_url = await kickoff(http)
    result = await manifest(export_app, http, status_url)
    assert (await http.delete(status_url)).status_code == 202
    assert (await http.get(status_url)).status_code == 404
    assert (await http.get(result["output"][0]["url"])).status_code == 404
    rows = await export_app.state.pool.fetchval(
        "SELECT count(*) FROM bulk_export_file WHERE export_id = $1", status_url.rsplit("/", 1)[1]
    )
    assert rows == 0


async def test_an_expired_export_is_gone_and_its_files_removed(
    settings: Settings, clean_db: None, tmp_path: Any
) -> None:
    """CARECOORD_EXPORT_RETENTION: the expiry job deletes the export and its files (here in a
    CARECOORD_EXPORT_DIR directory)."""
    application = create_app(
        settings.model_copy(update={"export_retention": 1, "export_dir": tmp_path, "export_poll_interval": 0})
    )
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            client.headers.update(await bearer(application, client_id="exporter"))
            await create(client, {"resourceType": "Organization", "name": "Clinic"})
            status_url = await kickoff(client, params={"_type": "Organization"})
            await run_jobs(application)
            assert list(tmp_path.rglob("*.ndjson"))
            done = await client.get(status_url)
            if done.status_code == 200:  # within its second of retention
                files = await lines(client, done.json()["output"])
                assert files["Organization"][0]["name"] == "Clinic"

            async def expired() -> bool:
                await run_jobs(application)
                count = await application.state.pool.fetchval(
                    "SELECT count(*) FROM bulk_export WHERE id = $1", status_url.rsplit("/", 1)[1]
                )
                return bool(count == 0)

            await wait_until(expired, "the expiry job removed the export", timeout=15)
            assert not list(tmp_path.rglob("*.ndjson"))
            assert (await client.get(status_url)).status_code == 404


async def test_queued_exports_wait_for_the_clients_running_ones(settings: Settings, clean_db: None) -> None:
    application = create_app(settings.model_copy(update={"export_concurrency": 1, "export_poll_interval": 0}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            client.headers.update(await bearer(application, client_id="exporter"))
            first = await kickoff(client)
            second = await kickoff(client)
            pool = application.state.pool
            # The first one holds the client's only slot (its job is not run here).
            await pool.execute(
                "UPDATE bulk_export SET state = 'running' WHERE id = $1", first.rsplit("/", 1)[1]
            )
            await pool.execute(
                "DELETE FROM job WHERE kind = 'bulk-export' AND key = $1", first.rsplit("/", 1)[1]
            )
            runner = job_runner(pool, application.state.http, application.state.settings)
            await runner.run_once()
            status = await client.get(second)
            assert status.status_code == 202 and status.headers["x-progress"].startswith("queued")
            await pool.execute(
                "UPDATE bulk_export SET state = 'completed' WHERE id = $1", first.rsplit("/", 1)[1]
            )

            async def done() -> bool:
                await runner.run_once()
                return (await client.get(second)).status_code == 200

            await wait_until(done, "the queued export ran", timeout=15)


async def test_polling_too_fast_is_429(settings: Settings, clean_db: None) -> None:
    application = create_app(settings.model_copy(update={"export_poll_interval": 30}))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            client.headers.update(await bearer(application, client_id="exporter"))
            status_url = await kickoff(client)
            assert (await client.get(status_url)).status_code == 202
            fast = await client.get(status_url)
            assert fast.status_code == 429 and fast.headers["retry-after"] == "30"


async def test_files_hold_the_state_as_of_transaction_time_while_writes_go_on(
    export_app: FastAPI, http: httpx.AsyncClient
) -> None:
    """Writes (creates, updates, deletes) committed after the kick-off do not show up; every
    resource current at the kick-off is there once, with the version it had then."""
    patients = [
        await create(http, {"resourceType": "Patient", "name": [{"family": f"F{i}"}]}) for i in range(12)
    ]
    expected = {p["id"]: p for p in patients}
    status_url = await kickoff(http, params={"_type": "Patient"})
    stop = asyncio.Event()

    async def writer() -> int:
        written = 0
        while not stop.is_set():
            victim = patients[written % len(patients)]
            changed = dict(victim, name=[{"family": f"late-{written}"}])
            await http.put(f"/fhir/Patient/{victim['id']}", json=changed)
            await create(http, {"resourceType": "Patient", "name": [{"family": "new"}]})
            if written == 3:
                await http.delete(f"/fhir/Patient/{patients[-1]['id']}")
            written += 1
            await asyncio.sleep(0)
        return written

    task = asyncio.create_task(writer())
    runner = job_runner(export_app.state.pool, export_app.state.http, export_app.state.settings)
    while True:
        await runner.run_once()
        if (await http.get(status_url)).status_code == 200:
            break
        await asyncio.sleep(0.01)
    stop.set()
    assert await task > 0
    result = (await http.get(status_url)).json()
    exported = (await lines(http, result["output"]))["Patient"]
    assert len(exported) == len({p["id"] for p in exported})
    assert {p["id"]: p for p in exported} == expected


async def test_operators_list_and_cancel_exports_and_see_them_in_metrics(
    export_app: FastAPI, http: httpx.AsyncClient, database_url: str
) -> None:
    """``carecoord exports list|cancel`` (a real CLI process) and the /metrics gauges."""
    status_url = await kickoff(http, params={"_type": "Organization"})
    export_id = status_url.rsplit("/", 1)[1]
    metrics = (await http.get("/metrics")).text
    assert 'carecoord_exports{state="queued"}' in metrics and "carecoord_export_running_resources" in metrics
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARECOORD_")} | {
        "DATABASE_URL": database_url
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "exports", *args],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    listed = await asyncio.to_thread(cli, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout) if r["id"] == export_id)
    assert row["state"] == "queued" and row["client_id"] == "exporter" and row["level"] == "system"
    cancelled = await asyncio.to_thread(cli, "cancel", export_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert (await http.get(status_url)).status_code == 404
    again = await asyncio.to_thread(cli, "cancel", export_id)
    assert again.returncode == 1 and "no export" in again.stderr


async def test_an_export_whose_steps_keep_failing_ends_as_failed(
    export_app: FastAPI, http: httpx.AsyncClient
) -> None:
    status_url = await kickoff(http, params={"_type": "Organization"})
    export_id = status_url.rsplit("/", 1)[1]
    pool = export_app.state.pool
    # A snapshot no step can read, on its last allowed try.
    await pool.execute("UPDATE bulk_export SET snapshot = 'broken' WHERE id = $1", export_id)
    await pool.execute(
        "UPDATE job SET payload = payload || '{\"failures\": 4}'::jsonb"
        " WHERE kind = 'bulk-export' AND key = $1",
        export_id,
    )
    await run_jobs(export_app)
    failed = await http.get(status_url)
    assert failed.status_code == 500
    assert failed.json()["issue"][0]["code"] == "exception" and "internal error" in failed.text


async def test_a_patient_token_exports_only_its_patients_data(
    export_app: FastAPI, http: httpx.AsyncClient
) -> None:
    """The token's patient context limits the compartment types inside the export's SQL, as in
    its searches; directory types (Organization) are not limited."""
    data = await seed(http)
    own = data["Patient"][2]["id"]
    token = await bearer(export_app, "patient/*.rs", client_id="patient-app", patient=own)
    response = await http.get("/fhir/$export", headers={**ASYNC, **token})
    assert response.status_code == 202, response.text
    await run_jobs(export_app)
    status = await http.get(response.headers["content-location"], headers=token)
    assert status.status_code == 200
    exported = await lines(http, status.json()["output"], token)
    assert [p["id"] for p in exported["Patient"]] == [own]
    assert {o["subject"]["reference"] for o in exported["Observation"]} == {f"Patient/{own}"}
    assert len(exported["Organization"]) == 1
