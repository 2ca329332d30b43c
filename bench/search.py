"""Search benchmark: the carecoord FHIR search engine over HTTP against the raw asyncpg floor.

Run from the repository root::

    .venv/bin/python bench/search.py [--sizes 10000,1000000]

For each size (total resources; default both 10k and 1M) it:

1. Creates a fresh database ``carecoord_search_<size>`` (dropping it first) and applies
   the migrations with ``carecoord migrate``.
2. Generates a care-coordination data set, deterministically: ~50 Organizations and, per
   Patient (identifier, name, birthDate, address, telecom), ~9 other resources on average:
   CarePlans, Goals, ServiceRequests (performer Organization), Tasks (one per
   ServiceRequest, owner one of the Organizations with a Zipf-like skew, focus the
   ServiceRequest) and Observations (vital signs and labs with valueQuantity). Creation
   times spread over two years and interleave patients, as a live system's would; row ids
   follow creation time.
3. Bulk loads it with exactly the rows the API write path produces: the stored body from
   ``app.fhir.repository.stamp`` and the index rows from
   ``_index_params(extract(resource_type, data, fhir_base))``, written with asyncpg
   ``copy_records_to_table`` into ``resource``, ``resource_history`` and ``search_*`` from
   parallel worker processes. The tables' constraints and indexes are dropped for the
   load and recreated from their own definitions afterwards (checked to be identical).
4. Starts the real server (``carecoord serve``), POSTs a sample of the generated
   resources through the API and checks that their stored bodies and index rows equal
   the bulk path's (then removes them), and runs ``VACUUM (ANALYZE)``.
5. Measures through HTTP (the lean keep-alive client of bench/crud.py) a query mix with
   parameter values drawn from the data, at concurrency 1 (p50/p95 latency) and 8
   (throughput): see ``QUERIES``. The 3-page walk follows the bundles' ``next`` links and
   counts as one operation.
6. Measures the raw floor in the same run: the exact statements the engine issues, run
   with asyncpg directly. They are captured by running the server's own
   ``SearchExecutor`` (app/fhir/repository.py) on a request parsed by ``parse_search``
   with the same registry and FHIR base, through a connection wrapper that records
   every statement and its arguments; the raw side then replays those statements
   (the search, its includes, the following pages). API bundles are checked to hold
   as many entries as the captured statements returned.
7. Writes ``EXPLAIN (ANALYZE, BUFFERS)`` of every statement of each query type (a typical
   and the slowest parameter set; custom plan, and the generic plan a cached prepared
   statement may switch to) to ``bench/results/explain-<size>.txt`` and prints one line
   per query: indexes used, sequential scans on the big tables, JIT.
8. Prints the table and the goal checks (p95 at 1M <= 1.5x p95 at 10k per query; p50 at
   1M < 20 ms). Results are saved to ``bench/results/search-<size>.json``; when a run
   covers only one size, the goal checks use the other size's saved results, if any.
9. Stops the server and drops the database, also on failure.

Options: ``--rounds N`` (medians over rounds, API/raw order alternating), ``--queries TEXT``
(only queries whose name contains TEXT; repeatable; results are then not saved for the goal
checks), ``--plan-cache-mode MODE`` (a PostgreSQL plan_cache_mode for the server and raw
connections, set as the database default; results saved apart), and, for investigating
plans, ``--keep-db`` (leave the loaded database, marked with its data-set parameters) and
``--reuse-db`` (skip the load when such a database exists).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import multiprocessing
import os
import random
import re
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import asyncpg  # type: ignore[import-untyped]

# bench/crud.py is importable because Python puts this script's directory on sys.path.
from crud import (
    REPO_ROOT,
    LeanClient,
    admin_url,
    bench_database,
    cores,
    loadavg,
    loop_name,
    percentile,
    runner_run,
)

from app.fhir import jsonio, repository
from app.fhir.indexing import IndexRows, extract
from app.fhir.search import SearchRequest, parse_search
from app.fhir.search_params import registry

RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_SIZES = (10_000, 1_000_000)
DB_PREFIX = "carecoord_search_"
ORGANIZATIONS = 50
PARAM_SETS = 32
"""Distinct parameter values drawn per query (cycled through by the timed runs)."""
REQUESTS = {1: 300, 8: 800}
"""Operations per query and side, by concurrency; each run also stops after RUN_SECONDS."""
RUN_SECONDS = 6.0
RAW_POOL = 8
CHUNK = 5000
"""Resources per bulk-load work unit (one COPY transaction)."""
BIG_TABLES = (
    "resource",
    "resource_history",
    "search_token",
    "search_string",
    "search_date",
    "search_reference",
    "search_quantity",
    "search_uri",
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MRN_SYSTEM = "http://hospital.example.org/mrn"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


class BenchOutOfDate(RuntimeError):
    """An app interface this bench relies on changed shape: the bench needs updating."""


def app_function(name: str) -> Callable[..., Any]:
    function = getattr(repository, name, None)
    if not callable(function):
        raise BenchOutOfDate(f"app.fhir.repository.{name} is gone; bench/search.py must be updated")
    return function


def index_layout() -> dict[str, list[str]]:
    """Index table -> value columns ("param" first), as ``_index_params`` names its arrays."""
    names = app_function("_index_params")(IndexRows())
    layout: dict[str, list[str]] = {}
    for key in names:
        table, _, column = key.partition("_")
        layout.setdefault(table, []).append(column)
    if not layout or any(columns[0] != "param" for columns in layout.values()):
        raise BenchOutOfDate(f"_index_params keys changed shape ({sorted(names)}); update bench/search.py")
    return layout


# --------------------------------------------------------------------------- the data set


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


SURNAMES = _words(
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris "
    "Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill "
    "Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips "
    "Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook Rogers "
    "Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson "
    "Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo Sanders "
    "Patel Myers Long Ross Foster Jimenez Powell Jenkins Perry Russell Sullivan Bell Coleman Butler "
    "Henderson Barnes Gonzales Fisher Vasquez Simmons Romero Jordan Patterson Alexander Hamilton "
    "Graham Reynolds Griffin Wallace Moreno West Cole Hayes Bryant Herrera Gibson Ellis Tran Medina "
    "Aguilar Stevens Murray Ford Castro Marshall Owens Harrison Fernandez McDonald Woods Washington "
    "Kennedy Wells Vargas Henry Chen Freeman Webb Tucker Guzman Burns Crawford Olson Simpson Porter "
    "Hunter Gordon Mendez Silva Shaw Snyder Mason Dixon Muñoz Hunt Hicks Holmes Palmer Wagner Black "
    "Robertson Boyd Rose Stone Salazar Fox Warren Mills Meyer Rice Schmidt García Peña Müller Øberg"
)
SYLLABLES_A = _words("Ka Lo Mar Ber Sta Vin Qui Hal Dre Or Zel Tam Ush Pra Gol Ness Fitz Van Ash Bro")
SYLLABLES_B = _words("ndt rova lund berg ström well ford ley ano etti ski wicz orth quist mann sen ridge")
GIVEN_F = _words(
    "Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Lisa Nancy Betty Sandra "
    "Margaret Ashley Kimberly Emily Donna Michelle Carol Amanda Melissa Deborah Stephanie Maria Elena "
    "Sofía Chloé Aisha Mei Priya Fatima Olga Ingrid"
)
GIVEN_M = _words(
    "James Robert John Michael David William Richard Joseph Thomas Christopher Charles Daniel Matthew "
    "Anthony Mark Donald Steven Andrew Paul Joshua Kenneth Kevin Brian George Timothy José Luis Wei "
    "Ahmed Raj Dmitri Lars Kwame Hiroshi"
)
STREETS = _words("Elm Oak Maple Cedar Pine Main Washington Lake Hill Park Sunset Lincoln Jackson Church")
CITIES = (
    ("Springfield", "IL", "627"),
    ("Columbus", "OH", "432"),
    ("Austin", "TX", "787"),
    ("Portland", "OR", "972"),
    ("Madison", "WI", "537"),
    ("Raleigh", "NC", "276"),
    ("Denver", "CO", "802"),
    ("Albany", "NY", "122"),
    ("Boise", "ID", "837"),
    ("Tucson", "AZ", "857"),
    ("Richmond", "VA", "232"),
    ("Omaha", "NE", "681"),
)
ORG_KINDS = ("Community Health", "Home Care", "Behavioral Health", "Rehab Center", "Family Clinic")
CAREPLAN_CATEGORIES = (
    ("734163000", "Care plan"),
    ("736353004", "Inpatient care plan"),
    ("719091000000102", "Home care plan"),
)
GOALS = (
    ("289169006", "Weight loss"),
    ("395004006", "Improve mobility"),
    ("281004", "Reduce HbA1c below 7%"),
    ("226234005", "Healthy diet"),
    ("160670007", "Quit smoking"),
)
REFERRALS = (
    ("3457005", "Patient referral"),
    ("306206005", "Referral to service"),
    ("183444007", "Referral for further care"),
    ("385763009", "Hospice care"),
    ("410155007", "Occupational therapy"),
    ("91251008", "Physical therapy procedure"),
)
VITALS = (  # LOINC code, display, UCUM unit, low, high, decimals
    ("8867-4", "Heart rate", "/min", 50, 120, 0),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 95, 175, 0),
    ("29463-7", "Body weight", "kg", 45, 130, 1),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 65, 250, 0),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4, 12, 1),
    ("8310-5", "Body temperature", "Cel", 35, 40, 1),
)
TASK_STATUSES = (("requested", 0.4), ("accepted", 0.25), ("completed", 0.35))


def stable_id(kind: str, *parts: int) -> str:
    """A deterministic UUID4-shaped id (the server assigns uuid4 ids)."""
    digest = hashlib.blake2b(f"{kind}/{'/'.join(map(str, parts))}".encode(), digest_size=16).digest()
    return str(uuid.UUID(bytes=digest, version=4))


def _cumulative(weights: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for weight in weights:
        total += weight
        out.append(total)
    return out


ORG_CUMULATIVE = _cumulative([1 / (rank + 1) for rank in range(ORGANIZATIONS)])
SURNAME_CUMULATIVE = _cumulative([1 / (rank + 1) ** 0.7 for rank in range(len(SURNAMES))])


def pick(rng: random.Random, cumulative: list[float]) -> int:
    return bisect.bisect_left(cumulative, rng.random() * cumulative[-1])


@dataclass(frozen=True)
class PatientPlan:
    """How many resources of each kind a patient has (deterministic per patient)."""

    careplans: int
    goals: int
    requests: int
    observations: int

    @property
    def total(self) -> int:
        return 1 + self.careplans + self.goals + 2 * self.requests + self.observations


def patient_plan(p: int) -> PatientPlan:
    rng = random.Random(f"plan/{p}")
    return PatientPlan(
        careplans=1 + (rng.random() < 0.3),
        goals=1 + (rng.random() < 0.5),
        requests=1 + (rng.random() < 0.7),
        observations=2 + (rng.random() < 0.8),
    )


def family_name(p: int) -> str:
    rng = random.Random(f"family/{p}")
    if rng.random() < 0.7:
        return SURNAMES[pick(rng, SURNAME_CUMULATIVE)]
    return rng.choice(SYLLABLES_A) + rng.choice(SYLLABLES_B)


def mrn(p: int) -> str:
    return f"MRN-{p:08d}"


def request_org(p: int, slot: int) -> int:
    """The Organization performing ServiceRequest (p, slot), which also owns its Task."""
    return pick(random.Random(f"org/{p}/{slot}"), ORG_CUMULATIVE)


def _date(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d")


def _instant(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _ref(kind: str, *parts: int) -> dict[str, str]:
    return {"reference": f"{kind}/{stable_id(kind, *parts)}"}


def build_organization(o: int, moment: datetime) -> dict[str, Any]:
    rng = random.Random(f"Organization/{o}")
    city, state, zip3 = CITIES[o % len(CITIES)]
    return {
        "resourceType": "Organization",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": f"{1700000000 + o * 7919}"}],
        "active": True,
        "type": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                        "code": "prov",
                        "display": "Healthcare Provider",
                    }
                ]
            }
        ],
        "name": f"{city} {ORG_KINDS[o % len(ORG_KINDS)]} {o}",
        "telecom": [{"system": "phone", "value": f"+1-555-{rng.randrange(1000, 9999)}", "use": "work"}],
        "address": [{"line": [f"{rng.randrange(1, 999)} {rng.choice(STREETS)} Ave"], "city": city,
                     "state": state, "postalCode": f"{zip3}{rng.randrange(10, 99)}", "country": "US"}],
    }  # fmt: skip


def build_patient(p: int, moment: datetime) -> dict[str, Any]:
    rng = random.Random(f"Patient/{p}")
    female = rng.random() < 0.52
    given = [rng.choice(GIVEN_F if female else GIVEN_M)]
    if rng.random() < 0.4:
        given.append(rng.choice(GIVEN_F if female else GIVEN_M))
    family = family_name(p)
    city, state, zip3 = CITIES[rng.randrange(len(CITIES))]
    birth = datetime(1930, 1, 1, tzinfo=UTC) + timedelta(days=rng.randrange(0, 33000))
    identifiers: list[dict[str, Any]] = [
        {
            "use": "usual",
            "type": {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}],
                "text": "Medical Record Number",
            },
            "system": MRN_SYSTEM,
            "value": mrn(p),
        }
    ]
    if rng.random() < 0.6:
        identifiers.append(
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": f"999-{p % 100:02d}-{p % 10000:04d}"}
        )
    telecom = [{"system": "phone", "value": f"+1-555-{rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}",
                "use": "mobile"}]  # fmt: skip
    if rng.random() < 0.5:
        telecom.append({"system": "email", "value": f"{given[0].lower()}.{p}@example.com", "use": "home"})
    return {
        "resourceType": "Patient",
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "identifier": identifiers,
        "active": True,
        "name": [{"use": "official", "family": family, "given": given}],
        "telecom": telecom,
        "gender": "female" if female else "male",
        "birthDate": _date(birth),
        "address": [{"use": "home", "line": [f"{rng.randrange(1, 9999)} {rng.choice(STREETS)} Street"],
                     "city": city, "state": state, "postalCode": f"{zip3}{rng.randrange(10, 99)}",
                     "country": "US"}],
    }  # fmt: skip


def build_careplan(p: int, slot: int, moment: datetime) -> dict[str, Any]:
    rng = random.Random(f"CarePlan/{p}/{slot}")
    code, display = rng.choice(CAREPLAN_CATEGORIES)
    plan = patient_plan(p)
    return {
        "resourceType": "CarePlan",
        "status": "active" if rng.random() < 0.6 else "completed",
        "intent": "plan",
        "category": [
            {"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/careplan-category",
                         "code": "assess-plan"}]},
            {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
        ],
        "title": f"{display} for patient {p}",
        "subject": _ref("Patient", p),
        "period": {"start": _date(moment)},
        "created": _instant(moment),
        "goal": [_ref("Goal", p, g) for g in range(plan.goals)],
    }  # fmt: skip


def build_goal(p: int, slot: int, moment: datetime) -> dict[str, Any]:
    rng = random.Random(f"Goal/{p}/{slot}")
    code, display = rng.choice(GOALS)
    return {
        "resourceType": "Goal",
        "lifecycleStatus": rng.choice(("active", "active", "completed", "proposed", "on-hold")),
        "description": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
        "subject": _ref("Patient", p),
        "startDate": _date(moment),
        "target": [{"dueDate": _date(moment + timedelta(days=rng.randrange(30, 365)))}],
    }


def build_servicerequest(p: int, slot: int, moment: datetime) -> dict[str, Any]:
    rng = random.Random(f"ServiceRequest/{p}/{slot}")
    code, display = rng.choice(REFERRALS)
    return {
        "resourceType": "ServiceRequest",
        "status": rng.choice(("active", "active", "completed", "completed", "revoked", "draft")),
        "intent": "order",
        "category": [{"coding": [{"system": SNOMED, "code": "3457005", "display": "Patient referral"}]}],
        "priority": rng.choice(("routine", "routine", "urgent")),
        "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
        "subject": _ref("Patient", p),
        "authoredOn": _instant(moment),
        "performer": [_ref("Organization", request_org(p, slot))],
    }


def build_task(p: int, slot: int, moment: datetime) -> dict[str, Any]:
    rng = random.Random(f"Task/{p}/{slot}")
    roll, status = rng.random(), "completed"
    for name, share in TASK_STATUSES:
        if roll < share:
            status = name
            break
        roll -= share
    return {
        "resourceType": "Task",
        "status": status,
        "intent": "order",
        "priority": "routine",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
        "description": "Fulfil the referral",
        "focus": _ref("ServiceRequest", p, slot),
        "for": _ref("Patient", p),
        "authoredOn": _instant(moment),
        "lastModified": _instant(moment),
        "owner": _ref("Organization", request_org(p, slot)),
    }


def build_observation(p: int, slot: int, moment: datetime) -> dict[str, Any]:
    rng = random.Random(f"Observation/{p}/{slot}")
    code, display, unit, low, high, decimals = rng.choice(VITALS)
    value = Decimal(f"{rng.uniform(low, high):.{decimals}f}")
    category = "laboratory" if unit in ("mg/dL", "%") else "vital-signs"
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                         "code": category}]}
        ],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
        "subject": _ref("Patient", p),
        "effectiveDateTime": _instant(moment),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }  # fmt: skip


KINDS = ("Organization", "Patient", "CarePlan", "Goal", "ServiceRequest", "Task", "Observation")
BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "CarePlan": build_careplan,
    "Goal": build_goal,
    "ServiceRequest": build_servicerequest,
    "Task": build_task,
    "Observation": build_observation,
}


def build(kind: int, p: int, slot: int, moment: datetime) -> tuple[str, str, dict[str, Any]]:
    """(resource type, id, resource) of one item of the data set."""
    rtype = KINDS[kind]
    if rtype == "Organization":
        return rtype, stable_id(rtype, p), build_organization(p, moment)
    if rtype == "Patient":
        return rtype, stable_id(rtype, p), build_patient(p, moment)
    return rtype, stable_id(rtype, p, slot), BUILDERS[rtype](p, slot, moment)


Item = tuple[int, int, int, int, int]
"""(rid, kind index, patient or organization index, slot, creation time in epoch ms)."""


@dataclass
class DataSet:
    size: int
    patients: int
    end: datetime
    items: list[Item]
    counts: Counter[str]
    tasks_by_org: Counter[int]


def plan_dataset(size: int, end: datetime) -> DataSet:
    """Every item's kind, owner patient and creation time; row ids follow creation time."""
    patients = max(1, (size - ORGANIZATIONS) // 10)
    start_ms = int((end - timedelta(days=730) - EPOCH).total_seconds() * 1000)
    end_ms = int((end - EPOCH).total_seconds() * 1000)
    span = end_ms - start_ms
    rng = random.Random(f"timeline/{size}")
    raw: list[tuple[int, int, int, int]] = [(start_ms + o * 1000, 0, o, 0) for o in range(ORGANIZATIONS)]
    tasks_by_org: Counter[int] = Counter()
    mean_gap = 60 * 86400 * 1000.0
    for p in range(patients):
        born = start_ms + ORGANIZATIONS * 1000 + int(rng.random() * (span - 3_600_000))
        raw.append((born, 1, p, 0))
        plan = patient_plan(p)

        def later(born: int = born) -> int:
            moment = born + 1000 + int(rng.expovariate(1 / mean_gap))
            return moment if moment < end_ms else born + 1000 + int(rng.random() * (end_ms - born - 1000))

        raw.extend((later(), 2, p, s) for s in range(plan.careplans))
        raw.extend((later(), 3, p, s) for s in range(plan.goals))
        for s in range(plan.requests):
            ordered = later()
            raw.append((ordered, 4, p, s))
            raw.append((ordered + 1 + rng.randrange(3_600_000), 5, p, s))  # the Task, soon after
            tasks_by_org[request_org(p, s)] += 1
        raw.extend((later(), 6, p, s) for s in range(plan.observations))
    raw.sort()
    items = [(rid, kind, p, slot, ts) for rid, (ts, kind, p, slot) in enumerate(raw, start=1)]
    counts = Counter(KINDS[kind] for _, kind, _, _ in raw)
    return DataSet(size, patients, end, items, counts, tasks_by_org)


def moment_of(ts_ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ts_ms)


# --------------------------------------------------------------------------- bulk load


def bulk_rows(items: Sequence[Item], fhir_base: str) -> dict[str, list[tuple[Any, ...]]]:
    """The rows the API write path produces for ``items`` (body by stamp, index by extract).

    The index rows are ``extract``'s rows, deduplicated in order, which is what the repository's
    ``_index_params`` sends as column arrays; the first resources of every chunk are checked
    against ``_index_params`` itself (transposing every resource's arrays back costs ~20% of
    the load), and the sample check compares with rows written through the API.
    """
    stamp = app_function("stamp")
    index_params = app_function("_index_params")
    layout = index_layout()
    tables: dict[str, list[tuple[Any, ...]]] = {"resource": [], "resource_history": []}
    for table in layout:
        tables[f"search_{table}"] = []
    for position, (rid, kind, p, slot, ts) in enumerate(items):
        moment = moment_of(ts)
        rtype, fid, data = build(kind, p, slot, moment)
        body = stamp(data, fid, 1, moment)
        tables["resource"].append((rid, rtype, fid, 1, moment, False, body))
        tables["resource_history"].append((rid, rid, rtype, fid, 1, moment, "POST", body))
        index = extract(rtype, data, fhir_base)
        checked = index_params(index) if position < 20 else None
        for table, columns in layout.items():
            rows = list(dict.fromkeys(getattr(index, table)))
            if checked is not None:
                arrays = [checked[f"{table}_{column}"] for column in columns]
                if rows != list(zip(*arrays, strict=True)):
                    raise BenchOutOfDate(f"{rtype}: _index_params no longer sends extract()'s {table} rows")
            tables[f"search_{table}"].extend((rid, rtype, *row) for row in rows)
    return tables


def table_columns(layout: dict[str, list[str]]) -> dict[str, list[str]]:
    columns = {
        "resource": ["rid", "resource_type", "fhir_id", "version_id", "last_updated", "deleted", "body"],
        "resource_history": [
            "hid", "rid", "resource_type", "fhir_id", "version_id", "last_updated", "method", "body",
        ],
    }  # fmt: skip
    for table, names in layout.items():
        columns[f"search_{table}"] = ["rid", "resource_type", *names]
    return columns


async def _copy_chunk(dsn: str, tables: dict[str, list[tuple[Any, ...]]]) -> None:
    columns = table_columns(index_layout())
    conn = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "off", "timezone": "UTC"})
    try:
        async with conn.transaction():
            for table, records in tables.items():
                if records:
                    await conn.copy_records_to_table(table, records=records, columns=columns[table])
    finally:
        await conn.close()


