"""Person-token benchmark (issue 11 item 5): a practitioner's searches, limited to its caseload
in SQL (app/fhir/access.py), against the same searches with a system token, in one run.

Run from the repository root::

    .venv/bin/python bench/user_access.py [--patients 100000] [--rounds 3]

What it does
------------
1. Creates a fresh database ``carecoord_bench_users`` (admin connection from ``DATABASE_URL``,
   else ``postgresql://postgres@127.0.0.1:5432/postgres``) and applies the migrations.
2. Generates, deterministically, ``--patients`` Patients (bench/search.py's realistic names),
   one Practitioner per ``CASELOAD`` (50) Patients, and per Patient an active CareTeam (subject
   the Patient, participant its Practitioner), ``TASKS`` Tasks (for the Patient, owner its
   Practitioner, statuses mixed) and ``OBSERVATIONS`` Observations; every tenth caseload is
   reached through a PractitionerRole instead, and every Practitioner also manages one
   active EpisodeOfCare. Bulk loaded with the rows the API write path produces (bench/search.py:
   ``stamp`` bodies and ``extract`` index rows, COPY with the indexes dropped and rebuilt).
3. Registers a client and signs two kinds of tokens with the server's own TokenService (the
   authorize flow is not needed to measure storage): ``system/*.rs``, and ``user/*.rs`` with
   ``fhirUser`` Practitioner/<one of 32 practitioners>.
4. Starts ``carecoord serve`` with authorization on and the audit trail off (it costs both
   sides the same; bench/auth.py measures it) and measures through HTTP, at concurrency 1,
   ``Patient?name=<family of a caseload patient>`` and
   ``Task?owner=Practitioner/<id>&status=requested`` with each token kind, alternating the
   order every round. The practitioner's results are limited to its caseload; the system
   token's are not.
5. Prints p50/p95 per query and token and the ratio practitioner/system (goal <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg  # type: ignore[import-untyped]
import httpx

# bench/crud.py and bench/search.py are importable: Python puts this script's directory on sys.path.
from crud import LeanClient, bench_database, cpu_line, percentile, runner_run
from search import (
    app_function,
    build_patient,
    drop_schema_objects,
    family_name,
    index_layout,
    restore_schema_objects,
    table_columns,
    vacuum_analyze,
)

from app.fhir.indexing import extract

BENCH_DB = "carecoord_bench_users"
CASELOAD = 50
TASKS = 2
OBSERVATIONS = 2
TOKENS = 32
REQUESTS = 300
WARMUP = 60
CHUNK = 20_000
CLIENT_ID = "bench-users"
TASK_STATUSES = ("requested", "requested", "in-progress", "completed", "completed", "cancelled")
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


def practitioner_of(p: int) -> int:
    return p // CASELOAD


def resources(patients: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(type, id, body) of the whole data set, in creation order."""
    items: list[tuple[str, str, dict[str, Any]]] = []
    for d in range((patients + CASELOAD - 1) // CASELOAD):
        items.append(
            ("Practitioner", f"dr-{d}", {"resourceType": "Practitioner", "name": [{"family": f"Dr{d}"}]})
        )
        if d % 10 == 9:
            role = {"resourceType": "PractitionerRole", "practitioner": {"reference": f"Practitioner/dr-{d}"}}
            items.append(("PractitionerRole", f"role-{d}", role))
    for p in range(patients):
        d = practitioner_of(p)
        rng = random.Random(f"users/{p}")
        items.append(("Patient", f"pt-{p}", build_patient(p, EPOCH)))
        member = f"PractitionerRole/role-{d}" if d % 10 == 9 else f"Practitioner/dr-{d}"
        team = {
            "resourceType": "CareTeam",
            "status": "active",
            "subject": {"reference": f"Patient/pt-{p}"},
            "participant": [{"member": {"reference": member}}],
        }
        items.append(("CareTeam", f"ct-{p}", team))
        if p % CASELOAD == 0:
            episode = {
                "resourceType": "EpisodeOfCare",
                "status": "active",
                "patient": {"reference": f"Patient/pt-{p}"},
                "careManager": {"reference": f"Practitioner/dr-{d}"},
            }
            items.append(("EpisodeOfCare", f"eoc-{p}", episode))
        for slot in range(TASKS):
            task = {
                "resourceType": "Task",
                "status": rng.choice(TASK_STATUSES),
                "intent": "order",
                "for": {"reference": f"Patient/pt-{p}"},
                "owner": {"reference": f"Practitioner/dr-{d}"},
                "authoredOn": "2025-06-01T10:00:00Z",
            }
            items.append(("Task", f"task-{p}-{slot}", task))
        for slot in range(OBSERVATIONS):
            observation = {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": f"Patient/pt-{p}"},
                "valueQuantity": {"value": 60 + rng.randrange(40), "unit": "/min"},
            }
            items.append(("Observation", f"obs-{p}-{slot}", observation))
    return items


def _rows(
    chunk: list[tuple[int, str, str, dict[str, Any]]], fhir_base: str
) -> dict[str, list[tuple[Any, ...]]]:
    stamp = app_function("stamp")
    layout = index_layout()
    tables: dict[str, list[tuple[Any, ...]]] = {"resource": [], "resource_history": []}
    tables.update({f"search_{table}": [] for table in layout})
    for rid, rtype, fid, data in chunk:
        moment = EPOCH + timedelta(seconds=rid)
        body = stamp(data, fid, 1, moment)
        tables["resource"].append((rid, rtype, fid, 1, moment, False, body))
        tables["resource_history"].append((rid, rid, rtype, fid, 1, moment, "POST", body))
        index = extract(rtype, data, fhir_base)
        for table in layout:
            tables[f"search_{table}"].extend(
                (rid, rtype, *row) for row in dict.fromkeys(getattr(index, table))
            )
    return tables


async def load(dsn: str, fhir_base: str, patients: int) -> int:
    started = time.perf_counter()
    objects = await drop_schema_objects(dsn)
    items = resources(patients)
    columns = table_columns(index_layout())
    conn = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "off", "timezone": "UTC"})
    try:
        for start in range(0, len(items), CHUNK):
            chunk = [(start + n + 1, *item) for n, item in enumerate(items[start : start + CHUNK])]
            async with conn.transaction():
                for table, records in _rows(chunk, fhir_base).items():
                    if records:
                        await conn.copy_records_to_table(table, records=records, columns=columns[table])
            print(f"  loaded {min(start + CHUNK, len(items))}/{len(items)}", flush=True)
    finally:
        await conn.close()
    await restore_schema_objects(dsn, objects, [])
    await vacuum_analyze(dsn)
    print(f"loaded {len(items)} resources in {time.perf_counter() - started:.0f} s", flush=True)
    return len(items)


