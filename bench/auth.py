"""Authorization benchmark: read and search with bearer tokens against the same server with
authorization off, in one run.

Run from the repository root (about 3 minutes)::

    .venv/bin/python bench/auth.py [--rounds 3]

What it does
------------
1. Creates a fresh database ``carecoord_bench_auth`` on the local PostgreSQL (admin
   connection from ``DATABASE_URL``, else ``postgresql://postgres@127.0.0.1:5432/postgres``)
   and applies the migrations.
2. Registers a backend-services client with ``carecoord clients add --json`` (scope
   ``system/*.cruds``), as an operator would.
3. Starts three real servers (``carecoord serve``, one uvicorn process each) on the same
   database: ``off`` (CARECOORD_AUTH_ENABLED=false, no audit), ``auth`` (tokens checked,
   audit off) and ``auth+audit`` (the default configuration: tokens and an AuditEvent per
   interaction). The token comes from ``POST /auth/token`` (client_secret_basic).
4. Loads 1,000 Patients, then measures ``GET /fhir/Patient/{id}`` and
   ``GET /fhir/Patient?family=...`` at concurrency 1 and 16 against each server, the
   servers' order rotating every round, with bench/crud.py's lean HTTP client. Only one
   server is under load at a time; the others idle.
5. Prints throughput and p50/p95 per server and the ratios auth/off and auth+audit/off
   (medians over rounds). The goal of issue 4 is >= 0.85 for the default configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# bench/crud.py is importable because Python puts this script's directory on sys.path.
from crud import (
    REPO_ROOT,
    LeanClient,
    RunStats,
    bench_database,
    carecoord_command,
    cpu_line,
    drive,
    free_port,
    patient_payload,
    server_env,
    stop_server,
    tail,
    wait_healthy,
)

BENCH_DB = "carecoord_bench_auth"
PATIENTS = 1000
FAMILIES = [f"Family{n:03d}" for n in range(200)]
REQUESTS = {1: 600, 16: 2000}
WARMUP = 300
MODES = ("off", "auth", "auth+audit")
SCENARIOS = (("read", 1), ("read", 16), ("search", 1), ("search", 16))


@dataclass
class Server:
    mode: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    client: LeanClient | None = None
    token: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Results:
    runs: dict[tuple[str, str, int], list[RunStats]] = field(default_factory=dict)


def register_client(env: dict[str, str]) -> tuple[str, str]:
    done = subprocess.run(
        carecoord_command("clients", "add", "--name", "bench", "--scope", "system/*.cruds", "--json"),
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"clients add failed:\n{done.stdout}\n{done.stderr}")
    registered = json.loads(done.stdout.strip().splitlines()[-1])
    return registered["client_id"], registered["client_secret"]


def fetch_token(base_url: str, client_id: str, secret: str) -> str:
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    response = httpx.post(
        f"{base_url}/auth/token",
        data={"grant_type": "client_credentials", "scope": "system/*.cruds"},
        headers={"authorization": f"Basic {basic}"},
        timeout=30,
    )
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


def start(server: Server) -> None:
    with server.log_path.open("wb") as log:
        server.process = subprocess.Popen(
            carecoord_command("serve", "--host", "127.0.0.1", "--port", str(server.port), "--workers", "1"),
            env=server.env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_healthy(server.base_url, server.process, server.log_path)


async def load_patients(client: LeanClient) -> list[str]:
    payload = patient_payload()
    ids = []
    for number in range(PATIENTS):
        payload["name"][0]["family"] = FAMILIES[number % len(FAMILIES)]
        reply = await client.request("POST", "/fhir/Patient", json.dumps(payload).encode())
        if reply.status != 201 or reply.location is None:
            raise RuntimeError(f"create answered {reply.status}: {reply.body[:300]!r}")
        ids.append(reply.location.rsplit("/", 3)[1])
    return ids


def operations(client: LeanClient, ids: list[str]) -> dict[str, Callable[[], Awaitable[None]]]:
    async def read() -> None:
        reply = await client.request("GET", f"/fhir/Patient/{random.choice(ids)}")
        if reply.status != 200:
            raise RuntimeError(f"read answered {reply.status}: {reply.body[:300]!r}")

    async def search() -> None:
        reply = await client.request("GET", f"/fhir/Patient?family={random.choice(FAMILIES)}&_count=10")
        if reply.status != 200:
            raise RuntimeError(f"search answered {reply.status}: {reply.body[:300]!r}")

    return {"read": read, "search": search}


async def measure(servers: list[Server], ids: list[str], rounds: int) -> Results:
    results = Results()
    ops = {s.mode: operations(s.client, ids) for s in servers if s.client is not None}
    for server in servers:
        for name in ("read", "search"):
            await drive(ops[server.mode][name], WARMUP, 16)
    for round_no in range(rounds):
        order = servers[round_no % len(servers) :] + servers[: round_no % len(servers)]
        for name, concurrency in SCENARIOS:
            for server in order:
                pid = server.process.pid if server.process else None
                stats = await drive(ops[server.mode][name], REQUESTS[concurrency], concurrency, pid)
                results.runs.setdefault((server.mode, name, concurrency), []).append(stats)
        print(f"round {round_no + 1}/{rounds} done", flush=True)
    return results


def report(results: Results) -> list[str]:
    def med(mode: str, name: str, concurrency: int, metric: str) -> float:
        return float(statistics.median(getattr(r, metric) for r in results.runs[(mode, name, concurrency)]))

    header = (
        f"{'scenario':<7} {'c':>3} | "
        + " | ".join(f"{mode:>10} req/s p50 ms" for mode in MODES)
        + " | auth/off  auth+audit/off"
    )
    lines = [header, "-" * len(header)]
    for name, concurrency in SCENARIOS:
        cells = []
        for mode in MODES:
            ops = med(mode, name, concurrency, "ops_per_s")
            cells.append(f"{ops:>16.0f} {med(mode, name, concurrency, 'p50_ms'):>6.2f}")
        off = med("off", name, concurrency, "ops_per_s")
        ratio_auth = med("auth", name, concurrency, "ops_per_s") / off
        ratio_audit = med("auth+audit", name, concurrency, "ops_per_s") / off
        lines.append(
            f"{name:<7} {concurrency:>3} | "
            + " | ".join(cells)
            + f" | {ratio_auth:>8.3f} {ratio_audit:>14.3f}"
        )
    lines.append("")
    lines.append(
        "server CPU ms per request (median): "
        + "; ".join(
            f"{mode} {name} c={c}: {med(mode, name, c, 'server_cpu_ms_per_op'):.2f}"
            for mode in MODES
            for name, c in SCENARIOS
            if c == 16
        )
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    servers: list[Server] = []
    with bench_database(BENCH_DB, f"carecoord-bench-auth-migrate-{os.getpid()}.log") as bench:
        bench.migrate()
        client_id, secret = register_client(bench.env)
        try:
            for mode in MODES:
                port = free_port()
                env = server_env(bench.env["DATABASE_URL"], f"http://127.0.0.1:{port}", auth=mode != "off")
                env["CARECOORD_AUDIT_ENABLED"] = "true" if mode == "auth+audit" else "false"
                env["CARECOORD_TOKEN_TTL"] = "3600"
                log = (
                    Path(tempfile.gettempdir())
                    / f"carecoord-bench-auth-{mode.replace('+', '-')}-{os.getpid()}.log"
                )
                server = Server(mode, port, env, log)
                start(server)
                servers.append(server)
            for server in servers:
                if server.mode != "off":
                    server.token = fetch_token(server.base_url, client_id, secret)
            results = asyncio.run(_run_with_tokens(servers, args.rounds))
        except BaseException:
            for server in servers:
                print(f"{server.mode} server log tail:\n{tail(server.log_path)}", file=sys.stderr)
            raise
        finally:
            for server in servers:
                if server.process is not None:
                    stop_server(server.process)
                server.log_path.unlink(missing_ok=True)
    print()
    print(
        f"{PATIENTS} Patients; {REQUESTS[1]} requests at c=1, {REQUESTS[16]} at c=16 per round; "
        f"{args.rounds} rounds, server order rotating; medians",
        flush=True,
    )
    for line in report(results):
        print(line)
    return 0


async def _run_with_tokens(servers: list[Server], rounds: int) -> Results:
    for server in servers:
        server.client = LeanClient("127.0.0.1", server.port)
        if server.token:
            server.client.fixed_headers += f"authorization: Bearer {server.token}\r\n"
    try:
        ids = await load_patients(servers[0].client)  # type: ignore[arg-type]
        return await measure(servers, ids, rounds)
    finally:
        for server in servers:
            if server.client is not None:
                await server.client.aclose()


if __name__ == "__main__":
    raise SystemExit(main())
