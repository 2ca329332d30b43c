"""CRUD benchmark: the carecoord HTTP API against the raw asyncpg floor.

Run from the repository root (about 2 minutes)::

    .venv/bin/python bench/crud.py

Options: ``--client httpx`` drives the API with one shared ``httpx.AsyncClient``
instead of the default lean client (see 3. below); ``--rounds N`` (default 3).
``--audit`` measures something else: FHIR read at 1 and 16 connections against servers
started alternately with ``CARECOORD_AUDIT_ENABLED=false`` and ``true`` (authorization off in
both), and prints req/s and p50/p95/p99 of each and the on/off throughput ratio: the cost of
the audit trail (issue 14).

What it does
------------
1. Creates a fresh database ``carecoord_bench`` on the local PostgreSQL (admin
   connection from ``DATABASE_URL`` if set, else
   ``postgresql://postgres@127.0.0.1:5432/postgres``), dropping it first, and applies
   the migrations with ``carecoord migrate``.
2. Starts the real server as a subprocess (``carecoord serve`` on a free port: one
   uvicorn process, access log off, the default asyncpg pool of up to 10
   connections) and waits for ``GET /healthz``.
3. Measures, through HTTP, FHIR create (``POST /fhir/Patient`` with a ~1.9 KB US
   Core-style Patient) and read (``GET /fhir/Patient/{id}``): throughput and p50/p95
   latency at concurrency 1 and 32 (asyncio tasks sharing one client). wrk is not
   assumed installed; the default load generator is a lean keep-alive HTTP/1.1 client
   in this file, because httpx measured 1-3 ms of client CPU per request on the 2-core
   reference machine, as much as the server's own work, and that CPU is taken from the
   server being measured. ``--client httpx`` uses httpx all the same.
4. Measures the raw floor in the same run: the same rows written and read with
   asyncpg directly (pool of 32), issuing exactly the statements the server issues.
   The SQL is the repository's own: ``_INSERT`` and ``_READ`` in
   ``app/fhir/repository.py`` are ``app.fhir.sql.Statement`` objects (``.sql`` with
   ``$n`` placeholders, ``.args(params)`` for the values), sent unchanged. A create is
   BEGIN; the one INSERT ... CTE statement writing the ``resource`` row, its
   ``resource_history`` row and the search-index rows; COMMIT, as the server does for
   every writing request (``connection.transaction()`` in ``app/deps.py``). The stored body
   comes from the server's ``stamp`` and the index rows from its own
   ``extract``/``_index_params`` (built once, since they depend only on the payload). A
   read is the bare SELECT without a transaction, as the server reads (autocommit).
5. Repeats everything for several rounds, alternating which side goes first, and
   reports medians, so that machine noise hits both sides alike.
6. Stops the server and drops the database, also on failure.

Why ratios
----------
Absolute requests/s depend on the machine (here a small, shared VM where the client,
the server and PostgreSQL compete for the same cores). The ratio API/raw is the
portable figure: the share of the database's own capacity that survives the HTTP
stack (uvicorn, FastAPI, JSON parsing, FHIR validation, pooling). A throughput
ratio near 1 means the database is the limit; a small ratio means the Python layer
is. Client and server CPU time per request are printed as well, because on a machine
with few cores a Python load generator takes CPU away from the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import httpx

from app.fhir import jsonio, repository
from app.fhir.indexing import extract
from app.fhir.sql import Statement
from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "carecoord_bench"
ROUNDS = 3
"""Default number of rounds (``--rounds``); medians over rounds are reported."""
REQUESTS = {1: 500, 32: 2000}
"""Measured operations per scenario and round, by concurrency."""
WARMUP = 300
RAW_POOL_SIZE = 32
SERVER_POOL = (
    f"asyncpg pool of up to {Settings.model_fields['db_pool_size'].default} connections "
    "(CARECOORD_DB_POOL_SIZE default, app/db.py)"
)
CLIENTS = {
    "lean": "lean keep-alive HTTP/1.1 client (one connection per in-flight request)",
    "httpx": "one shared httpx.AsyncClient",
}
CLIENT_SATURATED = 0.85
CLIENT_NOTICEABLE = 0.25
"""Client CPU share of one core above which the client's cost to the server is worth a note."""
"""Client CPU share of one core above which the load generator is called the bottleneck."""