def load_chunk(job: tuple[str, str, list[Item]]) -> tuple[int, dict[str, int], float, float]:
    """Worker process: build and COPY one chunk; returns (resources, rows per table, cpu s, copy s)."""
    dsn, fhir_base, items = job
    started = time.process_time()
    tables = bulk_rows(items, fhir_base)
    built = time.process_time() - started
    copy_started = time.perf_counter()
    asyncio.run(_copy_chunk(dsn, tables))
    return len(items), {t: len(r) for t, r in tables.items()}, built, time.perf_counter() - copy_started


@dataclass
class SchemaObjects:
    constraints: list[tuple[str, str, str, str]]  # table, name, type, definition
    indexes: list[tuple[str, str]]  # name, definition


async def schema_objects(conn: asyncpg.Connection) -> SchemaObjects:
    constraints = await conn.fetch(
        """
        SELECT conrelid::regclass::text AS tbl, conname, contype::text, pg_get_constraintdef(oid) AS def
        FROM pg_constraint WHERE conrelid = ANY($1::regclass[]) AND contype IN ('p', 'u', 'f')
        ORDER BY conname
        """,
        list(BIG_TABLES),
    )
    indexes = await conn.fetch(
        """
        SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def
        FROM pg_index i WHERE i.indrelid = ANY($1::regclass[])
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                          WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x'))
        ORDER BY 1
        """,
        list(BIG_TABLES),
    )
    return SchemaObjects(
        [(r["tbl"], r["conname"], r["contype"], r["def"]) for r in constraints],
        [(r["name"], r["def"]) for r in indexes],
    )


