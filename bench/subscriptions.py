"""Subscription notification benchmark: commit-to-receiver latency, events delivered per second,
and what subscriptions cost the writes they watch.

Run from the repository root (about 6 minutes)::

    .venv/bin/python bench/subscriptions.py [--samples 100] [--burst 500] [--rounds 3]

What it does
------------
1. Creates a fresh database ``carecoord_bench_subs`` on the local PostgreSQL (admin connection
   from ``DATABASE_URL`` if set, else ``postgresql://postgres@127.0.0.1:5432/postgres``),
   migrates it and starts the real server (``carecoord serve``, one process, authorization and
   audit off as in the other benchmarks, its in-process worker on: the dispatcher and the job
   runner run beside the API, as by default). The receiver is a keep-alive HTTP/1.1 server on
   loopback in a thread of this process, answering 200 at once and noting when each request
   arrived.
2. Creates 1,000 subscriptions through the API (each handshaken by the server): all on the
   SDOH Task topic, ``id-only``, rest-hook to the receiver. Exactly one matches the
   benchmark's Tasks (filter ``Task?owner=Organization/match``); the others have filters that
   never match (``Task?owner=Organization/other-N``), so every write is judged against all
   active ones and makes one notification.
3. Scenarios: 0, 1 (the matching one), 100 and 1,000 active subscriptions. A scenario is set
   by making that many active and the rest ``off`` in the working state the dispatcher reads
   (one UPDATE of the ``subscription`` table: a benchmark shortcut). Each round runs every
   scenario once, in a rotating order; figures are medians over the rounds, percentiles over
   every sample. In each scenario, with the queue empty:

   * **write time**: ``--samples`` Task creates one at a time, one every 150 ms (each waits for
     its notification to arrive before the next write): the client's request time, the server
     process's CPU per write (API, dispatcher and delivery together, from /proc; less what the
     idle server spends in the same time, measured for 2 s just before; PostgreSQL's own CPU
     is not in it) and, with subscriptions, the commit-to-receiver latency: the receiver's
     clock at arrival minus the Task's ``meta.lastUpdated`` (one machine, one clock);
   * **burst**: ``--burst`` Task creates, 8 at a time, as fast as the server takes them:
     writes per second; then the time from the first write until the receiver has every event
     gives events delivered per second.
4. Prints every figure next to its goal: p95 < 250 ms with 1,000 subscriptions; the matching
   cost added to a write with 1,000 subscriptions (server CPU per write with 1,000 minus with
   1, which make the same one notification) <= 10% of that write's own cost (server CPU per
   write with none); write throughput with 100 subscriptions >= 0.8x with none.
5. Stops the server and drops the database, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import httpx

# bench/crud.py is importable because Python puts this script's directory on sys.path.
from crud import bench_database, cpu_line, cpu_snapshot, percentile

BENCH_DB = "carecoord_bench_subs"
TASK_TOPIC = "http://hl7.org/fhir/us/sdoh-clinicalcare/SubscriptionTopic/Task"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
JSON = {"content-type": "application/fhir+json"}
SCENARIOS = (0, 1, 100, 1000)
BURST_CONCURRENCY = 8
MATCH_PATH = "/match"
PERIOD = 0.15
"""Seconds from one sequential write to the next (the notification arrives in between)."""
IDLE_SECONDS = 2.0


class Receiver:
    """A loopback HTTP/1.1 receiver (keep-alive) in its own thread and event loop: answers
    every request 200 with no body and records, per Task id, when its first event arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.events = 0
        self.handshakes = 0
        self.lock = threading.Lock()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for each in pending:
            each.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                now = time.time()
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length)
                self._note(path, body, now)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the worker closed its connection, or the receiver is stopping
        finally:
            writer.close()

    def _note(self, path: str, body: bytes, now: float) -> None:
        bundle = json.loads(body)
        parameters = bundle["entry"][0]["resource"]["parameter"]
        kind = next(p["valueCode"] for p in parameters if p["name"] == "type")
        with self.lock:
            if kind == "handshake":
                self.handshakes += 1
                return
            if kind != "event-notification" or path != MATCH_PATH:
                return
            for parameter in parameters:
                if parameter["name"] != "notification-event":
                    continue
                focus = next(p for p in parameter["part"] if p["name"] == "focus")
                task_id = focus["valueReference"]["reference"].rsplit("/", 1)[1]
                self.events += 1
                self.arrived.setdefault(task_id, now)


