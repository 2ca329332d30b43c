"""``Patient/[id]/$everything`` benchmark: the operation over HTTP against the raw asyncpg floor.

Run from the repository root::

    .venv/bin/python bench/everything.py [--resources 1000000] [--requests 200]

1. Creates a fresh database ``carecoord_everything_<resources>`` and migrates it.
2. Bulk loads the care-coordination data set of bench/search.py (Organizations, Patients with
   CarePlans, Goals, ServiceRequests, Tasks, Observations; the API write path's exact rows, by
   COPY from worker processes) for all but the measured records.
3. Starts the real server (``carecoord serve``; authorization and audit off, as the other
   benches: bench/auth.py measures their cost) and writes through the API, as transactions, a
   small directory (Practitioners, PractitionerRoles, Locations, HealthcareServices) and
   ``--patients`` records of ``--record`` resources each (Observations, Conditions,
   ServiceRequests, Tasks, Appointments, Goals, CarePlans, DocumentReferences and the Patient),
   which reference the directory and the loaded Organizations. ``VACUUM (ANALYZE)``.
4. Measures at concurrency 1, cycling over the records, p50/p95/p99 of: one page of 1,000
   entries (``_count=1000``, the largest page; a 1,000-resource record plus what it references is
   ~1,070 entries), the first page (the default ``_count``), a care window (``start``/``end`` over
   one year, ``_count=1000``) and the page walk (every page at ``_count=100``, following ``next``
   links, as one operation). The client counts entries and finds the next link without parsing.
5. Measures the raw floor: the exact statement(s) the server runs, built by the server's own
   ``EverythingQuery`` (app/fhir/everything.py) and replayed with asyncpg; the API's entry counts
   are checked against the floor's rows.
6. Prints EXPLAIN (ANALYZE, BUFFERS) summaries (``--explain``: whole plans), the table with
   API/raw ratios and the goal check (1,000-entry page p95 < 150 ms), then stops the server and
   drops the database (also on failure).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from crud import LeanClient, admin_url, bench_database, cores, loadavg, percentile, runner_run
from search import ORGANIZATIONS, bulk_load, plan_dataset, stable_id, vacuum_analyze

from app.fhir.access import OPEN_ACCESS
from app.fhir.everything import DEFAULT_COUNT, EverythingQuery, parse_request
from app.fhir.operations import OperationParameters, ParameterValue
from app.fhir.repository import FhirRepository

DB_PREFIX = "carecoord_everything_"
GOAL_P95_MS = 150.0
NEXT_LINK = re.compile(rb'"relation":"next","url":"([^"]+)"')
TRANSACTION_ENTRIES = 250
DIRECTORY = {"Practitioner": 30, "PractitionerRole": 10, "Location": 10, "HealthcareService": 10}
RECORD_MIX = (
    ("Observation", 0.50),
    ("Condition", 0.10),
    ("ServiceRequest", 0.08),
    ("Task", 0.08),
    ("Appointment", 0.06),
    ("Goal", 0.06),
    ("CarePlan", 0.06),
    ("DocumentReference", 0.06),
)


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


def organization(n: int) -> str:
    return f"Organization/{stable_id('Organization', n % ORGANIZATIONS)}"


def directory_resources() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in range(DIRECTORY["Practitioner"]):
        out.append({"resourceType": "Practitioner", "id": f"ev-dr-{n}", "name": [{"family": f"Doctor{n}"}]})
    for n in range(DIRECTORY["PractitionerRole"]):
        out.append(
            {
                "resourceType": "PractitionerRole",
                "id": f"ev-role-{n}",
                "practitioner": ref(f"Practitioner/ev-dr-{n}"),
                "organization": ref(organization(n)),
            }
        )
    for n in range(DIRECTORY["Location"]):
        out.append({"resourceType": "Location", "id": f"ev-loc-{n}", "name": f"Room {n}"})
    for n in range(DIRECTORY["HealthcareService"]):
        out.append(
            {
                "resourceType": "HealthcareService",
                "id": f"ev-hs-{n}",
                "name": f"Service {n}",
                "providedBy": ref(organization(n)),
            }
        )
    return out


def record_resource(patient: str, rtype: str, n: int, when: datetime) -> dict[str, Any]:
    """One resource of a measured record: a care date spread over three years, references into
    the directory (so the answer carries included resources)."""
    day = when.strftime("%Y-%m-%d")
    subject = ref(f"Patient/{patient}")
    doctor = ref(f"Practitioner/ev-dr-{n % DIRECTORY['Practitioner']}")
    base: dict[str, Any] = {"resourceType": rtype, "id": f"{patient}-{rtype.lower()}-{n}"}
    if rtype == "Observation":
        return {
            **base,
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"},
            "subject": subject,
            "effectiveDateTime": day,
            "performer": [doctor],
            "valueQuantity": {"value": 60 + n % 40, "unit": "/min"},
        }
    if rtype == "Condition":
        return {**base, "subject": subject, "onsetDateTime": day, "asserter": doctor, "code": {"text": "x"}}
    if rtype == "ServiceRequest":
        return {
            **base,
            "status": "active",
            "intent": "order",
            "subject": subject,
            "occurrenceDateTime": day,
            "requester": ref(f"PractitionerRole/ev-role-{n % DIRECTORY['PractitionerRole']}"),
            "performer": [ref(f"HealthcareService/ev-hs-{n % DIRECTORY['HealthcareService']}")],
        }
    if rtype == "Task":
        return {
            **base,
            "status": "requested",
            "intent": "order",
            "for": subject,
            "authoredOn": day,
            "executionPeriod": {"start": day},
            "owner": ref(organization(n)),
        }
    if rtype == "Appointment":
        return {
            **base,
            "status": "booked",
            "start": f"{day}T09:00:00Z",
            "end": f"{day}T09:30:00Z",
            "participant": [
                {"actor": subject, "status": "accepted"},
                {"actor": ref(f"Location/ev-loc-{n % DIRECTORY['Location']}"), "status": "accepted"},
            ],
        }
    if rtype == "Goal":
        return {
            **base,
            "lifecycleStatus": "active",
            "description": {"text": "goal"},
            "subject": subject,
            "startDate": day,
        }
    if rtype == "CarePlan":
        return {**base, "status": "active", "intent": "plan", "subject": subject, "period": {"start": day}}
    return {
        **base,
        "status": "current",
        "type": {"text": "note"},
        "subject": subject,
        "author": [doctor],
        "context": {"period": {"start": day}},
        "content": [{"attachment": {"contentType": "text/plain", "url": "http://example.org/note"}}],
    }


def record_resources(patient: str, size: int, end: datetime) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "resourceType": "Patient",
            "id": patient,
            "name": [{"family": patient}],
            "managingOrganization": ref(organization(0)),
            "generalPractitioner": [ref("Practitioner/ev-dr-0")],
        }
    ]
    counts = [(rtype, round(share * (size - 1))) for rtype, share in RECORD_MIX]
    counts[0] = (counts[0][0], counts[0][1] + (size - 1) - sum(c for _, c in counts))
    for rtype, count in counts:
        for n in range(count):
            when = end - timedelta(days=(n * 37) % 1095)
            out.append(record_resource(patient, rtype, n, when))
    return out


async def write_transactions(client: LeanClient, resources: list[dict[str, Any]]) -> None:
    for start in range(0, len(resources), TRANSACTION_ENTRIES):
        chunk = resources[start : start + TRANSACTION_ENTRIES]
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": r,
                    "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
                }
                for r in chunk
            ],
        }
        reply = await client.request("POST", "/fhir", json.dumps(bundle).encode())
        if reply.status != 200:
            raise RuntimeError(f"transaction answered {reply.status}: {reply.body[:400]!r}")


# --------------------------------------------------------------------------- measuring


def parameters(pairs: list[tuple[str, str]]) -> OperationParameters:
    return OperationParameters(tuple(ParameterValue(name, value) for name, value in pairs))


async def floor_statements(
    conn: asyncpg.Connection, fhir_base: str, patient: str, pairs: list[tuple[str, str]], walk: bool
) -> list[tuple[str, list[Any]]]:
    """The statements the server runs for one operation (every page when ``walk``), built by the
    server's own EverythingQuery."""
    repo = FhirRepository(conn, OPEN_ACCESS, fhir_base=fhir_base)
    statements = []
    request = parse_request(patient, parameters(pairs), None)
    while True:
        query = EverythingQuery(repo, request)
        statements.append(query.statement())
        page = await query.page()
        if not walk or page.next_after is None:
            return statements
        request = parse_request(patient, parameters(pairs), {"f": request.fingerprint, "k": page.next_after})


