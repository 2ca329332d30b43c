"""``carecoord serve --workers 2`` as a real process tree on a loopback port (issue 14): the
failed-request limit of /auth/token is one limit for both processes (PostgreSQL, app/auth/
ratelimit.py), one /metrics scrape sums what both processes counted (prometheus_client's
multiprocess mode, app/metrics.py), and SIGTERM stops every process (a killed supervisor's
workers stop too).

Which process answered a request is read from the server's log: every process writes JSON lines
with its pid, and each request's line carries the ``X-Request-ID`` the test sent. Requests are
pinned to a process by keeping one keep-alive connection to each (found by opening connections
until both processes have answered one).
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.cli import _fresh_metrics_dir
from tests.server_support import RunningServer, running_server

LIMIT = 4
"""CARECOORD_AUTH_FAILURE_LIMIT of the servers here; the window (an hour) outlasts the test."""

ENV = {
    "CARECOORD_LOG_LEVEL": "info",
    "CARECOORD_LOG_FORMAT": "json",
    "CARECOORD_AUTH_FAILURE_LIMIT": str(LIMIT),
    "CARECOORD_AUTH_FAILURE_WINDOW": "3600",
}


class ServerLog:
    """The JSON lines of a running server's log, read as they are written."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.entries: list[dict[str, Any]] = []
        self._offset = 0

    def _read(self) -> None:
        with self.server.log_path.open("rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                self.entries.append(entry)

    def wait_for(
        self, found: Callable[[list[dict[str, Any]]], Any], what: str, timeout: float = 90
    ) -> Any:
        """Read the log until ``found(entries)`` is truthy; its value. (The line of a request is
        written when its response has been sent: a moment after the client has it.)"""
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            value = found(self.entries)
            if value:
                return value
            assert self.server.process.poll() is None, self.server.log()[-3000:]
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.05)

    def answered_by(self, request_id: str) -> int:
        """The pid of the process that answered the request with this id."""

        def line(entries: list[dict[str, Any]]) -> int | None:
            for entry in entries:
                if entry.get("logger") == "carecoord.access" and entry.get("request_id") == request_id:
                    return int(entry["process"])
            return None

        pid: int = self.wait_for(line, f"the log line of request {request_id}")
        return pid

    def workers_started(self, count: int) -> set[int]:
        """The pids of ``count`` worker processes, once each has finished starting its app."""

        def started(entries: list[dict[str, Any]]) -> set[int] | None:
            pids = {e["process"] for e in entries if e.get("message") == "Application startup complete."}
            return pids if len(pids) >= count else None

        pids: set[int] = self.wait_for(started, f"{count} worker processes to start")
        return pids


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _metrics_dirs(serve_pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"carecoord-metrics-{serve_pid}-*"))


class Serving:
    def __init__(self, server: RunningServer, log: ServerLog, clients: dict[int, httpx.Client]) -> None:
        self.server = server
        self.log = log
        self.clients = clients
        self._ids = 0

    def request_id(self, what: str) -> str:
        self._ids += 1
        return f"{what}-{self._ids}"


def _pin_connections(server: RunningServer, log: ServerLog, pids: set[int]) -> dict[int, httpx.Client]:
    """One keep-alive connection to each worker process (a client of one connection each)."""
    clients: dict[int, httpx.Client] = {}
    for attempt in range(300):
        client = httpx.Client(
            base_url=server.base,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=60,
        )
        request_id = f"pin-{attempt}"
        assert client.get("/healthz", headers={"x-request-id": request_id}).status_code == 200
        pid = log.answered_by(request_id)
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
        if set(clients) == pids:
            return clients
    pytest.fail(f"new connections never reached every worker: {sorted(clients)} of {sorted(pids)}")