async def drop_schema_objects(dsn: str) -> SchemaObjects:
    conn = await asyncpg.connect(dsn)
    try:
        objects = await schema_objects(conn)
        async with conn.transaction():
            for table, name, _kind, _ in sorted(objects.constraints, key=lambda c: c[2] != "f"):
                await conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            for name, _ in objects.indexes:
                await conn.execute(f"DROP INDEX {name}")
        return objects
    finally:
        await conn.close()


async def restore_schema_objects(dsn: str, objects: SchemaObjects, timings: list[tuple[float, str]]) -> None:
    """Recreate the dropped constraints and indexes from their own definitions, two at a time."""
    settings = {"maintenance_work_mem": "512MB", "max_parallel_maintenance_workers": "1"}
    keys = [c for c in objects.constraints if c[2] != "f"]
    statements = [f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}' for t, n, _, d in keys]
    statements += [definition for _, definition in objects.indexes]
    foreign = [f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}' for t, n, k, d in objects.constraints if k == "f"]
    queue = list(statements)

    async def runner() -> None:
        conn = await asyncpg.connect(dsn, server_settings=settings)
        try:
            while queue:
                statement = queue.pop(0)
                began = time.perf_counter()
                await conn.execute(statement)
                timings.append((time.perf_counter() - began, statement))
        finally:
            await conn.close()

    await asyncio.gather(runner(), runner())
    conn = await asyncpg.connect(dsn, server_settings=settings)
    try:
        for statement in foreign:
            await conn.execute(statement)
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('resource', 'rid'), (SELECT max(rid) FROM resource))"
        )
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('resource_history', 'hid'),"
            " (SELECT max(hid) FROM resource_history))"
        )
        after = await schema_objects(conn)
    finally:
        await conn.close()
    if sorted(after.constraints) != sorted(objects.constraints) or after.indexes != objects.indexes:
        raise RuntimeError(f"schema after the load differs from the migrated one:\n{objects}\n{after}")


