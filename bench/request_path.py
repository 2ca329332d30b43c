"""Request path benchmark (issue 14): the five everyday requests, audit on, against their raw floors.

Run from the repository root (about 10 minutes on 2 cores; ``--quick``: about 1 minute)::

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/request_path.py

Options: ``--rounds N`` (default 3; medians over rounds), ``--quick`` (1 round of short runs on
500 Patients: a smoke run, not figures), ``--workers N`` (the second server's worker count;
default the number of cores), ``--operations create,read,...`` (a subset), ``--keep-db``.

``--profile`` measures something else: for each operation, a ``--workers 1`` server (audit on)
under load at ``--profile-concurrency`` (default 16) for ``--profile-seconds`` (default 15)
while py-spy samples it (``py-spy record --format raw``, 200 Hz; py-spy is not a
dependency of carecoord: ``.venv/bin/pip install py-spy``). It prints req/s and the server's CPU
per request, the functions with the most samples of their own (self time) and the carecoord
functions with the most samples under them (inclusive), and keeps the collapsed stacks in
``bench/results/profile-<operation>.txt`` (for ``flamegraph.pl`` or speedscope).

What it does
------------
1. Creates a fresh database ``carecoord_request_path`` (dropping it first), applies the
   migrations, and loads 2,000 Patients (bench/search.py's ``build_patient``: identifier,
   name, telecom, address) each with one CarePlan (subject the Patient, ``status`` active for
   3 in 5, completed otherwise), as the issue's peer comparison did. The rows are the write
   path's own (body by ``stamp``, index rows by ``extract``) sent with the repository's
   ``_INSERT``; then ``VACUUM (ANALYZE)``.
2. Measures five operations through HTTP with bench/crud.py's lean keep-alive client, at 1 and
   16 connections, for 3 seconds (or a request cap) per run:

   - ``create``: ``POST /fhir/Patient``, bench/crud.py's ~1.9 KB US Core Patient;
   - ``read``: ``GET /fhir/Patient/{id}`` of a random stored Patient;
   - ``identifier``: ``GET /fhir/Patient?identifier=MRN-system|MRN-value`` (one match);
   - ``careplan``: ``GET /fhir/CarePlan?subject=Patient/{id}&status=active`` (0 or 1 match);
   - ``transaction``: ``POST /fhir`` with a transaction Bundle of 3 POST entries (a Patient,
     a Condition and a CarePlan for it, ``urn:uuid`` references between them).

   against the real server (``carecoord serve``, authorization off like the other benches,
   audit ON: the default) started with ``--workers 1`` and with ``--workers N``.
3. Measures, in the same rounds and next to each API run, the raw floor of each operation with
   asyncpg directly (a pool of 16): create and read as bench/crud.py (BEGIN; the repository's
   ``_INSERT``; COMMIT / the bare ``_READ``); a search is the server's own compiled statements
   replayed (captured from ``SearchExecutor`` on the parsed request, as bench/search.py does);
   a transaction is BEGIN; the 3 ``_INSERT`` statements with the rows the server writes;
   COMMIT (bench/transactions.py). The floors are the clinical statements only: with audit on
   the server also writes each write's AuditEvent in its transaction and buffers a read's.
4. Measures the audit trail's cost: a second ``--workers 1`` server with
   ``CARECOORD_AUDIT_ENABLED=false`` runs beside the first, and its reads are measured right
   after the audited server's, at both concurrencies.
5. Rounds alternate the order of the servers, of the operations and of API and raw runs;
   medians over rounds are reported. Prints one table (operation, c, workers, req/s,
   p50/p95/p99, raw req/s, API/raw, server CPU per request) and the goal checks, and writes
   the figures to ``bench/results/request-path.json``.

Goals (issue 14, audit on): every cell >= 0.3x its raw floor at 1 connection and >= 0.25x at
16; read p99 at 1 connection <= 3x its p50; audit on keeps >= 90% of the throughput of audit
off. The machine's 2 cores are shared by the load generator, the server(s) and PostgreSQL, so
absolute figures are the machine's; the ratios are the portable figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]

# bench/crud.py (and its siblings) are importable because Python puts this script's directory
# on sys.path.
from crud import (
    REPO_ROOT,
    ApiSide,
    BenchDatabase,
    LeanClient,
    RawSide,
    RunStats,
    bench_database,
    carecoord_command,
    cores,
    cpu_line,
    cpu_snapshot,
    free_port,
    loop_name,
    patient_payload,
    percentile,
    print_report,
    repository_function,
    repository_statement,
    runner_run,
    stop_server,
    wait_healthy,
)
from search import (
    MRN_SYSTEM,
    ApiQuery,
    Captured,
    QuerySpec,
    RawQuery,
    build_patient,
    capture,
    mrn,
    stable_id,
    vacuum_analyze,
)
from transactions import RawSide as TransactionRawSide
from transactions import Refs

from app.fhir.indexing import extract
from app.settings import Settings

BENCH_DB = "carecoord_request_path"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULTS_FILE = RESULTS_DIR / "request-path.json"
PATIENTS = 2000
QUICK_PATIENTS = 500
ROUNDS = 3
CONCURRENCY = (1, 16)
RUN_SECONDS = 3.0
QUICK_SECONDS = 0.6
WARMUP_SECONDS = 1.5
MAX_OPS = {1: 3000, 16: 8000}
"""Requests per run at most (a run also stops after RUN_SECONDS)."""
MAX_TRANSACTIONS = {1: 600, 16: 1500}
"""Transactions per run at most: the raw floor's rows are built before its clock starts."""
RAW_POOL_SIZE = max(CONCURRENCY)
PARAM_SETS = 64
SERVER_POOL = Settings.model_fields["db_pool_size"].default

