"""Bulk Data export throughput and memory (issue 12), one command:

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
        .venv/bin/python bench/export.py --resources 200000

1. Creates a fresh database (``carecoord_bench_export``), migrates it and stores N Patients
   (each its resource row and its history version, ~500 bytes of JSON) with one INSERT ... SELECT
   (the seeding is not measured).
2. Starts ``carecoord serve --no-worker`` (authorization off, as the other benches) and one
   ``carecoord worker``, kicks off a system ``$export``, polls the status until the manifest, and
   downloads every file.
3. Prints resources per second (kick-off to manifest, and to the last byte downloaded) and the
   peak RSS of the server and the worker (sampled every 50 ms), next to the goals: >= 30,000
   resources/s, peak RSS < 300 MB whatever N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time

import asyncpg
import httpx
import psutil
from crud import (
    admin_url,
    carecoord_command,
    cpu_line,
    free_port,
    recreate_database,
    server_env,
    stop_server,
    tail,
    wait_healthy,
    with_database,
)

NAME = "carecoord_bench_export"
GOAL_RATE = 30_000
GOAL_RSS_MB = 300


async def seed(dsn: str, count: int) -> None:
    body = (
        '{"resourceType":"Patient","id":"p-\' || n || \'","meta":{"versionId":"1","lastUpdated":'
        '"2026-01-01T00:00:00.000+00:00"},"identifier":[{"system":"urn:bench","value":"\' || n || \'"}],'
        '"name":[{"family":"Bench","given":["Patient","\' || n || \'"]}],"gender":"unknown",'
        '"birthDate":"1970-01-01","address":[{"line":["1 Main Street"],"city":"Springfield",'
        '"postalCode":"12345","country":"US"}],"telecom":[{"system":"phone","value":"555-0100"}]}'
    )
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO resource (resource_type, fhir_id, version_id, last_updated, deleted, body)"
            f" SELECT 'Patient', 'p-' || n, 1, now(), false, '{body}' FROM generate_series(1, {count}) n"
        )
        await conn.execute(
            "INSERT INTO resource_history"
            " (rid, resource_type, fhir_id, version_id, last_updated, method, body)"
            " SELECT rid, resource_type, fhir_id, 1, last_updated, 'POST', body FROM resource"
        )
        await conn.execute("ANALYZE resource; ANALYZE resource_history")
    finally:
        await conn.close()


class PeakRss:
    """Samples the RSS of processes every 50 ms in a thread; keeps each one's peak (MB)."""

    def __init__(self, processes: dict[str, subprocess.Popen[bytes]]) -> None:
        self.handles = {name: psutil.Process(p.pid) for name, p in processes.items()}
        self.peaks = dict.fromkeys(processes, 0.0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            for name, handle in self.handles.items():
                try:
                    rss = handle.memory_info().rss
                    rss += sum(c.memory_info().rss for c in handle.children(recursive=True))
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks[name], rss / 1e6)

    def close(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        return self.peaks


async def live_resources(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM resource WHERE NOT deleted"))
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resources", type=int, default=1_000_000)
    args = parser.parse_args()
    admin = admin_url()
    dsn = with_database(admin, NAME)
    asyncio.run(recreate_database(admin, NAME, create=True))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(dsn.replace("postgresql://", "postgresql+asyncpg://", 1), base)
    env["CARECOORD_EXPORT_POLL_INTERVAL"] = "0.2"
    subprocess.run(carecoord_command("migrate"), env=env, check=True, capture_output=True)
    started = time.monotonic()
    asyncio.run(seed(dsn, args.resources))
    print(f"seeded {args.resources} Patients in {time.monotonic() - started:.1f}s", flush=True)
    logs = {name: open(f"/tmp/bench-export-{name}.log", "wb") for name in ("server", "worker")}  # noqa: SIM115
    server = subprocess.Popen(
        carecoord_command(
            "serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker", "--workers", "1"
        ),
        env=env,
        stdout=logs["server"],
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        carecoord_command("worker"), env=env, stdout=logs["worker"], stderr=subprocess.STDOUT
    )
    try:
        wait_healthy(base, server, __import__("pathlib").Path("/tmp/bench-export-server.log"), ready=True)
        # The export holds every live resource: the seeded Patients and what carecoord ships and
        # loads at its first start (the AHC HRSN screening Questionnaire, app/casework).
        expected = asyncio.run(live_resources(dsn))
        rss = PeakRss({"server": server, "worker": worker})
        with httpx.Client(base_url=base, timeout=60) as http:
            kicked = time.monotonic()
            response = http.get("/fhir/$export", headers={"prefer": "respond-async"})
            assert response.status_code == 202, response.text
            status_url = response.headers["content-location"]
            while True:
                status = http.get(status_url)
                if status.status_code == 200:
                    break
                assert status.status_code in (202, 429), status.text
                time.sleep(0.2)
            manifested = time.monotonic()
            manifest = status.json()
            downloaded = 0
            size = 0
            for entry in manifest["output"]:
                with http.stream("GET", entry["url"]) as stream:
                    for block in stream.iter_bytes():
                        size += len(block)
                        downloaded += block.count(b"\n")
            finished = time.monotonic()
        peaks = rss.close()
    except BaseException:
        print(tail(__import__("pathlib").Path("/tmp/bench-export-server.log")), file=sys.stderr)
        raise
    finally:
        stop_server(server)
        stop_server(worker)
        for log in logs.values():
            log.close()
        asyncio.run(recreate_database(admin, NAME, create=False))
    assert downloaded == expected, (downloaded, expected)
    export_rate = expected / (manifested - kicked)
    total_rate = expected / (finished - kicked)
    print(cpu_line())
    print(f"resources: {expected}, files: {len(manifest['output'])}, NDJSON bytes: {size}")
    print(f"export (kick-off to manifest): {manifested - kicked:.2f}s = {export_rate:,.0f} resources/s")
    print(
        f"export + download: {finished - kicked:.2f}s = {total_rate:,.0f} resources/s (goal >= {GOAL_RATE:,})"
    )
    for name, peak in peaks.items():
        print(f"peak RSS {name}: {peak:.0f} MB (goal < {GOAL_RSS_MB} MB)")
    print(json.dumps({"export_rate": round(export_rate), "total_rate": round(total_rate), "rss_mb": peaks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
