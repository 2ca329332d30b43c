"""Transaction Bundle benchmark: FHIR transactions against single creates and the raw asyncpg floor.

Run from the repository root (about 1.5-3 minutes)::

    .venv/bin/python bench/transactions.py

Option: ``--rounds N`` (default 3; medians over rounds are reported).

What it measures
----------------
The unit of work is a care-coordination referral: 1 Patient, 1 ServiceRequest, 1 Task and
2 Conditions, the entries of ``referral()`` in tests/test_bundles.py (the ServiceRequest's
subject and reasons, the Task's ``for``/``focus`` and its contained Provenance's target are
references between them). In the same run, against the same server and database:

1. **transaction**: ``POST /fhir`` with a Bundle ``type=transaction`` of the 5 entries as
   ``POST`` requests with ``urn:uuid:`` fullUrls and references (fresh urn:uuids and a fresh
   Patient identifier per Bundle); the server plans the ids, rewrites the references,
   validates and writes the 5 resources in one database transaction. Resources/s (5 per
   Bundle) and p50/p95 latency per Bundle, at concurrency 1 and 16.
2. **single create**: the same 5 resources posted one by one (``POST /fhir/Patient``, ...),
   one request and one database transaction each, at concurrency 1 and 16, in resources/s
   (p50/p95 per request). They carry no ``urn:uuid`` references to resolve; their references
   are literal (``Patient/<id>``, ...) to a Patient, ServiceRequest and 2 Conditions created
   beforehand, so that each stored resource has the same size and the same search-index rows
   as in the transaction (R4 requires ``Condition.subject`` and ``ServiceRequest.subject``
   anyway). The goal checked: transaction resources/s >= 0.5 x single-create resources/s.
3. **raw floor** of both, with asyncpg directly (a pool of 16 connections): per Bundle one
   transaction, BEGIN; 5 times the repository's own insert statement
   (``app.fhir.repository._INSERT``, an ``app.fhir.sql.Statement``: ``.sql`` and
   ``.args(params)``); COMMIT; per single create BEGIN; 1 insert; COMMIT. The rows are the
   ones the server writes: the references already rewritten to ``Type/id``, the body from
   the repository's ``stamp(data, fhir_id, 1, now)`` and the index rows from
   ``_index_params(extract(resource_type, data, fhir_base))``, as bench/crud.py does. They
   are built before the clock starts, so the floor is the database's work alone.
4. **1,000-entry transaction**: one Bundle of 200 referrals (1,000 entries, the server's
   default ``CARECOORD_MAX_BUNDLE_ENTRIES``), latency per round, median over rounds, beside
   its raw floor (one database transaction of 1,000 inserts).

Setup: a fresh database ``carecoord_bench_tx`` migrated with ``carecoord migrate``, the real
server (``carecoord serve``: one uvicorn process, the default asyncpg pool) on a free port,
ready when ``GET /readyz`` answers 200; the load generator is bench/crud.py's lean keep-alive
HTTP/1.1 client (~0.1-0.2 ms of client CPU per request where httpx costs 1-3 ms, CPU that
would otherwise be taken from the server on a 2-core machine). Every scenario runs once per
round; per concurrency the transaction and single-create API runs are adjacent (the goal's
ratio compares runs made under the same conditions of this noisy machine), with their raw
floors around them, and which kind goes first and API/raw order alternate between rounds.
Request bodies and raw rows are generated before the clock starts, and the server's
responses are checked (200 with one ``201 Created`` per entry; 201 per single create). The
server is stopped and the database dropped at the end, also on failure.

Why ratios
----------
Absolute figures depend on the machine (here a small shared VM where the load generator, the
server and PostgreSQL compete for the same cores). Two ratios are portable: transaction /
single-create resources/s, the issue's goal (a transaction saves 4 HTTP requests and 4
COMMITs per referral, and pays for reference planning and rewriting and one larger JSON
body), and API/raw, the share of the database's own capacity that survives the HTTP stack
(uvicorn, FastAPI, JSON parsing, FHIR validation, reference rewriting): near 1 means the
database is the limit, small means the Python layer is. Client and server CPU per resource
are printed because the client's CPU is taken from the server it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

# bench/crud.py is importable because Python puts this script's directory on sys.path.
from crud import (
    LeanClient,
    RunStats,
    bench_database,
    cpu_line,
    cpu_snapshot,
    drive,
    loop_name,
    med,
    now_ms,
    print_report,
    repository_function,
    repository_statement,
    runner_run,
)

from app.fhir import jsonio
from app.fhir.indexing import extract
from app.settings import Settings

BENCH_DB = "carecoord_bench_tx"
ROUNDS = 3
CONCURRENCY = (1, 16)
ENTRIES = 5
"""Resources per referral Bundle."""
RESOURCES = {1: 750, 16: 2500}
"""Resources written per scenario, side and round, by concurrency (a multiple of ENTRIES)."""
BIG_REFERRALS = 200
"""Referrals in the large transaction: 200 x 5 = 1,000 entries."""
WARMUP_BUNDLES = 80
RAW_POOL_SIZE = max(CONCURRENCY)
MRN = "http://hospital.example.org/mrn"
SERVER_POOL = Settings.model_fields["db_pool_size"].default
MAX_ENTRIES = Settings.model_fields["max_bundle_entries"].default

Op = Callable[[], Awaitable[None]]

# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Refs:
    """What the referral's resources call each other: urn:uuids in a Bundle, Type/id once stored."""

    patient: str
    request: str
    task: str
    condition_1: str
    condition_2: str

    def ordered(self) -> tuple[str, str, str, str, str]:
        return (self.patient, self.request, self.task, self.condition_1, self.condition_2)


