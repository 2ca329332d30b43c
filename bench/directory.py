"""Directory and worklist benchmark: ``Location?near`` and sorted Task worklists (issue 13).

Run from the repository root::

    .venv/bin/python bench/directory.py [--resources 1000000] [--small 10000] [--locations 100000]

For each size (the small one, then ``--resources`` total resources) it:

1. Creates a fresh database ``carecoord_directory_<size>`` and applies the migrations
   (``carecoord migrate``).
2. Generates, deterministically, 200 Organizations; Locations (``--locations`` in the large
   database, a tenth of the resources in the small one) spread uniformly over the contiguous
   United States, each with a HealthcareService in one of 10 service categories for every fourth
   Location; and Tasks for the rest: owner one of the Organizations with a Zipf skew (the
   busiest owns ~17% of all Tasks), status requested 8% / accepted 7% / in-progress 10% /
   completed 65% / cancelled 10%, priority routine 70% / urgent 15% / asap 10% / stat 5%,
   authoredOn over two years, executionPeriod of 1 to 60 days from it.
3. Bulk loads them with the rows the write path produces (body by ``stamp``, index rows by
   ``extract``), with COPY, the search tables' indexes dropped for the load and rebuilt from
   their own definitions; then ``VACUUM (ANALYZE)``.
4. Measures, at concurrency 1, the search engine as the API runs it: ``parse_search`` (with the
   caller's AccessContext) then ``SearchExecutor.search`` (the page statement and includes) on a
   pooled asyncpg connection, without HTTP; and the raw floor: the same compiled statements
   replayed with asyncpg. Queries (parameter values drawn from the data, owners weighted by
   how many Tasks they own):

   - ``near``: ``Location?near=LAT|LON|25|km``
   - ``near-same-matches``: the same with the radius that holds as many Locations at this size as
     25 km does in the large database (250 km among the small size's 1,000 Locations): ``near``
     returns ~28x more Locations at 1M than at 10k, this one the same number at both sizes, so
     its 1M/10k ratio is the cost of the database's size alone
   - ``near-chain``: ``HealthcareService?service-category=C&location.near=LAT|LON|25|km``
     ``&_include=HealthcareService:location``
   - ``worklist-priority``: ``Task?owner=O&status=requested,accepted&_sort=-priority,authored-on``
     with a system token, and ``-limited`` with the owner organisation's own token
     (``system/Task.rs``, organisation O: its access condition is part of the statement)
   - ``worklist-period``: the same with ``_sort=period``
   - ``worklist-page3``: the third page of ``worklist-priority`` (through the cursor keys)

5. Prints p50/p95/p99 per query and size, the ratio to the raw floor, the plan (indexes, rows)
   of the busiest owner's worklist statement (EXPLAIN ANALYZE), and the goal checks: p95 < 50 ms;
   p95 at the large size <= 1.5x p95 at the small size.
6. Drops the databases (``--keep-db`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]

# bench/crud.py is importable because Python puts this script's directory on sys.path.
from crud import admin_url, bench_database, percentile, runner_run

from app import db
from app.auth.scopes import parse_scopes
from app.fhir.access import OPEN_ACCESS, AccessContext
from app.fhir.indexing import extract
from app.fhir.repository import INDEX_TABLES, SearchExecutor, stamp
from app.fhir.search import parse_search
from app.fhir.search_params import registry
from app.settings import Settings

FHIR_BASE = "http://bench.test/fhir"
ORGANIZATIONS = 200
CATEGORIES = 10
CATEGORY_SYSTEM = "http://example.org/service-category"
STATUSES = (("requested", 0.08), ("accepted", 0.07), ("in-progress", 0.10), ("cancelled", 0.10))
PRIORITIES = (("stat", 0.05), ("asap", 0.10), ("urgent", 0.15))
SOUTH, NORTH, WEST, EAST = 25.0, 49.0, -124.0, -67.0
NEAR_KM = 25
REQUESTS = 200
PARAM_SETS = 40
GOAL_P95_MS = 50.0
GOAL_RATIO = 1.5
END = datetime(2026, 12, 1, tzinfo=UTC)
SEARCH_TABLES = tuple(f"search_{table}" for table in INDEX_TABLES)


# --------------------------------------------------------------------------- data


@dataclass
class DataSet:
    size: int
    locations: int
    services: int
    tasks: int
    owner_weights: list[int] = field(default_factory=list)
    """Tasks per Organization index."""


def _pick(rng: random.Random, shares: Sequence[tuple[str, float]], default: str) -> str:
    roll = rng.random()
    for name, share in shares:
        if roll < share:
            return name
        roll -= share
    return default


def _instant(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def owner_index(rng: random.Random, cumulative: list[float]) -> int:
    """Zipf over the Organizations: the k-th owns a share proportional to 1/(k+1)."""
    roll = rng.random() * cumulative[-1]
    low, high = 0, len(cumulative) - 1
    while low < high:
        middle = (low + high) // 2
        if cumulative[middle] < roll:
            low = middle + 1
        else:
            high = middle
    return low


def generate(size: int, locations: int) -> tuple[DataSet, Callable[[], Any]]:
    """The data set's plan and a generator of (type, id, resource) in creation order."""
    services = locations // 4
    tasks = size - ORGANIZATIONS - locations - services
    if tasks < 1000:
        raise SystemExit(f"--resources {size} leaves too few Tasks beside {locations} Locations")
    data = DataSet(size, locations, services, tasks, [0] * ORGANIZATIONS)
    cumulative = list(__import__("itertools").accumulate(1 / (k + 1) for k in range(ORGANIZATIONS)))

    def items() -> Any:
        rng = random.Random(size)
        for o in range(ORGANIZATIONS):
            yield "Organization", f"o{o}", {"resourceType": "Organization", "name": f"Organization {o}"}
        for n in range(locations):
            position = {"latitude": rng.uniform(SOUTH, NORTH), "longitude": rng.uniform(WEST, EAST)}
            yield "Location", f"l{n}", {"resourceType": "Location", "name": f"Site {n}", "position": position}
            if n % 4 == 0:
                category = {"coding": [{"system": CATEGORY_SYSTEM, "code": f"c{rng.randrange(CATEGORIES)}"}]}
                yield (
                    "HealthcareService",
                    f"s{n}",
                    {
                        "resourceType": "HealthcareService",
                        "name": f"Service {n}",
                        "category": [category],
                        "location": [{"reference": f"Location/l{n}"}],
                    },
                )
        span = 2 * 365 * 86400
        for n in range(tasks):
            owner = owner_index(rng, cumulative)
            data.owner_weights[owner] += 1
            authored = END - timedelta(seconds=span * (1 - n / tasks))
            task: dict[str, Any] = {
                "resourceType": "Task",
                "status": _pick(rng, STATUSES, "completed"),
                "intent": "order",
                "priority": _pick(rng, PRIORITIES, "routine"),
                "for": {"reference": f"Patient/p{rng.randrange(max(1, tasks // 5))}"},
                "owner": {"reference": f"Organization/o{owner}"},
                "authoredOn": _instant(authored),
                "executionPeriod": {
                    "start": _instant(authored),
                    "end": _instant(authored + timedelta(days=rng.randint(1, 60))),
                },
            }
            yield "Task", f"t{n}", task

    return data, items