async def timed(op: Callable[[int], Awaitable[int]], requests: int) -> tuple[list[float], int]:
    latencies = []
    entries = 0
    for number in range(requests):
        began = time.perf_counter()
        entries = await op(number)
        latencies.append((time.perf_counter() - began) * 1000)
    latencies.sort()
    return latencies, entries


def summary(latencies: list[float]) -> tuple[float, float, float]:
    return percentile(latencies, 0.50), percentile(latencies, 0.95), percentile(latencies, 0.99)


async def measure(
    base_url: str, dsn: str, patients: list[str], requests: int, end: datetime, explain_plans: bool
) -> list[tuple[str, tuple[float, float, float], tuple[float, float, float], int]]:
    fhir_base = f"{base_url}/fhir"
    host, port = base_url.removeprefix("http://").split(":")
    client = LeanClient(host, int(port))
    conn = await asyncpg.connect(dsn, server_settings={"timezone": "UTC"})
    window = [("start", (end - timedelta(days=365)).strftime("%Y-%m-%d")), ("end", end.strftime("%Y-%m-%d"))]
    cases = (
        ("1,000 entries in one page (_count=1000)", [("_count", "1000")], False),
        (f"first page (_count={DEFAULT_COUNT})", [], False),
        ("care window, 1 year (_count=1000)", [*window, ("_count", "1000")], False),
        ("page walk (_count=100, all pages)", [("_count", "100")], True),
    )
    rows = []
    try:
        for name, pairs, walk in cases:

            async def api(number: int, pairs: list[tuple[str, str]] = pairs, walk: bool = walk) -> int:
                patient = patients[number % len(patients)]
                path = f"/fhir/Patient/{patient}/$everything"
                if pairs:
                    path += "?" + "&".join(f"{k}={v}" for k, v in pairs)
                entries = 0
                while True:
                    reply = await client.request("GET", path)
                    if reply.status != 200:
                        raise RuntimeError(f"{path} answered {reply.status}: {reply.body[:300]!r}")
                    # Counted and followed without parsing the Bundle: the floor parses nothing either.
                    entries += reply.body.count(b'"fullUrl":')
                    following = NEXT_LINK.search(reply.body)
                    if not walk or following is None:
                        return entries
                    path = following.group(1).decode().removeprefix(base_url)

            captured = {p: await floor_statements(conn, fhir_base, p, pairs, walk) for p in patients}

            page_size = int(dict(pairs).get("_count", DEFAULT_COUNT))

            async def raw(
                number: int,
                captured: dict[str, list[tuple[str, list[Any]]]] = captured,
                page_size: int = page_size,
            ) -> int:
                entries = 0
                for sql, args in captured[patients[number % len(patients)]]:
                    found = await conn.fetch(sql, *args)
                    entries += min(len(found), page_size)
                return entries

            await api(0), await raw(0)  # warm both sides (plans, caches)
            api_latencies, api_entries = await timed(api, requests)
            raw_latencies, raw_entries = await timed(raw, requests)
            if api_entries != raw_entries:
                raise RuntimeError(f"{name}: the API answered {api_entries} entries, the floor {raw_entries}")
            rows.append((name, summary(api_latencies), summary(raw_latencies), api_entries))
            print(f"  measured {name}: {api_entries} entries", flush=True)
        walk = await floor_statements(conn, fhir_base, patients[0], [("_count", "100")], True)
        for title, (sql, args) in (("first page", walk[0]), ("second page", walk[1])):
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
            print(f"EXPLAIN (ANALYZE, BUFFERS), page walk, {title}:")
            lines = [r[0] for r in plan]
            shown = lines if explain_plans else [lines[1], lines[-1]]
            for line in shown:
                print(f"  {line.strip()}")
    finally:
        await conn.close()
        await client.aclose()
    return rows


