"""The README's run command (`carecoord serve` on the embedded PostgreSQL, over real HTTP) and the
`clients` subcommands against the test database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.auth.tokens import CLIENT_CHECK_INTERVAL
from app.db import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_on_embedded_postgres_answers_metadata_and_writes(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CARECOORD_DATABASE_URL")}
    env.update(
        {"CARECOORD_DATA_DIR": str(tmp_path / "data"), "CARECOORD_BASE_URL": f"http://127.0.0.1:{port}"}
    )
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.3)
        metadata = httpx.get(f"{base}/fhir/metadata")
        assert metadata.status_code == 200
        assert metadata.json()["fhirVersion"] == "4.0.1"
        patient = {"resourceType": "Patient", "name": [{"family": "Diaz"}]}
        fhir_json = {"content-type": "application/fhir+json"}
        assert httpx.post(f"{base}/fhir/Patient", json=patient, headers=fhir_json).status_code == 401
        # The README's way in: register a client with the CLI, get a token, use it.
        registered = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "clients",
                "add",
                "--name",
                "readme",
                "--scope",
                "system/*.cruds",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        client = json.loads(registered.stdout.strip().splitlines()[-1])
        token = httpx.post(
            f"{base}/auth/token",
            data={"grant_type": "client_credentials", "scope": "system/Patient.cruds"},
            auth=(client["client_id"], client["client_secret"]),
        )
        assert token.status_code == 200, token.text
        assert token.json()["scope"] == "system/Patient.cruds"
        bearer = {"authorization": f"Bearer {token.json()['access_token']}"}
        created = httpx.post(f"{base}/fhir/Patient", json=patient, headers={**fhir_json, **bearer})
        assert created.status_code == 201
        assert created.headers["location"].startswith(f"{base}/fhir/Patient/")
        # The commit happened before the 201 was sent: a new connection reads it at once.
        assert httpx.get(created.headers["location"], headers=bearer).json()["name"][0]["family"] == "Diaz"
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert (tmp_path / "data" / "pgdata" / "PG_VERSION").exists()


# --- `carecoord clients` against the test database (security review findings 5 and 11) ------

BASE = "http://cc.test"


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CARECOORD_DATABASE_URL"}
    env["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _acli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(_cli, database_url, *args)


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        yield client


async def test_cli_clients_add_refuses_non_plain_restrictions(database_url: str) -> None:
    for scope in (
        "system/Patient.rs?_has:Condition:patient:code=http://snomed.info/sct|44054006",
        "system/Observation.rs?subject:Patient.name=Rivera",
        "system/Patient.rs?_include=Patient:link",
    ):
        refused = await _acli(database_url, "clients", "add", "--name", "oracle", "--scope", scope, "--json")
        assert refused.returncode == 2, (scope, refused.stdout, refused.stderr)
        assert "restriction" in refused.stderr and not refused.stdout.strip()
    plain = await _acli(
        database_url,
        "clients",
        "add",
        "--name",
        "plain",
        "--scope",
        "system/Observation.rs?category=vital-signs",
        "--json",
    )
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["client_id"]


async def test_cli_introspection_flag_and_removal_revokes_tokens(
    database_url: str, app: FastAPI, http: httpx.AsyncClient
) -> None:
    helped = await _acli(database_url, "clients", "add", "--help")
    assert helped.returncode == 0 and "--introspection" in helped.stdout
    added = await _acli(
        database_url,
        "clients",
        "add",
        "--name",
        "resource server",
        "--scope",
        "system/Patient.r",
        "--introspection",
        "--json",
    )
    assert added.returncode == 0, added.stderr
    introspector = json.loads(added.stdout)
    plain = json.loads(
        (
            await _acli(database_url, "clients", "add", "--name", "app", "--scope", "system/*.rs", "--json")
        ).stdout
    )
    listed = await _acli(database_url, "clients", "list", "--json")
    by_id = {entry["client_id"]: entry for entry in json.loads(listed.stdout)}
    assert by_id[introspector["client_id"]]["introspection"] is True
    assert by_id[plain["client_id"]]["introspection"] is False

    form = {"grant_type": "client_credentials", "scope": "system/Patient.rs"}
    issued = await http.post("/auth/token", data=form, auth=(plain["client_id"], plain["client_secret"]))
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]
    headers = {"authorization": f"Bearer {token}", "accept": "application/fhir+json"}
    assert (await http.get("/fhir/Patient", headers=headers)).status_code == 200
    as_introspector = (introspector["client_id"], introspector["client_secret"])
    active = await http.post("/auth/introspect", data={"token": token}, auth=as_introspector)
    assert active.json()["active"] is True and active.json()["client_id"] == plain["client_id"]

    removed = await _acli(database_url, "clients", "remove", plain["client_id"])
    assert removed.returncode == 0, removed.stderr
    deadline = time.monotonic() + CLIENT_CHECK_INTERVAL + 2
    while (await http.get("/fhir/Patient", headers=headers)).status_code != 401:
        assert time.monotonic() < deadline, "the removed client's token still works"
        await asyncio.sleep(0.2)
    inactive = await http.post("/auth/introspect", data={"token": token}, auth=as_introspector)
    assert inactive.json() == {"active": False}
    refused = await http.post("/auth/token", data=form, auth=(plain["client_id"], plain["client_secret"]))
    assert refused.status_code == 401