T = TypeVar("T")

# --------------------------------------------------------------------------- payload


def patient_payload() -> dict[str, Any]:
    """A realistic US Core Patient (profiles, race/ethnicity/birthsex extensions, ~1.9 KB)."""
    us_core = "http://hl7.org/fhir/us/core/StructureDefinition"
    return {
        "resourceType": "Patient",
        "meta": {"profile": [f"{us_core}/us-core-patient"]},
        "extension": [
            {
                "url": f"{us_core}/us-core-race",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {
                            "system": "urn:oid:2.16.840.1.113883.6.238",
                            "code": "2106-3",
                            "display": "White",
                        },
                    },
                    {"url": "text", "valueString": "White"},
                ],
            },
            {
                "url": f"{us_core}/us-core-ethnicity",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {
                            "system": "urn:oid:2.16.840.1.113883.6.238",
                            "code": "2186-5",
                            "display": "Not Hispanic or Latino",
                        },
                    },
                    {"url": "text", "valueString": "Not Hispanic or Latino"},
                ],
            },
            {"url": f"{us_core}/us-core-birthsex", "valueCode": "F"},
        ],
        "identifier": [
            {
                "use": "usual",
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "MR",
                            "display": "Medical Record Number",
                        }
                    ],
                    "text": "Medical Record Number",
                },
                "system": "http://hospital.example.org/mrn",
                "value": "MRN-00481516",
            },
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS"}]
                },
                "system": "http://hl7.org/fhir/sid/us-ssn",
                "value": "999-55-1234",
            },
        ],
        "active": True,
        "name": [
            {"use": "official", "family": "Rivera-Thompson", "given": ["Maria", "Elena"], "prefix": ["Ms."]},
            {"use": "usual", "given": ["Ellie"]},
        ],
        "telecom": [
            {"system": "phone", "value": "+1-555-867-5309", "use": "mobile", "rank": 1},
            {"system": "email", "value": "maria.rivera@example.com", "use": "home"},
        ],
        "gender": "female",
        "birthDate": "1984-07-23",
        "address": [
            {
                "use": "home",
                "type": "physical",
                "line": ["1428 Elm Street", "Apt 3B"],
                "city": "Springfield",
                "district": "Sangamon County",
                "state": "IL",
                "postalCode": "62704",
                "country": "US",
                "period": {"start": "2016-04-01"},
            }
        ],
        "maritalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                    "code": "M",
                    "display": "Married",
                }
            ]
        },
        "communication": [
            {
                "language": {
                    "coding": [{"system": "urn:ietf:bcp:47", "code": "en-US", "display": "English (US)"}]
                },
                "preferred": True,
            },
        ],
    }


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of this process, of the server process, and busy/total of the machine."""

    wall: float
    client: float
    server: float
    machine_busy: float
    machine_total: float


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def cpu_snapshot(server_pid: int | None) -> CpuSnapshot:
    server = 0.0
    if server_pid is not None:
        # /proc/<pid>/stat: utime and stime are fields 14 and 15 (after the parenthesised comm).
        fields = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / _clock_ticks()
    cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = cpu[3] + cpu[4]  # idle + iowait
    total = sum(cpu[:8])  # guest time is already counted in user
    return CpuSnapshot(
        time.perf_counter(),
        time.process_time(),
        server,
        (total - idle) / _clock_ticks(),
        total / _clock_ticks(),
    )


@dataclass(frozen=True)
class RunStats:
    ops_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu_ms_per_op: float
    server_cpu_ms_per_op: float
    client_core_share: float
    machine_busy: float


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    rank = max(1, int(-(-fraction * len(sorted_values) // 1)))
    return sorted_values[rank - 1]


async def drive(
    op: Callable[[], Awaitable[None]], total: int, concurrency: int, server_pid: int | None = None
) -> RunStats:
    """Run ``op`` ``total`` times from ``concurrency`` tasks; latency per op, throughput overall."""
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await op()
            latencies.append(time.perf_counter() - started)

    before = cpu_snapshot(server_pid)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    after = cpu_snapshot(server_pid)
    wall = after.wall - before.wall
    latencies.sort()
    machine_total = after.machine_total - before.machine_total
    return RunStats(
        ops_per_s=total / wall,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p95_ms=percentile(latencies, 0.95) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        client_cpu_ms_per_op=(after.client - before.client) / total * 1000,
        server_cpu_ms_per_op=(after.server - before.server) / total * 1000,
        client_core_share=(after.client - before.client) / wall,
        machine_busy=(after.machine_busy - before.machine_busy) / machine_total if machine_total else 0.0,
    )


# --------------------------------------------------------------------------- the two sides


class BenchOutOfDate(RuntimeError):
    """The repository internals this bench replays changed shape: the bench needs updating."""


def repository_statement(name: str, expected: set[str]) -> Statement:
    """``app.fhir.repository.<name>``, checked to be a Statement with the expected parameters."""
    statement = getattr(repository, name, None)
    if not isinstance(statement, Statement):
        raise BenchOutOfDate(
            f"app.fhir.repository.{name} is {type(statement).__name__}, not an app.fhir.sql.Statement; "
            "bench/crud.py replays the repository's statements and must be updated"
        )
    if set(statement.names) != expected:
        raise BenchOutOfDate(
            f"app.fhir.repository.{name} now takes parameters {sorted(statement.names)}, the bench "
            f"knows {sorted(expected)}; update bench/crud.py"
        )
    return statement


def repository_function(name: str) -> Callable[..., Any]:
    function = getattr(repository, name, None)
    if not callable(function):
        raise BenchOutOfDate(f"app.fhir.repository.{name} is gone; update bench/crud.py")
    return function


def now_ms() -> datetime:
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class Reply:
    status: int
    location: str | None
    body: bytes


class HttpClient(Protocol):
    async def request(self, method: str, path: str, body: bytes = b"") -> Reply: ...

    async def aclose(self) -> None: ...


FHIR_HEADERS = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()


class LeanClient:
    """A minimal keep-alive HTTP/1.1 load generator (the role wrk plays): pooled connections,
    prebuilt request heads, Content-Length bodies only. It costs ~0.1-0.2 ms of CPU per
    request where httpx costs 1-3 ms, which matters when client and server share two cores.
    """

    IDLE_LIMIT = 2.0
    """Seconds; uvicorn closes connections idle for 5 s, so older ones are replaced, not reused."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[_Connection] = []
        fixed = "".join(f"{name}: {value}\r\n" for name, value in FHIR_HEADERS.items())
        self.fixed_headers = f"host: {host}:{port}\r\n{fixed}"

    async def _acquire(self) -> _Connection:
        while self.idle:
            conn = self.idle.pop()
            if time.monotonic() - conn.last_used < self.IDLE_LIMIT:
                return conn
            conn.writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Connection(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> Reply:
        conn = await self._acquire()
        head = f"{method} {path} HTTP/1.1\r\n{self.fixed_headers}content-length: {len(body)}\r\n\r\n"
        conn.writer.write(head.encode() + body)
        raw_head = await conn.reader.readuntil(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise RuntimeError(f"response without Content-Length: {raw_head[:200]!r}")
        data = await conn.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            conn.writer.close()
        else:
            conn.last_used = time.monotonic()
            self.idle.append(conn)
        return Reply(status, headers.get("location"), data)

    async def aclose(self) -> None:
        for conn in self.idle:
            conn.writer.close()
        self.idle.clear()


class HttpxClient:
    """One shared httpx.AsyncClient (``--client httpx``)."""

    def __init__(self, base_url: str) -> None:
        # uvicorn closes connections idle for 5 s; retire ours sooner, so that an idle pooled
        # connection is never reused just as the server hangs up on it.
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0)
        self.client = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60.0, headers=FHIR_HEADERS)

    async def request(self, method: str, path: str, body: bytes = b"") -> Reply:
        response = await self.client.request(method, path, content=body or None)
        return Reply(response.status_code, response.headers.get("location"), response.content)

    async def aclose(self) -> None:
        await self.client.aclose()