def referral_resources(mrn: str, refs: Refs) -> list[dict[str, Any]]:
    """Patient, ServiceRequest, Task, Condition, Condition: ``referral()`` of tests/test_bundles.py."""
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": "Okafor"}],
    }
    service_request = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {"text": "Housing navigation"},
        "subject": {"reference": refs.patient},
        "reasonReference": [{"reference": refs.condition_1}, {"reference": refs.condition_2}],
        "extension": [
            {"url": "http://example.org/pertains-to", "valueReference": {"reference": refs.condition_1}}
        ],
    }
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "focus": {"reference": refs.request},
        "for": {"reference": refs.patient},
        "contained": [
            {
                "resourceType": "Provenance",
                "id": "p1",
                "recorded": "2026-01-01T00:00:00Z",
                "target": [{"reference": refs.request}],
                "agent": [{"who": {"display": "Case manager"}}],
            }
        ],
    }
    conditions = [
        {"resourceType": "Condition", "subject": {"reference": refs.patient}, "code": {"text": text}}
        for text in ("Housing instability", "Food insecurity")
    ]
    return [patient, service_request, task, *conditions]


def fresh_mrn() -> str:
    return f"tx-{uuid.uuid4().hex}"


def urn_refs() -> Refs:
    return Refs(*(f"urn:uuid:{uuid.uuid4()}" for _ in range(ENTRIES)))


def transaction_entries(referrals: int) -> list[dict[str, Any]]:
    """``referrals`` referrals as POST entries with fresh urn:uuid fullUrls and a fresh MRN each."""
    entries = []
    for _ in range(referrals):
        refs = urn_refs()
        for full_url, resource in zip(refs.ordered(), referral_resources(fresh_mrn(), refs), strict=True):
            entries.append(
                {
                    "fullUrl": full_url,
                    "resource": resource,
                    "request": {"method": "POST", "url": resource["resourceType"]},
                }
            )
    return entries