def _columns(table: str) -> list[str]:
    return [
        "rid",
        "resource_type",
        "param",
        *(name for name, _ in INDEX_TABLES[table.removeprefix("search_")]),
    ]


async def bulk_load(dsn: str, items: Callable[[], Any]) -> tuple[int, float]:
    """COPY the resources, their history rows and index rows; the search tables' indexes are
    dropped for the load and rebuilt from their own definitions."""
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "off", "timezone": "UTC"})
    try:
        indexes = await conn.fetch(
            "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS def FROM pg_index"
            " WHERE indrelid = ANY($1::regclass[])",
            list(SEARCH_TABLES),
        )
        for row in indexes:
            await conn.execute(f"DROP INDEX {row['name']}")
        moment = END
        rid = 0
        batch: dict[str, list[tuple[Any, ...]]] = {}

        async def flush() -> None:
            for table, records in batch.items():
                if records:
                    columns = (
                        _columns(table)
                        if table.startswith("search_")
                        else (
                            [
                                "rid",
                                "resource_type",
                                "fhir_id",
                                "version_id",
                                "last_updated",
                                "deleted",
                                "body",
                            ]
                            if table == "resource"
                            else [
                                "rid",
                                "resource_type",
                                "fhir_id",
                                "version_id",
                                "last_updated",
                                "method",
                                "body",
                            ]
                        )
                    )
                    await conn.copy_records_to_table(table, records=records, columns=columns)
            batch.clear()

        for resource_type, fhir_id, data in items():
            rid += 1
            body = stamp(data, fhir_id, 1, moment)
            batch.setdefault("resource", []).append((rid, resource_type, fhir_id, 1, moment, False, body))
            batch.setdefault("resource_history", []).append(
                (rid, resource_type, fhir_id, 1, moment, "POST", body)
            )
            rows = extract(resource_type, data, FHIR_BASE)
            for table in INDEX_TABLES:
                for row in dict.fromkeys(getattr(rows, table)):
                    batch.setdefault(f"search_{table}", []).append((rid, resource_type, *row))
            if rid % 20000 == 0:
                await flush()
                print(f"  loaded {rid} resources ({rid / (time.perf_counter() - started):.0f}/s)", flush=True)
        await flush()
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('resource', 'rid'), (SELECT max(rid) FROM resource))"
        )
        rebuild = time.perf_counter()
        await conn.execute("SET maintenance_work_mem = '512MB'")
        for row in indexes:
            await conn.execute(row["def"])
        print(f"  indexes rebuilt in {time.perf_counter() - rebuild:.1f} s", flush=True)
        await conn.execute("VACUUM (ANALYZE)")
    finally:
        await conn.close()
    return rid, time.perf_counter() - started


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Query:
    name: str
    resource_type: str
    params: list[tuple[str, str]]
    access: AccessContext
    pages: int = 1


