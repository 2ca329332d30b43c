"""Subscription notifications from real ``carecoord worker`` processes (the API runs in-process
without a worker, as ``serve --no-worker`` does) to a real loopback receiver
(tests/partner_support.py MisbehavingServer).

* A worker SIGKILLed while a notification is in flight (the receiver holds the request): when
  its lease runs out another worker sends the same events again, under the same numbers, and
  every number arrives.
* Three workers on one database: 300 events reach each subscription numbered 1..300, each
  exactly once (the receiver always answers, so no answer is lost and nothing is resent).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests import REPO_ROOT
from tests.conftest import FHIR
from tests.partner_support import Hang, MisbehavingServer, Reply, misbehaving_server_fixture
from tests.test_referral_workers import WorkerProcesses
from tests.test_subscriptions import (
    bundles,
    create_subscription,
    event_numbers,
    status_of,
    subscription,
    subscription_status,
    task,
    wait_until,
)

misbehaving_server = misbehaving_server_fixture

LEASE = 2
"""CARECOORD_WORKER_LEASE of the workers: a killed worker's job is taken over this soon."""


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[WorkerProcesses]:
    """``carecoord worker`` processes, stopped (SIGTERM, then SIGKILL) and reaped at the end."""
    processes = WorkerProcesses(database_url, tmp_path, CARECOORD_WORKER_LEASE=str(LEASE))
    try:
        yield processes
    finally:
        processes.stop()


def delivered_events(bundle: dict[str, Any]) -> list[tuple[int, str, str]]:
    """(event number, Task id, version) of each event of a full-resource notification."""
    status = status_of(bundle)
    if status["type"] != "event-notification":
        return []
    numbers = [int(e["event-number"]) for e in status["notification-event"]]
    resources = [entry["resource"] for entry in bundle["entry"][1:]]
    assert len(numbers) == len(resources)
    return [(n, r["id"], r["meta"]["versionId"]) for n, r in zip(numbers, resources, strict=True)]


def worker_logs(workers: WorkerProcesses) -> str:
    return "\n".join(
        f"{path.name}: {path.read_text(errors='replace')[-1500:]}"
        for path in sorted(workers.workdir.glob("worker-*.log"))
    )


async def job_state(app: FastAPI, subscription_id: str) -> str | None:
    state: str | None = await app.state.pool.fetchval(
        "SELECT state FROM job WHERE kind = 'subscription' AND key = 'notify:' || $1"
        " AND state IN ('pending', 'leased') ORDER BY id DESC LIMIT 1",
        subscription_id,
    )
    return state


async def test_a_worker_killed_mid_notification_is_replaced_and_every_number_arrives(
    app: FastAPI, client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, workers: WorkerProcesses
) -> None:
    server = misbehaving_server
    # The handshake is answered; the first notification is held (no answer) until the test
    # ends; every later request is answered.
    server.script("/held", Reply(200), Hang(120), Reply(200))
    subscription_id = await create_subscription(
        client, subscription(server.url("/held"), content="full-resource", timeout=60)
    )
    first = workers.start()

    async def active() -> bool:
        return await subscription_status(client, subscription_id) == "active"

    await wait_until(active, "the first worker's handshake", timeout=90)
    before = [(await client.post(f"{FHIR}/Task", json=task())).json()["id"] for _ in range(5)]

    async def in_flight() -> bool:
        return len(server.requests_to("/held")) >= 2 and await job_state(app, subscription_id) == "leased"

    await wait_until(in_flight, "the first notification to be held at the receiver", timeout=60)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # Written while no worker runs: the next worker numbers them after the first five.
    after = [(await client.post(f"{FHIR}/Task", json=task())).json()["id"] for _ in range(5)]
    workers.start()
    total = len(before) + len(after)

    def acknowledged() -> list[tuple[int, str, str]]:
        # Requests 0 and 1 are the handshake and the held notification; the rest were answered.
        return [event for bundle in bundles(server, "/held")[2:] for event in delivered_events(bundle)]

    await wait_until(
        lambda: len(acknowledged()) >= total, "every event from the second worker", timeout=120
    )
    answered = acknowledged()
    assert [n for n, _, _ in answered] == list(range(1, total + 1)), worker_logs(workers)
    assert {task_id for _, task_id, _ in answered} == set(before + after)
    held = delivered_events(bundles(server, "/held")[1])
    assert held, "the held request was an event notification"
    # The held events were sent again under the same numbers: same number, same version.
    assert set(held) <= set(answered)
    assert [n for n, _, _ in held] == list(range(1, len(held) + 1))

    async def recorded() -> bool:
        # The receiver answered before the worker recorded it: wait for the record.
        row = await app.state.pool.fetchrow(
            "SELECT events_count, delivered_through FROM subscription WHERE fhir_id = $1", subscription_id
        )
        return (row["events_count"], row["delivered_through"]) == (total, total)

    await wait_until(recorded, "delivered_through to reach the last event")
    attempts = await app.state.pool.fetchval(
        "SELECT max(attempts) FROM job WHERE kind = 'subscription' AND key = 'notify:' || $1",
        subscription_id,
    )
    assert attempts >= 2  # the killed attempt, then the one that took the job over


