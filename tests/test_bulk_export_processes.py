"""Bulk Data export with real processes (issue 12): a ``carecoord worker`` SIGKILLed in the middle
of an export is replaced and the export completes with every resource exactly once; and the
SMART reference client (bulk-data-client, Node) downloads a system export from a real
``carecoord serve`` on loopback, authenticating as a SMART Backend Services client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.auth_support import client_key, public_jwks
from tests.conftest import wait_until
from tests.server_support import running_server
from tests.test_bulk_export import ASYNC, lines
from tests.test_referral_workers import WorkerProcesses

CLIENT_DIR = Path(__file__).parent / "bulk_data_client"


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[WorkerProcesses]:
    processes = WorkerProcesses(database_url, tmp_path, CARECOORD_EXPORT_CHUNK_RESOURCES="10")
    yield processes
    processes.stop()


async def add_patients(client: httpx.AsyncClient, count: int) -> set[str]:
    """``count`` Patients, written in transaction Bundles of 500."""
    ids: set[str] = set()
    for start in range(0, count, 500):
        entries = [
            {
                "resource": {"resourceType": "Patient", "name": [{"family": f"W{n}"}]},
                "request": {"method": "POST", "url": "Patient"},
            }
            for n in range(start, min(count, start + 500))
        ]
        response = await client.post(
            "/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}
        )
        assert response.status_code == 200, response.text
        ids.update(e["response"]["location"].split("/")[1] for e in response.json()["entry"])
    return ids


async def test_a_worker_killed_mid_export_is_replaced_and_every_resource_is_written_once(
    app: FastAPI, client: httpx.AsyncClient, workers: WorkerProcesses
) -> None:
    ids = await add_patients(client, 2000)
    response = await client.get("/fhir/$export?_type=Patient", headers=ASYNC)
    assert response.status_code == 202, response.text
    status_url = response.headers["content-location"]
    export_id = status_url.rsplit("/", 1)[1]
    pool = app.state.pool
    first = workers.start()

    async def some_written() -> bool:
        written = await pool.fetchval("SELECT resources_total FROM bulk_export WHERE id = $1", export_id)
        return bool(written and written >= 100)

    await wait_until(some_written, "the worker wrote part of the export", timeout=60)
    first.send_signal(signal.SIGKILL)
    first.wait(15)
    row = await pool.fetchrow("SELECT state, resources_total FROM bulk_export WHERE id = $1", export_id)
    assert row["state"] == "running" and 0 < row["resources_total"] < len(ids), dict(row)
    workers.start()

    async def completed() -> bool:
        state = await pool.fetchval("SELECT state FROM bulk_export WHERE id = $1", export_id)
        return bool(state == "completed")

    await wait_until(completed, "a new worker completed the export", timeout=120)
    result = (await client.get(status_url)).json()
    exported = (await lines(client, result["output"]))["Patient"]
    assert len(exported) == len(ids)
    assert {p["id"] for p in exported} == ids
    total = await pool.fetchval("SELECT resources_total FROM bulk_export WHERE id = $1", export_id)
    assert total == len(ids)


def _client_installed() -> str | None:
    """Why the bulk-data-client cannot run here, or None (installed now if npm can)."""
    if (CLIENT_DIR / "node_modules").is_dir():
        return None
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed: cannot install the SMART bulk-data-client"
    install = subprocess.run(
        [npm, "ci", "--omit=dev", "--no-audit", "--no-fund", "--engine-strict=false", "--loglevel=error"],
        cwd=CLIENT_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        return f"npm could not install the SMART bulk-data-client: {install.stderr[-500:]}"
    return None


def test_the_smart_bulk_data_client_downloads_a_system_export(
    database_url: str, tmp_path: Path, workers: WorkerProcesses
) -> None:
    problem = _client_installed()
    if problem:
        pytest.skip(problem)
    node = shutil.which("node")
    assert node is not None
    key = client_key("ES384")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(public_jwks(key)))
    env = {"CARECOORD_EXPORT_POLL_INTERVAL": "0.2", "CARECOORD_EXPORT_FILE_MAX_RESOURCES": "7"}
    with running_server(database_url, tmp_path, env=env) as server:
        registered = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "clients",
                "add",
                "--name",
                "bulk-data-client",
                "--scope",
                "system/*.cruds",
                "--jwks-file",
                str(jwks_file),
                "--json",
            ],
            env={**_server_env(server.base, database_url)},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).parent.parent,
        )
        assert registered.returncode == 0, registered.stderr
        client_id = json.loads(registered.stdout)["client_id"]
        seeded = _seed(server.base, key, client_id)
        workers.start()
        destination = tmp_path / "downloads"
        destination.mkdir()
        config = tmp_path / "config.js"
        private = key.as_dict(private=True) | {"alg": "ES384"}
        config.write_text(
            "module.exports = "
            + json.dumps(
                {
                    "fhirUrl": f"{server.base}/fhir",
                    "tokenUrl": f"{server.base}/auth/token",
                    "clientId": client_id,
                    "privateKey": private,
                    "scope": "system/*.rs",
                    "reporter": "text",
                    "global": True,
                    "lenient": False,
                    "destination": str(destination),
                    "retryAfterMSec": 200,
                    "log": {"enabled": False},
                }
            )
        )
        run = subprocess.run(
            [
                node,
                str(CLIENT_DIR / "built" / "app.js"),
                "--config",
                str(config),
                "--global",
                "--reporter",
                "text",
            ],
            cwd=CLIENT_DIR,
            # No terminal: error details are printed rather than asked about.
            env={**os.environ, "SHOW_ERRORS": "y", "AUTO_RETRY_TRANSIENT_ERRORS": "n"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:], server.log()[-3000:])
    downloaded: dict[str, set[str]] = {}
    for path in destination.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            if line.strip():
                resource = json.loads(line)
                downloaded.setdefault(resource["resourceType"], set()).add(resource["id"])
    # The database holds what earlier tests wrote too: the export is all of it.
    stored = asyncio.run(_stored_ids(database_url, tuple(seeded)))
    for resource_type, expected in seeded.items():
        assert expected <= stored[resource_type]
        assert downloaded.get(resource_type) == stored[resource_type], (
            resource_type,
            sorted(p.name for p in destination.iterdir()),
        )


async def _stored_ids(database_url: str, types: tuple[str, ...]) -> dict[str, set[str]]:
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        rows = await conn.fetch(
            "SELECT resource_type, fhir_id FROM resource"
            " WHERE NOT deleted AND resource_type = ANY($1::text[])",
            list(types),
        )
    finally:
        await conn.close()
    found: dict[str, set[str]] = {t: set() for t in types}
    for row in rows:
        found[row["resource_type"]].add(row["fhir_id"])
    return found


def _server_env(base: str, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARECOORD_")}
    env.update({"DATABASE_URL": database_url, "CARECOORD_BASE_URL": base})
    return env


def _seed(base: str, key: Any, client_id: str) -> dict[str, set[str]]:
    """Patients and Observations written through the server's API with a token of the client."""
    from tests.auth_support import assertion_form, sign_assertion

    assertion = sign_assertion(key, client_id, f"{base}/auth/token", alg="ES384")
    response = httpx.post(
        f"{base}/auth/token",
        data=assertion_form(assertion, scope="system/*.cruds"),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    headers = {"authorization": f"Bearer {response.json()['access_token']}"}
    seeded: dict[str, set[str]] = {"Patient": set(), "Observation": set()}
    for n in range(10):
        patient = httpx.post(
            f"{base}/fhir/Patient",
            json={"resourceType": "Patient", "name": [{"family": f"C{n}"}]},
            headers=headers,
        )
        assert patient.status_code == 201, patient.text
        seeded["Patient"].add(patient.json()["id"])
        observation = httpx.post(
            f"{base}/fhir/Observation",
            json={
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "weight"},
                "subject": {"reference": f"Patient/{patient.json()['id']}"},
            },
            headers=headers,
        )
        assert observation.status_code == 201, observation.text
        seeded["Observation"].add(observation.json()["id"])
    return seeded
