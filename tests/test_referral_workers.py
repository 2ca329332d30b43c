"""Referral workers and their jobs (issue 6, item 5; the job runner, issue 10).

As separate processes: a worker killed with SIGKILL in the middle of a delivery has its job
taken over when the lease runs out, and three workers sharing 200 referrals deliver each
exactly once to a real partner carecoord. In the test's event loop, against scripted partners
(tests/referral_support.py): leases, the fence, tracking past the delivery deadline, a
cancellation racing a delivery, a small pool."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.referrals.bundle import identifier_system
from app.referrals.worker import Worker
from tests import REPO_ROOT
from tests.conftest import BASE_URL, LOOPBACK_ALLOWLIST, TEST_SECRET_KEY, wait_until
from tests.partner_support import PartnerServer, partner_server_fixture  # noqa: F401  (fixture)
from tests.referral_support import (
    FakePartner,
    deliver,
    has_passed,
    jobs,
    lease_until,
    make_worker,
    partner_http,
    run_due,
)
from tests.test_referrals import add_partner, delivery_state, make_referral, partner_token
from tests.test_search_support import JSON

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


async def test_tracking_survives_a_transient_error_after_the_delivery_deadline(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """HIGH. The track job gets ``deadline = delivery time + CARECOORD_DELIVERY_DEADLINE`` (3
    days) and _failed_attempt gives up on any job past its deadline: the first 503/timeout
    while polling a referral that the partner works on for more than 3 days ends tracking for
    good ('failed'); the partner's completion never reaches carecoord."""
    partner = FakePartner("https://slow.example/fhir")
    await add_partner(client, "pslow", partner.base)
    async with partner_http(partner) as http:
        worker = make_worker(app, http)
        task_id = await deliver(app, client, worker, "pslow", "-slow")
        async with app.state.pool.acquire() as conn:  # four days later
            await conn.execute("UPDATE job SET deadline = now() - interval '1 day' WHERE key = $1", task_id)
        path = f"Task/{partner.task_id}"
        partner.override[("GET", path)] = lambda _: httpx.Response(503)
        await run_due(worker)
        del partner.override[("GET", path)]
        partner.resources[path]["status"] = "completed"
        await run_due(worker)
    assert (await jobs(app, task_id))["track"]["state"] != "failed"
    assert (await client.get(f"/fhir/Task/{task_id}")).json()["status"] == "completed"