class ApiSide:
    """FHIR create/read through the HTTP server."""

    def __init__(self, client: HttpClient, payload: bytes, ids: list[str]) -> None:
        self.client = client
        self.payload = payload
        self.ids = ids
        self.last_read_size = 0

    async def create(self) -> None:
        reply = await self.client.request("POST", "/fhir/Patient", self.payload)
        if reply.status != 201 or reply.location is None:
            raise RuntimeError(f"create answered {reply.status}: {reply.body[:300]!r}")
        # Location: {base}/Patient/{id}/_history/1
        self.ids.append(reply.location.rsplit("/", 3)[1])

    async def read(self) -> None:
        reply = await self.client.request("GET", f"/fhir/Patient/{random.choice(self.ids)}")
        if reply.status != 200:
            raise RuntimeError(f"read answered {reply.status}: {reply.body[:300]!r}")
        self.last_read_size = len(reply.body)


class RawSide:
    """The same statements straight through an asyncpg pool: the floor under the API."""

    def __init__(self, pool: asyncpg.Pool, payload: bytes, ids: list[str], fhir_base: str) -> None:
        self.pool = pool
        # The resource as the server sees it after parsing the request body (Decimal-preserving).
        self.payload: dict[str, Any] = jsonio.loads(payload)
        self.ids = ids
        self.stamp = repository_function("stamp")
        index_params = repository_function("_index_params")
        self.read_sql = repository_statement("_READ", {"rtype", "fid"}).sql
        # The search-index rows the server writes with each create, built by the server's own code.
        # They depend only on the client's payload (no id, no timestamp), so they are built once here
        # and the timed operation spends its CPU on the database round trips alone.
        index: dict[str, Any] = index_params(extract("Patient", self.payload, fhir_base))
        self.fixed_params = {"rtype": "Patient", "method": "POST", "org": None, "bookkeeping": False, **index}
        self.insert = repository_statement("_INSERT", {*self.fixed_params, "fid", "ts", "body"})
        self.index_rows = sum(len(values) for name, values in index.items() if name.endswith("_param"))
        if not self.index_rows:
            raise BenchOutOfDate("extract() produced no index rows for the Patient payload")

    def stored_body(self, fhir_id: str, moment: datetime) -> str:
        """The row body as the server stores it (the repository's ``stamp``)."""
        body: str = self.stamp(self.payload, fhir_id, 1, moment)
        return body

    async def create(self) -> None:
        """BEGIN; the repository's INSERT ... CTE statement; COMMIT (as the server's create)."""
        fhir_id = str(uuid.uuid4())
        moment = now_ms()
        params = {
            **self.fixed_params,
            "fid": fhir_id,
            "ts": moment,
            "body": self.stored_body(fhir_id, moment),
        }
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(self.insert.sql, *self.insert.args(params))
        if row is None:
            raise RuntimeError("raw insert returned no row")
        self.ids.append(fhir_id)

    async def read(self) -> None:
        """The bare SELECT, no transaction (autocommit), as the server's read."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(self.read_sql, "Patient", random.choice(self.ids))
        if row is None:
            raise RuntimeError("raw read found no row")


# --------------------------------------------------------------------------- the benchmark


SCENARIOS: tuple[tuple[str, int], ...] = (("create", 1), ("create", 32), ("read", 1), ("read", 32))


@dataclass
class Results:
    api: dict[tuple[str, int], list[RunStats]] = field(default_factory=dict)
    raw: dict[tuple[str, int], list[RunStats]] = field(default_factory=dict)


async def run_benchmark(
    base_url: str, raw_dsn: str, server_pid: int, client_kind: str, rounds: int
) -> Results:
    payload = patient_payload()
    payload_bytes = json.dumps(payload, separators=(",", ":")).encode()
    ids: list[str] = []
    results = Results()
    random.seed(20260101)
    url = urlsplit(base_url)
    client: HttpClient = (
        LeanClient(url.hostname or "127.0.0.1", url.port or 80)
        if client_kind == "lean"
        else HttpxClient(base_url)
    )
    pool_cm = asyncpg.create_pool(
        raw_dsn,
        min_size=RAW_POOL_SIZE,
        max_size=RAW_POOL_SIZE,
        server_settings={"application_name": "carecoord-bench", "timezone": "UTC"},
    )
    try:
        async with pool_cm as pool:
            raw = RawSide(pool, payload_bytes, ids, f"{base_url}/fhir")
            await measure(ApiSide(client, payload_bytes, ids), raw, results, server_pid, rounds)
    finally:
        await client.aclose()
    return results


async def measure(api: ApiSide, raw: RawSide, results: Results, server_pid: int, rounds: int) -> None:
    """Warm up, then ``rounds`` rounds of every scenario, API and raw in alternating order."""
    # Warm-up: fill both connection pools, prepare statements, load the validator.
    for op in (api.create, api.read, raw.create, raw.read):
        await drive(op, WARMUP, 32)
    raw_row = len(raw.stored_body(str(uuid.uuid4()), now_ms()))
    print(
        f"payload: {len(api.payload)} bytes posted; stored row {raw_row} bytes (raw), "
        f"{api.last_read_size} bytes (API read); {raw.index_rows} search-index rows per create",
        flush=True,
    )
    for round_no in range(rounds):
        for kind, concurrency in SCENARIOS:
            api_op = api.create if kind == "create" else api.read
            raw_op = raw.create if kind == "create" else raw.read
            sides: list[tuple[str, Callable[[], Awaitable[None]]]] = [("api", api_op), ("raw", raw_op)]
            if round_no % 2:
                sides.reverse()
            for side, side_op in sides:
                stats = await drive(
                    side_op, REQUESTS[concurrency], concurrency, server_pid if side == "api" else None
                )
                target = results.api if side == "api" else results.raw
                target.setdefault((kind, concurrency), []).append(stats)
        print(f"round {round_no + 1}/{rounds} done ({len(api.ids)} patients stored)", flush=True)


# --------------------------------------------------------------------------- setup and teardown


def admin_url() -> str:
    """The admin connection as a plain libpq URL (asyncpg does not take ``+asyncpg``)."""
    url = os.environ.get("DATABASE_URL") or DEFAULT_ADMIN_URL
    return re.sub(r"^postgres(ql)?(\+asyncpg)?://", "postgresql://", url)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


async def recreate_database(admin: str, name: str, *, create: bool) -> str:
    """Drop ``name`` (forcing out stray sessions) and, if asked, create it again; return the PG version."""
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            await conn.execute(f'CREATE DATABASE "{name}"')
        version: str = await conn.fetchval("SELECT version()")
        sync_commit: str = await conn.fetchval("SHOW synchronous_commit")
        return f"{version}; synchronous_commit={sync_commit}"
    finally:
        await conn.close()


def carecoord_command(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "carecoord"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "app.cli", *args]


def server_env(database_url: str, base_url: str, *, auth: bool = False) -> dict[str, str]:
    """The server's environment. These benchmarks measure storage and HTTP against the raw
    database floor, so authorization and audit are off unless ``auth``; their own cost is
    measured side by side by bench/auth.py."""
    env = dict(os.environ)
    env.pop("CARECOORD_DATABASE_URL", None)
    env["DATABASE_URL"] = database_url
    env["CARECOORD_BASE_URL"] = base_url
    env["CARECOORD_AUTH_ENABLED"] = "true" if auth else "false"
    env["CARECOORD_AUDIT_ENABLED"] = "true" if auth else "false"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_healthy(
    base_url: str,
    server: subprocess.Popen[bytes],
    log_path: Path,
    timeout: float = 60.0,
    *,
    ready: bool = False,
) -> None:
    """Poll ``GET /healthz`` (``/readyz`` if ``ready``) until it answers 200."""
    path, state = ("/readyz", "ready") if ready else ("/healthz", "healthy")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(f"{base_url}{path}", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not {state} after {timeout:.0f}s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: closes the connection pool
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=5)


@dataclass
class BenchDatabase:
    """A benchmark database and the real server on it, as set up by ``bench_database``."""

    admin: str
    name: str
    dsn: str
    """Plain libpq URL of the database (for asyncpg)."""
    port: int
    base_url: str
    env: dict[str, str]
    """The server's (and ``carecoord migrate``'s) environment."""
    log_path: Path
    pg_version: str = ""
    """PostgreSQL version and synchronous_commit, when the database was created."""
    server: subprocess.Popen[bytes] | None = None

    def migrate(self, timeout: float = 120) -> None:
        """Apply the migrations with ``carecoord migrate``."""
        migrated = subprocess.run(
            carecoord_command("migrate"),
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"carecoord migrate failed:\n{migrated.stdout}\n{migrated.stderr}")

    def serve(self, *, ready: bool = False) -> subprocess.Popen[bytes]:
        """Start ``carecoord serve`` (output to the log file) and wait for ``/healthz`` (or ``/readyz``)."""
        with self.log_path.open("wb") as log:
            self.server = subprocess.Popen(
                carecoord_command(
                    "serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"
                ),
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_healthy(self.base_url, self.server, self.log_path, ready=ready)
        return self.server


@contextmanager
def bench_database(
    name: str, log_name: str, *, admin: str | None = None, create: bool = True, keep: bool = False
) -> Iterator[BenchDatabase]:
    """Database ``name`` (dropped and created afresh unless ``create`` is false) and a free port
    for the server, whose output goes to ``log_name`` in the temp directory. Call ``migrate()``
    and ``serve()`` inside. On the way out, also on failure, the server is stopped (its log tail
    printed on failure) and the database dropped, unless ``keep``.
    """
    admin = admin or admin_url()
    dsn = with_database(admin, name)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = server_env(dsn.replace("postgresql://", "postgresql+asyncpg://", 1), base_url)
    bench = BenchDatabase(admin, name, dsn, port, base_url, env, Path(tempfile.gettempdir()) / log_name)
    if create:
        bench.pg_version = runner_run(recreate_database(admin, name, create=True))
    try:
        yield bench
    except BaseException:
        if bench.server is not None:
            print(f"server log tail:\n{tail(bench.log_path)}", file=sys.stderr)
        raise
    finally:
        if bench.server is not None:
            stop_server(bench.server)
        if keep:
            print(f'database {name} kept (--keep-db); drop it with: DROP DATABASE "{name}"', flush=True)
        else:
            runner_run(recreate_database(admin, name, create=False))
        bench.log_path.unlink(missing_ok=True)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_line() -> str:
    """Cores, CPU model and load: the first line of every bench's machine info."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"nproc: {cores()} (os.cpu_count {os.cpu_count()}); CPU: {model}; loadavg at start: {loadavg()}"


