"""Referral workers as separate processes (issue 6, item 5): a worker killed with SIGKILL in
the middle of a delivery has its job taken over when the lease runs out, and three workers
sharing 200 referrals deliver each exactly once to a real partner carecoord."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.referrals.bundle import identifier_system
from tests import REPO_ROOT
from tests.conftest import BASE_URL, LOOPBACK_ALLOWLIST, TEST_SECRET_KEY
from tests.partner_support import PartnerServer, partner_server_fixture  # noqa: F401  (fixture)
from tests.test_referrals import add_partner, delivery_state, make_referral, partner_token

SYSTEM = identifier_system(f"{BASE_URL}/fhir")


class WorkerProcesses:
    """``carecoord worker`` subprocesses on the tests' database."""

    def __init__(self, database_url: str, workdir: Path, **settings: str) -> None:
        """``settings``: environment variables that replace the defaults below."""
        self.database_url = database_url
        self.workdir = workdir
        self.settings = settings
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARECOORD_")}
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "CARECOORD_BASE_URL": BASE_URL,
                "CARECOORD_SECRET_KEY": TEST_SECRET_KEY,
                "CARECOORD_DATA_DIR": str(self.workdir / "data"),
                "CARECOORD_WORKER_LEASE": "3",
                "CARECOORD_DELIVERY_BACKOFF": "0.2",
                "CARECOORD_DELIVERY_TIMEOUT": "20",
                "CARECOORD_REFERRAL_POLL_INTERVAL": "3600",
                "CARECOORD_LOG_LEVEL": "warning",
                "CARECOORD_OUTBOUND_ALLOWLIST": LOOPBACK_ALLOWLIST,
                **self.settings,
            }
        )
        log = (self.workdir / f"worker-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(15)


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[WorkerProcesses]:
    processes = WorkerProcesses(database_url, tmp_path)
    yield processes
    processes.stop()


class SlowResponseProxy:
    """A TCP proxy to the partner that passes requests at once and holds every response back
    for ``delay`` seconds: the partner commits, the worker waits for an answer (and can be
    killed while it waits)."""

    def __init__(self, upstream: str, delay: float) -> None:
        host, port = upstream.removeprefix("http://").split("/", 1)[0].split(":")
        self.upstream = (host, int(port))
        self.delay = delay
        self.server: asyncio.AbstractServer | None = None
        self.requests = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay: float) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                first = True
                while data := await source.read(65536):
                    if first and delay:
                        await asyncio.sleep(delay)
                    first = False
                    sink.write(data)
                    await sink.drain()
            with contextlib.suppress(Exception):
                sink.close()

        await asyncio.gather(pipe(reader, up_writer, 0), pipe(up_reader, writer, self.delay))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def _copies_at_partner(partner: PartnerServer, task_ids: list[str]) -> dict[str, int]:
    headers = await partner_token(partner)
    found: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=60) as http:
        url: str | None = f"{partner.fhir_base}/Task"
        params: dict[str, str] | None = {"identifier": f"{SYSTEM}|", "_count": "500"}
        while url:
            response = await http.get(url, params=params, headers=headers)
            assert response.status_code == 200, response.text
            bundle = response.json()
            for entry in bundle.get("entry", []):
                for identifier in entry["resource"].get("identifier", []):
                    if identifier.get("system") == SYSTEM:
                        found[identifier["value"]] = found.get(identifier["value"], 0) + 1
            url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
            params = None
    return {task_id: found.get(f"Task/{task_id}", 0) for task_id in task_ids}


async def _credentials(app: FastAPI, partner: PartnerServer, endpoint: str) -> None:
    from app.referrals.credentials import set_credentials

    client_id, secret = partner.secret_client
    async with app.state.pool.acquire() as conn:
        await set_credentials(
            conn,
            app.state.settings,
            endpoint_id=endpoint,
            token_url=partner.token_url,
            client_id=client_id,
            client_secret=secret,
        )


async def _wait_delivered(client: httpx.AsyncClient, task_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(task_ids)
    while pending:
        for task_id in list(pending):
            task = (await client.get(f"/fhir/Task/{task_id}")).json()
            if delivery_state(task) == "delivered":
                pending.discard(task_id)
        assert time.monotonic() < deadline, f"{len(pending)} referrals not delivered"
        if pending:
            await asyncio.sleep(0.5)


async def test_a_worker_killed_mid_delivery_is_replaced_and_delivers_once(
    app: FastAPI, client: httpx.AsyncClient, partner_server: PartnerServer, workers: WorkerProcesses
) -> None:
    proxy = SlowResponseProxy(partner_server.fhir_base, delay=6)
    address = await proxy.start()
    try:
        await add_partner(client, "slowB", f"{address}/fhir")
        await _credentials(app, partner_server, "ep-slowB")
        first = workers.start()
        task_id = await make_referral(client, "slowB", suffix=f"-k{time.time_ns()}")

        async def leased() -> bool:
            async with app.state.pool.acquire() as conn:
                state = await conn.fetchval(
                    "SELECT state FROM job WHERE key = $1 AND kind = 'referral.deliver'", task_id
                )
            return state == "leased" and proxy.requests >= 1  # the Bundle is on its way

        deadline = time.monotonic() + 60
        while not await leased():
            assert time.monotonic() < deadline, "the first worker never started the delivery"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the Bundle is at the partner; its answer is held back
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        proxy.delay = 0
        workers.start()
        await _wait_delivered(client, [task_id], timeout=90)
        assert await _copies_at_partner(partner_server, [task_id]) == {task_id: 1}
        async with app.state.pool.acquire() as conn:
            attempts = await conn.fetchval(
                "SELECT attempts FROM job WHERE key = $1 AND kind = 'referral.deliver'", task_id
            )
        assert attempts == 2  # the killed attempt and the one that finished it
    finally:
        await proxy.stop()


async def test_three_workers_share_200_referrals_without_loss_or_duplicates(
    app: FastAPI, client: httpx.AsyncClient, partner_server: PartnerServer, workers: WorkerProcesses
) -> None:
    await add_partner(client, "busyB", partner_server.fhir_base)
    await _credentials(app, partner_server, "ep-busyB")
    for _ in range(3):
        workers.start()
    stamp = time.time_ns()
    task_ids = [await make_referral(client, "busyB", suffix=f"-m{stamp}-{n}") for n in range(200)]
    await _wait_delivered(client, task_ids, timeout=240)
    copies = await _copies_at_partner(partner_server, task_ids)
    assert sorted(set(copies.values())) == [1], {k: v for k, v in copies.items() if v != 1}
    async with app.state.pool.acquire() as conn:
        done = await conn.fetchval(
            "SELECT count(*) FROM job WHERE kind = 'referral.deliver' AND state = 'done' AND key = ANY($1)",
            task_ids,
        )
    assert done == 200
