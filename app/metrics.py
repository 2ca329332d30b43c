"""The Prometheus exposition of /metrics, in one process or aggregated over ``serve --workers``;
and the HTTP request counter.

**Several processes.** ``carecoord serve --workers N`` (N > 1) gives its worker processes a
private directory in ``PROMETHEUS_MULTIPROC_DIR`` (app/cli.py) before they import
prometheus_client, which then keeps every metric value in a memory-mapped file per process
there (prometheus_client's multiprocess mode). /metrics, answered by whichever process the
connection reached, reads every process's files (:class:`MultiProcessCollector`): counters and
histograms are summed over the processes, those that have exited included (a counter never goes
back); each gauge says how its values combine (``multiprocess_mode``, chosen where it is
defined). With one process the metrics are plain in-memory values and /metrics renders the
registry as is.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.referrals.metrics import REGISTRY

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus_client's multiprocess mode keeps the processes' files (read at its import)."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods counted by name; any other (a client may send anything) is counted as ``other``, so
that a client cannot grow the label set (and with it the files of every process)."""

HTTP_REQUESTS = Counter(
    "carecoord_http_requests",
    "HTTP requests answered, per method and status (no path: ids would make a label per resource)",
    ["method", "status"],
    registry=REGISTRY,
)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_DIR_ENV) or None


def exposition() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every process's values when serving
    with several (the gauges read at scrape time were set by this process just before)."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


class RequestMetricsMiddleware:
    """Counts each HTTP request when it ends, by method and status (``none``: no response was
    started, the client went away first). Websockets are not HTTP requests here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = "none"

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(method if method in METHODS else "other", status).inc()