OPERATIONS = ("create", "read", "identifier", "careplan", "transaction")
LABELS = {
    "create": "create Patient",
    "read": "read Patient",
    "identifier": "Patient?identifier=",
    "careplan": "CarePlan?subject=&status=",
    "transaction": "transaction, 3 entries",
}
GOAL_RATIO = {1: 0.3, 16: 0.25}
GOAL_READ_TAIL = 3.0
GOAL_AUDIT = 0.9

Op = Callable[[], Awaitable[None]]


# --------------------------------------------------------------------------- measurement


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants (uvicorn's workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(stat[11]) + int(stat[12])
        pending.extend(int(child) for child in children)
    return total / ticks


async def drive(op: Op, concurrency: int, seconds: float, limit: int, server_pid: int | None) -> RunStats:
    """``op`` from ``concurrency`` tasks until ``seconds`` have passed or ``limit`` ops were issued
    (bench/crud.py's ``drive`` with a time bound, and the CPU of the server's whole process tree)."""
    latencies: list[float] = []
    issued = 0
    before = cpu_snapshot(None)
    server_before = _tree_cpu(server_pid) if server_pid else 0.0
    deadline = before.wall + seconds

    async def worker() -> None:
        nonlocal issued
        while issued < limit and time.perf_counter() < deadline:
            issued += 1
            started = time.perf_counter()
            await op()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    after = cpu_snapshot(None)
    server_cpu = (_tree_cpu(server_pid) - server_before) if server_pid else 0.0
    wall = after.wall - before.wall
    done = len(latencies)
    latencies.sort()
    machine_total = after.machine_total - before.machine_total
    return RunStats(
        ops_per_s=done / wall,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p95_ms=percentile(latencies, 0.95) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        client_cpu_ms_per_op=(after.client - before.client) / done * 1000,
        server_cpu_ms_per_op=server_cpu / done * 1000,
        client_core_share=(after.client - before.client) / wall,
        machine_busy=(after.machine_busy - before.machine_busy) / machine_total if machine_total else 0.0,
    )


# --------------------------------------------------------------------------- data


def careplan(p: int, patient_id: str) -> dict[str, Any]:
    """Patient p's CarePlan: active for 3 patients in 5, completed otherwise."""
    return {
        "resourceType": "CarePlan",
        "status": "active" if p % 5 < 3 else "completed",
        "intent": "plan",
        "category": [
            {"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/careplan-category",
                         "code": "assess-plan"}]}
        ],
        "title": f"Care plan for patient {p}",
        "subject": {"reference": f"Patient/{patient_id}"},
        "period": {"start": "2026-01-15"},
    }  # fmt: skip


