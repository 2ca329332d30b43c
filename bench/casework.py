"""Case-work benchmark: ``Task/$referral-metrics`` for a partner with 10,000 referrals among
1M resources (issue 13 item 5; goal p95 < 500 ms).

Run from the repository root (about 10 minutes at 1M on 2 cores)::

    .venv/bin/python bench/casework.py [--resources 1000000] [--referrals 10000] [--rounds 40]

What it does
------------
1. Creates a fresh database (``carecoord_bench_casework``) and bulk-loads the search
   benchmark's data set (bench/search.py: Patients, Organizations, CarePlans, Goals,
   ServiceRequests, referral Tasks of 50 organisations, Observations) of ``--resources`` minus
   the referrals below, with the rows the API write path produces.
2. Adds the referrals the metrics are about: ``--referrals`` Tasks from Organization/bench-cm
   to Organization/bench-partner, and 40% as many again to four other partners, each with its
   version history (requested; then accepted, rejected or cancelled; in-progress; completed),
   the versions spaced over hours to days as real referrals are, bodies, index rows and
   ``referral_version`` rows as the API write path (stamp, extract, the write hook) makes them.
3. Starts ``carecoord serve`` (authorization off) and measures, sequentially, ``GET
   Task/$referral-metrics?owner=Organization/bench-partner`` (10,000 referrals, one row per
   requester) and ``?requester=Organization/bench-cm`` (14,000, one row per partner), and the
   raw asyncpg floor: the same statement (app/casework/referral_metrics.metrics_statement)
   executed directly. Prints p50/p95/p99, the ratio API/floor and the goal.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

# bench/crud.py and bench/search.py are importable: Python puts this script's directory on sys.path.
from crud import bench_database, cpu_line, percentile, runner_run
from search import _copy_chunk, bulk_load, index_layout, plan_dataset, vacuum_analyze

from app.casework.referral_metrics import metrics_statement
from app.fhir.access import OPEN_ACCESS
from app.fhir.indexing import extract
from app.fhir.repository import stamp
from app.fhir.search import SearchLimits

DATABASE = "carecoord_bench_casework"
TASK_CODE = {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]}
GOAL_P95_MS = 500.0


def referral_versions(n: int, owner: str, start: datetime, rng: random.Random) -> list[tuple[str, datetime]]:
    """(status, when) of each version of referral ``n``."""
    sent = start + timedelta(minutes=rng.randrange(0, 60 * 24 * 300))
    versions = [("requested", sent)]
    roll = rng.random()
    moment = sent + timedelta(minutes=rng.randrange(30, 60 * 24 * 5))
    if roll < 0.1:
        versions.append(("rejected", moment))
    elif roll < 0.15:
        versions.append(("cancelled", moment))
    elif roll < 0.25:
        pass  # still waiting
    else:
        versions.append(("accepted", moment))
        if roll < 0.85:
            moment += timedelta(hours=rng.randrange(1, 72))
            versions.append(("in-progress", moment))
            if roll < 0.7:
                moment += timedelta(hours=rng.randrange(1, 24 * 30))
                versions.append(("completed", moment))
    return versions


def referral_rows(
    first_rid: int, first_hid: int, count: int, owner: str, fhir_base: str, start: datetime, seed: str
) -> tuple[dict[str, list[tuple[Any, ...]]], int]:
    layout = index_layout()
    tables: dict[str, list[tuple[Any, ...]]] = {
        "resource": [],
        "resource_history": [],
        "referral_version": [],
    }
    for table in layout:
        tables[f"search_{table}"] = []
    rng = random.Random(seed)
    hid = first_hid
    for n in range(count):
        rid = first_rid + n
        fid = f"{seed}-{n}"
        versions = referral_versions(n, owner, start, rng)
        task: dict[str, Any] = {
            "resourceType": "Task",
            "intent": "order",
            "priority": "routine",
            "code": TASK_CODE,
            "focus": {"reference": f"ServiceRequest/{seed}-sr-{n}"},
            "for": {"reference": f"Patient/{seed}-p-{n % 5000}"},
            "authoredOn": versions[0][1].isoformat(),
            "requester": {"reference": "Organization/bench-cm"},
            "owner": {"reference": owner},
            "restriction": {"period": {"end": (versions[0][1] + timedelta(days=30)).isoformat()}},
        }
        due = versions[0][1] + timedelta(days=30)
        body = ""
        for number, (status, moment) in enumerate(versions, start=1):
            data = {**task, "status": status}
            body = stamp(data, fid, number, moment)
            tables["resource_history"].append(
                (hid, rid, "Task", fid, number, moment, "POST" if number == 1 else "PUT", body)
            )
            tables["referral_version"].append((fid, number, status, moment, due))
            hid += 1
        tables["resource"].append((rid, "Task", fid, len(versions), versions[-1][1], False, body))
        index = extract("Task", {**task, "status": versions[-1][0]}, fhir_base)
        for table in layout:
            rows = list(dict.fromkeys(getattr(index, table)))
            tables[f"search_{table}"].extend((rid, "Task", *row) for row in rows)
    return tables, hid


async def add_referrals(dsn: str, fhir_base: str, referrals: int, start: datetime) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        rid = int(await conn.fetchval("SELECT coalesce(max(rid), 0) FROM resource")) + 1
        hid = int(await conn.fetchval("SELECT coalesce(max(hid), 0) FROM resource_history")) + 1
    finally:
        await conn.close()
    owners = [("Organization/bench-partner", referrals)] + [
        (f"Organization/bench-other-{i}", referrals // 10) for i in range(4)
    ]
    total = 0
    for number, (owner, count) in enumerate(owners):
        for chunk in range(0, count, 2000):
            size = min(2000, count - chunk)
            tables, hid = referral_rows(rid, hid, size, owner, fhir_base, start, f"ref{number}c{chunk}")
            versions = tables.pop("referral_version")
            await _copy_chunk(dsn, tables)
            conn = await asyncpg.connect(dsn)
            try:
                await conn.copy_records_to_table(
                    "referral_version",
                    records=versions,
                    columns=["task_id", "version_id", "status", "recorded", "due"],
                )
            finally:
                await conn.close()
            rid += size
            total += size
    conn = await asyncpg.connect(dsn)
    try:
        # The rows above carry their own ids: move the identity sequences past them.
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('resource', 'rid'), (SELECT max(rid) FROM resource))"
        )
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('resource_history', 'hid'),"
            " (SELECT max(hid) FROM resource_history))"
        )
    finally:
        await conn.close()
    return total


async def measure(base_url: str, dsn: str, fhir_base: str, rounds: int) -> list[str]:
    lines = []
    limits = SearchLimits()
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        # As the server's pool connects (app/db.py): custom plans for the statement's values.
        conn = await asyncpg.connect(
            dsn, server_settings={"plan_cache_mode": "force_custom_plan", "timezone": "UTC"}
        )
        try:
            for label, query in (
                ("owner=bench-partner (10k referrals)", {"owner": "Organization/bench-partner"}),
                ("requester=bench-cm (all partners)", {"requester": "Organization/bench-cm"}),
            ):
                sql, values, _ = metrics_statement(
                    fhir_base,
                    OPEN_ACCESS,
                    limits,
                    requester=query.get("requester"),
                    owner=query.get("owner"),
                    periods=[],
                )
                api: list[float] = []
                raw: list[float] = []
                body: dict[str, Any] = {}
                for round_number in range(rounds + 2):  # two warm-up rounds
                    started = time.perf_counter()
                    response = await http.get("/fhir/Task/$referral-metrics", params=query)
                    elapsed = (time.perf_counter() - started) * 1000
                    if response.status_code != 200:
                        raise RuntimeError(
                            f"$referral-metrics answered {response.status_code}: {response.text[:300]}"
                        )
                    body = response.json()
                    started = time.perf_counter()
                    await conn.fetch(sql, *values)
                    raw_elapsed = (time.perf_counter() - started) * 1000
                    if round_number >= 2:
                        api.append(elapsed)
                        raw.append(raw_elapsed)
                api.sort()
                raw.sort()
                total = next(p for p in body["parameter"] if p["name"] == "total")
                sent = next(p["valueInteger"] for p in total["part"] if p["name"] == "sent")
                p95 = percentile(api, 0.95)
                verdict = "meets" if p95 < GOAL_P95_MS else "MISSES"
                lines.append(
                    f"{label}: {sent} referrals counted; API p50 {percentile(api, 0.5):.1f} ms,"
                    f" p95 {p95:.1f} ms, p99 {percentile(api, 0.99):.1f} ms | raw asyncpg floor p50"
                    f" {percentile(raw, 0.5):.1f} ms, p95 {percentile(raw, 0.95):.1f} ms | API/floor (p50)"
                    f" {percentile(api, 0.5) / percentile(raw, 0.5):.2f} | goal p95 < {GOAL_P95_MS:.0f} ms:"
                    f" {verdict}"
                )
                print(lines[-1], flush=True)
        finally:
            await conn.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resources", type=int, default=1_000_000, help="resources in the database")
    parser.add_argument("--referrals", type=int, default=10_000, help="referrals of the measured partner")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--keep-db", action="store_true")
    options = parser.parse_args(argv)
    started = time.perf_counter()
    referral_total = options.referrals + 4 * (options.referrals // 10)
    with bench_database(DATABASE, "carecoord-casework-bench.log", keep=options.keep_db) as bench:
        fhir_base = f"{bench.base_url}/fhir"
        bench.migrate()
        end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        data = plan_dataset(max(100, options.resources - referral_total), end)
        load = bulk_load(bench.dsn, fhir_base, data)
        print(f"bulk load: {load.resources} resources in {load.seconds:.1f} s", flush=True)
        added = runner_run(add_referrals(bench.dsn, fhir_base, options.referrals, end - timedelta(days=365)))
        runner_run(vacuum_analyze(bench.dsn))
        print(
            f"referrals added: {added} (with their version history); {load.resources + added} resources",
            flush=True,
        )
        bench.migrate(timeout=1800)
        server = bench.serve()
        print(f"server pid {server.pid}; {cpu_line()}", flush=True)
        lines = runner_run(measure(bench.base_url, bench.dsn, fhir_base, options.rounds))
    print("\n== results ==")
    print(json.dumps({"resources": options.resources, "referrals": options.referrals}))
    for line in lines:
        print(line)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