def subscription(endpoint: str, owner: str) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "benchmark",
        "criteria": TASK_TOPIC,
        "_criteria": {
            "extension": [
                {"url": f"{BACKPORT}/backport-filter-criteria", "valueString": f"Task?owner={owner}"}
            ]
        },
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {
                "extension": [{"url": f"{BACKPORT}/backport-payload-content", "valueCode": "id-only"}]
            },
        },
    }


def task() -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "owner": {"reference": "Organization/match"},
        "requester": {"reference": "Organization/cm"},
        "description": "benchmark referral",
    }


def instant(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass
class Scenario:
    subscriptions: int
    write_ms: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    server_cpu_ms_per_write: float = 0.0
    """Server process CPU per write, net of what the idle server spends in the same time."""
    idle_server_cpu_ms_per_s: float = 0.0
    writes_per_s: float = 0.0
    events_per_s: float | None = None


async def wait_for(check: Any, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {limit:.0f} s")
        await asyncio.sleep(0.05)


async def add_subscriptions(
    http: httpx.AsyncClient, receiver: Receiver, count: int, *, matching: bool
) -> list[str]:
    """Create ``count`` subscriptions (8 requests at a time); returns their ids."""
    numbers = list(range(count))
    ids: list[str] = []

    async def create() -> None:
        while numbers:
            n = numbers.pop()
            body = (
                subscription(receiver.url(MATCH_PATH), "Organization/match")
                if matching
                else subscription(receiver.url(f"/other/{n}"), f"Organization/other-{n}")
            )
            response = await http.post("/fhir/Subscription", json=body)
            if response.status_code != 201:
                raise RuntimeError(f"POST Subscription: {response.status_code} {response.text[:300]}")
            ids.append(response.json()["id"])

    await asyncio.gather(*(create() for _ in range(8)))
    return ids


async def activate(conn: asyncpg.Connection, ids: Sequence[str]) -> None:
    """Make exactly ``ids`` active and every other subscription ``off``, in the working state the
    dispatcher reads (app/subscriptions/storage.py), not through the API: a benchmark shortcut,
    so that the scenarios can alternate without a thousand updates and handshakes each time."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE subscription SET status ="
            " CASE WHEN fhir_id = ANY($1::text[]) THEN 'active' ELSE 'off' END",
            list(ids),
        )
        # As the Subscription write hook does: the dispatcher reads the subscriptions again.
        await conn.execute("UPDATE subscription_generation SET generation = generation + 1")


async def quiet(conn: asyncpg.Connection, expected_active: int) -> None:
    """Until ``expected_active`` subscriptions are active, the dispatcher has read every change
    of the feed (app/events/changes.py: nothing left in or after its window), every event is
    delivered and no job waits. Only then may the active set change: a dispatch still under
    way could count an event for a subscription turned off under it, and nothing would
    deliver that event when it is turned on again."""

    async def settled() -> bool:
        row = await conn.fetchrow(
            """
            SELECT (SELECT count(*) FROM subscription WHERE status = 'active') AS active,
                   (SELECT count(*) FROM subscription
                       WHERE status = 'active' AND events_count > delivered_through) AS behind,
                   (SELECT count(*) FROM job WHERE kind = 'subscription'
                       AND split_part(key, ':', 1) IN ('notify', 'handshake')
                       AND state IN ('pending', 'leased')) AS jobs,
                   (SELECT count(*) FROM resource_change r, change_cursor c
                       WHERE c.consumer = 'subscriptions' AND r.txid >= c.lower
                       AND NOT (r.txid < c.upper AND r.seq <= c.after_seq)) AS unread
            """
        )
        if await conn.fetchval("SELECT count(*) FROM subscription WHERE status = 'error'"):
            raise RuntimeError("a subscription went to error")
        return bool(
            row["active"] == expected_active and not row["behind"] and not row["jobs"] and not row["unread"]
        )

    await wait_for(settled, f"{expected_active} active subscriptions and an empty queue", limit=120)


async def sequential_writes(
    http: httpx.AsyncClient, receiver: Receiver, scenario: Scenario, samples: int, server_pid: int
) -> None:
    # What the idle server spends (the dispatcher looks at the feed every 50 ms, the runner
    # every second): subtracted from the writes' CPU, which is taken over the same paced time.
    idle_before = cpu_snapshot(server_pid)
    await asyncio.sleep(IDLE_SECONDS)
    idle_after = cpu_snapshot(server_pid)
    idle_server = (idle_after.server - idle_before.server) / (idle_after.wall - idle_before.wall)
    scenario.idle_server_cpu_ms_per_s = idle_server * 1000
    before = cpu_snapshot(server_pid)
    for _ in range(samples):
        started = time.perf_counter()
        response = await http.post("/fhir/Task", json=task())
        scenario.write_ms.append((time.perf_counter() - started) * 1000)
        if response.status_code != 201:
            raise RuntimeError(f"POST Task: {response.status_code} {response.text[:300]}")
        created = response.json()
        if scenario.subscriptions:
            task_id = created["id"]
            deadline = time.monotonic() + 30
            while True:
                with receiver.lock:
                    arrived = receiver.arrived.get(task_id)
                if arrived is not None:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("a notification did not arrive within 30 s")
                await asyncio.sleep(0.002)
            scenario.latency_ms.append((arrived - instant(created["meta"]["lastUpdated"])) * 1000)
        # One write per PERIOD in every scenario, so that the idle work in between is alike.
        await asyncio.sleep(max(PERIOD - (time.perf_counter() - started), 0))
    after = cpu_snapshot(server_pid)
    wall = after.wall - before.wall
    scenario.server_cpu_ms_per_write = (after.server - before.server - idle_server * wall) * 1000 / samples


async def burst(http: httpx.AsyncClient, receiver: Receiver, scenario: Scenario, count: int) -> None:
    remaining = [count]
    written: list[str] = []

    async def write() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            response = await http.post("/fhir/Task", json=task())
            if response.status_code != 201:
                raise RuntimeError(f"POST Task: {response.status_code} {response.text[:300]}")
            written.append(response.json()["id"])

    started = time.perf_counter()
    await asyncio.gather(*(write() for _ in range(BURST_CONCURRENCY)))
    scenario.writes_per_s = count / (time.perf_counter() - started)
    if not scenario.subscriptions:
        return

    async def all_arrived() -> bool:
        with receiver.lock:
            return all(task_id in receiver.arrived for task_id in written)

    await wait_for(all_arrived, f"{count} events at the receiver", limit=600)
    scenario.events_per_s = count / (time.perf_counter() - started)


def pct(values: Sequence[float], fraction: float) -> float:
    return percentile(sorted(values), fraction)


def line(scenario: Scenario) -> str:
    text = (
        f"subscriptions={scenario.subscriptions:<5}"
        f" write (c=1) p50 {statistics.median(scenario.write_ms):5.1f} ms"
        f" p95 {pct(scenario.write_ms, 0.95):5.1f} ms"
        f" | server CPU/write {scenario.server_cpu_ms_per_write:5.2f} ms"
        f" (idle {scenario.idle_server_cpu_ms_per_s:.0f} ms/s subtracted)"
        f" | burst {scenario.writes_per_s:6.1f} writes/s"
    )
    if scenario.latency_ms:
        lat = scenario.latency_ms
        text += (
            f" | commit->receiver p50 {statistics.median(lat):5.1f} ms p95 {pct(lat, 0.95):5.1f} ms"
            f" p99 {pct(lat, 0.99):5.1f} ms"
        )
    if scenario.events_per_s is not None:
        text += f" | delivered {scenario.events_per_s:6.1f} events/s"
    return text


def summary(results: Mapping[int, Scenario]) -> list[str]:
    none, one, hundred, thousand = (results[n] for n in SCENARIOS)
    p95 = pct(thousand.latency_ms, 0.95)
    matching = thousand.server_cpu_ms_per_write - one.server_cpu_ms_per_write
    share = matching / none.server_cpu_ms_per_write
    ratio = hundred.writes_per_s / none.writes_per_s
    slower = statistics.median(thousand.write_ms) / statistics.median(none.write_ms)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    return [
        f"commit->receiver with 1,000 subscriptions: p50 {statistics.median(thousand.latency_ms):.1f} ms,"
        f" p95 {p95:.1f} ms, p99 {pct(thousand.latency_ms, 0.99):.1f} ms"
        f" (goal p95 < 250 ms: {verdict(p95 < 250)})",
        f"matching cost with 1,000 subscriptions: {matching:.2f} ms server CPU per write (1,000 minus 1"
        f" subscription) = {share:.0%} of a write's own {none.server_cpu_ms_per_write:.2f} ms"
        f" (goal <= 10%: {verdict(share <= 0.10)})",
        f"write throughput with 100 subscriptions: {hundred.writes_per_s:.1f}/s vs {none.writes_per_s:.1f}/s"
        f" with none = {ratio:.2f}x (goal >= 0.8x: {verdict(ratio >= 0.8)})",
        "write time (c=1, p50) with 1,000 subscriptions vs none:"
        f" {statistics.median(thousand.write_ms):.1f} ms vs {statistics.median(none.write_ms):.1f} ms"
        f" = {slower:.2f}x",
        "events delivered per second (burst, one matching subscription):"
        + "".join(f" {n} subs {results[n].events_per_s:.1f}/s;" for n in SCENARIOS[1:]),
    ]


async def run(
    base_url: str, dsn: str, server_pid: int, samples: int, burst_size: int, rounds: int
) -> dict[int, list[Scenario]]:
    receiver = Receiver()
    receiver.start()
    conn = await asyncpg.connect(dsn)
    results: dict[int, list[Scenario]] = {count: [] for count in SCENARIOS}
    try:
        async with httpx.AsyncClient(base_url=base_url, headers=JSON, timeout=120) as http:
            # Every subscription is created (and handshaken) once, through the API.
            matching = await add_subscriptions(http, receiver, 1, matching=True)
            others = await add_subscriptions(http, receiver, max(SCENARIOS) - 1, matching=False)
            await quiet(conn, max(SCENARIOS))
            # Warm the server up (imports, caches, pool) before anything is measured.
            for _ in range(50):
                (await http.post("/fhir/Task", json=task())).raise_for_status()
            await quiet(conn, max(SCENARIOS))
            for round_number in range(rounds):
                # Each round in another order, so that drift in the machine's load hits all alike.
                order = (
                    SCENARIOS[round_number % len(SCENARIOS) :] + SCENARIOS[: round_number % len(SCENARIOS)]
                )
                for count in order:
                    active = (matching + others[: count - 1]) if count else []
                    await activate(conn, active)
                    await quiet(conn, count)
                    scenario = Scenario(count)
                    await sequential_writes(http, receiver, scenario, samples, server_pid)
                    await quiet(conn, count)
                    await burst(http, receiver, scenario, burst_size)
                    await quiet(conn, count)
                    results[count].append(scenario)
                    print(f"round {round_number + 1}: {line(scenario)}", flush=True)
    finally:
        await conn.close()
        receiver.stop()
    return results


def merged(runs: Sequence[Scenario]) -> Scenario:
    """The rounds of one scenario together: samples pooled, per-round figures by their median."""
    events = [r.events_per_s for r in runs if r.events_per_s is not None]
    return Scenario(
        runs[0].subscriptions,
        write_ms=[v for r in runs for v in r.write_ms],
        latency_ms=[v for r in runs for v in r.latency_ms],
        server_cpu_ms_per_write=statistics.median(r.server_cpu_ms_per_write for r in runs),
        idle_server_cpu_ms_per_s=statistics.median(r.idle_server_cpu_ms_per_s for r in runs),
        writes_per_s=statistics.median(r.writes_per_s for r in runs),
        events_per_s=statistics.median(events) if events else None,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100, help="sequential writes per scenario")
    parser.add_argument("--burst", type=int, default=500, help="writes of each burst")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each scenario once per round")
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    started = time.monotonic()
    with bench_database(BENCH_DB, "carecoord-bench-subs.log") as bench:
        bench.env.update(
            {
                "CARECOORD_LOG_LEVEL": "warning",
                "CARECOORD_OUTBOUND_ALLOWLIST": "127.0.0.0/8",
                "CARECOORD_DATA_DIR": tempfile.mkdtemp(prefix="carecoord-bench-subs-"),
            }
        )
        print(f"PostgreSQL: {bench.pg_version}", flush=True)
        bench.migrate()
        server = bench.serve(ready=True)
        runs = asyncio.run(run(bench.base_url, bench.dsn, server.pid, args.samples, args.burst, args.rounds))
    results = {count: merged(each) for count, each in runs.items()}
    print()
    print(f"medians of {args.rounds} rounds (latency and write-time percentiles over every sample):")
    for count in SCENARIOS:
        print(line(results[count]))
    print()
    print(
        f"bench/subscriptions.py --samples {args.samples} --burst {args.burst} --rounds {args.rounds}"
        f" ({time.monotonic() - started:.0f} s)"
    )
    for text in summary(results):
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