def machine_info(pg_version: str, client_kind: str, rounds: int) -> list[str]:
    wrk = "installed (not used)" if shutil.which("wrk") else "not installed"
    return [
        cpu_line(),
        f"PostgreSQL: {pg_version}",
        f"Python {platform.python_version()}, httpx {httpx.__version__}, asyncpg {asyncpg.__version__}, "
        f"load generator: {CLIENTS[client_kind]}, {loop_name()} loop; wrk: {wrk}",
        f"server: 1 uvicorn process, {SERVER_POOL}; raw: asyncpg pool of {RAW_POOL_SIZE}",
        f"per scenario and round: {REQUESTS[1]} ops at c=1, {REQUESTS[32]} ops at c=32; {rounds} rounds "
        f"(API/raw order alternating), medians reported; warm-up {WARMUP} ops per operation",
    ]


# --------------------------------------------------------------------------- report


def med(runs: Sequence[RunStats], metric: str) -> float:
    """The median over rounds of one RunStats field."""
    return float(statistics.median(getattr(run, metric) for run in runs))


def per_round(runs: Sequence[RunStats]) -> str:
    return "/".join(f"{run.ops_per_s:.0f}" for run in runs)


def report(results: Results) -> list[str]:
    header = (
        f"{'scenario':<8} {'c':>3} | {'API req/s':>9} {'p50 ms':>7} {'p95 ms':>7} | "
        f"{'raw ops/s':>9} {'p50 ms':>7} {'p95 ms':>7} | {'API/raw req/s':>13} {'API/raw p50':>11}"
    )
    out = [header, "-" * len(header)]
    for key in SCENARIOS:
        api, raw = results.api[key], results.raw[key]
        a_ops, r_ops = med(api, "ops_per_s"), med(raw, "ops_per_s")
        a50, r50 = med(api, "p50_ms"), med(raw, "p50_ms")
        out.append(
            f"{key[0]:<8} {key[1]:>3} | {a_ops:>9.0f} {a50:>7.2f} {med(api, 'p95_ms'):>7.2f} | "
            f"{r_ops:>9.0f} {r50:>7.2f} {med(raw, 'p95_ms'):>7.2f} | "
            f"{a_ops / r_ops:>13.3f} {a50 / r50:>10.1f}x"
        )
    out += [
        "",
        "raw create = BEGIN; repository _INSERT (resource + history + index rows); COMMIT;",
        "raw read = repository _READ, bare SELECT without a transaction (as the server does both).",
    ]
    header2 = (
        f"{'scenario':<8} {'c':>3} | {'API req/s per round':>19} {'raw ops/s per round':>19} | "
        f"{'client ms':>9} {'server ms':>9} {'client':>6} {'machine':>7}"
    )
    out += [
        "",
        "Rounds and CPU of the API runs (CPU ms per request for the load generator and the server process,",
        "client = share of one core used by the load generator, machine = busy share of all cores; medians):",
        header2,
        "-" * len(header2),
    ]
    saturated: list[str] = []
    for key in SCENARIOS:
        api = results.api[key]
        share = med(api, "client_core_share")
        if share >= CLIENT_SATURATED:
            saturated.append(f"{key[0]} c={key[1]} ({share:.0%} of a core)")
        out.append(
            f"{key[0]:<8} {key[1]:>3} | {per_round(api):>19} {per_round(results.raw[key]):>19} | "
            f"{med(api, 'client_cpu_ms_per_op'):>9.2f} {med(api, 'server_cpu_ms_per_op'):>9.2f} "
            f"{share:>6.0%} {med(api, 'machine_busy'):>7.0%}"
        )
    busiest = max(med(results.api[key], "client_core_share") for key in SCENARIOS)
    if saturated:
        out.append(f"NOTE: the Python load generator is (near) CPU-saturated in: {', '.join(saturated)}.")
    if busiest >= CLIENT_NOTICEABLE and cores() <= 4:
        out.append(
            f"NOTE: {cores()} cores shared by the client, the server and PostgreSQL, and the load generator "
            f"used up to {busiest:.0%} of one: that CPU is taken from the server, so API figures under load "
            "are a lower bound (more client processes would not help on this machine)."
        )
    elif busiest < CLIENT_NOTICEABLE:
        out.append(
            f"Load generator: at most {busiest:.0%} of one core; it is not the bottleneck. Server CPU ms per "
            "request x API req/s = the share of a core the single server process used."
        )
    return out