async def test_a_job_is_not_run_twice_while_its_worker_is_still_working(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """MEDIUM. Leases are never renewed and a job's duration is not bounded by the lease: with
    the defaults (lease 60 s, 30 s per partner request, up to four requests per delivery: token,
    POST, and again after a 401; one read per output when tracking) a slow partner makes the
    lease run out under a live worker, and a second worker sends the same Bundle concurrently
    (conditional creates racing at the partner are not guaranteed to be idempotent)."""
    partner = FakePartner("https://lease.example/fhir")
    await add_partner(client, "plse", partner.base)
    arrived, release = threading.Event(), threading.Event()
    released: list[bool] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and not arrived.is_set():
            # The partner (another thread, another event loop) holds its answer to the first
            # POST until the test has tried a second worker: longer than the lease, within
            # delivery_timeout (3 s).
            arrived.set()
            released.append(await asyncio.to_thread(release.wait, 2.5))
        response = partner.handle(request)
        assert response is not None
        return response

    partner.handler = slow
    async with partner_http(partner) as http:
        first = make_worker(app, http, name="w1", worker_lease=1)
        second = make_worker(app, http, name="w2", worker_lease=1)
        task_id = await make_referral(client, "plse", suffix="-lease")
        running = asyncio.create_task(first.run_once())
        try:
            claimed = await wait_until(lambda: lease_until(app, task_id, "w1"), "w1 to claim the delivery")
            await wait_until(arrived.is_set, "w1's Bundle to reach the partner")
            await wait_until(lambda: has_passed(app, claimed), "the lease w1 claimed to run out")
            assert not running.done(), "w1 is still waiting for the partner"
            await second.run_once()
        finally:
            release.set()
        await running
    assert released == [True], "the partner answered only after the second worker's attempt"
    posts = [r for r in partner.requests if r[0] == "POST"]
    assert (await jobs(app, task_id))["deliver"]["state"] == "done"
    assert len(posts) == 1, posts


class _RacingConnection:
    def __init__(self, conn: Any, after: Callable[[str], Any]) -> None:
        self._conn = conn
        self._after = after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        value = await self._conn.fetchval(sql, *args)
        await self._after(sql)
        return value


class _RacingPool:
    """The app's pool, whose connections call ``after(sql)`` after each fetchval: a
    deterministic way to commit something between two statements of a job."""

    def __init__(self, pool: Any, after: Callable[[str], Any]) -> None:
        self._pool = pool
        self._after = after

    def acquire(self) -> Any:
        pool, after = self._pool, self._after

        class _Ctx:
            async def __aenter__(self) -> _RacingConnection:
                self._cm = pool.acquire()
                return _RacingConnection(await self._cm.__aenter__(), after)

            async def __aexit__(self, *exc: object) -> None:
                await self._cm.__aexit__(*exc)

        return _Ctx()


async def test_a_cancellation_racing_the_end_of_the_delivery_is_not_lost(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """MEDIUM. Worker.cancel reads ``partner_task`` and then, in a second statement (another
    READ COMMITTED snapshot), whether a delivery is still active. A delivery that commits
    between the two looks 'never delivered': the cancel job ends 'done' without telling the
    partner, which goes on with a cancelled referral."""
    partner = FakePartner("https://race.example/fhir")
    await add_partner(client, "prace", partner.base)
    task_id = await make_referral(client, "prace", suffix="-race")
    async with app.state.pool.acquire() as conn:  # the delivery is in flight at another worker
        await conn.execute(
            "UPDATE job SET state = 'leased', leased_by = 'other', attempts = 1,"
            " lease_until = now() + interval '1 hour' WHERE key = $1",
            task_id,
        )
    task = (await client.get(f"/fhir/Task/{task_id}")).json()
    cancelled = {**task, "status": "cancelled", "statusReason": {"text": "Client moved"}}
    assert (await client.put(f"/fhir/Task/{task_id}", json=cancelled, headers=JSON)).status_code == 200

    async def delivery_commits(sql: str) -> None:
        if "partner_task IS NOT NULL" in sql:
            async with app.state.pool.acquire() as other:  # the other worker's _FINISH commits now
                await other.execute(
                    "UPDATE job SET state = 'done', finished_at = now(),"
                    " payload = payload || jsonb_build_object('partner_task', $2::text)"
                    " WHERE key = $1 AND kind = 'referral.deliver'",
                    task_id,
                    f"{partner.base}/Task/{partner.task_id}",
                )

    async with partner_http(partner) as http:
        worker = Worker(_RacingPool(app.state.pool, delivery_commits), http, app.state.settings, name="racer")
        await worker.run_once()
    cancel = (await jobs(app, task_id))["cancel"]
    assert "never delivered" not in (cancel["last_error"] or ""), cancel


async def test_the_worker_does_not_deadlock_on_a_small_pool(app: FastAPI, client: httpx.AsyncClient) -> None:
    """LOW-MEDIUM. The NOTIFY listener holds a pool connection for the worker's lifetime, and
    Worker.deliver calls _finish (which acquires a second connection) while holding one when
    the Task is no longer requested. With CARECOORD_DB_POOL_SIZE <= worker_concurrency + 1 the
    jobs wait for each other's connections forever (asyncpg's acquire has no timeout), and the
    API, sharing the pool in ``serve``, hangs with them."""
    from app import db

    settings = app.state.settings.model_copy(update={"db_pool_size": 2})
    pool = await db.create_pool(settings)
    partner = FakePartner("https://pool.example/fhir")
    await add_partner(client, "ppool", partner.base)
    task_id = await make_referral(client, "ppool", suffix="-pool")
    task = (await client.get(f"/fhir/Task/{task_id}")).json()
    cancelled = {**task, "status": "cancelled", "statusReason": {"text": "Client moved"}}
    assert (await client.put(f"/fhir/Task/{task_id}", json=cancelled, headers=JSON)).status_code == 200

    async def delivery_done() -> bool:
        return bool((await jobs(app, task_id))["deliver"]["state"] == "done")

    async with partner_http(partner) as http:
        worker = Worker(pool, http, settings, name="small-pool")
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            await wait_until(delivery_done, "the delivery to finish on a pool of two", timeout=8)
        finally:
            stop.set()
            done, _ = await asyncio.wait({running}, timeout=3)
            if not done:
                running.cancel()
            pool.terminate()
    assert await delivery_done()
    assert done, "the worker hung"


async def test_a_lost_lease_on_a_failed_attempt_does_not_escape_run_once(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """LOW. run_job catches LeaseLost from the handler, and from _failed_attempt after an
    unexpected error, but not from _failed_attempt after a DeliveryError: it escapes
    asyncio.gather, run() logs an error and goes on while the batch's other jobs still run
    (more than worker_concurrency jobs at once).

    The first worker's lease really runs out: its renewals stop (as when its event loop stalls
    or the database is out of reach), the test waits until the lease has expired, a second
    worker takes the job over, and only then does the partner answer the first one's attempt."""
    partner = FakePartner("https://ll.example/fhir")
    await add_partner(client, "pll", partner.base)
    release = threading.Event()
    released: list[bool] = []

    async def slow_500(request: httpx.Request) -> httpx.Response:
        partner.requests.append((request.method, str(request.url)))
        if len(partner.requests) == 1:  # the first worker's attempt: held until l2 has run
            released.append(await asyncio.to_thread(release.wait, 30))
        return httpx.Response(500)

    async def no_renewal(job: Any) -> None:
        await asyncio.Event().wait()  # until run_job cancels it

    partner.handler = slow_500
    async with partner_http(partner) as http:
        first = make_worker(app, http, name="l1", worker_lease=1)
        second = make_worker(app, http, name="l2", worker_lease=1)
        first.runner._keep_lease = no_renewal  # type: ignore[method-assign]
        task_id = await make_referral(client, "pll", suffix="-ll")
        running = asyncio.create_task(first.run_once())
        try:
            claimed = await wait_until(lambda: lease_until(app, task_id, "l1"), "l1 to claim the delivery")
            await wait_until(lambda: partner.requests, "l1's attempt to reach the partner")
            await wait_until(lambda: has_passed(app, claimed), "l1's lease to run out")
            assert await second.run_once() == 1, "l2 takes the expired job over"
        finally:
            release.set()
        await running  # l1's failed attempt finds its lease lost: LeaseLost must not escape
    assert released == [True]
    delivery = (await jobs(app, task_id))["deliver"]
    assert (delivery["attempts"], delivery["state"], delivery["leased_by"]) == (2, "pending", None), delivery