async def mint_tokens(
    database_url: str, base_url: str, practitioners: list[int]
) -> tuple[str, dict[int, str]]:
    """A system token and one practitioner token per practitioner, signed by the server's keys."""
    from app.auth.tokens import build_token_service
    from app.settings import Settings

    settings = Settings(database_url=database_url, base_url=base_url)
    pool = await asyncpg.create_pool(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        await pool.execute(
            "INSERT INTO oauth_client (client_id, name, scopes) VALUES ($1, 'bench', $2)"
            " ON CONFLICT (client_id) DO NOTHING",
            CLIENT_ID,
            "system/*.rs user/*.rs",
        )
        async with httpx.AsyncClient() as http:
            tokens = await build_token_service(settings, pool, http)
            system, _ = await tokens.issue(client_id=CLIENT_ID, scope="system/*.rs")
            users = {}
            for d in practitioners:
                users[d], _ = await tokens.issue(
                    client_id=CLIENT_ID, scope="user/*.rs", fhir_user=f"Practitioner/dr-{d}"
                )
        return system, users
    finally:
        await pool.close()


async def timed(op: Callable[[], Awaitable[None]], total: int) -> list[float]:
    latencies = []
    for _ in range(total):
        started = time.perf_counter()
        await op()
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def measure(
    port: int, system: str, users: dict[int, str], rounds: int
) -> dict[tuple[str, str], list[tuple[float, float]]]:
    client = LeanClient("127.0.0.1", port)
    rng = random.Random("queries")
    practitioners = list(users)
    counts: dict[tuple[str, str], list[int]] = {}

    def query(name: str, d: int) -> str:
        if name == "Patient?name":
            patient = d * CASELOAD + rng.randrange(CASELOAD)
            return f"/fhir/Patient?name={quote(family_name(patient))}"
        return f"/fhir/Task?owner=Practitioner/dr-{d}&status=requested"

    def op(name: str, token_kind: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            d = rng.choice(practitioners)
            token = system if token_kind == "system" else users[d]
            path = query(name, d)
            head = f"authorization: Bearer {token}\r\n"
            client.fixed_headers, saved = client.fixed_headers + head, client.fixed_headers
            try:
                reply = await client.request("GET", path)
            finally:
                client.fixed_headers = saved
            if reply.status != 200:
                raise RuntimeError(f"{path} answered {reply.status}: {reply.body[:300]!r}")
            entries = json.loads(reply.body).get("entry", [])
            counts.setdefault((name, token_kind), []).append(len(entries))

        return run

    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for name in ("Patient?name", "Task?owner&status"):
            for kind in ("system", "practitioner"):
                await timed(op(name, kind), WARMUP)
        for round_no in range(rounds):
            kinds = ("system", "practitioner") if round_no % 2 == 0 else ("practitioner", "system")
            for name in ("Patient?name", "Task?owner&status"):
                for kind in kinds:
                    latencies = sorted(await timed(op(name, kind), REQUESTS))
                    results.setdefault((name, kind), []).append(
                        (percentile(latencies, 0.5), percentile(latencies, 0.95))
                    )
            print(f"round {round_no + 1}/{rounds} done", flush=True)
    finally:
        await client.aclose()
    for (name, kind), found in sorted(counts.items()):
        print(f"  {name:<18} {kind:<12} mean matches per page {statistics.mean(found):.1f}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep-db", action="store_true", help="leave the loaded database (plans)")
    parser.add_argument("--reuse-db", action="store_true", help="use a database left by --keep-db")
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    log_name = f"carecoord-bench-users-{os.getpid()}.log"
    with bench_database(BENCH_DB, log_name, create=not args.reuse_db, keep=args.keep_db) as bench:
        if not args.reuse_db:
            bench.migrate()
            runner_run(load(bench.dsn, f"{bench.base_url}/fhir", args.patients))
        bench.env["CARECOORD_AUTH_ENABLED"] = "true"
        bench.env["CARECOORD_AUDIT_ENABLED"] = "false"
        bench.env["CARECOORD_TOKEN_TTL"] = "3600"
        practitioners = random.Random("practitioners").sample(
            range(args.patients // CASELOAD), min(TOKENS, args.patients // CASELOAD)
        )
        system, users = runner_run(mint_tokens(bench.env["DATABASE_URL"], bench.base_url, practitioners))
        bench.serve()
        results = runner_run(measure(bench.port, system, users, args.rounds))
    print()
    print(
        f"{args.patients} Patients, {CASELOAD} per practitioner caseload; {REQUESTS} requests per query,"
        f" token and round at concurrency 1; {args.rounds} rounds; medians over rounds"
    )
    print(
        f"{'query':<18} {'system p50/p95 ms':>18} {'practitioner p50/p95 ms':>24} {'ratio p50':>9} {'p95':>6}"
    )
    for name in ("Patient?name", "Task?owner&status"):
        sys_p50 = statistics.median(r[0] for r in results[(name, "system")])
        sys_p95 = statistics.median(r[1] for r in results[(name, "system")])
        usr_p50 = statistics.median(r[0] for r in results[(name, "practitioner")])
        usr_p95 = statistics.median(r[1] for r in results[(name, "practitioner")])
        print(
            f"{name:<18} {sys_p50:>8.2f} / {sys_p95:>7.2f} {usr_p50:>13.2f} / {usr_p95:>8.2f}"
            f" {usr_p50 / sys_p50:>9.2f} {usr_p95 / sys_p95:>6.2f}"
        )
    print("goal: practitioner/system <= 1.5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