def transaction_body(referrals: int = 1) -> bytes:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": transaction_entries(referrals)}
    return json.dumps(bundle, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- the API side


class ServerError(RuntimeError):
    """The server refused a valid request: the request and the response are in the message."""


def refused(what: str, body: bytes, status: int, answer: bytes) -> ServerError:
    request = body.decode(errors="replace")
    if len(request) > 3000:
        request = f"{request[:3000]}... ({len(body)} bytes)"
    return ServerError(
        f"{what} answered {status}\n--- request body ---\n{request}\n"
        f"--- response body ---\n{answer[:3000].decode(errors='replace')}"
    )


CREATED = b'"status":"201 Created"'


class ApiSide:
    def __init__(self, client: LeanClient, targets: Refs) -> None:
        self.client = client
        self.targets = targets  # literal references (Type/id) to stored resources, for single creates
        self.last_response_bytes = 0

    async def post_transaction(self, body: bytes, entries: int) -> None:
        reply = await self.client.request("POST", "/fhir", body)
        if reply.status != 200 or reply.body.count(CREATED) != entries:
            raise refused(f"transaction of {entries} entries", body, reply.status, reply.body)
        self.last_response_bytes = len(reply.body)

    def transactions(self, bundles: int) -> Op:
        bodies = [transaction_body() for _ in range(bundles)]

        async def op() -> None:
            await self.post_transaction(bodies.pop(), ENTRIES)

        return op

    def single_creates(self, resources: int) -> Op:
        requests: list[tuple[str, bytes]] = []
        while len(requests) < resources:
            for resource in referral_resources(fresh_mrn(), self.targets):
                body = json.dumps(resource, separators=(",", ":")).encode()
                requests.append((f"/fhir/{resource['resourceType']}", body))
        del requests[resources:]
        requests.reverse()  # popped from the end: Patient, ServiceRequest, Task, Condition, Condition

        async def op() -> None:
            path, body = requests.pop()
            reply = await self.client.request("POST", path, body)
            if reply.status != 201:
                raise refused(f"POST {path}", body, reply.status, reply.body)

        return op


async def create_targets(api_client: LeanClient) -> Refs:
    """One referral through a transaction; its stored resources are the single creates' targets."""
    body = transaction_body()
    reply = await api_client.request("POST", "/fhir", body)
    if reply.status != 200 or reply.body.count(CREATED) != ENTRIES:
        raise refused("transaction of 5 entries", body, reply.status, reply.body)
    locations = [entry["response"]["location"] for entry in json.loads(reply.body)["entry"]]
    return Refs(*("/".join(location.split("/")[:2]) for location in locations))


# --------------------------------------------------------------------------- the raw side


class RawSide:
    """The server's rows through asyncpg directly, built by the server's own functions."""

    def __init__(self, pool: asyncpg.Pool, fhir_base: str, targets: Refs) -> None:
        self.pool = pool
        self.fhir_base = fhir_base
        self.targets = targets
        self.stamp = repository_function("stamp")
        self.index_params = repository_function("_index_params")
        sample = self.index_params(extract("Patient", {"resourceType": "Patient"}, fhir_base))
        statement = repository_statement(
            "_INSERT", {"rtype", "fid", "ts", "body", "method", "org", "bookkeeping", *sample}
        )
        self.insert_sql = statement.sql
        self.insert_args = statement.args

    def rows(self, resource_type: str, fhir_id: str, resource: dict[str, Any]) -> list[Any]:
        """The insert's arguments for one resource, as the server's create builds them."""
        # The resource as the server holds it after parsing the request body (Decimal-preserving).
        data: dict[str, Any] = jsonio.loads(jsonio.dumps(resource))
        moment = now_ms()
        index: dict[str, Any] = self.index_params(extract(resource_type, data, self.fhir_base))
        params = {
            "rtype": resource_type,
            "fid": fhir_id,
            "ts": moment,
            "body": self.stamp(data, fhir_id, 1, moment),
            "method": "POST",
            "org": None,
            "bookkeeping": False,  # a client's write, not carecoord's own record (change feed)
            **index,
        }
        return self.insert_args(params)

    def referral_rows(self) -> list[list[Any]]:
        """The 5 inserts of one transaction Bundle: fresh ids, references rewritten to Type/id."""
        types = ("Patient", "ServiceRequest", "Task", "Condition", "Condition")
        ids = [str(uuid.uuid4()) for _ in types]
        refs = Refs(*(f"{rtype}/{fid}" for rtype, fid in zip(types, ids, strict=True)))
        resources = referral_resources(fresh_mrn(), refs)
        return [
            self.rows(rtype, fid, resource)
            for rtype, fid, resource in zip(types, ids, resources, strict=True)
        ]

    def single_rows(self) -> list[list[Any]]:
        """The 5 resources of a referral as single creates (literal references to the targets)."""
        return [
            self.rows(resource["resourceType"], str(uuid.uuid4()), resource)
            for resource in referral_resources(fresh_mrn(), self.targets)
        ]

    def count_index_rows(self) -> int:
        """Search-index rows of one referral (5 resources)."""
        total = 0
        for resource in referral_resources(fresh_mrn(), self.targets):
            index = self.index_params(extract(resource["resourceType"], resource, self.fhir_base))
            total += sum(len(values) for name, values in index.items() if name.endswith("_param"))
        return total

    async def write(self, inserts: Sequence[list[Any]]) -> None:
        """BEGIN; the repository's insert once per resource; COMMIT."""
        async with self.pool.acquire() as conn, conn.transaction():
            for args in inserts:
                if await conn.fetchrow(self.insert_sql, *args) is None:
                    raise RuntimeError("raw insert wrote no row")

    def transactions(self, bundles: int) -> Op:
        queue = [self.referral_rows() for _ in range(bundles)]

        async def op() -> None:
            await self.write(queue.pop())

        return op

    def single_creates(self, resources: int) -> Op:
        queue: list[list[Any]] = []
        while len(queue) < resources:
            queue.extend(self.single_rows())
        del queue[resources:]

        async def op() -> None:
            await self.write([queue.pop()])

        return op


# --------------------------------------------------------------------------- the benchmark

SCENARIOS: tuple[tuple[str, int], ...] = tuple(
    (kind, c) for kind in ("transaction", "single") for c in CONCURRENCY
)
LABELS = {"transaction": "transaction (5/Bundle)", "single": "single create"}


@dataclass(frozen=True)
class BigRun:
    seconds: float
    server_cpu_s: float = 0.0


@dataclass
class Results:
    api: dict[tuple[str, int], list[RunStats]] = field(default_factory=dict)
    raw: dict[tuple[str, int], list[RunStats]] = field(default_factory=dict)
    big_api: list[BigRun] = field(default_factory=list)
    big_raw: list[BigRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def ops_for(kind: str, concurrency: int) -> int:
    """Timed operations: Bundles for transactions, requests (= resources) for single creates."""
    return RESOURCES[concurrency] // (ENTRIES if kind == "transaction" else 1)


def per_resource(kind: str) -> int:
    return ENTRIES if kind == "transaction" else 1


async def big_api(api: ApiSide, server_pid: int) -> BigRun:
    body = transaction_body(BIG_REFERRALS)
    before = cpu_snapshot(server_pid)
    await api.post_transaction(body, BIG_REFERRALS * ENTRIES)
    after = cpu_snapshot(server_pid)
    return BigRun(after.wall - before.wall, after.server - before.server)


async def big_raw(raw: RawSide) -> BigRun:
    inserts = [args for _ in range(BIG_REFERRALS) for args in raw.referral_rows()]
    started = time.perf_counter()
    await raw.write(inserts)
    return BigRun(time.perf_counter() - started)


async def run_benchmark(base_url: str, raw_dsn: str, server_pid: int, rounds: int) -> Results:
    url = urlsplit(base_url)
    client = LeanClient(url.hostname or "127.0.0.1", url.port or 80)
    results = Results()
    try:
        targets = await create_targets(client)
        api = ApiSide(client, targets)
        async with asyncpg.create_pool(
            raw_dsn,
            min_size=RAW_POOL_SIZE,
            max_size=RAW_POOL_SIZE,
            server_settings={"application_name": "carecoord-bench-tx", "timezone": "UTC"},
        ) as pool:
            raw = RawSide(pool, f"{base_url}/fhir", targets)
            await measure(api, raw, results, server_pid, rounds)
    finally:
        await client.aclose()
    return results


async def measure(api: ApiSide, raw: RawSide, results: Results, server_pid: int, rounds: int) -> None:
    # Warm-up: fill both pools, prepare the statements on every connection, load the validator.
    top = max(CONCURRENCY)
    await drive(api.transactions(WARMUP_BUNDLES), WARMUP_BUNDLES, top)
    await drive(api.single_creates(WARMUP_BUNDLES * ENTRIES), WARMUP_BUNDLES * ENTRIES, top)
    await drive(raw.transactions(WARMUP_BUNDLES), WARMUP_BUNDLES, top)
    await drive(raw.single_creates(WARMUP_BUNDLES), WARMUP_BUNDLES, top)
    one = transaction_body()
    results.notes.append(
        f"one referral Bundle: {len(one)} bytes posted, {api.last_response_bytes} bytes answered; "
        f"{raw.count_index_rows()} search-index rows per referral (5 resources)"
    )
    for round_no in range(rounds):
        first, second = ("transaction", "single") if round_no % 2 == 0 else ("single", "transaction")
        # The two API runs of a concurrency are adjacent, so the goal's ratio compares runs made under
        # the same machine conditions; which kind goes first, and API/raw order, alternate by round.
        runs = ((first, "raw"), (first, "api"), (second, "api"), (second, "raw"))
        for concurrency in CONCURRENCY:
            for kind, side in runs:
                ops = ops_for(kind, concurrency)
                if side == "api":
                    op = api.transactions(ops) if kind == "transaction" else api.single_creates(ops)
                    stats = await drive(op, ops, concurrency, server_pid)
                    results.api.setdefault((kind, concurrency), []).append(stats)
                else:
                    op = raw.transactions(ops) if kind == "transaction" else raw.single_creates(ops)
                    stats = await drive(op, ops, concurrency)
                    results.raw.setdefault((kind, concurrency), []).append(stats)
        order = ("api", "raw") if round_no % 2 == 0 else ("raw", "api")
        for side in order:
            if side == "api":
                results.big_api.append(await big_api(api, server_pid))
            else:
                results.big_raw.append(await big_raw(raw))
        print(f"round {round_no + 1}/{rounds} done", flush=True)
    results.notes.append(
        f"{BIG_REFERRALS * ENTRIES:,}-entry Bundle: {len(transaction_body(BIG_REFERRALS))} bytes posted, "
        f"{api.last_response_bytes} bytes answered"
    )


# --------------------------------------------------------------------------- setup and teardown


def other_benchmarks() -> list[str]:
    """Command lines of other running bench/ scripts (they would share the cores)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        command = " ".join(a.decode(errors="replace") for a in argv if a)
        if "python" in command and "bench/" in command:
            found.append(f"pid {entry.name}: {command[:120]}")
    return found


def machine_info(pg_version: str, rounds: int) -> list[str]:
    others = other_benchmarks()
    return [
        cpu_line(),
        f"PostgreSQL: {pg_version}",
        f"Python {platform.python_version()}, asyncpg {asyncpg.__version__}, {loop_name()} loop; "
        "load generator: bench/crud.py's lean keep-alive HTTP/1.1 client",
        f"server: 1 uvicorn process, asyncpg pool of up to {SERVER_POOL} connections (default), "
        f"max_bundle_entries {MAX_ENTRIES}; raw: asyncpg pool of {RAW_POOL_SIZE}",
        f"per scenario, side and round: {RESOURCES[1]} resources at c=1, {RESOURCES[16]} at c=16 "
        f"({RESOURCES[1] // ENTRIES}/{RESOURCES[16] // ENTRIES} Bundles); {rounds} rounds, API/raw order "
        f"alternating, medians reported; warm-up {WARMUP_BUNDLES} Bundles + {WARMUP_BUNDLES * ENTRIES} "
        "single creates at c=16",
        "other bench processes at start: " + ("; ".join(others) if others else "none"),
    ]


# --------------------------------------------------------------------------- report


def res_per_s(kind: str, runs: Sequence[RunStats]) -> float:
    return med(runs, "ops_per_s") * per_resource(kind)


def report(results: Results) -> list[str]:
    header = (
        f"{'scenario':<22} {'c':>3} | {'API res/s':>9} {'p50 ms':>7} {'p95 ms':>7} | "
        f"{'raw res/s':>9} {'p50 ms':>7} {'p95 ms':>7} | {'API/raw res/s':>13} {'API/raw p50':>11}"
    )
    out = [header, "-" * len(header)]
    for kind, c in SCENARIOS:
        api, raw = results.api[(kind, c)], results.raw[(kind, c)]
        a_res, r_res = res_per_s(kind, api), res_per_s(kind, raw)
        a50, r50 = med(api, "p50_ms"), med(raw, "p50_ms")
        out.append(
            f"{LABELS[kind]:<22} {c:>3} | {a_res:>9.0f} {a50:>7.2f} {med(api, 'p95_ms'):>7.2f} | "
            f"{r_res:>9.0f} {r50:>7.2f} {med(raw, 'p95_ms'):>7.2f} | "
            f"{a_res / r_res:>13.3f} {a50 / r50:>10.1f}x"
        )
    out += [
        "res/s = resources written per second (5 per transaction Bundle); latency is per Bundle for",
        "transactions and per request for single creates. raw = BEGIN; repository _INSERT once per",
        "resource (5 per Bundle, 1 per single create); COMMIT, through asyncpg.",
        "",
        "Goal: transaction res/s >= 0.5 x single-create res/s (medians; per round in brackets)",
    ]
    for c in CONCURRENCY:
        tx, single = results.api[("transaction", c)], results.api[("single", c)]
        ratio = res_per_s("transaction", tx) / res_per_s("single", single)
        rounds = "/".join(
            f"{t.ops_per_s * ENTRIES / s.ops_per_s:.2f}" for t, s in zip(tx, single, strict=True)
        )
        raw_ratio = res_per_s("transaction", results.raw[("transaction", c)]) / res_per_s(
            "single", results.raw[("single", c)]
        )
        out.append(
            f"  c={c:<3} {res_per_s('transaction', tx):>6.0f} / {res_per_s('single', single):>6.0f} res/s = "
            f"{ratio:.2f} [{rounds}]  {'MET' if ratio >= 0.5 else 'NOT MET'}  "
            f"(raw floor: transaction/single = {raw_ratio:.2f})"
        )
    big_api_s = statistics.median(run.seconds for run in results.big_api)
    big_raw_s = statistics.median(run.seconds for run in results.big_raw)
    entries = BIG_REFERRALS * ENTRIES
    out += [
        "",
        f"{entries:,}-entry transaction ({BIG_REFERRALS} referrals x {ENTRIES} entries, one Bundle, "
        f"median of {len(results.big_api)}):",
        f"  API {big_api_s * 1000:.0f} ms [{'/'.join(f'{r.seconds * 1000:.0f}' for r in results.big_api)}] "
        f"= {entries / big_api_s:.0f} res/s; server CPU "
        f"{statistics.median(r.server_cpu_s for r in results.big_api) * 1000:.0f} ms",
        f"  raw {big_raw_s * 1000:.0f} ms [{'/'.join(f'{r.seconds * 1000:.0f}' for r in results.big_raw)}] "
        f"= {entries / big_raw_s:.0f} res/s; API/raw latency {big_api_s / big_raw_s:.1f}x",
    ]
    header2 = (
        f"{'scenario':<22} {'c':>3} | {'API res/s per round':>20} {'raw res/s per round':>20} | "
        f"{'client ms':>9} {'server ms':>9} {'client':>6} {'machine':>7}"
    )
    out += [
        "",
        "Rounds and CPU of the API runs (CPU ms per resource of the load generator and of the server",
        "process; client = share of one core used by the load generator, machine = busy share of all",
        "cores; medians):",
        header2,
        "-" * len(header2),
    ]
    for kind, c in SCENARIOS:
        api, raw = results.api[(kind, c)], results.raw[(kind, c)]
        n = per_resource(kind)
        out.append(
            f"{LABELS[kind]:<22} {c:>3} | "
            f"{'/'.join(f'{r.ops_per_s * n:.0f}' for r in api):>20} "
            f"{'/'.join(f'{r.ops_per_s * n:.0f}' for r in raw):>20} | "
            f"{med(api, 'client_cpu_ms_per_op') / n:>9.2f} {med(api, 'server_cpu_ms_per_op') / n:>9.2f} "
            f"{med(api, 'client_core_share'):>6.0%} {med(api, 'machine_busy'):>7.0%}"
        )
    out += ["", *results.notes]
    return out


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds; medians are reported")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with bench_database(BENCH_DB, f"carecoord-bench-tx-server-{os.getpid()}.log") as bench:
        bench.migrate()
        server = bench.serve(ready=True)
        print("\n".join(machine_info(bench.pg_version, args.rounds)), flush=True)
        print(f"server pid {server.pid} at {bench.base_url}, database {BENCH_DB}", flush=True)
        results = runner_run(run_benchmark(bench.base_url, bench.dsn, server.pid, args.rounds))
    print_report(report(results), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