@dataclass
class LoadReport:
    resources: int
    rows: dict[str, int]
    seconds: float
    build_cpu: float
    copy_seconds: float
    restore_seconds: float
    workers: int
    slowest_rebuilds: list[str]


def bulk_load(dsn: str, fhir_base: str, data: DataSet) -> LoadReport:
    started = time.perf_counter()
    objects = runner_run(drop_schema_objects(dsn))
    workers = max(1, cores())
    jobs = [(dsn, fhir_base, data.items[i : i + CHUNK]) for i in range(0, len(data.items), CHUNK)]
    rows: Counter[str] = Counter()
    build_cpu = copy_seconds = 0.0
    done = 0
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        for count, table_rows, built, copied in pool.imap_unordered(load_chunk, jobs):
            done += count
            rows.update(table_rows)
            build_cpu += built
            copy_seconds += copied
            if len(jobs) > 10 and done % (CHUNK * 20) < CHUNK:
                rate = done / (time.perf_counter() - started)
                print(f"  loaded {done}/{len(data.items)} resources ({rate:.0f}/s)", flush=True)
    restore_started = time.perf_counter()
    timings: list[tuple[float, str]] = []
    runner_run(restore_schema_objects(dsn, objects, timings))
    now = time.perf_counter()
    slowest = [
        f"{seconds:.1f} s {re.sub(r' ON (public[.])?', ' ON ', statement)[:90]}"
        for seconds, statement in sorted(timings, reverse=True)[:3]
    ]
    return LoadReport(
        done, dict(rows), now - started, build_cpu, copy_seconds, now - restore_started, workers, slowest
    )


async def vacuum_analyze(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, server_settings={"maintenance_work_mem": "512MB"})
    try:
        await conn.execute("VACUUM (ANALYZE)")
    finally:
        await conn.close()


# --------------------------------------------------------------------------- sample check