async def preload(dsn: str, fhir_base: str, patients: int) -> list[str]:
    """``patients`` Patients with a CarePlan each, as the write path stores them; their ids."""
    stamp = repository_function("stamp")
    index_params = repository_function("_index_params")
    sample = index_params(extract("Patient", {"resourceType": "Patient"}, fhir_base))
    insert = repository_statement(
        "_INSERT", {"rtype", "fid", "ts", "body", "method", "org", "bookkeeping", *sample}
    )
    moment = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    ids: list[str] = []
    rows: list[list[Any]] = []
    for p in range(patients):
        patient_id = stable_id("Patient", p)
        ids.append(patient_id)
        for rtype, fid, data in (
            ("Patient", patient_id, build_patient(p, moment)),
            ("CarePlan", stable_id("CarePlan", p), careplan(p, patient_id)),
        ):
            params = {
                "rtype": rtype,
                "fid": fid,
                "ts": moment,
                "body": stamp(data, fid, 1, moment),
                "method": "POST",
                "org": None,
                "bookkeeping": False,
                **index_params(extract(rtype, data, fhir_base)),
            }
            rows.append(insert.args(params))
    conn = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "off", "timezone": "UTC"})
    try:
        async with conn.transaction():
            await conn.executemany(insert.sql, rows)
    finally:
        await conn.close()
    await vacuum_analyze(dsn)
    return ids