def _limited(owner: int) -> AccessContext:
    return AccessContext(
        client_id=f"bench-o{owner}",
        organization=f"Organization/o{owner}",
        permissions=parse_scopes("system/Task.rs"),
        unrestricted=False,
    )


def queries(data: DataSet, rng: random.Random, reference_locations: int) -> dict[str, list[Query]]:
    owners = list(range(ORGANIZATIONS))

    def owner() -> int:
        return rng.choices(owners, data.owner_weights)[0]

    def point(km: float = NEAR_KM) -> str:
        return f"{rng.uniform(SOUTH, NORTH):.5f}|{rng.uniform(WEST, EAST):.5f}|{km:g}|km"

    # The radius whose circle holds, at this size's density, as many Locations as NEAR_KM does
    # in the large database: the two sizes then do the same work per query.
    same_matches_km = NEAR_KM * math.sqrt(reference_locations / data.locations)

    found: dict[str, list[Query]] = {}
    for _ in range(PARAM_SETS):
        o = owner()
        open_tasks = [("owner", f"Organization/o{o}"), ("status", "requested,accepted")]
        by_priority = [*open_tasks, ("_sort", "-priority,authored-on")]
        category = f"{CATEGORY_SYSTEM}|c{rng.randrange(CATEGORIES)}"
        for query in (
            Query("near", "Location", [("near", point())], OPEN_ACCESS),
            Query("near-same-matches", "Location", [("near", point(same_matches_km))], OPEN_ACCESS),
            Query(
                "near-chain",
                "HealthcareService",
                [
                    ("service-category", category),
                    ("location.near", point()),
                    ("_include", "HealthcareService:location"),
                ],
                OPEN_ACCESS,
            ),
            Query("worklist-priority", "Task", by_priority, OPEN_ACCESS),
            Query("worklist-priority-limited", "Task", by_priority, _limited(o)),
            Query("worklist-period", "Task", [*open_tasks, ("_sort", "period")], OPEN_ACCESS),
            Query("worklist-period-limited", "Task", [*open_tasks, ("_sort", "period")], _limited(o)),
            Query("worklist-page3", "Task", by_priority, OPEN_ACCESS, pages=3),
        ):
            found.setdefault(query.name, []).append(query)
    return found