async def check_sample(client: LeanClient, dsn: str, fhir_base: str, data: DataSet) -> str:
    """POST one generated resource per type through the API; its stored body and index rows must
    equal what the bulk path wrote for the same resource. The API's copies are removed afterwards.
    """
    stamp = app_function("stamp")
    columns = table_columns(index_layout())
    picked: dict[int, Item] = {}
    for item in data.items:
        picked.setdefault(item[1], item)
        if len(picked) == len(KINDS):
            break
    conn = await asyncpg.connect(dsn)
    created: list[int] = []
    try:
        compared = 0
        for rid, kind, p, slot, ts in picked.values():
            rtype, _, resource = build(kind, p, slot, moment_of(ts))
            # What a client sends: the resource as JSON (decimals as written).
            reply = await client.request("POST", f"/fhir/{rtype}", jsonio.dumps(resource))
            if reply.status != 201 or reply.location is None:
                raise RuntimeError(f"sample POST {rtype} answered {reply.status}: {reply.body[:300]!r}")
            api_id = reply.location.split(f"/{rtype}/", 1)[1].split("/", 1)[0]
            row = await conn.fetchrow(
                "SELECT rid, last_updated, body FROM resource WHERE resource_type = $1 AND fhir_id = $2",
                rtype,
                api_id,
            )
            created.append(row["rid"])
            parsed = jsonio.loads(jsonio.dumps(resource))
            if row["body"] != stamp(parsed, api_id, 1, row["last_updated"]):
                raise RuntimeError(f"{rtype}: the API stored a body the bulk path's stamp() does not produce")
            for table, names in columns.items():
                if not table.startswith("search_"):
                    continue
                value_columns = ", ".join(names[1:])
                sql = f"SELECT {value_columns} FROM {table} WHERE rid = $1"
                api_rows = sorted(map(tuple, await conn.fetch(sql, row["rid"])), key=repr)
                bulk = sorted(map(tuple, await conn.fetch(sql, rid)), key=repr)
                if api_rows != bulk:
                    raise RuntimeError(
                        f"{rtype}: {table} rows differ between the API and the bulk path (did app/ change "
                        "while the bench ran? the loader and the server must run the same code):\n"
                        f"API:  {api_rows}\nbulk: {bulk}"
                    )
                compared += len(bulk)
        return f"sample check: {len(picked)} resources ({', '.join(KINDS)}), {compared} index rows identical"
    finally:
        if created:
            async with conn.transaction():
                for table in reversed(BIG_TABLES):
                    await conn.execute(f"DELETE FROM {table} WHERE rid = ANY($1::bigint[])", created)
        await conn.close()


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class QuerySpec:
    name: str
    resource_type: str
    pages: int
    make: Callable[[DataSet, random.Random], list[tuple[str, str]]]


def _random_patient(data: DataSet, rng: random.Random) -> int:
    return rng.randrange(data.patients)


def q_identifier(data: DataSet, rng: random.Random) -> list[tuple[str, str]]:
    return [("identifier", f"{MRN_SYSTEM}|{mrn(_random_patient(data, rng))}")]


def q_name(data: DataSet, rng: random.Random) -> list[tuple[str, str]]:
    return [("name", family_name(_random_patient(data, rng))[: rng.randint(3, 5)])]


def q_careplan(data: DataSet, rng: random.Random) -> list[tuple[str, str]]:
    return [("patient", stable_id("Patient", _random_patient(data, rng))), ("status", "active")]


def _task_owner(data: DataSet, rng: random.Random) -> int:
    """An owner drawn as a random Task's owner (busy organizations come up more often)."""
    orgs, weights = zip(*sorted(data.tasks_by_org.items()), strict=True)
    return rng.choices(orgs, weights)[0]


def q_task_worklist(data: DataSet, rng: random.Random) -> list[tuple[str, str]]:
    since = data.end - timedelta(days=rng.randint(1, 90))
    return [
        ("owner", f"Organization/{stable_id('Organization', _task_owner(data, rng))}"),
        ("status", "requested"),
        ("_lastUpdated", f"gt{_date(since)}"),
    ]


def q_chain(data: DataSet, rng: random.Random) -> list[tuple[str, str]]:
    return [("subject:Patient.name", family_name(_random_patient(data, rng))[: rng.randint(4, 6)])]


def q_goal_include(data: DataSet, rng: random.Random) -> list[tuple[str, str]]:
    return [("patient", stable_id("Patient", _random_patient(data, rng))), ("_include", "Goal:subject")]


def q_walk(data: DataSet, rng: random.Random) -> list[tuple[str, str]]:
    big = {o: n for o, n in data.tasks_by_org.items() if n > 150}
    if big:
        orgs, weights = zip(*sorted(big.items()), strict=True)
        org = rng.choices(orgs, weights)[0]
    else:
        org = data.tasks_by_org.most_common(1)[0][0]
    return [("owner", f"Organization/{stable_id('Organization', org)}"), ("_count", "50")]


QUERIES = (
    QuerySpec("Patient?identifier=sys|val", "Patient", 1, q_identifier),
    QuerySpec("Patient?name=<prefix>", "Patient", 1, q_name),
    QuerySpec("CarePlan?patient=<id>&status=active", "CarePlan", 1, q_careplan),
    QuerySpec("Task?owner&status=requested&_lastUpdated=gt", "Task", 1, q_task_worklist),
    QuerySpec("ServiceRequest?subject:Patient.name=<prefix>", "ServiceRequest", 1, q_chain),
    QuerySpec("Goal?patient=<id>&_include=Goal:subject", "Goal", 1, q_goal_include),
    QuerySpec("Task?owner&_count=50, 3-page walk", "Task", 3, q_walk),
)


# --------------------------------------------------------------------------- the raw side


@dataclass
class Captured:
    """The statements the engine ran for one parameter set, and how many rows came back."""

    pairs: list[tuple[str, str]]
    statements: list[tuple[str, list[Any]]] = field(default_factory=list)
    matches: int = 0
    included: int = 0
    pages: int = 0