def transaction_body() -> bytes:
    """A transaction of 3 POST entries: a Patient, a Condition and a CarePlan about it."""
    patient, condition, plan = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    resources = transaction_resources(f"rp-{uuid.uuid4().hex}", patient, condition)
    entries = [
        {"fullUrl": url, "resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
        for url, resource in zip((patient, condition, plan), resources, strict=True)
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return json.dumps(bundle, separators=(",", ":")).encode()


def transaction_resources(value: str, patient: str, condition: str) -> list[dict[str, Any]]:
    return [
        {
            "resourceType": "Patient",
            "identifier": [{"system": MRN_SYSTEM, "value": value}],
            "name": [{"family": "Okafor", "given": ["Ada"]}],
            "birthDate": "1961-03-14",
        },
        {
            "resourceType": "Condition",
            "subject": {"reference": patient},
            "code": {"text": "Housing instability"},
        },
        {
            "resourceType": "CarePlan",
            "status": "active",
            "intent": "plan",
            "subject": {"reference": patient},
            "addresses": [{"reference": condition}],
            "title": "Housing navigation",
        },
    ]


CREATED = b'"status":"201 Created"'


# --------------------------------------------------------------------------- the two sides


class Api:
    """The five operations through one server."""

    def __init__(
        self, client: LeanClient, base_url: str, ids: list[str], searches: dict[str, list[Captured]]
    ) -> None:
        payload = json.dumps(patient_payload(), separators=(",", ":")).encode()
        self.crud = ApiSide(client, payload, ids)
        self.client = client
        self.queries = {
            name: ApiQuery(client, base_url, SPECS[name], sets) for name, sets in searches.items()
        }
        self.turn = 0

    async def check(self, searches: dict[str, list[Captured]]) -> None:
        """Each search returns what its captured statements returned (and warms the server)."""
        for name, sets in searches.items():
            for index, captured in enumerate(sets):
                got = await self.queries[name].run(index)
                if got != (captured.matches, captured.included, captured.pages):
                    raise RuntimeError(
                        f"{name} {captured.pairs}: the API returned {got}, the engine's "
                        f"statements {(captured.matches, captured.included, captured.pages)}"
                    )

    async def transaction(self) -> None:
        body = transaction_body()
        reply = await self.client.request("POST", "/fhir", body)
        if reply.status != 200 or reply.body.count(CREATED) != 3:
            raise RuntimeError(f"transaction answered {reply.status}: {reply.body[:300]!r}")

    def op(self, name: str, concurrency: int) -> Op:
        if name == "create":
            return self.crud.create
        if name == "read":
            return self.crud.read
        if name == "transaction":
            return self.transaction
        query = self.queries[name]
        sets = len(query.paths)

        async def search() -> None:
            self.turn += 1
            await query.op(self.turn % sets)

        return search


class Raw:
    """The floors: the same statements through asyncpg directly."""

    def __init__(
        self, pool: asyncpg.Pool, fhir_base: str, ids: list[str], searches: dict[str, list[Captured]]
    ) -> None:
        payload = json.dumps(patient_payload(), separators=(",", ":")).encode()
        self.crud = RawSide(pool, payload, ids, fhir_base)
        self.transactions = TransactionRawSide(pool, fhir_base, Refs("", "", "", "", ""))
        self.queries = {name: RawQuery(pool, sets) for name, sets in searches.items()}
        self.turn = 0

    def transaction_rows(self) -> list[list[Any]]:
        """The transaction's 3 inserts: fresh ids, references already rewritten to Type/id."""
        ids = [str(uuid.uuid4()) for _ in range(3)]
        resources = transaction_resources(
            f"rp-{uuid.uuid4().hex}", f"Patient/{ids[0]}", f"Condition/{ids[1]}"
        )
        return [
            self.transactions.rows(resource["resourceType"], fid, resource)
            for fid, resource in zip(ids, resources, strict=True)
        ]

    def op(self, name: str, concurrency: int, seconds: float) -> tuple[Op, int]:
        """The operation and the run's cap on operations."""
        if name == "create":
            return self.crud.create, MAX_OPS[concurrency]
        if name == "read":
            return self.crud.read, MAX_OPS[concurrency]
        if name == "transaction":
            limit = MAX_TRANSACTIONS[concurrency] if seconds >= RUN_SECONDS else 100
            queue = [self.transaction_rows() for _ in range(limit)]

            async def transaction() -> None:
                await self.transactions.write(queue.pop())

            return transaction, limit
        query = self.queries[name]
        sets = len(query.sets)

        async def search() -> None:
            self.turn += 1
            await query.op(self.turn % sets)

        return search, MAX_OPS[concurrency]


def q_identifier(rng: random.Random, patients: int) -> list[tuple[str, str]]:
    return [("identifier", f"{MRN_SYSTEM}|{mrn(rng.randrange(patients))}")]


def q_careplan(rng: random.Random, patients: int) -> list[tuple[str, str]]:
    return [("subject", f"Patient/{stable_id('Patient', rng.randrange(patients))}"), ("status", "active")]


SPECS = {
    "identifier": QuerySpec(LABELS["identifier"], "Patient", 1, lambda data, rng: []),
    "careplan": QuerySpec(LABELS["careplan"], "CarePlan", 1, lambda data, rng: []),
}
MAKE = {"identifier": q_identifier, "careplan": q_careplan}


async def capture_searches(dsn: str, fhir_base: str, patients: int) -> dict[str, list[Captured]]:
    """PARAM_SETS parameter sets per search and the statements the engine runs for each."""
    conn = await asyncpg.connect(dsn, server_settings={"timezone": "UTC"})
    try:
        out: dict[str, list[Captured]] = {}
        for name, spec in SPECS.items():
            rng = random.Random(f"request-path/{name}")
            out[name] = [
                await capture(conn, spec, MAKE[name](rng, patients), fhir_base) for _ in range(PARAM_SETS)
            ]
        return out
    finally:
        await conn.close()


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    workers: int
    audit: bool
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path


def start_server(bench: BenchDatabase, workers: int, *, audit: bool) -> Server:
    """``carecoord serve --workers N`` on a free port (audit on or off), healthy."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **bench.env,
        "CARECOORD_BASE_URL": base_url,
        "CARECOORD_AUDIT_ENABLED": "true" if audit else "false",
    }
    log_path = Path(tempfile.gettempdir()) / f"carecoord-request-path-{os.getpid()}-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            carecoord_command("serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)),
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(base_url, process, log_path, timeout=120)
    except BaseException:
        stop_server(process)
        raise
    return Server(workers, audit, process, base_url, log_path)


def stop(server: Server) -> None:
    stop_server(server.process)
    server.log_path.unlink(missing_ok=True)


def client_for(base_url: str) -> LeanClient:
    url = urlsplit(base_url)
    return LeanClient(url.hostname or "127.0.0.1", url.port or 80)


# --------------------------------------------------------------------------- the benchmark

Key = tuple[str, int, int]
"""(operation, concurrency, workers)"""


@dataclass
class Results:
    api: dict[Key, list[RunStats]] = field(default_factory=dict)
    raw: dict[Key, list[RunStats]] = field(default_factory=dict)
    audit_off: dict[int, list[RunStats]] = field(default_factory=dict)
    """Reads of the ``--workers 1`` server with audit off, by concurrency."""


@dataclass
class Plan:
    rounds: int
    seconds: float
    workers: int
    patients: int
    operations: tuple[str, ...] = OPERATIONS


async def warm(api: Api, raw: Raw | None, seconds: float, operations: Sequence[str] = OPERATIONS) -> None:
    for name in operations:
        await drive(api.op(name, 16), 16, seconds, MAX_OPS[16], None)
    if raw is not None:
        for name in operations:
            op, limit = raw.op(name, 16, 0)
            await drive(op, 16, seconds, min(limit, 100), None)


async def measure_phase(
    plan: Plan,
    round_no: int,
    servers: list[Server],
    pool: asyncpg.Pool,
    ids: list[str],
    searches: dict[str, list[Captured]],
    results: Results,
) -> None:
    """One server configuration (with the audit-off server beside a ``--workers 1`` one)."""
    main, *others = servers
    fhir_base = f"{main.base_url}/fhir"
    clients = [client_for(server.base_url) for server in servers]
    try:
        apis = [
            Api(client, server.base_url, ids, searches)
            for client, server in zip(clients, servers, strict=True)
        ]
        raw = Raw(pool, fhir_base, ids, searches)
        for api in apis:
            await api.check(searches)
            await warm(api, None, WARMUP_SECONDS if plan.seconds >= RUN_SECONDS else 0.3, plan.operations)
        await warm(apis[0], raw, 0.3, plan.operations)
        operations = plan.operations if round_no % 2 == 0 else tuple(reversed(plan.operations))
        for name in operations:
            for concurrency in CONCURRENCY:
                key = (name, concurrency, main.workers)
                sides: list[str] = ["api", "raw"]
                if others and name == "read":
                    sides = ["api", "off", "raw"]
                if (round_no + CONCURRENCY.index(concurrency)) % 2:
                    sides.reverse()
                for side in sides:
                    if side == "raw":
                        op, limit = raw.op(name, concurrency, plan.seconds)
                        stats = await drive(op, concurrency, plan.seconds, limit, None)
                        results.raw.setdefault(key, []).append(stats)
                    else:
                        server, api = (main, apis[0]) if side == "api" else (others[0], apis[1])
                        limit = (
                            MAX_TRANSACTIONS[concurrency] if name == "transaction" else MAX_OPS[concurrency]
                        )
                        stats = await drive(
                            api.op(name, concurrency), concurrency, plan.seconds, limit, server.process.pid
                        )
                        target = (
                            results.api.setdefault(key, [])
                            if side == "api"
                            else (results.audit_off.setdefault(concurrency, []))
                        )
                        target.append(stats)
    finally:
        for client in clients:
            await client.aclose()


def run(plan: Plan, bench: BenchDatabase, ids: list[str], searches: dict[str, list[Captured]]) -> Results:
    results = Results()
    configurations = [1, plan.workers] if plan.workers != 1 else [1]
    for round_no in range(plan.rounds):
        order = configurations if round_no % 2 == 0 else list(reversed(configurations))
        for workers in order:
            servers = [start_server(bench, workers, audit=True)]
            try:
                if workers == 1:
                    servers.append(start_server(bench, 1, audit=False))
                runner_run(_phase(plan, bench.dsn, round_no, servers, ids, searches, results))
            finally:
                for server in servers:
                    stop(server)
            print(
                f"round {round_no + 1}/{plan.rounds}: --workers {workers} done ({len(ids)} Patients)",
                flush=True,
            )
    return results


async def _phase(
    plan: Plan,
    dsn: str,
    round_no: int,
    servers: list[Server],
    ids: list[str],
    searches: dict[str, list[Captured]],
    results: Results,
) -> None:
    async with asyncpg.create_pool(
        dsn,
        min_size=RAW_POOL_SIZE,
        max_size=RAW_POOL_SIZE,
        server_settings={"application_name": "carecoord-bench-request-path", "timezone": "UTC"},
    ) as pool:
        await measure_phase(plan, round_no, servers, pool, ids, searches, results)


# --------------------------------------------------------------------------- report


def med(runs: Sequence[RunStats], metric: str) -> float:
    return float(statistics.median(getattr(run, metric) for run in runs))


def report(results: Results, plan: Plan) -> tuple[list[str], list[str]]:
    """The table and the goal checks."""
    header = (
        f"{'operation':<26} {'c':>3} {'workers':>7} | {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} | {'raw req/s':>9} {'API/raw':>7} | {'CPU ms/req':>10}"
    )
    out = [header, "-" * len(header)]
    checks: list[str] = []
    worker_counts = sorted({key[2] for key in results.api})
    for name in OPERATIONS:
        for concurrency in CONCURRENCY:
            for workers in worker_counts:
                key = (name, concurrency, workers)
                if key not in results.api:
                    continue
                api, raw = results.api[key], results.raw[key]
                ratio = med(api, "ops_per_s") / med(raw, "ops_per_s")
                label = f"{workers}" if workers == 1 else f"{workers} (def)"
                out.append(
                    f"{LABELS[name]:<26} {concurrency:>3} {label:>7} | {med(api, 'ops_per_s'):>7.0f} "
                    f"{med(api, 'p50_ms'):>7.2f} {med(api, 'p95_ms'):>7.2f} {med(api, 'p99_ms'):>7.2f} | "
                    f"{med(raw, 'ops_per_s'):>9.0f} {ratio:>7.2f} | {med(api, 'server_cpu_ms_per_op'):>10.2f}"
                )
                goal = GOAL_RATIO[concurrency]
                verdict = "met" if ratio >= goal else "NOT MET"
                checks.append(
                    f"{LABELS[name]} c={concurrency} --workers {workers}: API/raw {ratio:.3f} >= {goal}: "
                    f"{verdict}"
                )
    out.append("")
    out.append("CPU ms/req: CPU of the server's process tree per request (the median run's machine")
    out.append("was shared with the load generator and PostgreSQL). raw = the same statements with asyncpg.")
    read = results.api.get(("read", 1, 1))
    if read:
        tail_ratio = med(read, "p99_ms") / med(read, "p50_ms")
        verdict = "met" if tail_ratio <= GOAL_READ_TAIL else "NOT MET"
        checks.append(f"read c=1 --workers 1: p99/p50 {tail_ratio:.2f}x <= {GOAL_READ_TAIL:.0f}x: {verdict}")
    for concurrency in CONCURRENCY:
        on, off = results.api.get(("read", concurrency, 1)), results.audit_off.get(concurrency)
        if on and off:
            share = med(on, "ops_per_s") / med(off, "ops_per_s")
            out.append(
                f"read c={concurrency} --workers 1, audit off: {med(off, 'ops_per_s'):.0f} req/s, "
                f"p50/p95/p99 {med(off, 'p50_ms'):.2f}/{med(off, 'p95_ms'):.2f}/{med(off, 'p99_ms'):.2f} ms; "
                f"audit on keeps {share:.0%}"
            )
            verdict = "met" if share >= GOAL_AUDIT else "NOT MET"
            checks.append(f"audit on/off read c={concurrency}: {share:.3f} >= {GOAL_AUDIT}: {verdict}")
    return out, checks


def save(results: Results, plan: Plan, info: list[str]) -> None:
    def runs(values: list[RunStats]) -> dict[str, Any]:
        medians = {metric: med(values, metric) for metric in asdict(values[0])}
        return {"median": medians, "rounds": [asdict(v) for v in values]}

    document = {
        "benchmark": "request_path",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info,
        "plan": asdict(plan),
        "api": {f"{k[0]} c={k[1]} workers={k[2]}": runs(v) for k, v in results.api.items()},
        "raw": {f"{k[0]} c={k[1]} workers={k[2]}": runs(v) for k, v in results.raw.items()},
        "audit_off": {f"read c={c} workers=1": runs(v) for c, v in results.audit_off.items()},
    }
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(document, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"rounds (default {ROUNDS}; medians reported)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 round of short runs on fewer Patients (smoke)"
    )
    parser.add_argument(
        "--workers", type=int, default=cores(), help="the second server's --workers (default: the cores)"
    )
    parser.add_argument(
        "--operations",
        default=",".join(OPERATIONS),
        help=f"comma-separated subset of {','.join(OPERATIONS)}",
    )
    parser.add_argument("--keep-db", action="store_true", help="leave the database for investigation")
    parser.add_argument("--profile", action="store_true", help="instead: py-spy profiles of each operation")
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--profile-concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    operations = tuple(name.strip() for name in args.operations.split(",") if name.strip())
    unknown = set(operations) - set(OPERATIONS)
    if unknown or not operations:
        parser.error(f"--operations: unknown {sorted(unknown)}; choose from {','.join(OPERATIONS)}")
    args.operations = operations
    return args


# --------------------------------------------------------------------------- profiles

TOP = 25


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy (not a carecoord dependency)")
    return found


def _short(frame: str) -> str:
    """``function (path)`` with the path from the package (``app/...``, ``asyncpg/...``) on."""
    name, _, path = frame.partition(" (")
    for marker in ("/site-packages/", f"{REPO_ROOT}/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path}" if path else name


def summarize(path: Path) -> list[str]:
    """Self and inclusive sample shares from py-spy's collapsed stacks ("frame;frame;... count")."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if "(app/" in frame:
                under[frame] += count
    if not total:
        return ["(no samples)"]
    out = [f"{total} samples; self time (the function itself running), top {TOP}:"]
    out += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(TOP)]
    out.append(f"carecoord functions, inclusive (everything under them), top {TOP}:")
    out += [f"  {n / total:6.1%}  {frame}" for frame, n in under.most_common(TOP)]
    return out


async def profile_operation(
    name: str, server: Server, ids: list[str], searches: dict[str, list[Captured]], args: argparse.Namespace
) -> tuple[RunStats, Path]:
    client = client_for(server.base_url)
    try:
        api = Api(client, server.base_url, ids, searches)
        await api.check(searches)
        await warm(api, None, WARMUP_SECONDS, (name,))
        output = RESULTS_DIR / f"profile-{name}.txt"
        output.parent.mkdir(parents=True, exist_ok=True)
        spy = await asyncio.create_subprocess_exec(
            py_spy(), "record", "--pid", str(server.process.pid), "--format", "raw", "--nolineno",
            "--full-filenames", "--rate", "200", "--duration", f"{args.profile_seconds:g}",
            "--output", str(output),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        concurrency = args.profile_concurrency
        stats = await drive(
            api.op(name, concurrency), concurrency, args.profile_seconds, 10**9, server.process.pid
        )
        if await spy.wait() != 0:
            raise RuntimeError(f"py-spy failed on pid {server.process.pid} (ptrace permission?)")
        return stats, output
    finally:
        await client.aclose()


def profile_main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    py_spy()
    with bench_database(BENCH_DB, f"carecoord-request-path-{os.getpid()}.log", keep=args.keep_db) as bench:
        bench.migrate()
        print(cpu_line(), flush=True)
        fhir_base = f"{bench.base_url}/fhir"
        ids = runner_run(preload(bench.dsn, fhir_base, PATIENTS))
        searches = runner_run(capture_searches(bench.dsn, fhir_base, PATIENTS))
        server = start_server(bench, 1, audit=True)
        lines: list[str] = []
        try:
            for name in args.operations:
                stats, output = runner_run(profile_operation(name, server, ids, searches, args))
                headline = (
                    f"== {LABELS[name]} at c={args.profile_concurrency}: {stats.ops_per_s:.0f} req/s, p50 "
                    f"{stats.p50_ms:.2f} ms, server CPU {stats.server_cpu_ms_per_op:.3f} ms per request "
                    f"(stacks: {output})"
                )
                print(headline, flush=True)
                lines += ["", headline, *summarize(output)]
        finally:
            stop(server)
    print_report(lines, started)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        return profile_main(args)
    started = time.perf_counter()
    plan = Plan(
        rounds=args.rounds or (1 if args.quick else ROUNDS),
        seconds=QUICK_SECONDS if args.quick else RUN_SECONDS,
        workers=args.workers,
        patients=QUICK_PATIENTS if args.quick else PATIENTS,
        operations=args.operations,
    )
    with bench_database(BENCH_DB, f"carecoord-request-path-{os.getpid()}.log", keep=args.keep_db) as bench:
        bench.migrate()
        info = [
            cpu_line(),
            f"PostgreSQL: {bench.pg_version}",
            f"Python {platform.python_version()}, asyncpg {asyncpg.__version__}, {loop_name()} loop; load "
            "generator: bench/crud.py's lean keep-alive client (one connection per in-flight request)",
            f"servers: carecoord serve --workers 1 and --workers {plan.workers}, authorization off, audit "
            f"on, each process an asyncpg pool of up to {SERVER_POOL}; raw: asyncpg pool of {RAW_POOL_SIZE}",
            f"{plan.patients} Patients with a CarePlan each; runs of {plan.seconds:g} s (or {MAX_OPS} "
            f"requests, {MAX_TRANSACTIONS} transactions); {plan.rounds} round(s), orders alternating, "
            "medians reported",
        ]
        print("\n".join(info), flush=True)
        fhir_base = f"{bench.base_url}/fhir"
        load_started = time.perf_counter()
        ids = runner_run(preload(bench.dsn, fhir_base, plan.patients))
        searches = runner_run(capture_searches(bench.dsn, fhir_base, plan.patients))
        print(
            f"loaded {plan.patients} Patients + CarePlans in {time.perf_counter() - load_started:.1f} s",
            flush=True,
        )
        results = run(plan, bench, ids, searches)
    table, checks = report(results, plan)
    save(results, plan, info)
    print_report([*table, "", "Goals (audit on):", *checks, "", f"figures saved to {RESULTS_FILE}"], started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