class Recorder:
    """An asyncpg connection that records the statements it runs (the raw floor replays them)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.log: list[tuple[str, str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.log.append(("fetch", sql, args))
        return await self.conn.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.log.append(("fetchval", sql, args))
        return await self.conn.fetchval(sql, *args)


async def run_engine(conn: Any, query: Query) -> int:
    """What the API does for the query (without HTTP): parse with the caller's access, then the
    page statement and includes; ``pages`` pages through the cursor keys."""
    after = None
    matches = 0
    for _ in range(query.pages):
        request = parse_search(
            (query.resource_type,),
            query.params,
            registry=registry(),
            fhir_base=FHIR_BASE,
            strict=True,
            access=query.access,
        )
        page = await SearchExecutor(conn, FHIR_BASE).search(request, after, False)
        matches = len(page.matches)
        after = page.next_keys
        if after is None:
            break
    return matches


@dataclass
class Figures:
    p50: float
    p95: float
    p99: float
    raw_p95: float
    results: float


async def measure(
    dsn: str, data: DataSet, seed: int, reference_locations: int
) -> tuple[dict[str, Figures], list[str]]:
    rng = random.Random(seed)
    all_queries = queries(data, rng, reference_locations)
    figures: dict[str, Figures] = {}
    explain: list[str] = []
    # The server's own pool, with its session settings (plan_cache_mode, jit, timeouts).
    pool = await db.create_pool(Settings(database_url=dsn))
    conn = await pool.acquire()
    try:
        for name, sets in all_queries.items():
            statements = []
            counts = []
            for query in sets:  # warm-up, and the statements of the raw floor
                recorder = Recorder(conn)
                counts.append(await run_engine(recorder, query))
                statements.append(recorder.log)
            engine: list[float] = []
            raw: list[float] = []
            for number in range(REQUESTS):
                query = sets[number % len(sets)]
                began = time.perf_counter()
                await run_engine(conn, query)
                engine.append(time.perf_counter() - began)
                began = time.perf_counter()
                for method, sql, args in statements[number % len(sets)]:
                    await getattr(conn, method)(sql, *args)
                raw.append(time.perf_counter() - began)
            engine.sort()
            raw.sort()
            figures[name] = Figures(
                percentile(engine, 0.5) * 1000,
                percentile(engine, 0.95) * 1000,
                percentile(engine, 0.99) * 1000,
                percentile(raw, 0.95) * 1000,
                sum(counts) / len(counts),
            )
        busiest = max(range(ORGANIZATIONS), key=lambda o: data.owner_weights[o])
        for name, access in (
            ("worklist-priority", OPEN_ACCESS),
            ("worklist-priority-limited", _limited(busiest)),
        ):
            query = Query(
                name,
                "Task",
                [
                    ("owner", f"Organization/o{busiest}"),
                    ("status", "requested,accepted"),
                    ("_sort", "-priority,authored-on"),
                ],
                access,
            )
            recorder = Recorder(conn)
            await run_engine(recorder, query)
            _, sql, args = recorder.log[0]
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
            document = json.loads(plan) if isinstance(plan, str) else plan
            indexes = sorted(_plan_indexes(document[0]["Plan"]))
            explain.append(
                f"  EXPLAIN ANALYZE {name}, busiest owner o{busiest} ({data.owner_weights[busiest]} Tasks):"
                f" planning {document[0]['Planning Time']:.2f} ms,"
                f" execution {document[0]['Execution Time']:.2f} ms;"
                f" indexes: {', '.join(indexes)}"
            )
    finally:
        await pool.release(conn)
        await pool.close()
    return figures, explain


def _plan_indexes(node: dict[str, Any]) -> set[str]:
    found = {node["Index Name"]} if "Index Name" in node else set()
    for child in node.get("Plans", []):
        found |= _plan_indexes(child)
    return found


# --------------------------------------------------------------------------- main


def run_size(size: int, locations: int, keep: bool, reference: int) -> tuple[dict[str, Figures], list[str]]:
    name = f"carecoord_directory_{size}"
    print(f"\n=== {size} resources: database {name}", flush=True)
    with bench_database(name, f"carecoord-directory-{size}.log", admin=admin_url(), keep=keep) as bench:
        bench.migrate()
        data, items = generate(size, locations)
        loaded, seconds = runner_run(bulk_load(bench.dsn, items))
        busiest = max(data.owner_weights)
        print(
            f"loaded {loaded} resources in {seconds:.0f} s: {data.locations} Locations,"
            f" {data.services} HealthcareServices, {data.tasks} Tasks (busiest owner {busiest})",
            flush=True,
        )
        figures, explain = runner_run(measure(bench.dsn, data, seed=size, reference_locations=reference))
        for line in explain:
            print(line, flush=True)
        return figures, explain


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--resources", type=int, default=1_000_000, help="total resources, large size")
    parser.add_argument("--small", type=int, default=10_000, help="total resources, small size")
    parser.add_argument("--locations", type=int, default=100_000, help="Locations in the large database")
    parser.add_argument("--keep-db", action="store_true")
    options = parser.parse_args(argv)
    started = time.perf_counter()
    small, _ = run_size(options.small, options.small // 10, options.keep_db, options.locations)
    large, _ = run_size(options.resources, options.locations, options.keep_db, options.locations)
    print(
        f"\nconcurrency 1, {REQUESTS} requests per query and size; engine = parse_search +"
        " SearchExecutor.search (no HTTP); raw = the same statements replayed with asyncpg"
    )
    columns = ("p50 ms", "p95 ms", "p99 ms", "raw p95")
    print(f"{'query':<28}{'size':>9}" + "".join(f"{c:>9}" for c in columns) + f"{'x raw':>7}{'rows':>7}")
    failed = False
    for name in large:
        for size, figures in ((options.small, small), (options.resources, large)):
            f = figures[name]
            print(
                f"{name:<28}{size:>9}{f.p50:>9.2f}{f.p95:>9.2f}{f.p99:>9.2f}{f.raw_p95:>9.2f}"
                f"{f.p95 / f.raw_p95 if f.raw_p95 else math.nan:>7.2f}{f.results:>7.1f}"
            )
    print("\ngoals")
    for name in large:
        p95, ratio = large[name].p95, large[name].p95 / small[name].p95
        ok = p95 < GOAL_P95_MS and ratio <= GOAL_RATIO
        failed |= not ok
        print(
            f"  {name:<28} p95 {p95:6.2f} ms (goal < {GOAL_P95_MS:.0f})   p95 {options.resources} / "
            f"{options.small}: {ratio:4.2f}x (goal <= {GOAL_RATIO})   {'met' if ok else 'NOT MET'}"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