def print_report(lines: Sequence[str], started: float) -> None:
    """The report after a blank line, then the total run time since ``started`` and the load."""
    print()
    print("\n".join(lines))
    print(f"\ntotal run time {time.perf_counter() - started:.0f} s; loadavg at end: {loadavg()}")


# --------------------------------------------------------------------------- main


def disable_failed_sniffio_import() -> None:
    """httpcore 1.0 runs ``import sniffio`` on every request; without sniffio installed (anyio 4.16
    no longer needs it) each failed import rescans sys.path, ~0.3 ms per request here. A None entry
    in sys.modules makes the import fail at once, and httpcore then assumes asyncio, as it should.
    """
    if importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def runner_run(coro: Coroutine[Any, Any, T]) -> T:
    if loop_name() == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--client", choices=sorted(CLIENTS), default="lean", help="HTTP load generator")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds; medians are reported")
    parser.add_argument(
        "--audit",
        action="store_true",
        help="instead: FHIR read at 1 and 16 connections with CARECOORD_AUDIT_ENABLED false vs true"
        " (the audit trail's cost: req/s, p50/p95/p99, ratios)",
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- audit on vs off

AUDIT_CONCURRENCY = (1, 16)
AUDIT_REQUESTS = 3000
"""Reads per concurrency, server and round (enough for a p99 of 30 samples)."""
AUDIT_PATIENTS = 200


async def audit_round(
    base_url: str, server_pid: int, client_kind: str, ids: list[str]
) -> dict[int, RunStats]:
    """One server's reads at each of AUDIT_CONCURRENCY (the patients created on first use)."""
    url = urlsplit(base_url)
    client: HttpClient = (
        LeanClient(url.hostname or "127.0.0.1", url.port or 80)
        if client_kind == "lean"
        else HttpxClient(base_url)
    )
    payload = json.dumps(patient_payload(), separators=(",", ":")).encode()
    api = ApiSide(client, payload, ids)
    try:
        while len(ids) < AUDIT_PATIENTS:
            await api.create()
        await drive(api.read, WARMUP, 16)
        return {c: await drive(api.read, AUDIT_REQUESTS, c, server_pid) for c in AUDIT_CONCURRENCY}
    finally:
        await client.aclose()


def audit_report(results: dict[bool, list[dict[int, RunStats]]]) -> list[str]:
    header = (
        f"{'audit':<5} {'c':>3} | {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} | "
        f"{'p99/p50':>7} | {'req/s per round':>20}"
    )
    out = [header, "-" * len(header)]
    for concurrency in AUDIT_CONCURRENCY:
        for audit in (False, True):
            runs = [r[concurrency] for r in results[audit]]
            p50, p99 = med(runs, "p50_ms"), med(runs, "p99_ms")
            out.append(
                f"{'on' if audit else 'off':<5} {concurrency:>3} | {med(runs, 'ops_per_s'):>7.0f} {p50:>7.2f}"
                f" {med(runs, 'p95_ms'):>7.2f} {p99:>7.2f} | {p99 / p50:>6.1f}x | {per_round(runs):>20}"
            )
    out.append("")
    for concurrency in AUDIT_CONCURRENCY:
        on = med([r[concurrency] for r in results[True]], "ops_per_s")
        off = med([r[concurrency] for r in results[False]], "ops_per_s")
        out.append(f"c={concurrency}: audit on keeps {on / off:.1%} of the throughput with audit off")
    return out


def audit_main(args: argparse.Namespace) -> int:
    """Servers alternate between audit off and on, round by round, on one database."""
    started = time.perf_counter()
    results: dict[bool, list[dict[int, RunStats]]] = {False: [], True: []}
    ids: list[str] = []
    name = f"{BENCH_DB}_audit_{os.getpid()}"
    with bench_database(name, f"carecoord-bench-audit-{os.getpid()}.log") as bench:
        bench.migrate()
        info = machine_info(bench.pg_version, args.client, args.rounds)
        print("\n".join(line for line in info if not line.startswith("per scenario")), flush=True)
        print(
            f"per server and round: {AUDIT_REQUESTS} reads at each c in {AUDIT_CONCURRENCY} after"
            f" {WARMUP} warm-up reads, {AUDIT_PATIENTS} Patients; servers alternate audit off/on;"
            f" {args.rounds} rounds, medians reported; authorization off in both",
            flush=True,
        )
        for round_no in range(args.rounds):
            for audit in (False, True) if round_no % 2 == 0 else (True, False):
                bench.env["CARECOORD_AUDIT_ENABLED"] = "true" if audit else "false"
                server = bench.serve()
                results[audit].append(runner_run(audit_round(bench.base_url, server.pid, args.client, ids)))
                stop_server(server)
                bench.server = None
            print(f"round {round_no + 1}/{args.rounds} done", flush=True)
    print_report(audit_report(results), started)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client == "httpx":
        disable_failed_sniffio_import()
    if args.audit:
        return audit_main(args)
    started = time.perf_counter()
    with bench_database(BENCH_DB, f"carecoord-bench-server-{os.getpid()}.log") as bench:
        bench.migrate()
        server = bench.serve()
        print("\n".join(machine_info(bench.pg_version, args.client, args.rounds)), flush=True)
        print(f"server pid {server.pid} at {bench.base_url}, database {BENCH_DB}", flush=True)
        results = runner_run(run_benchmark(bench.base_url, bench.dsn, server.pid, args.client, args.rounds))
    print_report(report(results), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
