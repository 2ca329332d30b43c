"""Prometheus metrics of the audit buffer (issue 14), on the registry /metrics exposes
(app/referrals/metrics.py).

Each process has its own buffer, so with several processes (app/metrics.py) the gauges are
``livesum``: the events buffered and the requests waiting in all running processes together (an
exited process's last values are dropped, app/cli.py marks it dead)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from app.referrals.metrics import REGISTRY

BUFFERED = Gauge(
    "carecoord_audit_buffered",
    "AuditEvents buffered or being written (reads, refusals)",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
WAITING = Gauge(
    "carecoord_audit_requests_waiting",
    "Requests held back because the audit buffer is full (back-pressure)",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
WRITTEN = Counter(
    "carecoord_audit_events_written", "Buffered AuditEvents written to the audit store", registry=REGISTRY
)
DROPPED = Counter(
    "carecoord_audit_events_dropped",
    "AuditEvents lost: recorded past twice the buffer bound, or unwritable at shutdown",
    registry=REGISTRY,
)
FLUSH_FAILURES = Counter(
    "carecoord_audit_flush_failures", "Failed COPYs of the audit buffer (retried)", registry=REGISTRY
)