async def test_three_workers_deliver_300_events_once_each_in_order(
    app: FastAPI,
    client: httpx.AsyncClient,
    misbehaving_server: MisbehavingServer,
    workers: WorkerProcesses,
    database_url: str,
) -> None:
    server = misbehaving_server
    paths = ("/one", "/two", "/three")
    ids = {}
    for path in paths:
        server.script(path, Reply(200))
        # Small notifications, so that the work changes hands between the workers many times.
        ids[path] = await create_subscription(
            client, subscription(server.url(path), content="full-resource", max_count=7)
        )
    for _ in range(3):
        workers.start()

    async def all_active() -> bool:
        states = [await subscription_status(client, s) for s in ids.values()]
        return all(s == "active" for s in states)

    await wait_until(all_active, "the three handshakes", timeout=90)
    tasks = [(await client.post(f"{FHIR}/Task", json=task())).json() for _ in range(30)]

    async def update(resource: dict[str, Any]) -> None:
        for round_number in range(9):
            body = {**resource, "description": f"round {round_number}"}
            response = await client.put(f"{FHIR}/Task/{resource['id']}", json=body)
            assert response.status_code == 200, response.text

    await asyncio.gather(*(update(t) for t in tasks))  # 30 creates + 270 updates
    total = 300
    for path in paths:
        await wait_until(
            lambda path=path: len(event_numbers(server, path)) >= total,
            f"{total} events at {path}",
            timeout=180,
        )
    for path in paths:
        events = [event for bundle in bundles(server, path) for event in delivered_events(bundle)]
        assert [n for n, _, _ in events] == list(range(1, total + 1)), (path, worker_logs(workers))
        versions: dict[str, list[int]] = {}
        for _, task_id, version in events:
            versions.setdefault(task_id, []).append(int(version))
        assert len(versions) == 30 and all(v == list(range(1, 11)) for v in versions.values())
    assert all(process.poll() is None for process in workers.processes), worker_logs(workers)

    # The command line agrees: everything delivered, nothing waiting.
    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app.cli", "subscriptions", "list", "--json"],
        cwd=REPO_ROOT,
        env=_cli_env(database_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    rows = {row["id"]: row for row in json.loads(listed.stdout)}
    for subscription_id in ids.values():
        row = rows[subscription_id]
        assert (row["status"], row["events_count"], row["delivered_through"]) == ("active", total, total)
        assert (row["lag_events"], row["lag_seconds"], row["failures"]) == (0, None, 0)


def _cli_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CARECOORD_DATABASE_URL"}
    env["DATABASE_URL"] = database_url
    return env