@pytest.fixture(scope="module")
def serving(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    tmp_path = tmp_path_factory.mktemp("workers")
    with running_server(database_url, tmp_path, "--workers", "2", env=ENV) as server:
        log = ServerLog(server)
        pids = log.workers_started(2)
        assert server.process.pid not in pids  # the supervisor serves nothing itself
        clients = _pin_connections(server, log, pids)
        try:
            yield Serving(server, log, clients)
        finally:
            for client in clients.values():
                client.close()


def _bad_token_request(serving: Serving, client: httpx.Client, address: str) -> tuple[httpx.Response, str]:
    """A token request with credentials of no client, from ``address`` (uvicorn takes the client
    address from X-Forwarded-For on a connection from 127.0.0.1, a trusted proxy)."""
    request_id = serving.request_id("guess")
    response = client.post(
        "/auth/token",
        data={"grant_type": "client_credentials"},
        auth=("no-such-client", "guess"),
        headers={"x-forwarded-for": address, "x-request-id": request_id},
    )
    return response, request_id


def test_two_processes_share_one_failure_limit(serving: Serving) -> None:
    """RFC 6819 §5.1.4.2.3: after LIMIT failed token requests from one address, the next is 429,
    although the failures were answered by two processes, neither of which saw LIMIT of them."""
    first, second = serving.clients.values()
    for round_number in range(3):
        address = f"192.0.2.{round_number + 1}"
        # Alternate between the processes: each answers half of the failures.
        answers = [_bad_token_request(serving, (first, second)[n % 2], address) for n in range(LIMIT + 2)]
        statuses = [response.status_code for response, _ in answers]
        assert statuses == [401] * LIMIT + [429] * 2, statuses
        for response, _ in answers[LIMIT:]:
            assert response.json()["error"] == "slow_down"
            assert 1 <= int(response.headers["retry-after"]) <= 3600
        failures_by_process = Counter(serving.log.answered_by(rid) for _, rid in answers[:LIMIT])
        # Both processes answered failures, each fewer than the limit: a limit per process would
        # not have refused the next request.
        assert set(failures_by_process) == set(serving.clients), failures_by_process
        assert max(failures_by_process.values()) < LIMIT, failures_by_process
        refused_by = {serving.log.answered_by(request_id) for _, request_id in answers[LIMIT:]}
        assert refused_by == set(serving.clients)  # both processes refuse: one shared count

    # Over a new connection per request (whichever process accepts it), the same: exactly LIMIT.
    answered_by: set[int] = set()
    for round_number in range(3):
        address = f"192.0.2.{round_number + 11}"
        statuses = []
        for _ in range(LIMIT + 1):
            with httpx.Client(base_url=serving.server.base, timeout=60) as fresh:
                response, request_id = _bad_token_request(serving, fresh, address)
            statuses.append(response.status_code)
            answered_by.add(serving.log.answered_by(request_id))
        assert statuses == [401] * LIMIT + [429], statuses
    assert answered_by <= set(serving.clients)


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    """The value of one sample of a scrape (0 when absent: a counter not incremented yet)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_one_scrape_sums_the_counts_of_both_processes(serving: Serving) -> None:
    """carecoord_http_requests_total counts requests in the process that answered them; any
    process's /metrics reports the sum over both (and the gauges of every metrics module)."""
    name, labels = "carecoord_http_requests_total", {"method": "PATCH", "status": "405"}
    first_pid = next(iter(serving.clients))
    before = _sample(serving.clients[first_pid].get("/metrics").text, name, labels)
    sent = dict(zip(serving.clients, (3, 5), strict=True))
    for pid, count in sent.items():
        for _ in range(count):
            request_id = serving.request_id("patch")
            response = serving.clients[pid].patch("/healthz", headers={"x-request-id": request_id})
            assert response.status_code == 405
            assert serving.log.answered_by(request_id) == pid  # counted in that process
    total = before + sum(sent.values())
    for _ in range(3):
        for pid, client in serving.clients.items():
            request_id = serving.request_id("scrape")
            scrape = client.get("/metrics", headers={"x-request-id": request_id})
            assert scrape.status_code == 200
            assert serving.log.answered_by(request_id) == pid
            # Each process alone counted 3 or 5 of them: the scrape has all 8, whoever answers.
            assert _sample(scrape.text, name, labels) == total, scrape.text
            for gauge in (
                "carecoord_referral_queue_depth",
                "carecoord_subscription_retry_queue",
                "carecoord_exports",
                "carecoord_audit_buffered",
            ):
                assert f"# TYPE {gauge} gauge" in scrape.text, gauge


def test_sigterm_stops_every_process_and_a_killed_supervisor_takes_its_workers(
    database_url: str, tmp_path: Path
) -> None:
    """SIGTERM: serve stops its workers, removes its metrics directory and exits with 128 +
    SIGTERM, leaving no process. SIGKILL (no cleanup possible in serve): the kernel stops the
    workers (PR_SET_PDEATHSIG, app/cli.py worker_app), which would otherwise go on serving."""
    (tmp_path / "term").mkdir()
    (tmp_path / "kill").mkdir()
    with running_server(database_url, tmp_path / "term", "--workers", "2", env=ENV) as server:
        workers = ServerLog(server).workers_started(2)
        assert len(_metrics_dirs(server.process.pid)) == 1
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 128 + signal.SIGTERM, server.log()[-3000:]
    assert not [pid for pid in workers if _alive(pid)]
    assert _metrics_dirs(server.process.pid) == []

    with running_server(database_url, tmp_path / "kill", "--workers", "2", env=ENV) as server:
        workers = ServerLog(server).workers_started(2)
        server.process.kill()
        server.process.wait(timeout=60)
        deadline = time.monotonic() + 60
        while [pid for pid in workers if _alive(pid)]:
            assert time.monotonic() < deadline, f"workers left running: {workers}"
            time.sleep(0.1)
    # The killed serve could not remove its metrics directory: the next serve does.
    assert len(_metrics_dirs(server.process.pid)) == 1
    fresh = _fresh_metrics_dir()
    try:
        assert _metrics_dirs(server.process.pid) == []
        assert fresh.is_dir() and fresh.stat().st_mode & 0o777 == 0o700
    finally:
        fresh.rmdir()
