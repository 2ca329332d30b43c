"""Referral delivery benchmark: referrals delivered per second to a partner carecoord on
loopback, and the time from the local Task's commit to the partner's commit.

Run from the repository root (about 3 minutes)::

    .venv/bin/python bench/referrals.py [--referrals 300] [--latency-samples 40]

What it does
------------
1. Creates two fresh databases on the local PostgreSQL (``carecoord_bench_ref_a``, the
   referring carecoord A, and ``carecoord_bench_ref_b``, the partner B), and starts both as
   real servers (``carecoord serve``; A with ``--no-worker`` and authorization off, B with
   authorization on, as a partner would run it). A client is registered on B and its
   credentials are set on A with ``carecoord partners set-credentials``.
2. Floor: the same delivery Bundles (built by A's own ``referral_bundle``) POSTed straight to
   B as transactions, at concurrency 1 and 4: bundles/s (the "local transaction throughput").
3. Throughput: N referrals are created on A (one transaction each: Patient, Consent,
   Condition, ServiceRequest, Task) while no worker runs; then 1 (and then 4) ``carecoord
   worker`` processes start and the time until every delivery job is done gives deliveries/s.
4. Latency: with the workers idle (empty queue), referrals are created one at a time; for each,
   the time from A's commit of the Task (its meta.lastUpdated) to B's commit of its copy
   (the copy's meta.lastUpdated); p50/p95 at 1 and 4 workers. Both servers share one clock.
5. Prints the figures and the ratio delivery/floor (goal of issue 6: >= 0.3; p95 < 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

# bench/crud.py is importable because Python puts this script's directory on sys.path.
from crud import (
    REPO_ROOT,
    admin_url,
    carecoord_command,
    cpu_line,
    free_port,
    percentile,
    recreate_database,
    server_env,
    stop_server,
    tail,
    wait_healthy,
    with_database,
)

from app.referrals.bundle import identifier_system, referral_bundle

DB_A = "carecoord_bench_ref_a"
DB_B = "carecoord_bench_ref_b"
FULFILL = {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]}
JSON = {"content-type": "application/fhir+json"}


class Node:
    """One carecoord server (and its database) of the benchmark."""

    def __init__(self, name: str, database: str, *, auth: bool, extra_env: dict[str, str]) -> None:
        self.name = name
        self.database = database
        self.admin = admin_url()
        self.dsn = with_database(self.admin, database)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = server_env(
            self.dsn.replace("postgresql://", "postgresql+asyncpg://", 1), self.base, auth=auth
        )
        self.env["CARECOORD_DATA_DIR"] = tempfile.mkdtemp(prefix=f"carecoord-bench-{name}-")
        self.env.update(extra_env)
        self.log = Path(tempfile.gettempdir()) / f"carecoord-bench-ref-{name}-{os.getpid()}.log"
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            carecoord_command(*args),
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"carecoord {' '.join(args[:2])} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    def start(self, *extra: str) -> None:
        asyncio.run(recreate_database(self.admin, self.database, create=True))
        self.cli("migrate")
        with self.log.open("wb") as log:
            self.server = subprocess.Popen(
                carecoord_command(
                    "serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *extra
                ),
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_healthy(self.base, self.server, self.log)

    def start_workers(self, count: int) -> None:
        for _ in range(count):
            log = self.log.with_suffix(f".worker{len(self.workers)}.log").open("wb")
            self.workers.append(
                subprocess.Popen(
                    carecoord_command("worker"),
                    env=self.env,
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def wait_workers_ready(self, timeout: float = 120) -> None:
        """Until every worker has logged that it started (imports done, pool open)."""
        deadline = time.monotonic() + timeout
        for number in range(len(self.workers)):
            path = self.log.with_suffix(f".worker{number}.log")
            while "job runner" not in path.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {number} did not start:\n{tail(path)}")
                time.sleep(0.1)

    def stop_workers(self) -> None:
        for worker in self.workers:
            stop_server(worker)
        self.workers = []

    def stop(self) -> None:
        self.stop_workers()
        if self.server is not None:
            stop_server(self.server)
        asyncio.run(recreate_database(self.admin, self.database, create=False))


def referral_transaction(n: int, owner: str) -> dict[str, Any]:
    """Patient, Consent, Condition, ServiceRequest and a requested Task, as one transaction."""
    tag = uuid.uuid4().hex[:8]

    def entry(resource: dict[str, Any], key: str) -> dict[str, Any]:
        return {
            "fullUrl": f"urn:uuid:{key}",
            "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"]},
        }

    ids = {k: str(uuid.uuid4()) for k in ("p", "c", "d", "s")}
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            entry(
                {
                    "resourceType": "Patient",
                    "name": [{"family": f"Bench{n}", "given": [tag]}],
                    "gender": "female",
                    "birthDate": "1970-01-01",
                },
                ids["p"],
            ),
            entry(
                {
                    "resourceType": "Consent",
                    "status": "active",
                    "scope": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                "code": "patient-privacy",
                            }
                        ]
                    },
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                    "code": "IDSCL",
                                }
                            ]
                        }
                    ],
                    "patient": {"reference": f"urn:uuid:{ids['p']}"},
                },
                ids["c"],
            ),
            entry(
                {
                    "resourceType": "Condition",
                    "code": {"text": "Food insecurity"},
                    "subject": {"reference": f"urn:uuid:{ids['p']}"},
                },
                ids["d"],
            ),
            entry(
                {
                    "resourceType": "ServiceRequest",
                    "status": "active",
                    "intent": "order",
                    "code": {"text": "Food assistance"},
                    "subject": {"reference": f"urn:uuid:{ids['p']}"},
                    "performer": [{"reference": f"Organization/{owner}"}],
                    "supportingInfo": [{"reference": f"urn:uuid:{ids['c']}"}],
                    "reasonReference": [{"reference": f"urn:uuid:{ids['d']}"}],
                },
                ids["s"],
            ),
            entry(
                {
                    "resourceType": "Task",
                    "status": "requested",
                    "intent": "order",
                    "code": FULFILL,
                    "authoredOn": "2026-11-25",
                    "focus": {"reference": f"urn:uuid:{ids['s']}"},
                    "for": {"reference": f"urn:uuid:{ids['p']}"},
                    "requester": {"reference": "Organization/cm"},
                    "owner": {"reference": f"Organization/{owner}"},
                },
                str(uuid.uuid4()),
            ),
        ],
    }


def delivery_bundle(n: int, source_base: str) -> dict[str, Any]:
    """A delivery Bundle as A's worker builds it (A's own referral_bundle), for the floor."""
    local = {k: str(uuid.uuid4()) for k in ("t", "p", "c", "d", "s")}
    tx = referral_transaction(n, "partner")
    resources = {e["resource"]["resourceType"]: dict(e["resource"]) for e in tx["entry"]}
    key = {"Patient": "p", "Consent": "c", "Condition": "d", "ServiceRequest": "s", "Task": "t"}
    for resource_type, resource in resources.items():
        resource["id"] = local[key[resource_type]]
    text = json.dumps(resources)
    for urn, short in ((e["fullUrl"], e["resource"]["resourceType"]) for e in tx["entry"]):
        text = text.replace(urn, f"{short}/{local[key[short]]}")
    resources = json.loads(text)
    return referral_bundle(
        task=resources["Task"],
        service_request=resources["ServiceRequest"],
        patient=resources["Patient"],
        supporting=[resources["Consent"], resources["Condition"]],
        source_base=source_base,
    )


async def post_all(
    base: str, path: str, bodies: list[dict[str, Any]], concurrency: int, headers: dict[str, str]
) -> float:
    """POST every body (``concurrency`` at a time); returns the seconds it took."""
    queue = list(bodies)
    async with httpx.AsyncClient(base_url=base, headers={**JSON, **headers}, timeout=120) as http:

        async def run() -> None:
            while queue:
                body = queue.pop()
                response = await http.post(path, json=body)
                if response.status_code not in (200, 201):
                    raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")

        started = time.perf_counter()
        await asyncio.gather(*(run() for _ in range(concurrency)))
        return time.perf_counter() - started


async def wait_jobs_done(dsn: str, expected: int, limit: float = 600) -> float:
    """Seconds until ``expected`` delivery jobs are done (polling A's database)."""
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        while True:
            done = await conn.fetchval(
                "SELECT count(*) FROM job WHERE kind = 'referral.deliver' AND state = 'done'"
            )
            failed = await conn.fetchval(
                "SELECT count(*) FROM job WHERE kind = 'referral.deliver' AND state = 'failed'"
            )
            if failed:
                raise RuntimeError(f"{failed} deliveries failed")
            if done >= expected:
                return time.perf_counter() - started
            if time.perf_counter() - started > limit:
                raise RuntimeError(f"only {done}/{expected} delivered after {limit}s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def latency(a: Node, b_token: dict[str, str], b_base: str, samples: int) -> list[float]:
    """Commit-to-commit seconds of ``samples`` referrals sent one at a time to idle workers."""
    system = identifier_system(f"{a.base}/fhir")
    results = []
    async with httpx.AsyncClient(timeout=60) as http:
        for n in range(samples):
            response = await http.post(
                f"{a.base}/fhir", json=referral_transaction(n, "partner"), headers=JSON
            )
            response.raise_for_status()
            task_location = next(
                e["response"]["location"]
                for e in response.json()["entry"]
                if e["response"]["location"].startswith("Task/")
            )
            task_id = task_location.split("/")[1]
            local = (await http.get(f"{a.base}/fhir/Task/{task_id}")).json()
            committed = datetime.fromisoformat(local["meta"]["lastUpdated"].replace("Z", "+00:00"))
            deadline = time.monotonic() + 30
            while True:
                found = (
                    await http.get(
                        f"{b_base}/fhir/Task",
                        params={"identifier": f"{system}|Task/{task_id}"},
                        headers=b_token,
                    )
                ).json()
                copies = [e["resource"] for e in found.get("entry", [])]
                if copies:
                    remote = datetime.fromisoformat(copies[0]["meta"]["lastUpdated"].replace("Z", "+00:00"))
                    results.append((remote - committed).total_seconds())
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("a referral was not delivered within 30 s")
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--referrals", type=int, default=300)
    parser.add_argument("--latency-samples", type=int, default=40)
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    common = {
        "CARECOORD_LOG_LEVEL": "warning",
        "CARECOORD_SECRET_KEY": "bench-secret",
        "CARECOORD_REFERRAL_POLL_INTERVAL": "3600",
    }
    b = Node("b", DB_B, auth=True, extra_env={**common, "CARECOORD_AUTH_FAILURE_LIMIT": "100000"})
    a = Node("a", DB_A, auth=False, extra_env=common)
    try:
        b.start()
        partner = json.loads(
            b.cli("clients", "add", "--name", "carecoord-a", "--scope", "system/*.cruds", "--json")
        )
        token = httpx.post(
            f"{b.base}/auth/token",
            data={"grant_type": "client_credentials"},
            auth=(partner["client_id"], partner["client_secret"]),
        ).json()["access_token"]
        b_token = {"authorization": f"Bearer {token}"}
        a.start("--no-worker")
        with httpx.Client(base_url=f"{a.base}/fhir", headers=JSON) as http:
            http.put(
                "/Organization/cm", json={"resourceType": "Organization", "id": "cm", "name": "CM"}
            ).raise_for_status()
            http.put(
                "/Endpoint/ep-b",
                json={
                    "resourceType": "Endpoint",
                    "id": "ep-b",
                    "status": "active",
                    "address": f"{b.base}/fhir",
                    "connectionType": {
                        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                        "code": "hl7-fhir-rest",
                    },
                    "payloadType": [{"text": "FHIR R4"}],
                },
            ).raise_for_status()
            http.put(
                "/Organization/partner",
                json={
                    "resourceType": "Organization",
                    "id": "partner",
                    "name": "B",
                    "endpoint": [{"reference": "Endpoint/ep-b"}],
                },
            ).raise_for_status()
        a.cli(
            "partners",
            "set-credentials",
            "--endpoint",
            "Endpoint/ep-b",
            "--token-url",
            f"{b.base}/auth/token",
            "--client-id",
            partner["client_id"],
            f"--client-secret={partner['client_secret']}",
        )

        report: list[str] = []
        for workers in (1, 4):
            floor_bundles = [delivery_bundle(n, f"{a.base}/fhir") for n in range(args.referrals)]
            floor_s = asyncio.run(post_all(b.base, "/fhir", floor_bundles, workers, b_token))
            floor = args.referrals / floor_s
            # Referrals pile up on A with no worker running, then the workers drain the queue.
            asyncio.run(
                post_all(
                    a.base,
                    "/fhir",
                    [referral_transaction(n, "partner") for n in range(args.referrals)],
                    4,
                    {},
                )
            )
            before = asyncio.run(_sql(a.dsn, _DONE))
            # Park the queue while the workers start, so their start-up is not timed.
            asyncio.run(
                _sql(
                    a.dsn,
                    "UPDATE job SET not_before = now() + interval '1 hour'"
                    " WHERE state = 'pending' RETURNING 0",
                )
            )
            a.start_workers(workers)
            a.wait_workers_ready()
            asyncio.run(
                _sql(
                    a.dsn,
                    "WITH released AS (UPDATE job SET not_before = now()"
                    " WHERE state = 'pending' RETURNING 0)"
                    " SELECT pg_notify('jobs', 'referral.deliver')",
                )
            )
            drained = asyncio.run(wait_jobs_done(a.dsn, before + args.referrals))
            rate = args.referrals / drained
            lat = sorted(asyncio.run(latency(a, b_token, b.base, args.latency_samples)))
            a.stop_workers()
            report.append(
                f"workers={workers}: delivered {rate:6.1f} referrals/s (a queue of {args.referrals})"
                f" | floor: same Bundles POSTed to B at c={workers}: {floor:6.1f}/s"
                f" | ratio {rate / floor:.2f}"
                f" | commit->partner commit, empty queue: p50 {statistics.median(lat) * 1000:.0f} ms,"
                f" p95 {percentile(lat, 0.95) * 1000:.0f} ms ({len(lat)} samples)"
            )
            print(report[-1], flush=True)
        print()
        print("\n".join(report))
        return 0
    except BaseException:
        for node in (a, b):
            print(f"{node.name} log tail:\n{tail(node.log)}", file=sys.stderr)
        raise
    finally:
        for node in (a, b):
            node.stop()


_DONE = "SELECT count(*) FROM job WHERE kind = 'referral.deliver' AND state = 'done'"


async def _sql(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql) or 0)
    finally:
        await conn.close()


if __name__ == "__main__":
    raise SystemExit(main())
