"""The README's run command: `carecoord serve` on the embedded PostgreSQL, over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


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
