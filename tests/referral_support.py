"""Scripted partner FHIR servers for the referral worker tests (test_referrals.py,
test_referral_workers.py, test_partner_data.py, ...).

The partners are scripted FHIR servers behind one real HTTP server on loopback (uvicorn in a
thread; each partner under its own path), so the worker talks real HTTP; jobs are run with
``Worker.run_once`` (``run_due``) so that every interleaving is deterministic.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from app.referrals.worker import Worker
from tests.partner_support import free_port

Handler = Callable[[httpx.Request], httpx.Response]


class _Loopback:
    """One real HTTP server on 127.0.0.1 (uvicorn in a thread) playing every FakePartner: a
    request to ``/{name}/fhir/...`` goes to the partner registered as ``name``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.partners: dict[str, FakePartner] = {}
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off", interface="asgi3"
        )
        self.server = uvicorn.Server(config)
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the loopback partner server did not start"
            time.sleep(0.02)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"].decode()
        url = f"http://127.0.0.1:{self.port}{scope['path']}" + (f"?{query}" if query else "")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        request = httpx.Request(scope["method"], url, headers=headers, content=body)
        partner = self.partners.get(scope["path"].split("/")[1])
        response = await partner.respond(request) if partner else httpx.Response(404)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in response.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding")
                ],
            }
        )
        await send({"type": "http.response.body", "body": response.content})


_loopback: list[_Loopback] = []


def loopback() -> _Loopback:
    if not _loopback:
        _loopback.append(_Loopback())
    return _loopback[0]


class FakePartner:
    """A partner FHIR server named after ``hint``'s host, served over real HTTP on loopback:
    accepts the delivery transaction (its Task is ``Task/{task_id}``), answers reads from
    ``resources`` and records every request. ``handler`` replaces its behaviour (slow or
    failing partners)."""

    def __init__(self, hint: str, task_id: str = "remote-1") -> None:
        server = loopback()
        name = httpx.URL(hint).host
        server.partners[name] = self
        self.base = f"http://127.0.0.1:{server.port}/{name}/fhir"
        self.handler: Callable[[httpx.Request], Awaitable[httpx.Response]] | None = None
        self.task_id = task_id
        self.resources: dict[str, dict[str, Any]] = {
            f"Task/{task_id}": {
                "resourceType": "Task",
                "id": task_id,
                "status": "requested",
                "intent": "order",
            }
        }
        self.requests: list[tuple[str, str]] = []
        self.override: dict[tuple[str, str], Handler] = {}

    async def respond(self, request: httpx.Request) -> httpx.Response:
        if self.handler is not None:
            return await self.handler(request)
        return self.handle(request) or httpx.Response(404)

    def handle(self, request: httpx.Request) -> httpx.Response | None:
        url = str(request.url)
        if not url.startswith(self.base):
            return None
        path = url[len(self.base) :].lstrip("/").split("?", 1)[0]
        self.requests.append((request.method, path))
        special = self.override.get((request.method, path))
        if special is not None:
            return special(request)
        if request.method == "POST" and path == "":
            bundle = json.loads(request.content)
            entries = [
                {
                    "response": {
                        "status": "201 Created",
                        "location": f"Task/{self.task_id}/_history/1"
                        if e["resource"]["resourceType"] == "Task"
                        else f"{e['resource']['resourceType']}/x{i}/_history/1",
                    }
                }
                for i, e in enumerate(bundle["entry"])
            ]
            return httpx.Response(
                200, json={"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
            )
        if request.method == "GET" and path in self.resources:
            return httpx.Response(200, json=self.resources[path])
        if request.method == "PUT" and path in self.resources:
            self.resources[path] = json.loads(request.content)
            return httpx.Response(200, json=self.resources[path])
        return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})


def partner_http(*partners: FakePartner) -> httpx.AsyncClient:
    """The worker's HTTP client: a real one (the partners are real servers on loopback)."""
    return httpx.AsyncClient(timeout=httpx.Timeout(10.0))


def make_worker(app: FastAPI, http: httpx.AsyncClient, name: str = "probe", **settings: Any) -> Worker:
    return Worker(app.state.pool, http, app.state.settings.model_copy(update=settings), name=name)


async def jobs(app: FastAPI, task_id: str) -> dict[str, dict[str, Any]]:
    async with app.state.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT * FROM job WHERE key = $1 AND kind LIKE 'referral.%' ORDER BY id", task_id
        )
    # The job's columns and its payload's fields (task_id, partner_task, copies, ...) by kind.
    return {
        row["kind"].removeprefix("referral."): {**dict(row), **json.loads(row["payload"])} for row in rows
    }


async def run_due(worker: Worker) -> None:
    """Make every pending job due, then run one batch."""
    async with worker.pool.acquire() as conn:
        await conn.execute("UPDATE job SET not_before = now() WHERE state = 'pending'")
    await worker.run_once()


async def deliver(app: FastAPI, client: httpx.AsyncClient, worker: Worker, org: str, suffix: str) -> str:
    from tests.test_referrals import delivery_state, make_referral  # (it imports this module)

    task_id = await make_referral(client, org, suffix=suffix)
    await run_due(worker)
    task = (await client.get(f"/fhir/Task/{task_id}")).json()
    assert delivery_state(task) == "delivered", task
    return task_id




async def lease_until(app: FastAPI, task_id: str, worker: str) -> datetime | None:
    """When the lease ``worker`` holds on the delivery of ``task_id`` runs out (None: not leased by it)."""
    async with app.state.pool.acquire() as conn:
        until: datetime | None = await conn.fetchval(
            "SELECT lease_until FROM job WHERE key = $1 AND kind = 'referral.deliver'"
            " AND state = 'leased' AND leased_by = $2",
            task_id,
            worker,
        )
    return until


async def has_passed(app: FastAPI, moment: datetime) -> bool:
    """Whether the database's clock (the one leases are judged by) has passed ``moment``."""
    async with app.state.pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT $1::timestamptz < now()", moment))


def complete(partner: FakePartner, output: str) -> None:
    """The partner completes its Task with ``output`` as its resulting activity."""
    task = partner.resources[f"Task/{partner.task_id}"]
    task["status"] = "completed"
    task["output"] = [{"type": {"text": "resulting-activity"}, "valueReference": {"reference": output}}]