class RecordingConnection:
    """An asyncpg connection that records every statement the SearchExecutor runs."""

    def __init__(self, conn: asyncpg.Connection, log: list[tuple[str, list[Any]]]) -> None:
        self._conn = conn
        self._log = log

    async def fetch(self, sql: str, *args: Any) -> Any:
        self._log.append((sql, list(args)))
        return await self._conn.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self._log.append((sql, list(args)))
        return await self._conn.fetchval(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        self._log.append((sql, list(args)))
        return await self._conn.fetchrow(sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        self._log.append((sql, list(args)))
        return await self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        raise BenchOutOfDate(
            f"SearchExecutor now uses connection.{name}, which bench/search.py does not record; update it"
        )


def parse(spec: QuerySpec, pairs: list[tuple[str, str]], fhir_base: str) -> SearchRequest:
    return parse_search((spec.resource_type,), pairs, registry=registry(), fhir_base=fhir_base, strict=False)


async def capture(
    conn: asyncpg.Connection, spec: QuerySpec, pairs: list[tuple[str, str]], fhir_base: str
) -> Captured:
    """Run the server's SearchExecutor (as run_search does) and record its statements."""
    executor_class = getattr(repository, "SearchExecutor", None)
    if executor_class is None:
        raise BenchOutOfDate("app.fhir.repository.SearchExecutor is gone; update bench/search.py")
    result = Captured(pairs)
    executor = executor_class(RecordingConnection(conn, result.statements), fhir_base)
    request = parse(spec, pairs, fhir_base)
    if request.issues:
        raise RuntimeError(f"{spec.name}: the engine ignored parameters: {request.issues}")
    after: tuple[Any, ...] | None = None
    for _ in range(spec.pages):
        page = await executor.search(request, after, False)
        result.matches += len(page.matches)
        result.included += len(page.included)
        result.pages += 1
        if page.next_keys is None:
            break
        # The next link carries the applied parameters with _count last (run_search's link()).
        following = [p for p in request.applied if p[0] != "_count"] + [("_count", str(request.count))]
        request = parse(spec, following, fhir_base)
        after = page.next_keys
    return result


# --------------------------------------------------------------------------- measurement


@dataclass
class RunStats:
    ops: int
    ops_per_s: float
    p50_ms: float
    p95_ms: float
    by_set: dict[int, list[float]] = field(default_factory=dict, repr=False)


async def drive(op: Callable[[int], Awaitable[None]], sets: int, total: int, concurrency: int) -> RunStats:
    """``op(i)`` over parameter sets i = 0, 1, ... cyclically, from ``concurrency`` tasks, at most
    ``total`` operations or RUN_SECONDS."""
    latencies: list[float] = []
    by_set: dict[int, list[float]] = {}
    issued = 0
    started = time.perf_counter()
    deadline = started + RUN_SECONDS

    async def worker() -> None:
        nonlocal issued
        while issued < total and time.perf_counter() < deadline:
            index = issued % sets
            issued += 1
            begun = time.perf_counter()
            await op(index)
            elapsed = time.perf_counter() - begun
            latencies.append(elapsed)
            by_set.setdefault(index, []).append(elapsed)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()
    return RunStats(
        len(latencies),
        len(latencies) / wall,
        percentile(latencies, 0.50) * 1000,
        percentile(latencies, 0.95) * 1000,
        by_set,
    )


_NEXT = re.compile(rb'"relation":"next","url":"([^"]+)"')
_MATCH = b'"search":{"mode":"match"}'
_INCLUDE = b'"search":{"mode":"include"}'


class ApiQuery:
    def __init__(self, client: LeanClient, base_url: str, spec: QuerySpec, sets: list[Captured]) -> None:
        self.client = client
        self.base_url = base_url
        self.spec = spec
        self.paths = [f"/fhir/{spec.resource_type}?{urlencode(c.pairs)}" for c in sets]

    async def run(self, index: int) -> tuple[int, int, int]:
        """One operation; returns (matches, includes, pages)."""
        path = self.paths[index]
        matches = included = pages = 0
        for _ in range(self.spec.pages):
            reply = await self.client.request("GET", path)
            if reply.status != 200:
                raise RuntimeError(f"GET {path} answered {reply.status}: {reply.body[:300]!r}")
            pages += 1
            matches += reply.body.count(_MATCH)
            included += reply.body.count(_INCLUDE)
            following = _NEXT.search(reply.body, 0, 4096)
            if following is None:
                break
            url = following.group(1).decode()
            if not url.startswith(self.base_url):
                raise RuntimeError(f"next link {url} is not on {self.base_url}")
            path = url[len(self.base_url) :]
        return matches, included, pages

    async def op(self, index: int) -> None:
        await self.run(index)


class RawQuery:
    def __init__(self, pool: asyncpg.Pool, sets: list[Captured]) -> None:
        self.pool = pool
        self.sets = sets

    async def op(self, index: int) -> None:
        async with self.pool.acquire() as conn:
            for sql, args in self.sets[index].statements:
                await conn.fetch(sql, *args)


@dataclass
class QueryResult:
    size: int
    query: str
    api: dict[int, RunStats]
    raw: dict[int, RunStats]
    mean_matches: float
    statements: int

    def summary(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "query": self.query,
            "api": {c: {k: v for k, v in asdict(s).items() if k != "by_set"} for c, s in self.api.items()},
            "raw": {c: {k: v for k, v in asdict(s).items() if k != "by_set"} for c, s in self.raw.items()},
            "mean_matches": self.mean_matches,
            "statements": self.statements,
        }


async def measure_query(
    spec: QuerySpec,
    data: DataSet,
    client: LeanClient,
    pool: asyncpg.Pool,
    base_url: str,
    rounds: int,
) -> tuple[QueryResult, list[Captured]]:
    fhir_base = f"{base_url}/fhir"
    rng = random.Random(f"params/{spec.name}/{data.size}")
    sets: list[Captured] = []
    async with pool.acquire() as conn:
        for _ in range(PARAM_SETS):
            sets.append(await capture(conn, spec, spec.make(data, rng), fhir_base))
    api, raw = ApiQuery(client, base_url, spec, sets), RawQuery(pool, sets)
    # Warm-up, and the check that the API returns what the captured statements return.
    for index, captured in enumerate(sets):
        got = await api.run(index)
        if got != (captured.matches, captured.included, captured.pages):
            raise RuntimeError(
                f"{spec.name} {captured.pairs}: API returned (matches, includes, pages) {got}, "
                f"the engine's statements {(captured.matches, captured.included, captured.pages)}"
            )
    api_runs: dict[int, list[RunStats]] = {1: [], 8: []}
    raw_runs: dict[int, list[RunStats]] = {1: [], 8: []}
    for round_no in range(rounds):
        for concurrency in (1, 8):
            sides = [(api.op, api_runs), (raw.op, raw_runs)]
            if round_no % 2:
                sides.reverse()
            for op, runs in sides:
                runs[concurrency].append(await drive(op, len(sets), REQUESTS[concurrency], concurrency))
    result = QueryResult(
        data.size,
        spec.name,
        {c: median_stats(runs) for c, runs in api_runs.items()},
        {c: median_stats(runs) for c, runs in raw_runs.items()},
        statistics.mean(c.matches for c in sets),
        statistics.mean(len(c.statements) for c in sets),
    )
    return result, sets


def median_stats(runs: list[RunStats]) -> RunStats:
    by_set: dict[int, list[float]] = {}
    for run in runs:
        for index, values in run.by_set.items():
            by_set.setdefault(index, []).extend(values)
    return RunStats(
        sum(r.ops for r in runs),
        statistics.median(r.ops_per_s for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p95_ms for r in runs),
        by_set,
    )


# --------------------------------------------------------------------------- EXPLAIN

_INDEX_USE = re.compile(r"(?:Index Scan|Index Only Scan)(?: Backward)? using (\S+) on (\S+)")
_BITMAP_USE = re.compile(r"Bitmap Index Scan on (\S+)")
_SEQ = re.compile(r"Seq Scan on (\S+)(?: (\w+))?.*rows=(\d+) loops=(\d+)")
_EXEC = re.compile(r"Execution Time: ([\d.]+) ms")


async def explain(conn: asyncpg.Connection, sql: str, args: list[Any], generic: bool) -> list[str]:
    if not generic:
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
        return [r[0] for r in rows]
    # The plan a cached prepared statement runs once PostgreSQL settles on a generic plan (the
    # server's asyncpg connections cache prepared statements): PREPARE with the parameter types
    # asyncpg infers, then EXPLAIN EXECUTE with the values as typed literals.
    prepared = await conn.prepare(sql)
    types = [
        await conn.fetchval("SELECT format_type($1::oid, NULL)", p.oid) for p in prepared.get_parameters()
    ]
    literals = [
        f"{await conn.fetchval(f'SELECT quote_nullable(CAST($1 AS {kind})::text)', value)}::{kind}"
        for kind, value in zip(types, args, strict=True)
    ]
    signature = f"({', '.join(types)})" if types else ""
    await conn.execute(f"PREPARE bench_generic{signature} AS {sql}")
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        execute = f"EXECUTE bench_generic({', '.join(literals)})" if literals else "EXECUTE bench_generic"
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {execute}")
        return [r[0] for r in rows]
    finally:
        await conn.execute("RESET plan_cache_mode")
        await conn.execute("DEALLOCATE bench_generic")


def plan_summary(lines: list[str]) -> tuple[list[str], list[str], bool, float]:
    """(indexes used, seq scans of big tables, JIT used, execution ms) of one EXPLAIN output."""
    indexes: list[str] = []
    seqs: list[str] = []
    for line in lines:
        for name in _INDEX_USE.findall(line):
            if name[0] not in indexes:
                indexes.append(name[0])
        for name in _BITMAP_USE.findall(line):
            if f"{name} (bitmap)" not in indexes:
                indexes.append(f"{name} (bitmap)")
        seq = _SEQ.search(line)
        if seq and seq.group(1) in BIG_TABLES:
            seqs.append(f"{seq.group(1)} (rows={seq.group(3)} loops={seq.group(4)})")
    jit = any(line.strip().startswith("JIT:") for line in lines)
    executed = [float(m.group(1)) for line in lines if (m := _EXEC.search(line))]
    return indexes, seqs, jit, sum(executed)


async def explain_query(
    pool: asyncpg.Pool, spec: QuerySpec, sets: list[Captured], raw_stats: RunStats, out: list[str]
) -> list[str]:
    """EXPLAIN every statement of a typical and of the slowest parameter set; one summary line each."""
    slowest = max(raw_stats.by_set.items(), key=lambda kv: statistics.median(kv[1]))[0]
    picks = [("typical", 0)] + ([("slowest", slowest)] if slowest != 0 else [])
    summaries = []
    async with pool.acquire() as conn:
        for label, index in picks:
            captured = sets[index]
            for generic in (False, True):
                mode = "generic plan" if generic else "custom plan"
                all_indexes: list[str] = []
                all_seqs: list[str] = []
                jit_any = False
                total_ms = 0.0
                for number, (sql, args) in enumerate(captured.statements, start=1):
                    try:
                        lines = await explain(conn, sql, args, generic)
                    except asyncpg.PostgresError as exc:
                        lines = [f"(EXPLAIN failed: {exc})"]
                    out.append(f"--- {spec.name} | {label} {captured.pairs} | statement {number} | {mode}")
                    if not generic:
                        out.append(sql)
                        out.append(f"args: {args!r}")
                    out.extend(lines)
                    out.append("")
                    indexes, seqs, jit, executed = plan_summary(lines)
                    all_indexes += [i for i in indexes if i not in all_indexes]
                    all_seqs += seqs
                    jit_any |= jit
                    total_ms += executed
                summaries.append(
                    f"{label:<7} {mode:<12} {total_ms:8.2f} ms | indexes: {', '.join(all_indexes) or '-'}"
                    f" | seq scans on big tables: {', '.join(all_seqs) or 'none'}"
                    f"{' | JIT' if jit_any else ''}"
                )
    return summaries


# --------------------------------------------------------------------------- one size


@dataclass
class SizeRun:
    size: int
    load: LoadReport | None
    counts: Counter[str]
    results: list[QueryResult]
    explain_lines: list[str]
    seconds: float


async def measure_all(
    data: DataSet,
    base_url: str,
    dsn: str,
    rounds: int,
    queries: Sequence[QuerySpec],
    explain_out: list[str],
) -> list[QueryResult]:
    client = LeanClient("127.0.0.1", int(base_url.rsplit(":", 1)[1]))
    pool_cm = asyncpg.create_pool(
        dsn,
        min_size=RAW_POOL,
        max_size=RAW_POOL,
        server_settings={"application_name": "carecoord-bench", "timezone": "UTC"},
    )
    results: list[QueryResult] = []
    try:
        sample = await check_sample(client, dsn, f"{base_url}/fhir", data)
        print(sample, flush=True)
        started = time.perf_counter()
        await vacuum_analyze(dsn)
        print(f"VACUUM (ANALYZE): {time.perf_counter() - started:.1f} s", flush=True)
        async with pool_cm as pool:
            for spec in queries:
                result, sets = await measure_query(spec, data, client, pool, base_url, rounds)
                results.append(result)
                a1, r1, a8 = result.api[1], result.raw[1], result.api[8]
                print(
                    f"  {spec.name:<46} p50 {a1.p50_ms:7.2f} ms  p95 {a1.p95_ms:7.2f} ms  "
                    f"{a8.ops_per_s:6.0f} req/s  raw p50 {r1.p50_ms:7.2f} ms",
                    flush=True,
                )
                for line in await explain_query(pool, spec, sets, result.raw[1], explain_out):
                    print(f"      {line}", flush=True)
        return results
    finally:
        await client.aclose()


DATA_VERSION = "1"
"""Bump when the generator changes: ``--reuse-db`` reloads databases marked with another version."""


async def database_marker(admin: str, name: str) -> dict[str, Any] | None:
    """The data-set marker a previous run left as the database's comment (``--keep-db``)."""
    conn = await asyncpg.connect(admin)
    try:
        comment = await conn.fetchval(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1", name
        )
    finally:
        await conn.close()
    if not comment or not comment.startswith("bench/search.py "):
        return None
    marker: dict[str, Any] = json.loads(comment.split(" ", 1)[1])
    return marker


async def mark_database(dsn: str, name: str, marker: dict[str, Any]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        text = "bench/search.py " + json.dumps(marker)
        await conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{text}'")
    finally:
        await conn.close()


async def set_plan_cache_mode(dsn: str, name: str, mode: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'ALTER DATABASE "{name}" SET plan_cache_mode = {mode}')
    finally:
        await conn.close()


def run_size(size: int, admin: str, options: argparse.Namespace) -> SizeRun:
    started = time.perf_counter()
    name = f"{DB_PREFIX}{size}"
    print(f"\n=== size {size}: database {name}", flush=True)
    marker = runner_run(database_marker(admin, name)) if options.reuse_db else None
    reuse = marker is not None and marker.get("version") == DATA_VERSION and marker.get("size") == size
    with bench_database(
        name,
        f"carecoord-search-bench-{os.getpid()}-{size}.log",
        admin=admin,
        create=not reuse,
        keep=options.keep_db,
    ) as bench:
        dsn, base_url = bench.dsn, bench.base_url
        fhir_base = f"{base_url}/fhir"
        planned = time.perf_counter()
        if reuse and marker is not None:
            end = datetime.fromisoformat(marker["end"])
        else:
            bench.migrate()
            end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        data = plan_dataset(size, end)
        kinds = ", ".join(f"{k} {v}" for k, v in data.counts.items())
        print(
            f"data set: {len(data.items)} resources ({kinds}); "
            f"planned in {time.perf_counter() - planned:.1f} s",
            flush=True,
        )
        load: LoadReport | None = None
        if reuse:
            print("bulk load: skipped, --reuse-db found this data set loaded by an earlier run", flush=True)
        else:
            load = bulk_load(dsn, fhir_base, data)
            runner_run(
                mark_database(dsn, name, {"version": DATA_VERSION, "size": size, "end": end.isoformat()})
            )
            index_rows = sum(n for t, n in load.rows.items() if t.startswith("search_"))
            print(
                f"bulk load: {load.resources} resources, {index_rows} index rows in {load.seconds:.1f} s "
                f"({load.resources / load.seconds:.0f} resources/s; {load.workers} worker processes, "
                f"build CPU {load.build_cpu:.1f} s, COPY {load.copy_seconds:.1f} s summed over workers, "
                f"constraints+indexes rebuilt in {load.restore_seconds:.1f} s)",
                flush=True,
            )
            print(f"  rows: {', '.join(f'{t} {n}' for t, n in sorted(load.rows.items()))}", flush=True)
            print(f"  slowest rebuilds: {'; '.join(load.slowest_rebuilds)}", flush=True)
        # The server migrates on start; a migration that arrived during the load (the
        # repository is edited concurrently) would be built over the loaded data there and
        # overrun the health wait, so apply it here, timed.
        if options.plan_cache_mode:
            # A database default, so that the server's connections (and the raw pool) get it too.
            runner_run(set_plan_cache_mode(dsn, name, options.plan_cache_mode))
            print(f"plan_cache_mode = {options.plan_cache_mode} for database {name}", flush=True)
        migrated = time.perf_counter()
        bench.migrate(timeout=1800)
        print(f"carecoord migrate after the load: {time.perf_counter() - migrated:.1f} s", flush=True)
        server = bench.serve()
        print(f"server pid {server.pid} at {base_url}", flush=True)
        explain_out = [f"# EXPLAIN (ANALYZE, BUFFERS), size {size}, {datetime.now(UTC).isoformat()}", ""]
        queries = (
            [q for q in QUERIES if any(f in q.name for f in options.queries)] if options.queries else QUERIES
        )
        results = runner_run(measure_all(data, base_url, dsn, options.rounds, queries, explain_out))
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        suffix = "" if len(queries) == len(QUERIES) else "-partial"
        if options.plan_cache_mode:
            suffix += f"-{options.plan_cache_mode}"
        (RESULTS_DIR / f"explain-{size}{suffix}.txt").write_text("\n".join(explain_out) + "\n")
        run = SizeRun(size, load, data.counts, results, explain_out, time.perf_counter() - started)
        if not suffix:  # a partial or variant run does not replace the results the goal checks use
            (RESULTS_DIR / f"search-{size}.json").write_text(
                json.dumps(
                    {
                        "size": size,
                        "when": datetime.now(UTC).isoformat(timespec="seconds"),
                        "load": asdict(load) if load else None,
                        "results": [r.summary() for r in results],
                    },
                    indent=1,
                )
            )
        return run


# --------------------------------------------------------------------------- report


def saved_results(size: int) -> tuple[str, dict[str, dict[str, Any]]] | None:
    path = RESULTS_DIR / f"search-{size}.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["when"], {r["query"]: r for r in saved["results"]}


def report(runs: list[SizeRun]) -> list[str]:
    header = (
        f"{'size':>8} {'query':<46} | {'p50 ms':>7} {'p95 ms':>7} {'req/s':>6} | "
        f"{'raw p50':>7} {'raw/s':>6} | {'p50 ratio':>9} {'req/s ratio':>11} | {'hits':>5}"
    )
    out = [
        "p50/p95: concurrency 1 (one request after another); req/s: concurrency 8. raw = the engine's",
        "own statements replayed with asyncpg. ratio p50 = API p50 / raw p50; req/s ratio = API / raw at",
        "c=8. The walk is 3 requests (3 statements raw) per operation. hits = mean matches per operation.",
        header,
        "-" * len(header),
    ]
    for run in runs:
        for r in run.results:
            a1, a8, r1, r8 = r.api[1], r.api[8], r.raw[1], r.raw[8]
            out.append(
                f"{r.size:>8} {r.query:<46} | {a1.p50_ms:>7.2f} {a1.p95_ms:>7.2f} {a8.ops_per_s:>6.0f} | "
                f"{r1.p50_ms:>7.2f} {r8.ops_per_s:>6.0f} | {a1.p50_ms / r1.p50_ms:>8.1f}x "
                f"{a8.ops_per_s / r8.ops_per_s:>11.2f} | {r.mean_matches:>5.1f}"
            )
    out += ["", *goal_checks(runs)]
    return out


def goal_checks(runs: list[SizeRun]) -> list[str]:
    here = {run.size: {r.query: r.summary() for r in run.results} for run in runs}
    sources = {}
    for size in (10_000, 1_000_000):
        if size in here:
            sources[size] = ("this run", here[size])
        elif (saved := saved_results(size)) is not None:
            sources[size] = (f"saved run of {saved[0]}", saved[1])
    out = ["Goal checks (c=1 latencies):"]
    if set(sources) != {10_000, 1_000_000}:
        missing = sorted({10_000, 1_000_000} - set(sources))
        out.append(f"  needs results at 10k and 1M; missing {missing} (run with --sizes including them)")
    else:
        for size in (10_000, 1_000_000):
            out.append(f"  {size}: {sources[size][0]}")
    small = sources.get(10_000, ("", {}))[1]
    large = sources.get(1_000_000, ("", {}))[1]
    for spec in QUERIES:
        parts = []
        if spec.name in small and spec.name in large:
            p95_large = _stat(large[spec.name], "p95_ms")
            p95_small = _stat(small[spec.name], "p95_ms")
            ok = p95_large <= 1.5 * p95_small
            parts.append(
                f"p95 1M/10k = {p95_large:.2f}/{p95_small:.2f} = {p95_large / p95_small:.2f}x "
                f"{'PASS' if ok else 'FAIL'} (<= 1.5x)"
            )
        if spec.name in large:
            p50 = _stat(large[spec.name], "p50_ms")
            parts.append(f"p50 at 1M = {p50:.2f} ms {'PASS' if p50 < 20 else 'FAIL'} (< 20 ms)")
        out.append(f"  {spec.name:<46} {'; '.join(parts) or 'n/a'}")
    return out


def _stat(summary: dict[str, Any], metric: str) -> float:
    api = summary["api"]
    return float((api[1] if 1 in api else api["1"])[metric])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="comma-separated total resource counts (default 10000,1000000)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds per query; medians are reported")
    parser.add_argument(
        "--queries", action="append", default=[], help="only queries whose name contains this (repeatable)"
    )
    parser.add_argument(
        "--plan-cache-mode",
        choices=("auto", "force_custom_plan", "force_generic_plan"),
        help="set PostgreSQL's plan_cache_mode as the databases' default (server and raw side); "
        "default: leave it alone",
    )
    parser.add_argument(
        "--keep-db", action="store_true", help="keep the databases (for investigation; default: drop them)"
    )
    parser.add_argument(
        "--reuse-db",
        action="store_true",
        help="reuse a database kept by an earlier --keep-db run with the same size and data version",
    )
    args = parser.parse_args(argv)
    args.sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    admin = admin_url()
    print(
        f"nproc {cores()}; loadavg {loadavg()}; {loop_name()} loop; asyncpg {asyncpg.__version__}; "
        f"per query and side: {REQUESTS[1]} ops at c=1, {REQUESTS[8]} at c=8 (each capped at "
        f"{RUN_SECONDS:.0f} s), {PARAM_SETS} parameter sets, {args.rounds} round(s); "
        f"plan_cache_mode {args.plan_cache_mode or 'server default'}",
        flush=True,
    )
    runs = [run_size(size, admin, args) for size in args.sizes]
    print()
    for run in runs:
        loaded = f"load {run.load.seconds:.0f} s" if run.load else "data reused"
        print(f"size {run.size}: {run.seconds:.0f} s in all ({loaded})")
    print("\n".join(report(runs)))
    print(f"\nEXPLAIN output: {RESULTS_DIR}/explain-<size>.txt")
    print(f"total run time {time.perf_counter() - started:.0f} s; loadavg at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