def run(options: argparse.Namespace) -> int:
    started = time.perf_counter()
    record_total = options.patients * options.record
    name = f"{DB_PREFIX}{options.resources}"
    with bench_database(
        name, f"carecoord-everything-bench-{options.resources}.log", admin=admin_url()
    ) as bench:
        bench.migrate()
        end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        data = plan_dataset(max(ORGANIZATIONS + 1, options.resources - record_total), end)
        load = bulk_load(bench.dsn, f"{bench.base_url}/fhir", data)
        print(f"bulk load: {load.resources} resources in {load.seconds:.0f} s", flush=True)
        bench.migrate(timeout=1800)
        bench.serve()
        host, port = bench.base_url.removeprefix("http://").split(":")
        patients = [f"ev-patient-{n}" for n in range(options.patients)]

        async def write() -> None:
            client = LeanClient(host, int(port))
            try:
                await write_transactions(client, directory_resources())
                for patient in patients:
                    await write_transactions(client, record_resources(patient, options.record, end))
            finally:
                await client.aclose()

        written = time.perf_counter()
        runner_run(write())
        print(
            f"wrote {options.patients} records of {options.record} resources through the API"
            f" in {time.perf_counter() - written:.0f} s",
            flush=True,
        )
        runner_run(vacuum_analyze(bench.dsn))
        total = load.resources + record_total + sum(DIRECTORY.values())
        rows = runner_run(
            measure(bench.base_url, bench.dsn, patients, options.requests, end, options.explain)
        )
    print(
        f"\n$everything at {total} resources; nproc {cores()}; loadavg {loadavg()};"
        f" {options.requests} requests per case at concurrency 1, cycling over {options.patients} records"
    )
    print(f"{'case':<38} {'entries':>7}  {'API p50/p95/p99 ms':>22}  {'raw p50/p95/p99 ms':>22}  p95 ratio")
    for case, api, raw, entries in rows:
        api_text = "/".join(f"{v:.1f}" for v in api)
        raw_text = "/".join(f"{v:.1f}" for v in raw)
        print(f"{case:<38} {entries:>7}  {api_text:>22}  {raw_text:>22}  {api[1] / raw[1]:.2f}x")
    whole = rows[0][1][1]
    verdict = "met" if whole < GOAL_P95_MS else "NOT met"
    print(f"goal: 1,000-entry page p95 {whole:.1f} ms < {GOAL_P95_MS:.0f} ms at {total} resources: {verdict}")
    print(f"total run time {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--resources", type=int, default=1_000_000, help="resources in the database in all")
    parser.add_argument("--patients", type=int, default=3, help="measured records (cycled through)")
    parser.add_argument("--record", type=int, default=1000, help="resources per measured record")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per case and side")
    parser.add_argument("--explain", action="store_true", help="print the whole EXPLAIN (ANALYZE) plans")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
